"""The offloading runtime: eviction policies, the slot cache, the background loader, gating, the
swapped-in MoE block, the engine that assembles them around transformers' model, and generation."""
