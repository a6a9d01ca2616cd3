"""The plugin's environment variables are not mistaken for vLLM's own: vLLM
warns at every engine start about any VLLM_* name it does not know."""

import re
from pathlib import Path

import vllm_adadecode


def test_every_vllm_variable_the_plugin_names_is_one_vllm_knows():
    from vllm import envs

    root = Path(vllm_adadecode.__file__).parent
    names = set()
    for path in root.rglob("*.py"):
        # Quoted names (variables read or set); a quoted prefix ends in "_".
        names |= {n for n in re.findall(r"[\"']\$?(VLLM_[A-Z0-9_]+)", path.read_text())
                  if not n.endswith("_")}
    assert names, "the scan found no names at all"
    unknown = sorted(n for n in names if n not in envs.environment_variables)
    assert not unknown, f"not vLLM variables, rename without the VLLM_ prefix: {unknown}"


def test_the_engine_environment_passes_vllms_check():
    from vllm.platforms.interface import Platform

    from vllm_adadecode.cpu_env import runtime_env

    env = runtime_env({}, tensor_parallel_size=2)
    env["ADADECODE_STATS"] = "1"
    import os

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        Platform.validate_environ(hard_fail=True)  # raises on an unknown VLLM_* name
    finally:
        os.environ.clear()
        os.environ.update(saved)
