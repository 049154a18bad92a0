"""adapmoe: run Mixture-of-Experts language models with experts offloaded to disk (AdapMoE method)."""

__version__ = "0.1.0"
