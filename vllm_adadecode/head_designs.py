"""Exit-head designs: how a head turns the residual-stream state after its exit
layer into the input of the model's own (frozen) final norm and LM head.

Every design computes ``z = T h + extra(h, context)``. ``T`` (d x d, the
identity at start) is the transform every design shares, and ``extra`` is zero
at start, so every design begins as the logit lens and training only adds:

===========  ==================================================================
dxd          ``z = T h`` (format version 1's only design)
mlp          ``z = T h + W_down silu(W_up rms(h))``: a residual block with a
             little capacity (Medusa's heads are of this kind)
final_state  ``z = T h + U f``: also reads ``f``, the full model's final normed
             state of the last verified position (what EAGLE drafts from). For
             the k-th draft of a step that state is k positions old; training
             samples that age.
attention    ``z = T h + W_o attn(rms h_t; rms h_t, ..., rms h_{t-w+1})``: one
             attention block over the exit-layer states of the last ``w``
             positions (Kangaroo's adapter), learned bias per head and offset.
===========  ==================================================================

The parameter names here are the tensor names in a heads folder
(``exit_heads.<layer>.<name>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RMS_EPS = 1e-6
ADAPTER_DIM = 256  # attention: query/key/value width
ADAPTER_HEADS = 4
WINDOW = 16  # attention: positions a head attends to (the newest included)
MAX_STALENESS = 5  # final_state: ages of the final state seen in training (1 = previous position)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


@dataclass(frozen=True)
class Design:
    name: str
    # what the head reads beyond h: None, "final_state" (f [B, d]) or
    # "window" (states [B, WINDOW, d] newest first, mask [B, WINDOW])
    context: str | None

    def shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        s = {"transform": (d, d)}
        if self.name == "mlp":
            s.update(up=(d, d), down=(d, d))
        elif self.name == "final_state":
            s.update(state=(d, d))
        elif self.name == "attention":
            r = ADAPTER_DIM
            s.update(q=(r, d), k=(r, d), v=(r, d), o=(d, r), position_bias=(ADAPTER_HEADS, WINDOW))
        return s

    def num_values(self, d: int) -> int:
        return sum(math.prod(s) for s in self.shapes(d).values())

    def init(self, d: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The logit lens: T = I, and every extra path's output weight zero."""
        p = {"transform": torch.eye(d)}
        for name, shape in self.shapes(d).items():
            if name == "transform":
                continue
            if name in ("down", "state", "o", "position_bias"):
                p[name] = torch.zeros(shape)
            else:
                p[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        return p

    def apply(self, p: dict[str, torch.Tensor], h: torch.Tensor,
              context: dict[str, torch.Tensor] | None = None, linear=F.linear) -> torch.Tensor:
        """h: [B, d] state after the exit layer -> z: [B, d], the final norm's input.
        ``linear(x, weight)`` computes x @ weight.T (any GEMM: torch's, vLLM's)."""
        z = linear(h, p["transform"])
        if self.name == "mlp":
            z = z + linear(F.silu(linear(_rms(h), p["up"])), p["down"])
        elif self.name == "final_state":
            z = z + linear(context["final_state"], p["state"])
        elif self.name == "attention":
            z = z + linear(self._attend(p, h, context["window"], context["mask"], linear), p["o"])
        return z

    @staticmethod
    def _attend(p, h, window, mask, linear):
        b, w, _ = window.shape
        nh, dh = ADAPTER_HEADS, ADAPTER_DIM // ADAPTER_HEADS
        q = linear(_rms(h), p["q"]).view(b, nh, dh)
        xw = _rms(window).reshape(b * w, -1)
        k = linear(xw, p["k"]).view(b, w, nh, dh)
        v = linear(xw, p["v"]).view(b, w, nh, dh)
        scores = torch.einsum("bhd,bwhd->bhw", q, k) / math.sqrt(dh) + p["position_bias"][:, :w]
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.einsum("bhw,bwhd->bhd", scores.softmax(-1), v).reshape(b, nh * dh)


DESIGNS = {d.name: d for d in (
    Design("dxd", None),
    Design("mlp", None),
    Design("final_state", "final_state"),
    Design("attention", "window"),
)}
# Designs the engine's drafter runs (the others are compared offline: docs/HEADS.md).
ENGINE_DESIGNS = ("dxd",)


def context_rows(design: Design, hidden: torch.Tensor, final: torch.Tensor,
                 seq_ids: torch.Tensor, rows: torch.Tensor, *, staleness: torch.Tensor | int = 1
                 ) -> dict[str, torch.Tensor] | None:
    """A design's context for ``rows`` of consecutive-position features.

    hidden [N, d] (one exit layer), final [N, d], seq_ids [N]: rows of one
    sequence are consecutive positions. A state from before a sequence's first
    row is absent (zeros / masked), never another sequence's.
    """
    if design.context is None:
        return None
    if design.context == "final_state":
        prev = rows - staleness
        ok = (prev >= 0) & (seq_ids[prev.clamp(min=0)] == seq_ids[rows])
        return {"final_state": final[prev.clamp(min=0)] * ok[:, None]}
    idx = rows[:, None] - torch.arange(WINDOW)
    ok = (idx >= 0) & (seq_ids[idx.clamp(min=0)] == seq_ids[rows][:, None])
    return {"window": hidden[idx.clamp(min=0)], "mask": ok}
