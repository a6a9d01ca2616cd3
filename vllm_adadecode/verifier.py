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
    """Tokens to emit per request, [B, max_spec_len + 1], padded with -1.

    One pass over Python lists: a step holds a few drafts per request, and
    a dozen small tensor operations cost more than the comparison itself
    (0.11 ms against 0.02 ms per step at batch 1, docs/PERFORMANCE.md section 18)."""
    lengths = list(num_draft_tokens)
    width = max_spec_len + 1
    drafts = draft_token_ids.tolist()
    targets = target_token_ids.tolist()
    bonus = bonus_token_ids.reshape(-1).tolist()
    rows = []
    k = 0
    for i, n in enumerate(lengths):
        row = []
        for j in range(k, k + n):
            row.append(targets[j])  # the full model's token, kept or replacing the draft
            if drafts[j] != targets[j]:
                break
        else:
            row.append(bonus[i])  # every draft held (or none): the bonus token follows
        k += n
        rows.append(row + [PLACEHOLDER_TOKEN_ID] * (width - len(row)))
    out = torch.tensor(rows, dtype=torch.int32).reshape(len(lengths), width)
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
