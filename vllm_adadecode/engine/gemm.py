"""Row padding for vLLM's CPU matmuls (setting ``gemm_padding``).

vLLM runs a CPU model's linear layers through oneDNN with prepacked weights
(``dispatch_cpu_unquantized_gemm``). At a handful of rows that matmul's time
is not monotone in the row count: on the machines this project measures, 24
Qwen2.5-Coder-1.5B decoder layers took 1.3x as long at 1 row, and 1.6x at 2
rows, as at 4-6 rows (docs/performance/gemm-padding.md). Decoding at batch 1 and speculative
steps live exactly there: one row per plain step, a few per verification,
one per draft attempt.

``install`` measures, at engine start, a decoder layer's matmuls at 1 to
``MAX_ROWS`` rows on this machine, and from then on runs every oneDNN matmul of
the model with ``m`` rows on ``pad_to[m]`` rows (zeros appended, the extra rows
of the result dropped) wherever that measured faster, the padding's own
overhead included. Where nothing pays (small models, whose matmuls sit in
cache) vLLM's matmuls are left as they are. Rows never mix in a matmul: a row's
result depends on that row alone.

The padded matmul is one custom op (``adadecode::padded_onednn_mm``), so a
torch.compile'd model calls it like vLLM's own op and the row count is read
when it runs, not when the graph is traced.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("vllm_adadecode")

MAX_ROWS = 16  # row counts measured (and padded) at engine start
_GAIN = 0.93  # pad only where the padded matmul took at most this share of the time

# pad_to[m]: the rows a matmul of m rows runs on (m <= MAX_ROWS); set by ``install``.
_PAD_TO: list[int] = list(range(MAX_ROWS + 1))


def _padded_onednn_mm(x: torch.Tensor, handler: torch.Tensor, bias: torch.Tensor | None,
                      n: int) -> torch.Tensor:
    m, k = x.shape
    rows = _PAD_TO[m] if m <= MAX_ROWS else m
    if rows != m:
        x = torch.cat([x, x.new_zeros(rows - m, k)])
    out = torch.empty(rows, n, dtype=x.dtype)
    torch.ops._C.onednn_mm(out, x, bias, handler)
    return out[:m] if rows != m else out


def _padded_onednn_mm_fake(x: torch.Tensor, handler: torch.Tensor, bias: torch.Tensor | None,
                           n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_LIB: torch.library.Library | None = None  # the op lives as long as this object


def _register() -> None:
    global _LIB
    if _LIB is not None:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    _LIB = torch.library.Library("adadecode", "FRAGMENT")
    direct_register_custom_op("padded_onednn_mm", _padded_onednn_mm, mutates_args=[],
                              fake_impl=_padded_onednn_mm_fake, target_lib=_LIB)


def _onednn_handler(module):
    """The oneDNN handler vLLM bound into ``module.cpu_linear``, or None where
    the layer runs another CPU kernel (sgl, zentorch, plain torch)."""
    from vllm._custom_ops import CPUDNNLGEMMHandler

    fn = getattr(module, "cpu_linear", None)
    for cell in getattr(fn, "__closure__", None) or ():
        if isinstance(cell.cell_contents, CPUDNNLGEMMHandler):
            return cell.cell_contents
    return None


def _padded(handler):
    tensor, n, k = handler.handler_tensor, handler.n, handler.k
    op = torch.ops.adadecode.padded_onednn_mm

    def cpu_linear(x, weight, bias):
        lead = x.shape[:-1]
        return op(x.reshape(-1, k), tensor, bias, n).reshape(*lead, n)

    # The handler frees its oneDNN primitive when collected: keep it alive.
    cpu_linear._adadecode_handler = handler
    return cpu_linear


def _time_rows(handlers, rows: int, repeats: int) -> float:
    """Best of ``repeats``: seconds for one pass of ``handlers`` at ``rows`` rows, unpadded."""
    xs = [torch.randn(rows, h.k) for h in handlers]
    outs = [torch.empty(rows, h.n) for h in handlers]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms oneDNN's primitive cache
        t0 = time.perf_counter()
        for h, x, out in zip(handlers, xs, outs):
            torch.ops._C.onednn_mm(out, x, None, h.handler_tensor)
        best = min(best, time.perf_counter() - t0)
    return best


def plan(costs: list[float]) -> list[int]:
    """pad_to from measured costs (costs[m], m = 1..MAX_ROWS; costs[0] unused):
    each row count runs on the row count at or above it that measured fastest,
    where that is at most ``_GAIN`` of its own time."""
    pad_to = list(range(len(costs)))
    for m in range(1, len(costs)):
        best = min(range(m, len(costs)), key=lambda r: costs[r])
        if costs[best] <= _GAIN * costs[m]:
            pad_to[m] = best
    return pad_to


def _time_padded(handlers, rows: int, pad_to: list[int], repeats: int) -> float:
    """Best of ``repeats``: seconds for one pass of ``handlers`` at ``rows`` rows
    through the padded op (appending the zeros, dropping their rows) with
    ``pad_to`` as its plan."""
    global _PAD_TO
    saved, _PAD_TO = _PAD_TO, pad_to
    op = torch.ops.adadecode.padded_onednn_mm
    try:
        xs = [torch.randn(rows, h.k) for h in handlers]
        best = float("inf")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for h, x in zip(handlers, xs):
                op(x, h.handler_tensor, None, h.n)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        _PAD_TO = saved


def _confirmed(handlers, candidate: list[int], repeats: int) -> list[int]:
    """The candidate plan's paddings that still save ``_GAIN`` when timed as
    they run (through the op, zeros appended and dropped), each against the
    same op unpadded, in alternation."""
    plain = list(range(len(candidate)))
    pad_to = list(plain)
    for m, rows in enumerate(candidate):
        if rows == m:
            continue
        trial = list(plain)
        trial[m] = rows
        padded = unpadded = float("inf")
        for _ in range(2):
            unpadded = min(unpadded, _time_padded(handlers, m, plain, repeats))
            padded = min(padded, _time_padded(handlers, m, trial, repeats))
        if padded <= _GAIN * unpadded:
            pad_to[m] = rows
    return pad_to


def install(model, rows: int | None = None, repeats: int = 5):
    """Install row padding on every oneDNN linear layer of ``model``: with
    ``rows``, every matmul of fewer rows runs on ``rows`` rows; without, the
    padding this machine measures fastest (``plan``, each padding then
    confirmed as it runs, overhead included). Returns the row counts padded
    ({m: rows}; empty: nothing pays, vLLM's matmuls left as they are) and the
    measured ms of one decoder layer's matmuls at 1..MAX_ROWS rows (None with
    ``rows``); (None, None) where the model's linear layers do not run on
    oneDNN."""
    global _PAD_TO
    layers = [(name, m) for name, m in model.named_modules() if _onednn_handler(m) is not None]
    if not layers:
        return None, None
    _register()
    costs = None
    if rows is not None:
        pad_to = [max(m, rows) if m else 0 for m in range(MAX_ROWS + 1)]
    else:
        # One decoder layer's matmuls (or, without decoder layers, every one).
        sample = [m for name, m in layers if ".layers.0." in name] or [m for _, m in layers]
        handlers = [_onednn_handler(m) for m in sample]
        with torch.inference_mode():
            costs = [0.0] + [_time_rows(handlers, r, repeats) for r in range(1, MAX_ROWS + 1)]
            pad_to = _confirmed(handlers, plan(costs), repeats)
    padded = {m: r for m, r in enumerate(pad_to) if r != m}
    if padded:
        _PAD_TO = pad_to
        for _, m in layers:
            m.cpu_linear = _padded(_onednn_handler(m))
    ms = None if costs is None else [round(c * 1e3, 3) for c in costs[1:]]
    logger.info("AdaDecode: matmul rows padded %s (one decoder layer's matmuls, ms at 1.. "
                "rows: %s)", padded or "nowhere", ms)
    return padded, ms
