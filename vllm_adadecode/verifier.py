"""Exact-match verification: keep a draft only where the full model agrees.

For each request, drafted tokens are compared with the full model's greedy
token at the same position. The longest agreeing prefix is kept; at the first
disagreement the full model's token is emitted instead and the rest is
dropped; when every draft agrees, the full model's next (bonus) token follows.
The output is therefore exactly what greedy decoding without speculation
produces. Requests without drafts emit their bonus token, sampled as usual.

For batches with sampled requests (or processing that moves greedy tokens),
``match_draws`` does the same against the token drawn at each drafted position
by vLLM's sampler (position-keyed: vllm_adadecode.sampling), so a sampled
request emits exactly the draws decoding without speculation makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PLACEHOLDER_TOKEN_ID = -1  # vLLM's marker for "no token in this slot"


def accepted_lengths(draft: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Leading agreements per row of padded [B, S] drafts/targets, capped by lengths."""
    S = draft.shape[1]
    valid = torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)
    agree = (draft == target) & valid
    return agree.to(torch.int32).cumprod(dim=1).sum(dim=1)


def exact_match(
    draft_token_ids: torch.Tensor,  # [num_draft_tokens], flattened over requests
    num_draft_tokens: Sequence[int],  # per request
    target_token_ids: torch.Tensor,  # [num_draft_tokens]: full model's greedy token
    bonus_token_ids: torch.Tensor,  # [B, 1]: the token after the last draft
    max_spec_len: int,
) -> torch.Tensor:
    """Tokens to emit per request, [B, max_spec_len + 1], padded with -1."""
    B = len(num_draft_tokens)
    out = torch.full((B, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    if B == 0:
        return out
    lengths = torch.as_tensor(list(num_draft_tokens), dtype=torch.int64)
    S = max(1, max_spec_len)
    draft = torch.full((B, S), PLACEHOLDER_TOKEN_ID, dtype=torch.int64)
    target = torch.full((B, S), PLACEHOLDER_TOKEN_ID, dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(B), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(len(rows)) - starts[rows]
    draft[rows, cols] = draft_token_ids.to(torch.int64).cpu()
    target[rows, cols] = target_token_ids.to(torch.int64).cpu()
    accepted = accepted_lengths(draft, target, lengths)
    # The full model's tokens up to and including the first mismatch (all of
    # them when every draft holds), then the bonus token where every draft held.
    n_target = torch.minimum(accepted + 1, lengths)
    keep = torch.arange(S).unsqueeze(0) < n_target.unsqueeze(1)
    out[:, :S] = torch.where(keep, target, PLACEHOLDER_TOKEN_ID).to(torch.int32)
    full = (accepted == lengths).nonzero().squeeze(1)
    bonus = bonus_token_ids.reshape(B).to(torch.int32).cpu()
    out[full, lengths[full]] = bonus[full]
    return out.to(bonus_token_ids.device)


def match_draws(
    draft_token_ids: Sequence[Sequence[int]],  # per request, its drafts
    verifiable: Sequence[int],  # per request, how many leading drafts may be judged
    drawn: torch.Tensor,  # [B, S + 1]: the token drawn at each depth (S = max drafts)
) -> torch.Tensor:
    """Tokens to emit per request, [B, S + 1], padded with -1: the draws up to
    and including the first one that differs from its draft (all judged drafts
    and the draw after them when every judged draft holds)."""
    B, S1 = drawn.shape
    S = max(1, S1 - 1)
    draft = torch.full((B, S), PLACEHOLDER_TOKEN_ID, dtype=torch.int64)
    for i, d in enumerate(draft_token_ids):
        if len(d):
            draft[i, : len(d)] = torch.as_tensor(list(d), dtype=torch.int64)
    lengths = torch.as_tensor(list(verifiable), dtype=torch.int64)
    accepted = accepted_lengths(draft, drawn[:, :S].to(torch.int64), lengths)
    keep = torch.arange(S1).unsqueeze(0) <= accepted.unsqueeze(1)
    return torch.where(keep, drawn.to(torch.int64), PLACEHOLDER_TOKEN_ID).to(torch.int32)
