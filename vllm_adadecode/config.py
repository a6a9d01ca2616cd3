"""AdaDecode's resolved settings and their validation at engine start.

Each setting is defined once in ``settings.SETTINGS`` (default, type, allowed
values, help); this module builds the config dataclass from it and resolves a
user's raw settings against the model and its heads folder.

A user switches AdaDecode on through vLLM's speculative config, e.g.::

    LLM(model, speculative_config={"method": "adadecode", "threshold": 0.8})
    vllm serve MODEL --speculative-config '{"method": "adadecode", "exit_layers": [12, 20]}'
    vllm serve MODEL --spec-model HEADS_DIR            # an AdaDecode heads folder

and may also pass settings through ``--additional-config '{"adadecode": {...}}'``.
Keys given in the speculative config win over the additional config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import AdaDecodeConfigError
from .settings import BY_KEY, SETTINGS, Setting, default

__all__ = ["AdaDecodeConfig", "AdaDecodeConfigError", "resolve"]

METHOD = "adadecode"
DEFAULT_THRESHOLD = default("threshold")
DEFAULT_NUM_SPECULATIVE_TOKENS = default("num_speculative_tokens")

# Keys AdaDecode owns inside the speculative config (besides vLLM's own below).
ADADECODE_KEYS = tuple(s.key for s in SETTINGS if s.key != "num_speculative_tokens")
# vLLM speculative-config keys that keep their vLLM meaning with AdaDecode.
VLLM_KEYS = ("method", "num_speculative_tokens", "model")
ALLOWED_KEYS = VLLM_KEYS + ADADECODE_KEYS
# "heads": "identity" turns the shipped heads off: T_i = I (the logit lens).
IDENTITY_HEADS = "identity"

# An AdaDecode engine that proposes nothing: the engine alone, the second plain
# baseline of the demo and the bench (every speedup divides by the faster of it
# and vanilla).
DRAFTING_OFF = {"lookup": False, "self_draft": False}


def drafting_off(spec: dict | None) -> bool:
    return bool(spec) and all(spec.get(k) == v for k, v in DRAFTING_OFF.items())


def _to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["exit_layers"] = list(self.exit_layers)
    return d


def _from_dict(cls, d: dict[str, Any]) -> "AdaDecodeConfig":
    """Resolved settings (``to_dict``'s output) back into the dataclass; a
    missing key takes its default."""
    return cls(**{s.key: s.convert(d[s.key] if s.key in d else s.default)
                  for s in SETTINGS})


def _lookup_tokens(self) -> int:
    """Most lookup tokens a request may draft in one step."""
    if self.lookup_max_tokens is None:
        return self.num_speculative_tokens
    return min(self.lookup_max_tokens, self.num_speculative_tokens)


def _chain_tokens(self) -> int:
    """Most lookup tokens a request's main draft may hold in one step, when the
    back-off sizes drafts (``adaptive``): with ``tree`` on, every row vLLM
    schedules per request (``num_speculative_tokens`` + ``tree_nodes``), so a
    long recurring span is drafted as one chain, at the length its measured
    acceptance and row cost say pays, and branches fill the rows it leaves."""
    if self.tree and self.adaptive and self.lookup_max_tokens is None:
        return self.num_speculative_tokens + self.tree_nodes
    return self.lookup_tokens


def _field(s: Setting):
    if s.key == "exit_layers":  # always resolved: no default
        return (s.key, tuple)
    return (s.key, Any, dataclasses.field(default=s.default, metadata={"help": s.help}))


# Resolved settings, as the drafter in every worker sees them: one field per
# entry of settings.SETTINGS (exit_layers first: it has no default).
AdaDecodeConfig = dataclasses.make_dataclass(
    "AdaDecodeConfig", [_field(s) for s in SETTINGS], frozen=True,
    namespace={"to_dict": _to_dict, "from_dict": classmethod(_from_dict),
               "lookup_tokens": property(_lookup_tokens),
               "chain_tokens": property(_chain_tokens),
               "__doc__": "Resolved AdaDecode settings (fields: settings.SETTINGS)."})
AdaDecodeConfig.__module__ = __name__


def default_exit_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """Quarter, half and three quarters of the depth (the paper's 8/16/24 of 32)."""
    layers = sorted({max(1, round(num_hidden_layers * q)) for q in (0.25, 0.5, 0.75)})
    return tuple(x for x in layers if 1 <= x < num_hidden_layers)


def validate_threshold(value: Any) -> float:
    return BY_KEY["threshold"].validate(value)


def validate_exit_layers(value: Any, num_hidden_layers: int) -> tuple[int, ...]:
    allowed = f"integers in [1, {num_hidden_layers - 1}] in strictly increasing order"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise AdaDecodeConfigError(
            f"adadecode 'exit_layers' must be a list of {allowed}, got {value!r}"
        )
    layers = list(value)
    if not layers:
        raise AdaDecodeConfigError(f"adadecode 'exit_layers' is empty; give {allowed}")
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int):
            raise AdaDecodeConfigError(
                f"adadecode 'exit_layers' must hold {allowed}, got {x!r} in {layers}"
            )
        if not 1 <= x < num_hidden_layers:
            raise AdaDecodeConfigError(
                f"adadecode 'exit_layers' entry {x} is out of range: the model has "
                f"{num_hidden_layers} layers, so exit layers must be {allowed}"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise AdaDecodeConfigError(
            f"adadecode 'exit_layers' must be strictly increasing, got {layers}"
        )
    return tuple(layers)


def validate_num_speculative_tokens(value: Any) -> int:
    return BY_KEY["num_speculative_tokens"].validate(value)


def is_heads_dir(path: Any) -> bool:
    """True when ``path`` is a folder whose config.json names the exit-heads format."""
    from .heads import HEADS_FORMAT

    if not isinstance(path, str):
        return False
    cfg = Path(path).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text()).get("format") == HEADS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _vocab_size(model_dir: str) -> int | None:
    """The model folder's vocabulary size (config.json), or None when unknown."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg).get("vocab_size")


def is_adadecode_request(spec: dict[str, Any] | None) -> bool:
    """Does a raw speculative-config dict ask for AdaDecode?"""
    if not spec:
        return False
    if spec.get("method") == METHOD:
        return True
    return spec.get("method") in (None, "draft_model") and is_heads_dir(spec.get("model"))


def resolve(
    spec: dict[str, Any],
    additional: dict[str, Any] | None,
    *,
    model_dir: str,
    num_hidden_layers: int,
    hidden_size: int,
) -> AdaDecodeConfig:
    """Turn the user's raw settings into a validated AdaDecodeConfig.

    ``spec`` is the speculative-config dict (keys already normalised to
    snake_case); ``additional`` is ``additional_config.get("adadecode")``.
    Raises AdaDecodeConfigError naming the field and the allowed values.
    """
    from .head_designs import ENGINE_DESIGNS
    from .heads import ExitHeads, shipped_heads_for

    unknown = sorted(set(spec) - set(ALLOWED_KEYS))
    if unknown:
        raise AdaDecodeConfigError(
            f"unknown adadecode setting(s) {unknown} in the speculative config; "
            f"allowed keys: {list(ALLOWED_KEYS)}"
        )
    extra = dict(additional or {})
    if not isinstance(additional or {}, dict):
        raise AdaDecodeConfigError(
            "additional_config['adadecode'] must be a JSON object with keys "
            f"{list(ADADECODE_KEYS) + ['num_speculative_tokens']}"
        )
    unknown = sorted(set(extra) - set(ADADECODE_KEYS + ("num_speculative_tokens",)))
    if unknown:
        raise AdaDecodeConfigError(
            f"unknown adadecode setting(s) {unknown} in additional_config['adadecode']; "
            f"allowed keys: {list(ADADECODE_KEYS) + ['num_speculative_tokens']}"
        )
    merged = {**extra, **{k: v for k, v in spec.items() if k != "method"}}

    heads_path = merged.pop("heads", None)
    model_path = merged.pop("model", None)
    if heads_path is not None and model_path is not None and heads_path != model_path:
        raise AdaDecodeConfigError(
            "give the adadecode heads folder once: 'model' and 'heads' disagree "
            f"({model_path!r} vs {heads_path!r})"
        )
    heads_path = heads_path if heads_path is not None else model_path

    heads = None
    implicit = False  # heads chosen by fingerprint rather than named by the user
    if heads_path == IDENTITY_HEADS:
        heads_path = None
    elif heads_path is not None:
        if not isinstance(heads_path, str):
            raise AdaDecodeConfigError(
                f"adadecode 'heads' must be a path to an exit-heads folder or "
                f"{IDENTITY_HEADS!r}, got {heads_path!r}"
            )
        heads = ExitHeads.load(heads_path)  # raises AdaDecodeConfigError when bad
        if heads.design not in ENGINE_DESIGNS:
            raise AdaDecodeConfigError(
                f"adadecode heads folder {heads_path!r}: config.json 'design' is "
                f"{heads.design!r}, which the drafter does not run; the engine runs: "
                f"{', '.join(map(repr, ENGINE_DESIGNS))} (`vllm-adadecode eval-heads` "
                "evaluates every design offline)")
        heads.check_base_model(model_dir, hidden_size=hidden_size)
        heads_path = str(Path(heads_path).expanduser().resolve())
    else:
        shipped = shipped_heads_for(model_dir, hidden_size=hidden_size)
        if shipped is not None:
            heads, heads_path = shipped
            heads_path = str(Path(heads_path).resolve())
            implicit = True

    if "exit_layers" in merged:
        exit_layers = validate_exit_layers(merged.pop("exit_layers"), num_hidden_layers)
    elif heads is not None:
        exit_layers = validate_exit_layers(heads.exit_layers, num_hidden_layers)
    else:
        exit_layers = default_exit_layers(num_hidden_layers)
    if heads is not None:
        missing = [x for x in exit_layers if x not in heads.exit_layers]
        if missing and implicit:
            # The shipped heads do not cover the layers asked for: identity heads.
            heads, heads_path = None, None
        elif missing:
            raise AdaDecodeConfigError(
                f"adadecode 'exit_layers' {list(exit_layers)}: the heads folder "
                f"{heads_path} has no head for layer(s) {missing}; it has heads for "
                f"{list(heads.exit_layers)}"
            )

    if "threshold" in merged:
        threshold = validate_threshold(merged.pop("threshold"))
    elif heads is not None:
        threshold = validate_threshold(heads.threshold)
    else:
        threshold = DEFAULT_THRESHOLD

    if "full_head_check" not in merged and heads is not None \
            and "full_head_check" in heads.metadata:
        # A heads folder with a wide shortlist may draft on it (shortlist --draft-on-shortlist).
        value = heads.metadata["full_head_check"]
        if not isinstance(value, bool):
            raise AdaDecodeConfigError(
                f"adadecode heads folder {heads_path}: config.json 'full_head_check' must be "
                f"true or false, got {value!r}")
        merged["full_head_check"] = value

    num_spec = validate_num_speculative_tokens(
        merged.pop("num_speculative_tokens", DEFAULT_NUM_SPECULATIVE_TOKENS))
    # Every other setting checks itself (settings.SETTINGS).
    values = {s.key: s.validate(merged.pop(s.key, s.default)) for s in SETTINGS
            if s.kind in ("bool", "int", "fraction")
            and s.key not in ("threshold", "num_speculative_tokens")}
    if values["lookup_max_match"] < values["lookup_min_match"]:
        raise AdaDecodeConfigError(
            f"adadecode 'lookup_max_match' ({values['lookup_max_match']}) must be >= "
            f"'lookup_min_match' ({values['lookup_min_match']})")
    if values["lookup_max_tokens"] is not None and values["lookup_max_tokens"] > num_spec:
        raise AdaDecodeConfigError(
            f"adadecode 'lookup_max_tokens' ({values['lookup_max_tokens']}) must be <= "
            f"'num_speculative_tokens' ({num_spec}): a step drafts at most that many tokens")
    if values["tree_prune_top_k"] is not None and not (values["tree"] and values["deferred"]):
        raise AdaDecodeConfigError(
            "adadecode 'tree_prune_top_k' prunes token trees in the layered verification "
            "forward: it needs 'tree': true and 'deferred': true (or set it to null)")
    if values["tree"] and not (values["lookup"] or values["self_draft"]):
        raise AdaDecodeConfigError(
            "adadecode 'tree' grows branches from lookups and from the exit heads' likely "
            "tokens: it needs 'lookup': true or 'self_draft': true (or set 'tree': false)")
    corpus = merged.pop("corpus", None)
    corpus_path, corpus_key = ((heads_path, "heads") if corpus is None
                               else (_corpus_folder(corpus), "corpus"))
    if corpus is None and heads is not None and "corpus_from" in heads.metadata:
        corpus_path = _borrowed_corpus(heads_path, heads.metadata["corpus_from"])
    if corpus_path is not None and values["lookup"] and values["lookup_corpus"]:
        from .drafts.corpus import CorpusError, load_corpus_tokens

        try:  # a bad corpus file is refused at start, not in the first request
            load_corpus_tokens(corpus_path, _vocab_size(model_dir))
        except CorpusError as e:
            raise AdaDecodeConfigError(f"adadecode '{corpus_key}': {e}") from None
    assert not merged, merged
    return AdaDecodeConfig(
        **values,
        exit_layers=exit_layers,
        threshold=threshold,
        num_speculative_tokens=num_spec,
        heads=heads_path,
        corpus=corpus_path,
    )


def _borrowed_corpus(heads_path: str, name: Any) -> str:
    """The corpus a heads folder names in its config.json ("corpus_from": a
    shipped heads folder, or a folder, whose model has the same tokenizer),
    for a folder that has no corpus file of its own."""
    from .drafts.corpus import CORPUS_FILE

    if (Path(heads_path) / CORPUS_FILE).is_file():
        return heads_path
    try:
        return _corpus_folder(name)
    except AdaDecodeConfigError as e:
        raise AdaDecodeConfigError(
            f"adadecode heads folder {heads_path}: its config.json's 'corpus_from' "
            f"({name!r}) names no corpus ({e}); fix that file, or give the "
            "'corpus' setting") from None


def _corpus_folder(value: Any) -> str:
    """The folder of the ``corpus`` setting: a folder holding the corpus file,
    or the name of a shipped heads folder."""
    from .drafts.corpus import CORPUS_FILE
    from .heads import SHIPPED_DIR

    allowed = (f"a folder holding {CORPUS_FILE}, or the name of a shipped heads folder "
               f"({', '.join(sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CORPUS_FILE).is_file()))})")
    if not isinstance(value, str) or not value:
        raise AdaDecodeConfigError(f"adadecode 'corpus' must be {allowed}, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_dir() and "/" not in value and (SHIPPED_DIR / value).is_dir():
        path = SHIPPED_DIR / value
    if not (path / CORPUS_FILE).is_file():
        raise AdaDecodeConfigError(
            f"adadecode 'corpus': {value!r} has no {CORPUS_FILE}; give {allowed}")
    return str(path.resolve())
