"""Ray on the CPU platform: a vLLM platform plugin, off unless asked for.

vLLM 0.32 refuses its Ray executor on CPU: ``CpuPlatform.ray_device_key`` is
empty, and Ray accepts neither ``"CPU"`` nor a custom resource where vLLM asks
for accelerator ids. This plugin (entry point group ``vllm.platform_plugins``)
selects ``RayCpuPlatform``, the CPU platform with Ray's ``"GPU"`` resource as
its device key, so vLLM's Ray executor places one CPU worker per GPU slot of a
cluster started with ``--num-gpus`` equal to the workers it should hold (the
slots are only placement tokens: nothing runs on a GPU). Its workers bind
their OpenMP threads by the same rules as the mp executor
(``VLLM_CPU_OMP_THREADS_BIND``), which vLLM applies only when it spawns the
processes itself.

It is active only with ``ADADECODE_RAY_CPU=1`` in the environment and only
where vLLM would pick its CPU platform: nothing changes on GPU machines, where
vLLM runs Ray itself, nor for engines started without the variable. Set it in
the shell that starts the engine (``vllm serve``, or the process that builds
``LLM(...)``); the engine passes it on to its Ray workers.

This module imports nothing from vLLM: vLLM calls ``platform_plugin`` while it
is still choosing its platform.
"""

from __future__ import annotations

import os

ENV = "ADADECODE_RAY_CPU"
PLATFORM = "vllm_adadecode.raycpu.platform.RayCpuPlatform"


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def platform_plugin() -> str | None:
    """vLLM platform-plugin entry point: the Ray-capable CPU platform, or None
    (vLLM's own choice) unless ``ADADECODE_RAY_CPU=1`` on a CPU build."""
    if not enabled():
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None  # an accelerator build: vLLM's own platform runs Ray
    return PLATFORM
