"""A CI-sized soak: `vllm serve` with and without AdaDecode under the same
seeded mix as `vllm-adadecode soak` (chat and completion, streaming or not,
greedy and sampled with n > 1, 1-token to near-max_model_len prompts, max_tokens
to the edge, stop strings, shared prefixes, clients that abort), with a KV
cache small enough that the scheduler preempts, and prefix caching on.
Chunked prefill is off in both servers: vLLM 0.32 on CPU dies on a seeded
request whose prompt is split (test_sampling.py shows AdaDecode does not)."""

from pathlib import Path

import pytest

from vllm_adadecode import prompts as P
from vllm_adadecode.soak import format_report, run_soak

pytestmark = pytest.mark.engine


def test_soak_under_kv_pressure_with_prefix_caching(tiny_llama, tmp_path):
    texts = [p.text for name in ("humaneval", "mtbench", "sharegpt") for p in P.load(name)]
    rep = run_soak(model=tiny_llama, requests=40, inflight=12, seed=1, kv_blocks=20,
                   prefix_caching=True, log_dir=Path(tmp_path), texts=texts,
                   enforce_eager=True, progress=False,
                   speculative_config={"method": "adadecode", "exit_layers": [1, 3],
                                       "threshold": 0.05, "adaptive": False})
    print("\n" + format_report(rep))
    mix = rep["mix"]
    assert mix["client_aborts_planned"] > 0 and mix["n_gt_1"] > 0 and mix["stream"] > 0
    assert mix["one_token_prompts"] > 0 and mix["longest_prompt"] > 1000
    for name, s in rep["servers"].items():
        assert s["failed"] == 0, (name, s["failures"])
        assert s["server_errors"] == 0, (name, s["server_error_lines"])
        assert s["alive_at_end"], name
        assert s["aborted_by_client"] > 0 and s["completed"] + s["aborted_by_client"] == 40
        assert s["preemptions"] and s["preemptions"] > 0, (name, "no KV pressure")
        assert s["prefix_cache_hits"] and s["prefix_cache_hits"] > 0, name
    assert rep["servers"]["adadecode"]["spec_decode_drafts"] > 0
    assert rep["greedy_compared"] >= 10
    assert rep["greedy_identical"] == rep["greedy_compared"], rep["greedy_differing"]
