"""Train exit heads: minimise KL(p_final || p_exit_i) with the base model frozen.

p_exit_i = softmax(lm_head(final_norm(z_i))), z_i the head design's output
(``head_designs.py``; ``dxd``: z_i = T_i h_i, T_i initialised to the identity).
Only the head's own tensors learn; the model's final norm and LM head stay frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..head_designs import MAX_STALENESS, Design, context_rows
from .data import Features


@dataclass
class FrozenHead:
    """The model's own final norm and LM head, shared by every exit head."""

    lm_head: torch.Tensor  # [V, d]
    norm_weight: torch.Tensor  # [d]
    eps: float

    @classmethod
    def from_hf(cls, hf_model) -> "FrozenHead":
        norm = hf_model.model.norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return cls(hf_model.lm_head.weight.detach().float(), norm.weight.detach().float(), eps)

    def exit_logits(self, h: torch.Tensor, transform: torch.Tensor | None) -> torch.Tensor:
        return self.logits(h if transform is None else h @ transform.T)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """LM-head logits of a design's output z (the final norm's input)."""
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return z @ self.lm_head.T

    def restricted(self, token_ids: torch.Tensor) -> "FrozenHead":
        """The same head over a subset of the vocabulary (rows of the LM head)."""
        return FrozenHead(self.lm_head[token_ids].contiguous(), self.norm_weight, self.eps)

    def final_logits(self, final: torch.Tensor) -> torch.Tensor:
        return final @ self.lm_head.T


def kl_final_to_exit(final_logits: torch.Tensor, exit_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_final || p_exit)."""
    logp = F.log_softmax(final_logits.float(), dim=-1)
    logq = F.log_softmax(exit_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def _schedule(params: dict, lr: float, epochs: float, batch: int, n: int, g: torch.Generator):
    """Adam with 20 warm-up steps and a cosine decay, and the minibatches of row
    indices it steps on (shuffled epochs, drawn from ``g``)."""
    opt = torch.optim.Adam(params.values(), lr=lr)
    steps = max(1, int(math.ceil(epochs * n / batch)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))

    def batches():
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < batch:
                order = torch.cat([order, torch.randperm(n, generator=g)])
            idx, order = order[:batch], order[batch:]
            yield idx

    return opt, sched, batches(), steps


class _SampledVocab:
    """A sampled softmax's head for each step: the ``vocab`` token ids plus
    ``negatives`` others drawn afresh (every token's logit is still pushed
    down now and then); the whole head when ``vocab`` is None."""

    def __init__(self, head: FrozenHead, vocab: torch.Tensor | None, negatives: int,
                 g: torch.Generator):
        self.head, self.vocab, self.negatives, self.g = head, vocab, negatives, g
        self.others = None
        if vocab is not None:
            keep = torch.ones(head.lm_head.shape[0], dtype=torch.bool)
            keep[vocab] = False
            self.others = keep.nonzero().flatten()

    def draw(self) -> FrozenHead:
        if self.others is None:
            return self.head
        drawn = self.others[torch.randperm(len(self.others), generator=self.g)[:self.negatives]]
        return self.head.restricted(torch.cat([self.vocab, drawn]))


def train_heads(head: FrozenHead, feats: Features, layers: list[int], *, epochs: float = 2.0,
                batch: int = 512, lr: float = 1e-3, seed: int = 0,
                vocab: torch.Tensor | None = None, negatives: int = 4096,
                desc: str = "training exit heads") -> dict[int, torch.Tensor]:
    """Adam on every T_i at once (each head's loss only touches its own T_i).
    The KL is over the whole vocabulary, or a sampled softmax over ``vocab``
    and ``negatives`` others (``_SampledVocab``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d = feats.final.shape[1]
    cols = [feats.layers.index(x) for x in layers]
    params = {x: torch.nn.Parameter(torch.eye(d)) for x in layers}
    opt, sched, batches, steps = _schedule(params, lr, epochs, batch, len(feats), g)
    sampled = _SampledVocab(head, vocab, negatives, g)
    bar = tqdm(batches, total=steps, desc=desc, unit="step")
    for idx in bar:
        step_head = sampled.draw()
        with torch.no_grad():
            final_logits = step_head.final_logits(feats.final[idx])
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, c in zip(layers, cols):
            loss = kl_final_to_exit(final_logits,
                                    step_head.exit_logits(feats.hidden[idx, c], params[x]))
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        bar.set_postfix(kl=f"{total / len(layers):.3f}")
    return {x: p.detach().clone() for x, p in params.items()}


def train_design(head: FrozenHead, feats: Features, layer: int, design: Design, *,
                 epochs: float = 1.0, batch: int = 512, lr: float = 1e-3, seed: int = 0,
                 vocab: torch.Tensor | None = None, negatives: int = 4096,
                 desc: str | None = None) -> dict[str, torch.Tensor]:
    """Adam on one exit head of any design. The KL is over the whole vocabulary,
    or, given ``vocab`` (token ids), over those plus ``negatives`` other tokens
    drawn afresh each step (a sampled softmax: cheaper, and every token's logit
    is still pushed down now and then). A ``final_state`` head sees the final
    state at an age drawn from 1..MAX_STALENESS per row, as the drafts of one
    step do."""
    g = torch.Generator().manual_seed(seed)
    sampled = _SampledVocab(head, vocab, negatives, g)
    col = feats.layers.index(layer)
    hidden = feats.hidden[:, col]
    d = feats.final.shape[1]
    params = {k: torch.nn.Parameter(v) for k, v in design.init(d, g).items()}
    opt, sched, batches, steps = _schedule(params, lr, epochs, batch, len(feats), g)
    bar = tqdm(batches, total=steps, desc=desc or f"{design.name} head, layer {layer}",
               unit="step", leave=False)
    for idx in bar:
        age = torch.randint(1, MAX_STALENESS + 1, (len(idx),), generator=g)
        ctx = context_rows(design, hidden, feats.final, feats.seq_ids, idx, staleness=age)
        step_head = sampled.draw()
        with torch.no_grad():
            final_logits = step_head.final_logits(feats.final[idx])
        opt.zero_grad(set_to_none=True)
        loss = kl_final_to_exit(final_logits,
                                step_head.logits(design.apply(params, hidden[idx], ctx)))
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(kl=f"{loss.item():.3f}")
    return {k: p.detach().clone() for k, p in params.items()}
