"""Time the sampling path of one engine in this process (docs/performance/backoff.md,
"Where the extra sampling time went").

    eval "$(.venv/bin/python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/probes/profile_sampling.py adadecode
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/probes/profile_sampling.py vanilla

16 MT-Bench eval prompts at concurrency 16, 128 greedy tokens, after one warm
pass. Prints tokens/s, the runner's step split (seconds) and the calls to and
time in vLLM's RejectionSampler.forward. For a sampled profile, run it under
``py-spy record -r 200 -f raw -o OUT -- python scripts/probes/profile_sampling.py ...``.
"""

import collections
import json
import os
import sys
import time

import vllm.v1.sample.rejection_sampler as rs
from vllm import SamplingParams

from vllm_adadecode import prompts
from vllm_adadecode.bench.worker import _chat, _generate_inflight, _start_engine, _step_times
from vllm_adadecode.models import packaged_model_dir

timer = collections.Counter()
_forward = rs.RejectionSampler.forward


def _timed(*args, **kwargs):  # installed before the engine's own hook wraps it
    t0 = time.perf_counter()
    try:
        return _forward(*args, **kwargs)
    finally:
        timer["seconds"] += time.perf_counter() - t0
        timer["calls"] += 1


rs.RejectionSampler.forward = _timed

if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "adadecode"
    job = {"model": str(packaged_model_dir()), "max_model_len": 2048}
    if method == "adadecode":
        job["speculative_config"] = {"method": "adadecode"}
    llm = _start_engine(job, 16)
    texts = _chat(llm.get_tokenizer(), [p.text for p in prompts.mtbench("eval")][:16])
    params = SamplingParams(temperature=0.0, max_tokens=128)
    _step_times(llm)  # install the timers
    _generate_inflight(llm, texts, params, 16, "warm", None)
    _step_times(llm)
    timer.clear()
    tokens, _, elapsed, _ = _generate_inflight(llm, texts, params, 16, "run", None)
    n = sum(len(t) for t in tokens)
    print(json.dumps({"method": method, "tokens_per_s": n / elapsed,
                      "step_seconds": _step_times(llm),
                      "rejection_sampler": dict(timer)}), flush=True)
    os._exit(0)
