"""Matmul row padding (``gemm_padding``, vllm_adadecode/engine/gemm.py): the
plan from measured costs, rows that never mix in vLLM's oneDNN matmul, and a
real engine whose every small matmul is padded, token-identical to vanilla."""

from __future__ import annotations

import pytest
import torch

from vllm_adadecode.engine import gemm

from .test_engine import DEFERRED, MIXED_SAMPLING, TINY_SPEC, _tiny


def test_plan_pads_each_row_count_to_the_fastest_at_or_above_it():
    costs = [0.0, 10.0, 12.0, 8.0, 7.5, 7.0, 6.0, 9.0, 9.5, 11.0]
    pad_to = gemm.plan(costs)
    assert pad_to[1:7] == [6, 6, 6, 6, 6, 6]  # 6 rows were the fastest
    assert pad_to[7:] == [7, 8, 9]  # nothing faster at or above: unpadded
    # A saving under 7% is not taken (timing noise).
    assert gemm.plan([0.0, 10.0, 9.5]) == [0, 1, 2]
    assert gemm.plan([0.0, 10.0, 9.0]) == [0, 2, 2]


def test_padded_matmul_rows_never_mix():
    """The padded op's rows equal vLLM's oneDNN matmul of the same rows at the
    padded count, whatever the padding rows hold (zeros, or anything)."""
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    w, bias = torch.randn(96, 64), torch.randn(96)
    handler = ops.create_onednn_mm(w.t(), 32)
    gemm._register()
    saved = gemm._PAD_TO
    try:
        gemm._PAD_TO = [max(m, 6) if m else 0 for m in range(gemm.MAX_ROWS + 1)]
        for m in (1, 2, 5):
            x = torch.randn(m, 64)
            out = torch.ops.adadecode.padded_onednn_mm(x, handler.handler_tensor, bias, 96)
            assert out.shape == (m, 96)
            for fill in (torch.zeros(6 - m, 64), torch.randn(6 - m, 64) * 100):
                full = ops.onednn_mm(handler, torch.cat([x, fill]), bias)
                assert torch.equal(out, full[:m])
            assert torch.allclose(out, x @ w.t() + bias, atol=1e-4)
    finally:
        gemm._PAD_TO = saved


@pytest.mark.engine
def test_every_small_matmul_padded_identical_to_vanilla(engine, tiny_qwen2):
    """Every matmul of fewer than 8 rows runs on 8 (plain steps, draft attempts,
    verification): greedy tokens equal vanilla's, with drafts kept and
    rejected; sampled tokens equal those of an engine that does not draft."""
    forced = {**DEFERRED, "gemm_pad_rows": 8}
    ada = _tiny(engine, tiny_qwen2, speculative_config=forced)
    assert ada["drafter"]["gemm_padding"] == {str(m): 8 for m in range(1, 8)}
    assert ada["token_ids"] == _tiny(engine, tiny_qwen2)["token_ids"]
    assert sum(ada["drafter"]["accepted_by_exit"].values()) > 0
    assert sum(ada["drafter"]["rejected_by_exit"].values()) > 0
    # Sampled requests (position-keyed): the tokens of the engine with drafting
    # off and padding as measured.
    from vllm_adadecode.config import DRAFTING_OFF

    sampled = _tiny(engine, tiny_qwen2, sampling=MIXED_SAMPLING, speculative_config=forced)
    off = _tiny(engine, tiny_qwen2, sampling=MIXED_SAMPLING,
                speculative_config={**DEFERRED, **DRAFTING_OFF})
    assert sampled["token_ids"] == off["token_ids"]
    assert sampled["drafter"]["drafted_by_sampling"].get("sampled", 0) > 0
    # The default measures at engine start: a plan (possibly padding nothing).
    default = _tiny(engine, tiny_qwen2, speculative_config=TINY_SPEC)
    assert isinstance(default["drafter"]["gemm_padding"], dict)
