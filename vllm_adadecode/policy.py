"""Pure decisions of the AdaDecode drafter (no vLLM, no model): easy to test.

Depth of a drafted token = the last 0-based decoder layer it has run. Within one
draft step the depths of a request's drafted tokens never increase along
positions, because whenever the newest token goes deeper, the earlier drafted
tokens are carried along to the same depth (their deferred layers run batched
with it). So the tokens that must join the newest one in a layer segment are a
contiguous suffix of the drafted tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy token and its softmax probability, per row."""
    logits = logits.float()
    best, token = logits.max(dim=-1)
    prob = torch.exp(best - torch.logsumexp(logits, dim=-1))
    return token, prob


def exits(top_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """A token exits at this exit layer when its top-1 probability reaches the threshold."""
    return top_prob >= threshold


def carried_suffix(depths: Sequence[int], segment_start: int) -> int:
    """How many of a request's drafted tokens (depths in position order) must run
    the next segment with the newest token: those whose depth equals the depth
    the newest token has reached (``segment_start``)."""
    n = 0
    for d in reversed(depths):
        if d < segment_start:
            raise ValueError(
                f"drafted token at depth {d} is behind the newest token ({segment_start})"
            )
        if d != segment_start:
            break
        n += 1
    return n


def draft_budget(max_draft: int, position: int, max_model_len: int) -> int:
    """Draft tokens allowed for a request whose next input sits at ``position``:
    drafted tokens occupy positions position+1 .. position+budget < max_model_len."""
    return max(0, min(max_draft, max_model_len - 1 - position))
