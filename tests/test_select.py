"""The exit-layer cost model and drafting replay (training/select.py)."""

import pytest
import torch

from vllm_adadecode.training.select import CostModel, choose, simulate

COST = CostModel(step_overhead_ms=8.0, vanilla_layer_ms=1.0, layer_ms=1.0, draft_layer_ms=1.0,
                 check_ms=1.0, attempt_ms=0.0)
L = 30


def _stats(n: int, conf: list[float], right: list[bool]):
    c = torch.tensor([conf] * n)
    r = torch.tensor([right] * n)
    return c, r, torch.zeros(n, dtype=torch.int32)


def test_never_confident_costs_only_the_exit_checks():
    conf, right, seq = _stats(100, [0.1, 0.2], [True, True])
    r = simulate(conf, right, seq, [5, 20], [0, 1], 0.8, num_layers=L, max_draft=5, cost=COST)
    assert r["tokens_per_step"] == 1.0
    # the attempt's 21 layers are resumed by verification; 2 checks are extra
    assert r["speedup"] == pytest.approx((8 + 30) / (8 + 30 + 2))


def test_confident_and_right_at_a_shallow_layer_pays():
    conf, right, seq = _stats(600, [0.9, 0.9], [True, True])
    r = simulate(conf, right, seq, [5], [0], 0.8, num_layers=L, max_draft=5, cost=COST)
    assert r["tokens_per_step"] == pytest.approx(6.0, abs=0.05)
    # 5 attempts of 6 layers + 1 check, then verification of all 30 layers (budget ran out)
    assert r["speedup"] == pytest.approx(6 * 38 / (8 + 5 * 7 + 30), rel=0.02)


def test_confident_but_wrong_drafts_lose_and_choose_prefers_right_layers():
    conf = torch.tensor([[0.9, 0.9]] * 300)
    right = torch.tensor([[False, True]] * 300)
    seq = torch.zeros(300, dtype=torch.int32)
    wrong = simulate(conf, right, seq, [5], [0], 0.8, num_layers=L, max_draft=5, cost=COST)
    assert wrong["tokens_per_step"] == 1.0 and wrong["speedup"] < 1.0
    best = choose(conf, right, seq, [5, 12], num_layers=L, cost=COST)["best"]
    assert best["exit_layers"] == [12] and best["speedup"] > 1.0


def _row(design, depth, speedup):
    return {"design": design, "depth": depth, "predicted": {"humaneval": {"speedup": speedup}}}


@pytest.mark.parametrize("best, passes", [(1.0, False), (1.099, False), (1.1, True),
                                          (1.101, True), (1.5, True)])
def test_compare_heads_gate_needs_a_10_percent_margin(best, passes):
    """The gate passes a design only if its best predicted speedup beats the
    shipped heads' best by the margin: just under and just over 10%."""
    from vllm_adadecode.training.compare import _gate

    rows = [_row("shipped", 3, 0.9), _row("shipped", 5, 1.0),  # the bar: the best, 1.0
            _row("identity", 2, 2.0),  # identity heads are never judged
            _row("mlp", 2, best), _row("mlp", 4, 0.5)]
    gate = _gate(rows, 0.10)["gate"]
    assert gate["shipped"] == {"humaneval": 1.0}
    assert gate["best"]["mlp"]["humaneval"]["speedup"] == best
    assert gate["passed"] == (["mlp"] if passes else [])
    assert ("mlp beat" in gate["finding"]) == passes


def test_compare_heads_gate_without_shipped_heads_is_not_applied():
    from vllm_adadecode.training.compare import _gate

    gate = _gate([_row("mlp", 2, 3.0)], 0.10)["gate"]
    assert gate["passed"] == [] and "not applied" in gate["finding"]


def test_cost_model_follows_the_packaged_model_and_flags_override_fields():
    from vllm_adadecode.cli import build_parser
    from vllm_adadecode.training.pipeline import _cost_model
    from vllm_adadecode.training.select import MEASURED_COSTS, cost_model_for

    assert cost_model_for(None) == CostModel()
    big = cost_model_for("/cache/models/Qwen2.5-Coder-1.5B-Instruct")
    assert big == MEASURED_COSTS["Qwen2.5-Coder-1.5B-Instruct"]
    # A deeper, wider model: each layer and the LM head cost more than SmolLM2's.
    assert big.vanilla_layer_ms > 10 * CostModel().vanilla_layer_ms
    assert big.step_overhead_ms > CostModel().step_overhead_ms
    assert cost_model_for("/somewhere/unknown-model") == CostModel()
    args = build_parser().parse_args(
        ["train-heads", "--model", "/m/Qwen2.5-Coder-0.5B-Instruct", "--out", "/tmp/x",
         "--check-ms", "2.5"])
    got = _cost_model(args)
    assert got.check_ms == 2.5
    assert got.layer_ms == MEASURED_COSTS["Qwen2.5-Coder-0.5B-Instruct"].layer_ms


def test_exit_stats_judge_fp16_stored_heads_as_their_fp32_values():
    """Shipped heads are stored in fp16 and features are fp32: eval-heads and
    compare-heads judge such a head exactly as the same values in fp32."""
    from vllm_adadecode.training.data import Features
    from vllm_adadecode.training.evaluate import exit_stats
    from vllm_adadecode.training.train import FrozenHead

    g = torch.Generator().manual_seed(0)
    d, v, n = 16, 50, 40
    head = FrozenHead(torch.randn(v, d, generator=g), torch.ones(d), 1e-6)
    feats = Features([1], torch.randn(n, 1, d, generator=g), torch.randn(n, d, generator=g),
                     torch.zeros(n, dtype=torch.int32))
    t16 = (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)).half()
    got = exit_stats(head, feats, {1: t16})[1]
    want = exit_stats(head, feats, {1: t16.float()})[1]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got["right"].any() and not torch.equal(got["kl"], exit_stats(head, feats, {1: None})[1]["kl"])
