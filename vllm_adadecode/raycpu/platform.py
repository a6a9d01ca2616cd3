"""``RayCpuPlatform``: vLLM's CPU platform, placeable by vLLM's Ray executor.

Every override touches vLLM 0.32 internals (the platform interface, the
parallel config); see ``vllm_adadecode.raycpu`` for why each is needed.
"""

from __future__ import annotations

import os

from vllm.platforms.cpu import CpuPlatform

from . import ENV

CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
RAY_CPU_WORKER = "vllm_adadecode.raycpu.worker.RayCPUWorker"
# Passed to every Ray worker before it starts: the worker process must choose
# this platform too, and must preload the same OpenMP runtime.
_FORWARDED = (ENV, "LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
              "VLLM_CPU_KVCACHE_SPACE")


class RayCpuPlatform(CpuPlatform):
    # Ray's GPU resource as a placement token: vLLM's Ray executor asks Ray
    # for this key's ids per worker, and Ray has ids only for accelerators.
    ray_device_key: str = "GPU"

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        parallel = vllm_config.parallel_config
        if parallel.distributed_executor_backend != "ray":
            return
        if parallel.worker_cls == CPU_WORKER:
            parallel.worker_cls = RAY_CPU_WORKER
        from ray.runtime_env import RuntimeEnv

        base = dict(parallel.ray_runtime_env or {})
        env_vars = dict(base.get("env_vars") or {})
        for key in _FORWARDED:
            if key in os.environ:
                env_vars.setdefault(key, os.environ[key])
        base["env_vars"] = env_vars
        parallel.ray_runtime_env = RuntimeEnv(**base)
