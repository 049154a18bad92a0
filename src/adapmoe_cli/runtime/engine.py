"""The engine: builds transformers' model for a store's config with no expert weights (meta device),
loads the dense weights, puts `OffloadedExperts` in place of every MoE block's experts module (the
family's block, router and shared experts stay transformers'), and owns the cache, loader and statistics
behind them. It is given its `Budget` (budget.py) and gate; it decides neither.
Generation lives in `generate.py`; the engine knows nothing of text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adapmoe_cli.budget import Budget, check_fits
from adapmoe_cli.errors import StoreError, UsageError
from adapmoe_cli.experts_format import by_part
from adapmoe_cli.families import is_weight
from adapmoe_cli.profiling.routing_model import eviction_for
from adapmoe_cli.runtime.attention import use_packed_attention
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.compiled import DecodeStep
from adapmoe_cli.runtime.expert_kernel import ExpertKernel, StackedExperts
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.loader import Loader
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.moe_block import Observers, OffloadedExperts, gated_activation
from adapmoe_cli.runtime.prefetch import PrefetchAdmission
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.settings import Settings, replace
from adapmoe_cli.skeleton import config_errors, describe, empty_model
from adapmoe_cli.store import Store
from adapmoe_cli.store.reader import ExpertReader, expert_views


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cpu")
    if name == "cuda":
        raise UsageError(
            "the CUDA path is not in this build yet (it has not been verified on a GPU); use --device cpu"
        )
    return torch.device(name)


class Engine:
    """A ready-to-run offloaded model. Use as a context manager or call `close()`."""

    def __init__(self, store: Store, settings: Settings, budget: Budget, verify: bool = True,
                 gate: GatePolicy | None = None, fallback: Store | None = None,
                 note: Callable[[str], None] | None = None):
        """`fallback`: a low-bit store of the same model (`variant_store`) whose every expert is held in memory
        and computes a missed expert while the full one loads (manager.py). `note` hears what the user should
        know (a compile that failed)."""
        from adapmoe_cli.store.verify import ensure_files

        self.store = store
        self.settings = settings
        self.device = resolve_device(settings.device)
        if verify:
            ensure_files(store)  # sizes now; bytes are checked as they are read (store/verify.py)
        assert budget.slot_bytes == store.slot_bytes, "a budget made for another store"
        self.budget = budget
        check_fits(budget, store.dense_bytes)
        self.stats = Stats()
        self.gate = gate or GatePolicy.off()
        self.observers = Observers()
        layout = next(iter(store.experts.values()))
        store.experts_format.check_runtime()
        self.eviction, routing = eviction_for(store, settings.cache.policy)  # `auto` resolved
        fused = not store.experts_format.quantized  # w1 and w3 as one view (store/reader.py)
        self.cache = ExpertCache(
            self.budget.quotas, store.slot_bytes, policy=self.eviction,
            make_views=lambda buf: by_part(expert_views(buf, layout, fused=fused)), routing=routing,
            experts=store.shape.num_experts,
        )
        self._reader = ExpertReader(store)  # the loader thread reads with it; direct_io() looks at it between reads
        self.manager = ExpertManager(self.cache, Loader(self._reader), self.stats,
                                     PrefetchAdmission(settings.prefetch_precision))
        self._fallback_buffers: list[Any] = []
        self.fallback_bytes = 0  # memory the fallback copy holds
        if fallback is not None:
            self.manager.fallback = self._hold_fallback(fallback)
        self._blocks: list[OffloadedExperts] = []
        self._graph_counts = torch.zeros(2, dtype=torch.long)  # [layer calls, experts] the graph computed
        self._graph_layers: frozenset[int] = frozenset()  # layers whose experts the compiled step computes
        self.model = self._build_model(note)
        #: one forward of fed tokens, compiled for single tokens with `settings.compile` (compiled.py); the
        #: manager's observers see every layer call, so observed steps run eagerly
        self.decode = DecodeStep(self.model, settings.compile, note,
                                 watched=lambda: bool(self.observers.callbacks or self.manager.on_layer),
                                 after=self._count_graph, simpler=self._manager_only)

    def _hold_fallback(self, fallback: Store) -> Any:
        """Every expert of `fallback` read (and checked) into memory; (layer, expert) → its weights, each part
        a function of the input (the store's format computes it)."""
        from adapmoe_cli.store.reader import aligned_buffer

        if fallback.family.model_type != self.store.family.model_type or fallback.shape != self.store.shape:
            raise UsageError(f"the fallback store {fallback.path} holds another model than {self.store.path}")
        fallback.experts_format.check_runtime()
        fmt, activations = fallback.experts_format, self.settings.quantized_activations
        weights: dict[tuple[int, int], dict[str, Any]] = {}
        with ExpertReader(fallback) as reader:
            for (layer, expert), entry in fallback.experts.items():
                buf = aligned_buffer(fallback.slot_bytes)
                reader.read_into(layer, expert, buf)
                self._fallback_buffers.append(buf)
                weights[(layer, expert)] = {
                    part: (lambda x, t=t: fmt.linear(x, t, activations)) if is_weight(part) else t
                    for part, t in by_part(expert_views(buf, entry)).items()}
        self.fallback_bytes = len(weights) * fallback.slot_bytes
        return lambda layer, expert: weights[(layer, expert)]

    def _build_model(self, note: Callable[[str], None] | None) -> Any:
        store, fam = self.store, self.store.family
        try:
            model = empty_model(fam, store.config, dtype=store.dtype)
        except config_errors() as e:
            raise StoreError(f"{store.path}: its config cannot build a {fam.model_type} model ({describe(e)})"
                             ) from None
        dense = {fam.hub_to_model_key(k): v for k, v in store.load_dense().items()}
        if store.config.get("tie_word_embeddings") and "lm_head.weight" not in dense:
            dense["lm_head.weight"] = dense.get("model.embed_tokens.weight")
        params = dict(model.state_dict())
        for k, v in dense.items():
            want = params.get(k)
            if want is None or v is None or tuple(v.shape) != tuple(want.shape) or v.dtype != want.dtype:
                raise StoreError(f"{store.path}: dense weights do not fit the config (e.g. {k}); re-run "
                                 "`adapmoe shard --force`")
        result = model.load_state_dict(dense, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not fam.is_expert_param(k)]
        if missing or result.unexpected_keys:
            bad = (missing or result.unexpected_keys)[0]
            raise StoreError(f"{store.path}: dense weights do not fit the config (e.g. {bad})")
        _materialise_buffers(model)
        use_packed_attention(model)  # a decoded token's grouped-query heads in one pass per key/value head
        shape = store.shape
        layers = list(shape.moe_layers)
        fmt, activations = store.experts_format, self.settings.quantized_activations

        def linear(x: torch.Tensor, w: Any) -> torch.Tensor:
            # a part's tensors, or (the fallback copy's) a function computing with them in their own format
            return w(x) if callable(w) else fmt.linear(x, w, activations)

        sparse = tuple(i for i in range(shape.num_layers) if hasattr(fam.moe_block(model, i), "experts"))
        if sparse != shape.moe_layers:
            raise StoreError(f"{store.path}: transformers builds MoE layers {list(sparse)} from this config, "
                             f"the {fam.model_type} family expects {list(shape.moe_layers)}")
        renormalises = fam.router_renormalises(store.config)
        kernel = None
        if self.settings.compile and not fmt.quantized:  # the compiled step's experts (expert_kernel.py);
            # the family's activation is the config's, the same in every layer
            kernel = ExpertKernel(gated_activation(fam.activation, fam.experts(model, layers[0])), fam.biases, note)
        for i, layer in enumerate(layers):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            experts = OffloadedExperts(
                layer, self.manager, glu=gated_activation(fam.activation, fam.experts(model, layer)),
                gate_policy=lambda: self.gate, biases=fam.biases,
                observers=self.observers, renormalises=renormalises, ordered=fam.ordered, next_layer=nxt,
                next_router=fam.router(model, nxt) if nxt is not None else None, prefetch=self.settings.prefetch,
                linear=linear, kernel=kernel,
            )
            fam.set_experts(model, layer, experts)
            self._blocks.append(experts)
        if kernel is not None and self.device.type == "cpu":
            self._in_graph(fam.biases)
        for p in model.parameters():
            p.requires_grad_(False)  # inference engine; the profiler asks for activation gradients only
        leftover = [n for n, p in model.named_parameters() if p.is_meta]
        assert not leftover, f"parameters left on the meta device: {leftover[:3]}"
        return model.eval().to(self.device)

    def _in_graph(self, biases: bool) -> None:
        """Where a compiled step can compute a layer's experts inside its graph (moe_block._from_slots).
        Settled, with no call out of the graph: a layer with a slot for every expert whose next layer, where
        it prefetches, has one for every expert too (the manager would neither load nor prefetch there: its
        books are only hits). Those layers' — and their next layers' — experts are all read now, before the
        first token (each would be read on its first use anyway), so the graph is the same from the first
        step to the last: one compile, which the compiler caches on disk. Where experts are small
        (`GRAPH_EXPERT_BYTES`), a settled layer's calls the gate may drop experts from are computed in the
        graph too (each of the k, a dropped one zeroed), and so are the ungated calls of the other layers,
        whose experts are all in memory once the manager has made its call (`OffloadedExperts
        .resolve_in_graph`), from the slots the manager names. Larger experts leave the graph for both: there
        a dropped expert's product costs more than the call out of the graph, and the manager computes what
        is in memory while the rest loads."""
        shape = self.store.shape
        small = self.store.slot_bytes <= GRAPH_EXPERT_BYTES
        whole = {layer for layer, q in self.budget.quotas.items()
                 if q >= shape.num_experts and self.cache.policies[layer].retains}  # (not `naive`: it reloads)
        parts = {b.layer: self.cache.stacked(b.layer) for b in self._blocks
                 if b.layer in whole and (not b.prefetch_enabled or b.next_layer in whole)}
        chosen = [b for b in self._blocks if parts.get(b.layer) is not None]
        for layer in sorted({b.layer for b in chosen} | {b.next_layer for b in chosen if b.prefetch_enabled}):
            self.manager.preload(layer, range(shape.num_experts))
        for block in chosen:
            settled = self.cache.settle(block.layer)
            assert settled, f"layer {block.layer} holds every expert, read"
            block.compute_in_graph(StackedExperts(block.glu, biases, parts[block.layer], self.cache.place[block.layer]),
                                   self._graph_counts, gated=small)
        self._graph_layers = frozenset(b.layer for b in chosen)
        for block in self._blocks:
            if not small or block.layer in self._graph_layers or self.manager.fallback is not None:
                continue  # (a fallback computes a miss while it loads: its slot is not in memory yet)
            if self.budget.quotas[block.layer] >= shape.top_k and self.cache.policies[block.layer].retains:
                stacked = self.cache.stacked(block.layer)
                if stacked is not None:
                    block.resolve_in_graph(StackedExperts(block.glu, biases, stacked, self.cache.place[block.layer]))

    def _count_graph(self) -> None:
        """Hand what a compiled step counted in its graph to the manager's Stats (one read a step, none where
        no layer computes in the graph)."""
        if not self._graph_layers:
            return
        # nothing takes a slot from a layer holding every expert: it stays settled, its graph stays right
        assert self._graph_layers <= self.cache.settled_layers, "a layer computed in the graph lost an expert"
        calls, experts = self._graph_counts.tolist()
        if calls:
            self._graph_counts.zero_()
            st = self.stats
            st.layer_tokens += calls
            st.expert_activations += experts
            st.expert_uses += experts
            st.hits += experts

    def _manager_only(self) -> bool:
        """After a failed compile: every layer's experts through the manager (True if that changes anything)."""
        changed = any(block.stacked is not None for block in self._blocks)
        for block in self._blocks:
            block.compute_in_graph(None)
        self._graph_layers = frozenset()
        return changed

    def use_gate(self, gate: GatePolicy) -> None:
        """Route with another adaptive gate from the next forward on (experiments sweep thresholds)."""
        self.gate = gate
        self.decode.state_changed()

    def use_prefetch(self, on: bool) -> None:
        """Prefetch the next layer's predicted experts (or not) from the next forward on."""
        self.settings = replace(self.settings, prefetch=on)
        for layer in self.store.shape.moe_layers:
            experts = self.store.family.experts(self.model, layer)
            experts.prefetch_enabled = on and experts.next_layer is not None
            if experts.prefetch_enabled and layer in self._graph_layers and \
                    not self.cache.holds_all(experts.next_layer):  # it has something to prefetch now
                experts.compute_in_graph(None)
                self._graph_layers -= {layer}
        self.decode.state_changed()

    def direct_io(self) -> bool:
        """Whether this engine's expert reads bypass the page cache (O_DIRECT on its reader's own file
        descriptors). Waits for reads in flight first; the bench reports it after each run."""
        self.manager.drain()
        return self._reader.direct_io_works()

    def close(self) -> None:
        self.decode.close()
        self.manager.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: experts up to this size are computed in the compiled step's graph in a settled layer where the gate may
#: drop some, and in layers the manager still loads into (`Engine._in_graph`). A call out of the graph costs
#: ~30–60 µs more than the graph computing its experts (docs/performance.md); a dropped expert's product,
#: computed anyway, costs about its bytes at ~20 GB/s (50 µs a MiB), and a third of the k is dropped at the
#: shipped gates: 1 MiB is below where the two meet (the embedded model's experts are 0.56 MiB, a full-size
#: store's 16 MiB or more)
GRAPH_EXPERT_BYTES = 1 << 20


def _materialise_buffers(model: Any) -> None:
    """Non-persistent buffers (rotary `inv_freq`) were created on meta: rebuild those modules for real."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            config = getattr(module, "config", None) or model.config
            new = type(module)(config=config)
            setattr(parent, attr, new)
