"""AdaDecode's settings: fields, defaults, and validation with clear messages.

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

METHOD = "adadecode"

# Paper defaults (arXiv 2506.03700): threshold 0.75, at most 5 early tokens.
DEFAULT_THRESHOLD = 0.75
DEFAULT_NUM_SPECULATIVE_TOKENS = 5

# Keys AdaDecode owns inside the speculative config (besides vLLM's own below).
ADADECODE_KEYS = ("exit_layers", "threshold", "heads", "adaptive", "deferred", "shortlist",
                  "lookup", "lookup_min_match", "lookup_max_match", "lookup_max_tokens",
                  "lookup_cache", "lookup_cache_tokens", "lookup_corpus", "corpus_min_prob",
                  "self_draft", "disable_by_batch_size", "sampled_drafts")
# Lookup defaults: match 2-5 tokens (vLLM's ngram bench settings), a cache of
# earlier responses of up to 16,384 tokens (64 KiB; one scan of it per
# request-step that finds no match in its own tokens).
DEFAULT_LOOKUP_MIN_MATCH = 2
DEFAULT_LOOKUP_MAX_MATCH = 5
DEFAULT_LOOKUP_CACHE_TOKENS = 16384
# Corpus drafts continue while the product of their frequencies stays >= this
# (offline on the eval split: 0.4 gave the most tokens per unit of step cost).
DEFAULT_CORPUS_MIN_PROB = 0.4
# No drafting while a step holds this many requests or more: at 16 no bench
# run on the 2-core CPU measured a whole-run gain (docs/PERFORMANCE.md 11).
DEFAULT_DISABLE_BY_BATCH_SIZE = 16
# vLLM speculative-config keys that keep their vLLM meaning with AdaDecode.
# An AdaDecode engine that proposes nothing: the engine alone, the second plain
# baseline of the demo and the bench (every speedup divides by the faster of it
# and vanilla).
DRAFTING_OFF = {"lookup": False, "self_draft": False}


def drafting_off(spec: dict | None) -> bool:
    return bool(spec) and all(spec.get(k) == v for k, v in DRAFTING_OFF.items())


VLLM_KEYS = ("method", "num_speculative_tokens", "model")
ALLOWED_KEYS = VLLM_KEYS + ADADECODE_KEYS
# "heads": "identity" turns the shipped heads off: T_i = I (the logit lens).
IDENTITY_HEADS = "identity"


class AdaDecodeConfigError(ValueError):
    """Bad AdaDecode input; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class AdaDecodeConfig:
    """Resolved settings, as the drafter in every worker sees them."""

    exit_layers: tuple[int, ...]
    """0-based decoder-layer indices whose output may emit a draft token;
    each in [1, num_hidden_layers - 1], strictly increasing."""
    threshold: float = DEFAULT_THRESHOLD
    """A token exits at the first exit layer whose top-1 probability >= threshold."""
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    """Maximum draft length per verification step."""
    heads: str | None = None
    """Exit-heads folder; None means identity heads (the model's own norm + LM head)."""
    adaptive: bool = True
    """Measure tokens per second with and without drafting, per batch size, and
    draft only where drafting is measured to pay (speculation backs off under load)."""
    deferred: bool = True
    """Deferred-layer verification: a drafted token's verification runs only the
    layers after the depth the drafter already took it to."""
    shortlist: bool = True
    """Screen each exit check on the heads' vocabulary shortlist first (when the
    heads folder has one); only rows that pass are checked on the full LM head,
    so every exit decision is the one the full LM head would make for tokens in
    the shortlist."""
    lookup: bool = True
    """Lookup drafts: propose the tokens that followed the longest earlier
    occurrence of the request's newest tokens (prompt and output so far)."""
    lookup_min_match: int = DEFAULT_LOOKUP_MIN_MATCH
    """Shortest suffix (tokens) that must recur for a lookup draft."""
    lookup_max_match: int = DEFAULT_LOOKUP_MAX_MATCH
    """Longest suffix the matcher tries."""
    lookup_max_tokens: int | None = None
    """Most lookup tokens per step (None: num_speculative_tokens); each request
    drafts fewer as its observed acceptance says."""
    lookup_cache: bool = True
    """Also match against earlier responses of this engine (bounded cache)."""
    lookup_cache_tokens: int = DEFAULT_LOOKUP_CACHE_TOKENS
    """Capacity of that cache in tokens; the oldest responses are evicted first."""
    lookup_corpus: bool = True
    """When neither finds a match, draft from the heads folder's corpus of the
    model's own responses (``corpus.safetensors``), when it has one."""
    corpus_min_prob: float = DEFAULT_CORPUS_MIN_PROB
    """A corpus draft continues while the product of its tokens' frequencies
    (after their contexts, in the corpus) stays at or above this."""
    self_draft: bool = True
    """Early-exit self-drafts (from where a lookup draft ends, or alone)."""
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    """No drafts in a step whose batch holds this many requests or more (None:
    no limit; below it the back-off decides)."""
    sampled_drafts: bool = True
    """Position-keyed sampling: the token at position p of a sampled request is
    drawn with noise keyed on (seed, p), so its output does not depend on
    speculation; sampled requests then get drafts, kept only where they equal
    the target's draw. False: vLLM's own sampler, and no drafts for sampled
    requests (CPU engines only; other platforms always behave as False)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exit_layers"] = list(self.exit_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdaDecodeConfig":
        return cls(
            exit_layers=tuple(d["exit_layers"]),
            threshold=float(d["threshold"]),
            num_speculative_tokens=int(d["num_speculative_tokens"]),
            heads=d.get("heads"),
            adaptive=bool(d.get("adaptive", True)),
            deferred=bool(d.get("deferred", True)),
            shortlist=bool(d.get("shortlist", True)),
            lookup=bool(d.get("lookup", True)),
            lookup_min_match=int(d.get("lookup_min_match", DEFAULT_LOOKUP_MIN_MATCH)),
            lookup_max_match=int(d.get("lookup_max_match", DEFAULT_LOOKUP_MAX_MATCH)),
            lookup_max_tokens=(None if d.get("lookup_max_tokens") is None
                               else int(d["lookup_max_tokens"])),
            lookup_cache=bool(d.get("lookup_cache", True)),
            lookup_cache_tokens=int(d.get("lookup_cache_tokens", DEFAULT_LOOKUP_CACHE_TOKENS)),
            lookup_corpus=bool(d.get("lookup_corpus", True)),
            corpus_min_prob=float(d.get("corpus_min_prob", DEFAULT_CORPUS_MIN_PROB)),
            self_draft=bool(d.get("self_draft", True)),
            disable_by_batch_size=(None if d.get("disable_by_batch_size") is None
                                   else int(d["disable_by_batch_size"])),
            sampled_drafts=bool(d.get("sampled_drafts", True)),
        )

    @property
    def lookup_tokens(self) -> int:
        """Most lookup tokens a request may draft in one step."""
        if self.lookup_max_tokens is None:
            return self.num_speculative_tokens
        return min(self.lookup_max_tokens, self.num_speculative_tokens)


def default_exit_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """Quarter, half and three quarters of the depth (the paper's 8/16/24 of 32)."""
    layers = sorted({max(1, round(num_hidden_layers * q)) for q in (0.25, 0.5, 0.75)})
    return tuple(x for x in layers if 1 <= x < num_hidden_layers)


def validate_threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdaDecodeConfigError(
            f"adadecode 'threshold' must be a number in (0, 1], got {value!r}"
        )
    if not 0.0 < float(value) <= 1.0:
        raise AdaDecodeConfigError(
            f"adadecode 'threshold' must be in (0, 1], got {value!r}"
        )
    return float(value)


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
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdaDecodeConfigError(
            f"adadecode 'num_speculative_tokens' must be an integer >= 1, got {value!r}"
        )
    return value


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

    num_spec = merged.pop("num_speculative_tokens", DEFAULT_NUM_SPECULATIVE_TOKENS)
    num_spec = validate_num_speculative_tokens(num_spec)
    flags = {}
    for key, default in (("adaptive", True), ("deferred", True), ("shortlist", True),
                         ("lookup", True), ("lookup_cache", True), ("lookup_corpus", True),
                         ("self_draft", True), ("sampled_drafts", True)):
        flags[key] = merged.pop(key, default)
        if not isinstance(flags[key], bool):
            raise AdaDecodeConfigError(
                f"adadecode '{key}' must be true or false, got {flags[key]!r}")
    ints = {}
    for key, default, low in (("lookup_min_match", DEFAULT_LOOKUP_MIN_MATCH, 1),
                              ("lookup_max_match", DEFAULT_LOOKUP_MAX_MATCH, 1),
                              ("lookup_max_tokens", None, 1),
                              ("lookup_cache_tokens", DEFAULT_LOOKUP_CACHE_TOKENS, 16),
                              ("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE, 1)):
        value = merged.pop(key, default)
        if value is None and key in ("lookup_max_tokens", "disable_by_batch_size"):
            ints[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AdaDecodeConfigError(
                f"adadecode '{key}' must be an integer >= {low}, got {value!r}")
        ints[key] = value
    if ints["lookup_max_match"] < ints["lookup_min_match"]:
        raise AdaDecodeConfigError(
            f"adadecode 'lookup_max_match' ({ints['lookup_max_match']}) must be >= "
            f"'lookup_min_match' ({ints['lookup_min_match']})")
    if ints["lookup_max_tokens"] is not None and ints["lookup_max_tokens"] > num_spec:
        raise AdaDecodeConfigError(
            f"adadecode 'lookup_max_tokens' ({ints['lookup_max_tokens']}) must be <= "
            f"'num_speculative_tokens' ({num_spec}): a step drafts at most that many tokens")
    corpus_min_prob = merged.pop("corpus_min_prob", DEFAULT_CORPUS_MIN_PROB)
    if (isinstance(corpus_min_prob, bool) or not isinstance(corpus_min_prob, (int, float))
            or not 0.0 < corpus_min_prob <= 1.0):
        raise AdaDecodeConfigError(
            f"adadecode 'corpus_min_prob' must be a number in (0, 1], got {corpus_min_prob!r}")
    if heads_path is not None and flags["lookup"] and flags["lookup_corpus"]:
        from .drafts.corpus import CorpusError, load_corpus_tokens

        try:  # a bad corpus file is refused at start, not in the first request
            load_corpus_tokens(heads_path, _vocab_size(model_dir))
        except CorpusError as e:
            raise AdaDecodeConfigError(f"adadecode 'heads': {e}") from None
    assert not merged, merged
    return AdaDecodeConfig(
        corpus_min_prob=float(corpus_min_prob),
        **ints,
        exit_layers=exit_layers,
        threshold=threshold,
        num_speculative_tokens=num_spec,
        heads=heads_path,
        **flags,
    )
