"""Decoder-layer segments of the target model, compiled like vLLM compiles the
model, and their ahead-of-time cache (``SegmentStore``).

The drafter and the deferred forward run layers [start, end) of the target's
own decoder through these callables, inside an ``AttentionContext`` (runner.py).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm_adadecode")


def layer_run(layers, name: str):
    """A function running ``layers`` in turn on (positions, hidden, residual),
    with a code object of its own named ``name``: torch.compile caches graphs
    per code object, so functions built here never evict each other."""
    import types

    mods = tuple(layers)

    def run(positions, hidden, residual):
        for layer in mods:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual

    code = run.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, run.__globals__, name, None, run.__closure__)


class LayerSegments:
    """Callables that run decoder layers [start, end) of the target model on
    (positions, hidden, residual); with ``compile``, each segment is one
    torch.compile graph (its own code object, so segments never evict each
    other from dynamo's per-code cache).

    A range that crosses one of ``boundaries`` runs as the segments between
    them, so the set of graphs stays fixed (one per gap between boundaries)
    whatever ranges the drafter and the deferred forward ask for: graphs
    compile in the first steps, not whenever a new mix of depths shows up."""

    def __init__(self, layers, *, compile: bool, boundaries=()):
        self.layers = layers
        self.compile = compile
        self.boundaries = sorted(set(boundaries))
        self._fns: dict[tuple[int, int], object] = {}
        self._ranges: dict[tuple[int, int], object] = {}
        # Pieces compiled ahead of time and saved, or loaded from a saved
        # artifact at a warm start: (start, end) -> (one-row fn, several-rows fn).
        self._saved: dict[tuple[int, int], tuple] = {}
        self.loaded = self.saved = 0

    def __call__(self, start: int, end: int):
        fn = self._ranges.get((start, end))
        if fn is None:
            pieces = [self._piece(a, b) for a, b in self.pieces(start, end)]
            if len(pieces) == 1:
                fn = pieces[0]
            else:
                def fn(positions, hidden, residual):
                    for piece in pieces:
                        hidden, residual = piece(positions, hidden, residual)
                    return hidden, residual
            self._ranges[(start, end)] = fn
        return fn

    def _piece(self, start: int, end: int):
        fn = self._fns.get((start, end))
        if fn is None:
            fn = self._fns[(start, end)] = self._build(start, end)
        return fn

    def _build(self, start: int, end: int):
        fn = layer_run(self.layers[start:end], f"adadecode_layers_{start}_{end}")
        if not self.compile:
            return fn
        saved = self._saved.get((start, end))
        if saved is not None:  # compiled ahead of time (or loaded): one per row class
            one, several = saved
            return lambda positions, hidden, residual: (
                one if positions.shape[0] == 1 else several)(positions, hidden, residual)
        # As vLLM compiles the model: static shapes except the token
        # dimension (dynamic=True would also make the hidden size symbolic;
        # the static graphs take 14-20% less time per call for SmolLM2's
        # layers 7-29, docs/performance/segments.md). One row gets a graph
        # of its own.
        compiled = torch.compile(fn, dynamic=False)
        from torch._dynamo import mark_dynamic as mark

        def call(positions, hidden, residual):
            if positions.shape[0] > 1:
                mark(positions, 0)
                mark(hidden, 0)
                if residual is not None:
                    mark(residual, 0)
            return compiled(positions, hidden, residual)

        return call

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """Layers [start, end) cut at the boundaries inside them."""
        cuts = [start] + [b for b in self.boundaries if start < b < end] + [end]
        return list(zip(cuts, cuts[1:]))

    def warm_up(self, vllm_config, hidden_size: int, dtype) -> int:
        """Build (compile) every piece now, for one row and for several rows
        (torch.compile specialises a dimension of size 1), inside a forward
        context without attention metadata: attention and KV writes are
        skipped, as in vLLM's own warm-up. Returns the pieces run."""
        from vllm.forward_context import set_forward_context

        pieces = self.pieces(0, len(self.layers))
        store = SegmentStore.open(vllm_config, self.layers)
        for start, end in pieces:
            if store is not None and (start, end) not in self._fns:
                saved = store.get(start, end, hidden_size, dtype)
                if saved is not None:
                    self._saved[(start, end)] = saved
                    self.loaded += store.loaded
                    self.saved += store.saved
                    store.loaded = store.saved = 0
                    self._fns[(start, end)] = self._build(start, end)
                    continue
            fn = self._piece(start, end)
            for rows in (1, 2):
                # Inference tensors, as in decoding (dynamo guards on the
                # dispatch keys).
                with torch.inference_mode(), set_forward_context(
                        None, vllm_config, num_tokens=rows, slot_mapping={}):
                    positions = torch.arange(rows, dtype=torch.int64)
                    hidden = torch.zeros(rows, hidden_size, dtype=dtype)
                    residual = None if start == 0 else torch.zeros_like(hidden)
                    fn(positions, hidden, residual)
        return len(pieces)

    @property
    def num_compiled(self) -> int:
        """Layer segments built as torch.compile graphs so far."""
        return len(self._fns) if self.compile else 0


def _run_layers(layers, positions, hidden, residual):
    """Decoder layers in turn on (positions, hidden, residual): the function
    compiled ahead of time for a segment (its layers come in as an argument,
    so the saved artifact holds code, not weights)."""
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual)
    return hidden, residual


_SEGMENT_INPUTS = ("L['positions']", "L['hidden']", "L['residual']")


def _segment_guards(entries) -> list[bool]:
    """Guards kept in a saved segment: those on its tensor inputs and the
    shape relations between them. Guards on the layer modules and their
    weights are dropped: the modules are the same objects at every call, and
    torch 2.13 saves their guard state in a form it cannot load back."""
    return [e.name.startswith(_SEGMENT_INPUTS) or e.guard_type == "SHAPE_ENV"
            for e in entries]


class SegmentStore:
    """Layer segments compiled ahead of time (torch's ``aot_compile``) and
    saved under vLLM's cache root, so a warm engine start loads them instead of
    tracing them again with Dynamo (most of a warm start's extra seconds,
    docs/RELIABILITY.md). One artifact per segment and row class (one row;
    several rows with the token dimension dynamic). The key covers vLLM's own
    compile-cache factors (environment and engine configuration), the
    tensor-parallel rank, the torch and vLLM versions and the source of the
    decoder layer and of this module; a
    missing, stale or unloadable artifact is compiled again and replaced.

    Only guards on the segment's tensor inputs are kept (``_segment_guards``),
    and the row class is chosen here, so the artifacts' own guard checks are
    off."""

    def __init__(self, root, factors: list[str], vllm_config, layers):
        self.root = root
        self._layers = layers
        self.factors = factors
        self.vllm_config = vllm_config
        self.loaded = self.saved = 0

    @classmethod
    def open(cls, vllm_config, layers) -> "SegmentStore | None":
        import hashlib
        import inspect
        import sys
        from pathlib import Path

        import vllm
        import vllm.envs as envs

        if not hasattr(torch.compiler, "load_compiled_function"):
            return None
        try:
            from vllm.compilation.caching import aot_compile_hash_factors

            factors = [str(f) for f in aot_compile_hash_factors(vllm_config)]
            sources = [sys.modules[type(layers[0]).__module__].__file__, __file__]
            for path in sources:
                factors.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            from vllm.distributed import get_tensor_model_parallel_rank

            factors += [torch.__version__, vllm.__version__, type(layers[0]).__qualname__,
                        f"tp_rank={get_tensor_model_parallel_rank()}",
                        hashlib.sha256(inspect.getsource(_run_layers).encode()).hexdigest()]
        except Exception as e:  # noqa: BLE001 - no store: compile as before
            logger.warning("AdaDecode: no saved layer segments (%s)", e)
            return None
        return cls(Path(envs.VLLM_CACHE_ROOT) / "adadecode_segments", factors, vllm_config,
                   layers)

    def _path(self, start: int, end: int, rows: int, hidden_size: int, dtype):
        import hashlib
        import json

        key = json.dumps([self.factors, start, end, rows, hidden_size, str(dtype)])
        return self.root / f"layers_{start}_{end}_rows{rows}_" \
            f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt2"

    def get(self, start: int, end: int, hidden_size: int, dtype):
        """(one-row fn, several-rows fn) for layers [start, end): loaded, or
        compiled now and saved; None if torch cannot compile it ahead of time."""
        mods = torch.nn.ModuleList(self._layers[start:end])
        fns = []
        for rows in (1, 2):
            fn = self._load(self._path(start, end, rows, hidden_size, dtype))
            if fn is None:
                fn = self._compile(mods, start, end, rows, hidden_size, dtype)
            if fn is None:
                return None
            fns.append(lambda positions, hidden, residual, _fn=fn: _fn(
                mods, positions, hidden, residual))
        return tuple(fns)

    def _load(self, path):
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f, f_globals=_run_layers.__globals__)
            fn.disable_guard_check()
        except Exception as e:  # noqa: BLE001 - compiled again below
            logger.warning("AdaDecode: saved layer segment %s did not load (%s); "
                           "compiling it again", path.name, e)
            return None
        self.loaded += 1
        return fn

    def _compile(self, mods, start, end, rows, hidden_size, dtype):
        import os
        import tempfile

        from vllm.forward_context import set_forward_context

        path = self._path(start, end, rows, hidden_size, dtype)
        try:
            compiled = torch.compile(
                _run_layers, fullgraph=True, dynamic=False,
                options={"guard_filter_fn": _segment_guards})
            with torch.inference_mode(), set_forward_context(
                    None, self.vllm_config, num_tokens=rows, slot_mapping={}):
                positions = torch.arange(rows, dtype=torch.int64)
                hidden = torch.zeros(rows, hidden_size, dtype=dtype)
                residual = None if start == 0 else torch.zeros_like(hidden)
                if rows > 1:
                    for t in (positions, hidden, residual):
                        if t is not None:
                            torch._dynamo.mark_dynamic(t, 0)
                fn = compiled.aot_compile(((mods, positions, hidden, residual), {}))
            fn.disable_guard_check()
        except Exception as e:  # noqa: BLE001 - fall back to torch.compile
            logger.warning("AdaDecode: layers %d-%d could not be compiled ahead of time "
                           "(%s); compiling them on first use instead", start, end - 1, e)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                pass
            fn.save_compiled_function(tmp.name)
            os.replace(tmp.name, path)  # atomic: ranks and engines may race
            self.saved += 1
        except Exception as e:  # noqa: BLE001 - it still runs; the next start compiles again
            logger.warning("AdaDecode: could not save layer segment %s (%s)", path.name, e)
        return fn
