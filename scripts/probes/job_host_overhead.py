"""Seconds a test-suite job host spends per job beyond engine start and
generation: six jobs on a tiny random Llama (8 prompts, 48 tokens,
concurrency 4, eager), vanilla and AdaDecode alternating, in one JobHost.

    PYTHONPATH=. python scripts/probes/job_host_overhead.py

Each line: wall, engine start, generation, and the rest (wall minus both):
the job's hand-over, its engine's shutdown and the host's cleanup.
"""
import tempfile
import time
from pathlib import Path

from tests.conftest import build_tiny_llama
from vllm_adadecode.bench.worker import JobHost
from vllm_adadecode.models import packaged_model_dir
from vllm_adadecode.prompts import mixed

SPEC = {"method": "adadecode", "exit_layers": [1, 3, 5], "threshold": 0.005,
        "num_speculative_tokens": 4, "adaptive": False, "deferred": True, "lookup": True}

with tempfile.TemporaryDirectory() as tmp:
    model = str(build_tiny_llama(Path(tmp) / "tiny-llama", str(packaged_model_dir())))
    host = JobHost(log_path=str(Path(tmp) / "host.log"))
    try:
        for i in range(6):
            job = dict(model=model, prompts=[p.text for p in mixed(8)], max_tokens=48,
                       concurrency=4, enforce_eager=True, progress=False, warmup=False,
                       in_process=True, seed=i)
            if i % 2:
                job["speculative_config"] = SPEC
            t = time.perf_counter()
            r = host.run(job)
            wall = time.perf_counter() - t
            print(f"job {i} ({'adadecode' if i % 2 else 'vanilla'}): wall {wall:.1f} s, "
                  f"start {r['startup_s']:.1f} s, generate {r['elapsed_s']:.2f} s, "
                  f"rest {wall - r['startup_s'] - r['elapsed_s']:.1f} s", flush=True)
    finally:
        host.close()
