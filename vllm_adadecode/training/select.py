"""Choose exit layers and threshold by expected speed, from measured head quality.

For candidate layers, short-trained heads give, on held-out tokens, each token's
exit-head confidence and whether its top-1 agrees with the full model. Replaying
AdaDecode's drafting on those sequences (a token exits at the first chosen layer
whose confidence reaches the threshold; drafting stops at the first token that
exits nowhere; the verifier keeps the agreeing prefix) gives, for every choice
of layers and threshold, tokens per verification step and the compute spent:

* drafting a token that exits at layer e after checking c exit heads costs
  (e + 1) + c * h layer-units, h = the LM head's cost in decoder layers;
* a token that exits nowhere costs the layers and heads it tried;
* verifying k drafts costs (L + h) * (1 + beta * k): extra tokens in one forward
  are cheaper than separate forwards (beta < 1).

The choice maximising (tokens per step) * (L + h) / (cost per step), i.e. the
predicted speedup over one full forward per token, wins.
"""

from __future__ import annotations

import itertools

import torch


def head_cost_in_layers(cfg: dict) -> float:
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ff
    return cfg["vocab_size"] * d / layer


def simulate(conf: torch.Tensor, right: torch.Tensor, seq_ids: torch.Tensor, layers: list[int],
             cols: list[int], threshold: float, *, num_layers: int, head_cost: float,
             max_draft: int, beta: float) -> dict[str, float]:
    """conf/right: [N, n_candidates] over consecutive held-out positions."""
    ok = (conf[:, cols] >= threshold)
    # first exit column per token, or -1
    any_ok = ok.any(dim=1)
    first = torch.where(any_ok, ok.float().argmax(dim=1), torch.full_like(any_ok, -1, dtype=torch.long))
    first = first.tolist()
    good = right[:, cols].tolist()
    seq = seq_ids.tolist()
    n = len(seq)
    full = num_layers + head_cost
    tokens = cost = steps = 0.0
    t = 0
    while t < n:
        drafted = []
        draft_cost = 0.0
        j = t
        while len(drafted) < max_draft and j < n and seq[j] == seq[t]:
            f = first[j]
            if f < 0:
                draft_cost += layers[-1] + 1 + len(layers) * head_cost
                break
            draft_cost += layers[f] + 1 + (f + 1) * head_cost
            drafted.append(good[j][f])
            j += 1
        accepted = 0
        for g in drafted:
            if not g:
                break
            accepted += 1
        cost += draft_cost + full * (1 + beta * len(drafted))
        advance = accepted + 1
        # the last position of a sequence has no next token inside it
        end = t
        while end < n and seq[end] == seq[t]:
            end += 1
        advance = min(advance, end - t)
        tokens += advance
        steps += 1
        t += advance
    return {"tokens_per_step": tokens / steps, "speedup": tokens * full / cost}


def choose(conf: torch.Tensor, right: torch.Tensor, seq_ids: torch.Tensor, candidates: list[int],
           *, num_layers: int, head_cost: float, max_draft: int = 5, beta: float = 0.3,
           thresholds=(0.5, 0.6, 0.7, 0.8, 0.9), max_layers: int = 3) -> dict:
    """Best (layers, threshold) by simulated speedup; returns the full table too."""
    table = []
    for k in range(1, max_layers + 1):
        for cols in itertools.combinations(range(len(candidates)), k):
            layers = [candidates[c] for c in cols]
            for g in thresholds:
                r = simulate(conf, right, seq_ids, layers, list(cols), g, num_layers=num_layers,
                             head_cost=head_cost, max_draft=max_draft, beta=beta)
                table.append({"exit_layers": layers, "threshold": g, **r})
    table.sort(key=lambda r: -r["speedup"])
    return {"best": table[0], "table": table, "head_cost_layers": head_cost, "beta": beta,
            "max_draft": max_draft}
