"""A compiled decode step (`--compile`): transformers' model, one token at a time, through `torch.compile`
(inductor), the way gpt-fast does it — the dense parts (norms, attention with its rotary embedding and KV
cache — written in place, runtime/kv_cache.py —, routers, the adaptive gate, the next layer's prediction,
residuals, lm head) become a few fused kernels, and each MoE layer's experts are one opaque call into the
manager (`moe_block.offloaded_experts`), which loads, waits and counts as in the eager path — or, where the
engine chose so (`Engine._in_graph`), computed in the graph from the cache's slots, after the manager's call
(`moe_block.resolve_experts`) or, in a layer holding every expert, with none. Each `nn.Linear`'s one-row
product (attention's projections, shared experts, the lm head) is written as a multiply and a sum
(`_row_linear_forward`). Prompts (several tokens) run eagerly.

Compiling costs tens of seconds on the first call in a machine's life (inductor caches its kernels on disk:
a later process takes a few seconds), and whenever the graph's guards change (another gate, prefetch
toggled). When compilation is unavailable or fails (no C++ compiler, an unsupported family), the step says
why once and runs eagerly from then on; the KV cache is cut back to where it was, so nothing is lost. A
missing compiler is found before the model is traced; a compile that fails after tracing is tried once
more with a simpler model (`simpler`).

Between the tokens of one generation the step skips most of dynamo's guards (`skip_guard_eval_unsafe`):
once a step on a KV cache has checked every guard and compiled nothing, the next steps on that cache check
only the guards on the input tensors, the symbolic sizes (the KV cache's length) and what told apart the
graphs compiled so far (another engine's, another gate's). The Python values a graph is specialised on —
module attributes, the family's config — do not change between steps (the fully checked step that
compiled nothing shows it); the gate's thresholds and prefetch change only through the engine, which says so
(`state_changed`: the next step checks every guard). A step the remaining guards refuse runs guarded."""

from __future__ import annotations

import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from adapmoe_cli.runtime import row_linear
from adapmoe_cli.runtime.expert_kernel import row_product
from adapmoe_cli.skeleton import describe


class DecodeStep:
    """`step(input_ids, kv)` → the model's output for one fed token, compiled when `compile` is on."""

    def __init__(self, model: Any, compile: bool, note: Callable[[str], None] | None = None,
                 watched: Callable[[], bool] = lambda: False, after: Callable[[], None] = lambda: None,
                 simpler: Callable[[], bool] = lambda: False):
        """`watched()`: someone observes each layer call (the profiler, a routing recorder) — the compiled
        step does not report to observers, so such steps run eagerly. `after()`: called after each compiled
        step (the engine collects what the graph counted). `simpler()`: after a failed compile, make the
        model simpler to compile (the engine: every layer's experts through the manager); True: try again."""
        self.model = model
        self.enabled = compile
        self.note = note
        self.watched = watched
        self.after = after
        self.simpler = simpler
        self.compile_s: float | None = None  # seconds the first compiled call took (compiling included)
        self.failure: str | None = None  # why it runs eagerly after all
        self._compiled: Any = None
        self._steady: weakref.ref | None = None  # the KV cache whose last step ran compiled, nothing changed since
        self.unguarded_steps = 0  # steps that ran with only the tensor and size guards checked
        for module in model.modules():  # attention's projections, shared experts, the lm head
            if type(module) is torch.nn.Linear:
                module.forward = types.MethodType(_row_linear_forward, module)

    @property
    def active(self) -> bool:
        return self.enabled and self.failure is None

    @property
    def pending(self) -> bool:
        """The next single-token call compiles (or finds that it cannot)."""
        return self.active and self._compiled is None

    def __call__(self, input_ids: torch.Tensor, kv: Any) -> Any:
        if not self.active or input_ids.shape[-1] != 1 or self.watched() or not _reserve(kv):
            self._steady = None
            return self.model(input_ids=input_ids, cache=kv, use_cache=True)
        out = self._first(input_ids, kv) if self._compiled is None else self._run(input_ids, kv)
        if out is None:  # it cannot compile: this step and the next run eagerly
            return self.model(input_ids=input_ids, cache=kv, use_cache=True)
        _advance(kv)
        self.after()
        return out

    def _run(self, input_ids: torch.Tensor, kv: Any) -> Any:
        if self._steady is not None and self._steady() is kv:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    out = self._compiled(input_ids=input_ids, cache=kv, use_cache=True)
                self.unguarded_steps += 1
                return out
            except RuntimeError as e:  # a tensor or size guard failed: raised before the graph ran
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        compiles = _compiles()
        with _specialised():  # (it may recompile)
            out = self._compiled(input_ids=input_ids, cache=kv, use_cache=True)  # every guard checked
        # steady once a step with every guard checked compiled nothing: nothing the graph was specialised on
        # changes from one step to the next (a value that did would have made this step recompile)
        self._steady = weakref.ref(kv) if _compiles() == compiles else None
        return out

    def state_changed(self) -> None:
        """The engine changed a value the model reads (the gate, prefetch): the next step checks every guard
        (and recompiles if the graph was specialised on the old value)."""
        self._steady = None

    def close(self) -> None:
        """Forget the compiled step. The compiler keeps one entry per model it compiled for the same code and
        stops compiling after a few (it would run a later engine eagerly, unsaid: the bench opens one per
        run), so an engine that compiled clears them when it closes; another live engine's step recompiles
        on its next call (seconds: the kernels are cached on disk)."""
        self._steady = None
        if self._compiled is not None:
            self._compiled = None
            torch._dynamo.reset()

    def _first(self, input_ids: torch.Tensor, kv: Any) -> Any:
        """Compile on the first call (timed); None: it cannot (said once, the KV cache cut back)."""
        missing = _no_compiler()
        if missing is not None:  # said at once, not after tracing the model twice to find it out (44 → 7.7 s)
            self.failure = missing[:200]
            if self.note is not None:
                self.note(f"--compile: compiling the decode step failed ({self.failure}); running eagerly "
                          "(to compile, install a C++ compiler such as g++, or point CXX at one)")
            return None
        for layer in kv.layers:  # (transformers' own cache, which concatenates: it grows by one position a step)
            if getattr(layer, "keys", None) is not None and layer.keys.numel() and not hasattr(layer, "reserve"):
                torch._dynamo.mark_dynamic(layer.keys, 2)
                torch._dynamo.mark_dynamic(layer.values, 2)
        before = kv.get_seq_length()
        t0 = time.perf_counter()
        first: str | None = None  # why the first attempt failed, where a simpler model is tried
        while True:
            try:
                # the C++ wrapper calls the kernels without Python in between: 450 → 500 tok/s on the embedded
                # model
                self._compiled = torch.compile(self.model, dynamic=True,
                                               options={"cpp_wrapper": True, "guard_filter_fn": _guards_kept})
                with _specialised():
                    out = self._compiled(input_ids=input_ids, cache=kv, use_cache=True)
                break
            except Exception as e:  # noqa: BLE001 — any failure of the compiler means: run eagerly
                self._compiled = None
                failure = f"{type(e).__name__}: {describe(e)}"[:200]  # the compiler's errors run to pages
                for layer in kv.layers:
                    extra = layer.get_seq_length() - before
                    if extra > 0:
                        layer.crop(-extra)
                torch._dynamo.reset()
                if first is None and self.simpler():
                    first = failure
                    continue
                self.failure = failure
                if self.note is not None:
                    self.note(f"--compile: compiling the decode step failed ({self.failure}); running eagerly")
                return None
        if first is not None and self.note is not None:
            self.note(f"--compile: compiling the experts into the decode step failed ({first}); they are "
                      "computed outside it")
        self.compile_s = time.perf_counter() - t0
        return out


def _reserve(kv: Any) -> bool:
    """Room in the KV cache for the step's position, which the graph writes in place (runtime/kv_cache.py); it
    is held once the step has run (`_advance`). False: the step runs eagerly. A cache without `reserve`
    (transformers' own) concatenates in the graph."""
    reserve = getattr(kv, "reserve", None)
    return reserve is None or reserve(1)


def _advance(kv: Any) -> None:
    """The compiled step ran: the position it wrote is held."""
    if hasattr(kv, "advance"):
        kv.advance(1)


def _specialised() -> Any:
    """How the step is traced: dynamic in the KV cache's length only; the Python floats it reads (attention's
    scaling, the norms' epsilon, the gate's thresholds) are constants of the graph, guarded, instead of inputs
    made into tensors on every call (0.05–0.08 ms of a ~1.2 ms step on the embedded model). (A function:
    torch imports its compiler, 1–1.5 s, when first asked for it, so a process that does not compile never
    does.)"""
    return torch._dynamo.config.patch(specialize_float=True)


def _no_compiler() -> str | None:
    """Why inductor has no C++ compiler to build the step with, or None. (Inductor looks for one only when it
    lowers a graph, after dynamo has traced the whole model; its own search, asked first, takes milliseconds.
    A torch that finds its compiler some other way is left to say so when compiling.)"""
    try:
        from torch._inductor import cpp_builder, exc
        search, missing = cpp_builder.get_cpp_compiler, exc.InvalidCxxCompiler
    except (ImportError, AttributeError):
        return None
    try:
        search()
    except missing as e:
        return f"{type(e).__name__}: {describe(e)}"
    except Exception:  # noqa: BLE001 — anything else: compiling will say what it is
        return None
    return None


def graphs_built() -> int:
    """Graphs inductor has compiled in this process that its cache on disk could have held and did not: each
    runs a C++ compiler, and the decode step's takes several hundred MiB while it does (bench_runs
    .capped_runner). A graph it cannot cache (the expert kernel, traced without dynamo: "no shape env") is
    lowered again in every process but finds its C++ built, and is not counted."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled (and nothing to import for it)
        return 0
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]


def _compiles() -> int:
    """Frames the compiler has been asked to compile in this process (each cache miss counts)."""
    return torch._dynamo.utils.counters["frames"]["total"]


def _row_linear_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An `nn.Linear`'s forward for the compiled step: one token's product as a multiply and a sum over the
    input size, which inductor makes a reduction loop reading the weight at memory speed (and fuses with
    what is around it), where `F.linear` of one row goes to MKL — three times slower on the project's AMD
    machine with the weight out of the cache (0.43 against 0.14 ms for the embedded model's 3 MB lm head;
    expert_kernel.py has the same for the experts). For attention's projections as well as the lm head
    this saves 0.26 ms of a 2.4 ms step on the embedded model and 0.31–0.36 ms of ~10 ms on the full-size
    store, whose experts push the dense weights out of the cache (docs/performance.md). Eagerly, one row
    by whichever way this machine multiplies faster (row_linear.py); several rows, transformers' `F.linear`."""
    if not torch.compiler.is_compiling():
        return row_linear.linear(x, linear.weight, linear.bias)
    if x.shape[-2] != 1:
        return torch.nn.functional.linear(x, linear.weight, linear.bias)
    y = row_product(x.reshape(-1, x.shape[-1]), linear.weight).view(*x.shape[:-1], -1)
    return y if linear.bias is None else y + linear.bias


#: guards the compiled step does without: that no module has gained a hook, and that no module instance has
#: an attribute shadowing its class's. Half of the ~2,000 guards checked before each step (0.42 → 0.20 ms a
#: token on the embedded model); nothing adds hooks to an engine's model where a step runs compiled (the
#: profiler's observers run those steps eagerly, `DecodeStep.watched`). Values that change what the graph
#: computes — the gate's thresholds, prefetch on or off, the module's key, tensor shapes — stay guarded.
_UNGUARDED = frozenset({"EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT"})


def _guards_kept(entries: list[Any]) -> list[bool]:
    return [entry.guard_type not in _UNGUARDED for entry in entries]
