"""Choose exit layers and threshold by expected speed, from measured head quality.

For candidate layers, short-trained heads give, on held-out tokens, each token's
exit-head confidence and whether its top-1 agrees with the full model. Replaying
AdaDecode's drafting on those sequences (a token exits at the first chosen layer
whose confidence reaches the threshold; drafting stops at the first token that
exits nowhere; the verifier keeps the agreeing prefix) gives, for every choice
of layers and threshold, tokens per verification step and the time spent.

The cost model follows the drafter and deferred verification as built
(``vllm_adadecode/proposer.py``), at batch 1, where a layer pass costs about
the same for one row as for the few rows of a verification step:

* a vanilla step costs ``step_overhead_ms + vanilla_layer_ms * L`` for one
  token (``step_overhead_ms``: everything outside the decoder layers: LM head,
  sampling, scheduling, input preparation);
* each draft attempt runs the newest token alone through layers 0..d, where d
  is the exit layer it left at, or the last exit layer when no exit was
  confident: ``attempt_ms + draft_layer_ms * (d + 1) + check_ms * (exit
  checks made)``;
* verification resumes every row at the depth its attempt reached (earlier
  drafts are carried as deep as later ones), so it runs only the layers after
  the shallowest row's depth: ``step_overhead_ms + layer_ms * (L - 1 - d_min)``.
  A last draft that was never attempted (the draft budget ran out) has depth -1.

So a failed attempt costs its exit checks, its fixed cost, and the gap between
the drafter's and verification's per-layer cost and vLLM's own forward; an
accepted draft that exits at e saves a whole step minus its own e + 1 layers,
and a following attempt that goes deeper than e without exiting spends its
extra layers twice.

The choice maximising predicted speedup over vanilla decoding wins.
``CostModel`` defaults were measured on this project's 2-core CPU machines with
SmolLM2-135M-Instruct (fp32, batch 1, compiled; ``scripts/time_step.py``,
docs/HEADS.md); ``MEASURED_COSTS`` holds each packaged model's, and the
commands' --*-ms flags override single fields for other machines or models.
"""

import itertools
from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class CostModel:
    # Measured on main (docs/HEADS.md, "The cost model"): scripts/time_step.py, 3 HumanEval
    # eval prompts x 128 tokens, compiled, lookups off, the shipped layer-6 heads drafting
    # on every step, against a vanilla run in the same session.
    step_overhead_ms: float = 5.2  # a step's time outside the decoder layers
    vanilla_layer_ms: float = 0.62  # one decoder layer in vLLM's own compiled forward
    layer_ms: float = 0.66  # one decoder layer in the resumed (deferred) verification forward
    draft_layer_ms: float = 0.65  # one decoder layer in a draft attempt (one row)
    check_ms: float = 1.55  # one exit check: exit head, shortlist screen, full LM head if passed
    attempt_ms: float = 1.2  # fixed cost of one draft attempt (embedding, bookkeeping, dispatch)


# The cost model per packaged model. SmolLM2's is the dataclass's defaults
# (compiled, measured on the drafter as built). The Qwen models' come from
# scripts/model_costs.py (eager, batch 1; docs/results/models/costs_*.json):
# step_overhead_ms is the LM head plus the step's rest; vanilla_layer_ms and
# draft_layer_ms one decoder layer over one row; check_ms about a third of the
# LM head, SmolLM2's measured share (the exit head, the shortlist screen, and
# the full LM head when the screen passes). layer_ms is one layer in a
# verification step with 5 drafted rows, scaled by the engine's own fit of
# decoding steps against lookup-drafted rows (drafts/adapt.py::StepCost, in
# docs/results/models/bench_qwen*_c1.json): each row added about 7.4 ms to a
# 79 ms step on the 0.5B (x1.46 for 5 rows) and about 20 ms to a 260 ms step
# on the 1.5B (x1.38).
MEASURED_COSTS = {
    "SmolLM2-135M-Instruct": CostModel(),
    "Qwen2.5-Coder-0.5B-Instruct": CostModel(
        step_overhead_ms=23.1, vanilla_layer_ms=2.88, layer_ms=4.2, draft_layer_ms=2.88,
        check_ms=6.0, attempt_ms=1.2),
    "Qwen2.5-Coder-1.5B-Instruct": CostModel(
        step_overhead_ms=54.3, vanilla_layer_ms=10.38, layer_ms=14.3, draft_layer_ms=10.38,
        check_ms=14.5, attempt_ms=1.2),
}


def cost_model_for(model: str | None, **given: float | None) -> CostModel:
    """The measured cost model of a packaged model (by its folder's name; None
    is the default SmolLM2), else SmolLM2's; ``given`` values that are not
    None override single fields (the commands' --*-ms flags)."""
    from pathlib import Path

    name = "SmolLM2-135M-Instruct" if model is None else Path(str(model)).name
    base = MEASURED_COSTS.get(name, CostModel())
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def simulate(conf: torch.Tensor, right: torch.Tensor, seq_ids: torch.Tensor, layers: list[int],
             cols: list[int], threshold: float, *, num_layers: int, max_draft: int,
             cost: CostModel) -> dict[str, float]:
    """conf/right: [N, n_candidates] over consecutive held-out positions, or
    [N, n_candidates, S] when a head's quality depends on the draft's index k
    in its step (k = 0, 1, ...; index S - 1 serves every later draft)."""
    if conf.dim() == 2:
        conf, right = conf[..., None], right[..., None]
    firsts, goods = [], []
    for k in range(conf.shape[2]):
        ok = (conf[:, cols, k] >= threshold)
        any_ok = ok.any(dim=1)
        firsts.append(torch.where(any_ok, ok.float().argmax(dim=1),
                                  torch.full_like(any_ok, -1, dtype=torch.long)).tolist())
        goods.append(right[:, cols, k].tolist())
    seq = seq_ids.tolist()
    n = len(seq)
    vanilla_ms = cost.step_overhead_ms + cost.vanilla_layer_ms * num_layers
    tokens = spent = steps = 0.0
    t = 0
    while t < n:
        end = t
        while end < n and seq[end] == seq[t]:
            end += 1
        drafted: list[bool] = []
        depth = -1  # depth of the last row (the shallowest after carrying)
        step_ms = cost.step_overhead_ms
        j = t
        while len(drafted) < max_draft and j < end:
            k = min(len(drafted), len(firsts) - 1)
            first, good = firsts[k], goods[k]
            f = first[j]
            depth, checks = (layers[-1], len(layers)) if f < 0 else (layers[f], f + 1)
            step_ms += cost.attempt_ms + cost.draft_layer_ms * (depth + 1) + cost.check_ms * checks
            if f < 0:  # no confident exit: drafting stops; verification resumes this attempt
                break
            drafted.append(good[j][f])
            j += 1
        else:
            depth = -1  # budget or sequence ran out: the newest draft was never attempted
        step_ms += cost.layer_ms * (num_layers - 1 - depth)
        accepted = 0
        for g in drafted:
            if not g:
                break
            accepted += 1
        advance = min(accepted + 1, end - t)  # the sequence's last token has no successor
        spent += step_ms
        tokens += advance
        steps += 1
        t += advance
    return {"tokens_per_step": tokens / steps, "speedup": tokens * vanilla_ms / spent}


def choose(conf: torch.Tensor, right: torch.Tensor, seq_ids: torch.Tensor, candidates: list[int],
           *, num_layers: int, max_draft: int = 5, cost: CostModel = CostModel(),
           thresholds=(0.5, 0.6, 0.7, 0.8, 0.9), max_layers: int = 3) -> dict:
    """Best (layers, threshold) by simulated speedup; returns the full table too."""
    table = []
    for k in range(1, max_layers + 1):
        for cols in itertools.combinations(range(len(candidates)), k):
            layers = [candidates[c] for c in cols]
            for g in thresholds:
                r = simulate(conf, right, seq_ids, layers, list(cols), g, num_layers=num_layers,
                             max_draft=max_draft, cost=cost)
                table.append({"exit_layers": layers, "threshold": g, **r})
    table.sort(key=lambda r: -r["speedup"])
    return {"best": table[0], "table": table, "cost_model": asdict(cost),
            "num_layers": num_layers, "max_draft": max_draft}
