"""Choose exit layers and threshold by expected speed, from measured head quality.

For candidate layers, short-trained heads give, on held-out tokens, each token's
exit-head confidence and whether its top-1 agrees with the full model. Replaying
AdaDecode's drafting on those sequences (a token exits at the first chosen layer
whose confidence reaches the threshold; drafting stops at the first token that
exits nowhere; the verifier keeps the agreeing prefix) gives, for every choice
of layers and threshold, tokens per verification step and the compute spent:

* a vanilla decoding step (one token) takes ``step_ms``;
* a verification step with k drafts takes ``step_ms + verify_token_ms * k``;
* drafting a token that exits at layer e after checking c exit heads takes
  ``draft_layer_ms * (e + 1) + (draft_head_ms + draft_segment_ms) * c``; a token
  that exits nowhere costs the layers and checks it tried.

The choice maximising tokens * step_ms / (time spent), the predicted speedup
over vanilla decoding, wins. ``CostModel`` defaults were measured on this
project's 2-core CPU machines with SmolLM2-135M-Instruct (fp32, batch 1; see
docs/HEADS.md); pass your own for other machines or models.
"""

import itertools
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CostModel:
    step_ms: float = 39.0  # one vanilla decoding step
    verify_token_ms: float = 8.0  # each extra drafted token in a verification step
    draft_layer_ms: float = 1.6  # one decoder layer for one drafted token
    draft_head_ms: float = 5.0  # one exit-head check (full-vocabulary LM head)
    draft_segment_ms: float = 1.0  # fixed cost per layer segment (metadata, dispatch)


def simulate(conf: torch.Tensor, right: torch.Tensor, seq_ids: torch.Tensor, layers: list[int],
             cols: list[int], threshold: float, *, max_draft: int,
             cost: CostModel) -> dict[str, float]:
    """conf/right: [N, n_candidates] over consecutive held-out positions."""
    ok = (conf[:, cols] >= threshold)
    # first exit column per token, or -1
    any_ok = ok.any(dim=1)
    first = torch.where(any_ok, ok.float().argmax(dim=1), torch.full_like(any_ok, -1, dtype=torch.long))
    first = first.tolist()
    good = right[:, cols].tolist()
    seq = seq_ids.tolist()
    n = len(seq)
    per_check = cost.draft_head_ms + cost.draft_segment_ms
    tokens = spent = steps = 0.0
    t = 0
    while t < n:
        drafted = []
        draft_cost = 0.0
        j = t
        while len(drafted) < max_draft and j < n and seq[j] == seq[t]:
            f = first[j]
            if f < 0:
                draft_cost += cost.draft_layer_ms * (layers[-1] + 1) + per_check * len(layers)
                break
            draft_cost += cost.draft_layer_ms * (layers[f] + 1) + per_check * (f + 1)
            drafted.append(good[j][f])
            j += 1
        accepted = 0
        for g in drafted:
            if not g:
                break
            accepted += 1
        spent += draft_cost + cost.step_ms + cost.verify_token_ms * len(drafted)
        advance = accepted + 1
        # the last position of a sequence has no next token inside it
        end = t
        while end < n and seq[end] == seq[t]:
            end += 1
        advance = min(advance, end - t)
        tokens += advance
        steps += 1
        t += advance
    return {"tokens_per_step": tokens / steps, "speedup": tokens * cost.step_ms / spent}


def choose(conf: torch.Tensor, right: torch.Tensor, seq_ids: torch.Tensor, candidates: list[int],
           *, max_draft: int = 5, cost: CostModel = CostModel(), thresholds=(0.5, 0.6, 0.7, 0.8, 0.9),
           max_layers: int = 3) -> dict:
    """Best (layers, threshold) by simulated speedup; returns the full table too."""
    table = []
    for k in range(1, max_layers + 1):
        for cols in itertools.combinations(range(len(candidates)), k):
            layers = [candidates[c] for c in cols]
            for g in thresholds:
                r = simulate(conf, right, seq_ids, layers, list(cols), g,
                             max_draft=max_draft, cost=cost)
                table.append({"exit_layers": layers, "threshold": g, **r})
    table.sort(key=lambda r: -r["speedup"])
    return {"best": table[0], "table": table, "cost_model": asdict(cost),
            "max_draft": max_draft}
