"""Methods added to vLLM's workers, read with ``LLM.collective_rpc(NAME)``, and
the step timers behind ``adadecode_step_times`` (any engine, for benchmarks)."""

from __future__ import annotations

import os
import time

from .drafter import drafter_of

STATS_RPC = "adadecode_stats"
STEP_TIMES_RPC = "adadecode_step_times"
RESET_RPC = "adadecode_reset_lookup_cache"
WORKER_INFO_RPC = "adadecode_worker_info"


def adadecode_stats(self, reset: bool = True):
    """The AdaDecode drafter's counters on this worker (None without one)."""
    drafter = drafter_of(getattr(self, "model_runner", None))
    return drafter.stats(reset=reset) if drafter is not None else None


def adadecode_reset_lookup_cache(self):
    """Empty the drafter's cache of earlier responses (benchmarks reset it
    between runs, as they reset the prefix cache); None without one."""
    drafter = drafter_of(getattr(self, "model_runner", None))
    return drafter.reset_lookup_cache() if drafter is not None else None


def adadecode_step_times(self, reset: bool = True):
    """Seconds this worker's runner spent per part of its steps since the last
    read (timers installed on the first call)."""
    runner = getattr(self, "model_runner", None)
    return step_times(runner, reset=reset) if runner is not None else None


def adadecode_worker_info(self):
    """What this worker is: its class, process, CPU affinity and OpenMP thread
    count (tests check Ray workers with it)."""
    return {"class": type(self).__name__, "pid": os.getpid(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


_RPCS = {STATS_RPC: adadecode_stats, RESET_RPC: adadecode_reset_lookup_cache,
         STEP_TIMES_RPC: adadecode_step_times, WORKER_INFO_RPC: adadecode_worker_info}


def add_worker_rpcs() -> None:
    """Add the methods to vLLM's ``WorkerBase`` (every worker class), once."""
    from vllm.v1.worker.worker_base import WorkerBase

    for name, fn in _RPCS.items():
        if not hasattr(WorkerBase, name):
            setattr(WorkerBase, name, fn)


# Runner methods timed, and the part of a step each one is.
_TIMED = (("execute_model", "execute"), ("sample_tokens", "sample_and_draft"),
          ("_model_forward", "forward"), ("propose_draft_token_ids", "drafting"))


def step_times(runner, reset: bool = True) -> dict:
    """Seconds spent in the runner's execute_model (its forward, and the rest),
    in sample_tokens (sampling, verification, bookkeeping and the drafter's
    call) and in the drafter alone, plus the number of steps. The first call
    installs the timers (instance attributes) and returns zeros."""
    acc = getattr(runner, "_adadecode_times", None)
    if acc is None:
        acc = runner._adadecode_times = dict.fromkeys([k for _, k in _TIMED], 0.0)
        acc["steps"] = 0
        for name, key in _TIMED:
            original = getattr(runner, name)

            def timed(*a, _orig=original, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    acc[_key] += time.perf_counter() - t0
                    if _key == "execute":
                        acc["steps"] += 1

            setattr(runner, name, timed)
    out = dict(acc)
    if reset:
        for k in acc:
            acc[k] = 0 if k == "steps" else 0.0
    return out
