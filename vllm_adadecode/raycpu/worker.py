"""``RayCPUWorker``: vLLM's CPU worker, binding its OpenMP threads itself.

Under the mp executor vLLM sets each CPU worker's OpenMP variables as it
spawns the process (``OMPProcessManager``); Ray starts the processes, so the
worker applies the same rules to itself before any parallel region runs:
its rank's CPU list from ``VLLM_CPU_OMP_THREADS_BIND`` (or the automatic
NUMA split), as OpenMP variables and as the process's CPU affinity.
"""

from __future__ import annotations

import logging
import os

from vllm.v1.worker.cpu_worker import CPUWorker

logger = logging.getLogger("vllm_adadecode")


def bind_openmp(vllm_config, local_rank: int) -> list[int] | None:
    """Bind this process to ``local_rank``'s CPUs as the mp executor would;
    returns them (None with ``VLLM_CPU_OMP_THREADS_BIND=nobind``)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    manager = OMPProcessManager(vllm_config)
    if manager.skip_setup or not manager.cpu_lists:
        return None
    cpus = list(manager.cpu_lists[local_rank])
    # The context manager sets the variables and would restore them on exit:
    # this process keeps them.
    manager.configure_omp_envs(0, local_rank).__enter__()
    os.sched_setaffinity(0, cpus)
    logger.info("AdaDecode Ray CPU worker, local rank %d: OpenMP bound to CPUs %s "
                "(OMP_NUM_THREADS=%s)", local_rank, cpus, os.environ.get("OMP_NUM_THREADS"))
    return cpus


class RayCPUWorker(CPUWorker):
    def init_device(self):
        self.omp_cpus = bind_openmp(self.vllm_config, self.local_rank)
        super().init_device()
