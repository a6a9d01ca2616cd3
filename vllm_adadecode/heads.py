"""Exit heads: the learned parts of each exit head, their folder format, and the
base-model fingerprint that ties a heads folder to the model it was trained on.

An exit head at layer i maps that layer's residual-stream state h to
``lm_head(final_norm(z))``, where z is the head design's output
(``head_designs.py``; design ``dxd``: z = T_i h). Only the head's own
tensors are trained; the model's own final norm and LM head are reused,
frozen. With no training, T_i = I (logit lens).

Folder format (``HEADS_FORMAT``, version 2; version-1 folders, which have no
"design" and hold d x d transforms, still load as design ``dxd``)::

    HEADS_DIR/config.json        {"format": ..., "format_version": 2, "design": "dxd",
                                  "base_model_fingerprint": ...,
                                  "hidden_size": d, "exit_layers": [...],
                                  "threshold": 0.75, ...}
    HEADS_DIR/exit_heads.safetensors   "exit_heads.<layer>.transform": [d, d]
                                       "exit_heads.<layer>.<name>": the design's other tensors
                                       "exit_heads.shortlist": [n] token ids (optional)

The optional shortlist holds the token ids the model emitted most often in the
heads' training responses; the drafter screens exit checks on those rows of
the LM head before paying for the full vocabulary.

Loading reads safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import AdaDecodeConfigError
from .head_designs import DESIGNS

HEADS_FORMAT = "vllm-adadecode-exit-heads"
HEADS_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
WEIGHTS_FILE = "exit_heads.safetensors"
SHIPPED_DIR = Path(__file__).parent / "shipped_heads"

_FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
_FINGERPRINT_TENSORS = ("model.norm.weight", "model.embed_tokens.weight")


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("text_config", cfg)


def base_model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A short hash identifying a base model's architecture and weights.

    Hashes the architecture fields of config.json and, bf16-rounded so the
    model's storage dtype does not matter, the final norm weight and the
    first rows of the token embedding read straight from the safetensors files.
    """
    model_dir = Path(model_dir)
    cfg = _text_config(json.loads((model_dir / "config.json").read_text()))
    h = hashlib.sha256()
    h.update(json.dumps({k: cfg.get(k) for k in _FINGERPRINT_CONFIG_KEYS}).encode())
    from safetensors import safe_open

    found = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in _FINGERPRINT_TENSORS:
                if name in found or name not in st.keys():
                    continue
                sl = st.get_slice(name)
                t = sl[:16] if len(sl.get_shape()) == 2 else sl[:]
                h.update(name.encode())
                h.update(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                found.add(name)
    return "sha256:" + h.hexdigest()[:32]


# Dtypes an exit head's transform may be stored in.
HEAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Headroom over the tensors' own size in a weights file (header, shortlist).
_WEIGHTS_SLACK_BYTES = 16 << 20


def max_weights_bytes(hidden_size: int, num_heads: int, design: str = "dxd") -> int:
    """The largest weights file a heads folder may have: its heads' tensors in
    fp32, plus room for the header and a shortlist. A bigger file is not a
    heads folder of this shape, and is never read."""
    return (max(1, num_heads) * DESIGNS[design].num_values(hidden_size) * 4
            + _WEIGHTS_SLACK_BYTES)


class ExitHeads:
    """The exit heads of one base model, keyed by 0-based exit layer.

    ``transforms[layer]`` is every design's T_i; ``extra[layer]`` holds the
    design's other tensors by name (empty for ``dxd``).
    """

    def __init__(
        self,
        transforms: dict[int, torch.Tensor],
        *,
        hidden_size: int,
        threshold: float = 0.75,
        base_model_fingerprint: str | None = None,
        metadata: dict[str, Any] | None = None,
        shortlist: torch.Tensor | None = None,
        design: str = "dxd",
        extra: dict[int, dict[str, torch.Tensor]] | None = None,
    ):
        if not isinstance(design, str) or design not in DESIGNS:
            raise AdaDecodeConfigError(
                f"exit heads 'design' must be one of {', '.join(map(repr, DESIGNS))}, "
                f"got {design!r}")
        self.design = design
        self.shortlist = None if shortlist is None else shortlist.to(torch.int64)
        self.transforms = {int(k): v for k, v in sorted(transforms.items())}
        self.extra = {x: dict((extra or {}).get(x, {})) for x in self.transforms}
        self.hidden_size = hidden_size
        self.threshold = threshold
        self.base_model_fingerprint = base_model_fingerprint
        self.metadata = dict(metadata or {})
        shapes = DESIGNS[design].shapes(hidden_size)
        for layer in self.transforms:
            got = self.params(layer)
            if set(got) != set(shapes):
                raise AdaDecodeConfigError(
                    f"exit head for layer {layer} (design {design!r}) has tensors "
                    f"{sorted(got)}, expected {sorted(shapes)}")
            for name, t in got.items():
                if tuple(t.shape) != shapes[name]:
                    raise AdaDecodeConfigError(
                        f"exit head for layer {layer}: {name!r} has shape {tuple(t.shape)}, "
                        f"expected {shapes[name]}"
                    )

    def params(self, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor of one head by name, as its design's ``apply`` takes them."""
        return {"transform": self.transforms[layer], **self.extra[layer]}

    @property
    def exit_layers(self) -> list[int]:
        return list(self.transforms)

    @classmethod
    def identity(cls, exit_layers, hidden_size: int, **kw) -> "ExitHeads":
        return cls(
            {x: torch.eye(hidden_size) for x in exit_layers}, hidden_size=hidden_size, **kw
        )

    def keep(self, exit_layers, *, name: str = "exit_layers") -> "ExitHeads":
        """These heads with only those at ``exit_layers`` (a non-empty subset
        of theirs): a folder rewritten with them makes the engine draft at
        those layers by default. Threshold, shortlist and metadata are kept.
        A bad subset's error names ``name`` (the setting or flag that gave it)."""
        layers = sorted({int(x) for x in exit_layers})
        if not layers or not set(layers) <= set(self.transforms):
            raise AdaDecodeConfigError(
                f"{name} must be a non-empty subset of the folder's exit layers "
                f"{self.exit_layers}, got {list(exit_layers)}")
        return ExitHeads({x: self.transforms[x] for x in layers},
                         hidden_size=self.hidden_size, threshold=self.threshold,
                         base_model_fingerprint=self.base_model_fingerprint,
                         metadata=self.metadata, shortlist=self.shortlist,
                         design=self.design, extra={x: self.extra[x] for x in layers})

    def is_identity(self, layer: int) -> bool:
        if self.extra[layer]:
            return False
        t = self.transforms[layer]
        return bool(torch.equal(t, torch.eye(self.hidden_size, dtype=t.dtype)))

    # ---- folder I/O -------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write the folder; ``dtype`` (one of ``HEAD_DTYPES``) is the heads'
        storage dtype: the drafter casts them to the model's dtype on load."""
        from safetensors.torch import save_file

        if dtype not in HEAD_DTYPES:
            raise ValueError(f"dtype must be one of {HEAD_DTYPES}, got {dtype}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"exit_heads.{layer}.{name}": t.detach().to(dtype).contiguous()
            for layer in self.transforms for name, t in self.params(layer).items()
        }
        if self.shortlist is not None:
            tensors[SHORTLIST_KEY] = self.shortlist.contiguous()
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": HEADS_FORMAT})
        os.replace(tmp, out / WEIGHTS_FILE)
        cfg = {
            "format": HEADS_FORMAT,
            "format_version": HEADS_FORMAT_VERSION,
            "design": self.design,
            "base_model_fingerprint": self.base_model_fingerprint,
            "hidden_size": self.hidden_size,
            "exit_layers": self.exit_layers,
            "threshold": self.threshold,
            "shortlist_size": None if self.shortlist is None else int(self.shortlist.numel()),
            **{k: v for k, v in self.metadata.items() if k not in _RESERVED},
        }
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, heads_dir: str | os.PathLike) -> "ExitHeads":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(heads_dir).expanduser()
        where = f"adadecode heads folder {str(d)!r}"
        if not d.is_dir():
            raise AdaDecodeConfigError(f"{where} does not exist or is not a folder")
        try:
            cfg = json.loads((d / "config.json").read_text())
        except FileNotFoundError:
            raise AdaDecodeConfigError(f"{where} has no config.json") from None
        except ValueError as e:
            raise AdaDecodeConfigError(f"{where}: config.json is not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or cfg.get("format") != HEADS_FORMAT:
            raise AdaDecodeConfigError(
                f"{where}: config.json 'format' must be {HEADS_FORMAT!r}, "
                f"got {cfg.get('format') if isinstance(cfg, dict) else cfg!r}"
            )
        version = cfg.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
            raise AdaDecodeConfigError(
                f"{where}: 'format_version' must be one of "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}, got {version!r}"
            )
        design = cfg.get("design", "dxd") if version >= 2 else "dxd"
        if version >= 2 and "design" not in cfg:
            raise AdaDecodeConfigError(f"{where}: config.json lacks 'design'")
        if not isinstance(design, str) or design not in DESIGNS:
            raise AdaDecodeConfigError(
                f"{where}: config.json 'design' must be one of "
                f"{', '.join(map(repr, DESIGNS))}, got {design!r}")
        for key in ("hidden_size", "exit_layers", "threshold", "base_model_fingerprint"):
            if key not in cfg:
                raise AdaDecodeConfigError(f"{where}: config.json lacks {key!r}")
        hidden, layers = cfg["hidden_size"], cfg["exit_layers"]
        if (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1
                or not isinstance(layers, list)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise AdaDecodeConfigError(
                f"{where}: config.json 'hidden_size' must be a positive integer and "
                f"'exit_layers' a list of integers, got {hidden!r} and {layers!r}")
        weights = d / WEIGHTS_FILE
        try:
            size = weights.stat().st_size
        except FileNotFoundError:
            raise AdaDecodeConfigError(f"{where} has no {WEIGHTS_FILE}") from None
        limit = max_weights_bytes(hidden, len(layers), design)
        if size > limit:
            raise AdaDecodeConfigError(
                f"{where}: {WEIGHTS_FILE} is {size} bytes, more than the {limit} that "
                f"{len(layers)} {design!r} exit head(s) of hidden size {hidden} can need; "
                "refusing to load it")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdaDecodeConfigError(f"{where}: {WEIGHTS_FILE} is corrupt ({e})") from None
        transforms, extra = {}, {}
        for layer in layers:
            params = {}
            for name in DESIGNS[design].shapes(hidden):
                key = f"exit_heads.{layer}.{name}"
                if key not in tensors:
                    raise AdaDecodeConfigError(f"{where}: {WEIGHTS_FILE} lacks tensor {key!r}")
                t = tensors[key]
                if t.dtype not in HEAD_DTYPES:
                    raise AdaDecodeConfigError(
                        f"{where}: tensor {key!r} has dtype {t.dtype}; allowed: "
                        f"{', '.join(str(x) for x in HEAD_DTYPES)}")
                if not bool(torch.isfinite(t).all()):
                    raise AdaDecodeConfigError(
                        f"{where}: tensor {key!r} holds NaN or Inf values")
                params[name] = t
            transforms[int(layer)] = params.pop("transform")
            extra[int(layer)] = params
        shortlist = tensors.get(SHORTLIST_KEY)
        if shortlist is not None and (shortlist.dim() != 1 or shortlist.is_floating_point()):
            raise AdaDecodeConfigError(
                f"{where}: {SHORTLIST_KEY!r} must be a 1-D tensor of token ids")
        return cls(
            transforms,
            hidden_size=int(cfg["hidden_size"]),
            threshold=float(cfg["threshold"]),
            base_model_fingerprint=cfg["base_model_fingerprint"],
            metadata={k: v for k, v in cfg.items() if k not in _RESERVED},
            shortlist=shortlist,
            design=design,
            extra=extra,
        )

    def check_base_model(self, model_dir: str | os.PathLike, *, hidden_size: int) -> None:
        """Refuse heads trained for another model (hidden size or fingerprint)."""
        if self.hidden_size != hidden_size:
            raise AdaDecodeConfigError(
                f"adadecode heads are for hidden size {self.hidden_size}, but the served "
                f"model has hidden size {hidden_size}: these heads belong to another model"
            )
        if Path(model_dir).is_dir():
            fp = base_model_fingerprint(model_dir)
            if self.base_model_fingerprint != fp:
                raise AdaDecodeConfigError(
                    f"adadecode heads were trained for base model fingerprint "
                    f"{self.base_model_fingerprint}, but the served model {str(model_dir)!r} "
                    f"has fingerprint {fp}: these heads belong to another model"
                )


_RESERVED = {
    "format",
    "format_version",
    "design",
    "base_model_fingerprint",
    "hidden_size",
    "exit_layers",
    "threshold",
    "shortlist_size",
}
SHORTLIST_KEY = "exit_heads.shortlist"


def shipped_heads_for(model_dir: str, *, hidden_size: int):
    """The packaged heads whose fingerprint matches ``model_dir``, as (heads, path)."""
    if not SHIPPED_DIR.is_dir() or not Path(model_dir).is_dir():
        return None
    fp = None
    for cfg_file in sorted(SHIPPED_DIR.glob("*/config.json")):
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError:
            continue
        if cfg.get("hidden_size") != hidden_size:
            continue
        fp = fp or base_model_fingerprint(model_dir)
        if cfg.get("base_model_fingerprint") == fp:
            return ExitHeads.load(cfg_file.parent), str(cfg_file.parent)
    return None
