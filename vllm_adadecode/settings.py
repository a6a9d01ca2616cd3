"""Every AdaDecode setting, defined once: key, default, type, allowed values, help.

The config dataclass (``config.AdaDecodeConfig``), its ``from_dict``, the
validation at engine start (``config.resolve``) and the README's settings table
all come from ``SETTINGS``. ``python -m vllm_adadecode.settings`` prints that
table; a test checks the README holds exactly it.

Kinds:

* ``bool``: ``true`` / ``false``;
* ``int``: an integer >= ``low`` (``nullable``: or ``null``);
* ``fraction``: a number in (0, 1];
* ``layers``: increasing 0-based decoder-layer indices in [1, L-1];
* ``heads``: a heads folder, or ``"identity"``.

``exit_layers``, ``threshold`` and ``heads`` take their defaults from the heads
folder when there is one (``config.resolve``); the defaults here apply without.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import AdaDecodeConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    kind: str  # bool, int, fraction, layers, heads (a path: heads, corpus)
    default: Any
    help: str
    low: int = 1  # int: the smallest allowed value
    nullable: bool = False  # int: null allowed (no limit)
    default_text: str | None = None  # the README's default column, when not the value
    allowed_text: str | None = None  # the README's allowed column, when not the kind's
    readme_key: str | None = None  # the README's key column, when not `key`

    def allowed(self) -> str:
        if self.allowed_text is not None:
            return self.allowed_text
        if self.kind == "bool":
            return "`true` / `false`"
        if self.kind == "fraction":
            return "(0, 1]"
        if self.kind == "int":
            return f"integer >= {self.low}" + (", or `null`" if self.nullable else "")
        raise AssertionError(self.kind)

    def default_cell(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if self.default is None:
            return "`null`"
        return str(self.default)

    def validate(self, value: Any) -> Any:
        """The value, checked (the message names the key and what is allowed)."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise AdaDecodeConfigError(
                    f"adadecode '{self.key}' must be true or false, got {value!r}")
            return value
        if self.kind == "int":
            if value is None and self.nullable:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < self.low:
                raise AdaDecodeConfigError(
                    f"adadecode '{self.key}' must be an integer >= {self.low}, got {value!r}")
            return value
        if self.kind == "fraction":
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0.0 < float(value) <= 1.0):
                raise AdaDecodeConfigError(
                    f"adadecode '{self.key}' must be a number in (0, 1], got {value!r}")
            return float(value)
        raise AssertionError(f"{self.key}: kind {self.kind} is validated by config.resolve")

    def convert(self, value: Any) -> Any:
        """A value from a resolved settings dict (``AdaDecodeConfig.from_dict``)."""
        if value is None:
            return None
        if self.kind == "layers":
            return tuple(int(x) for x in value)
        return {"bool": bool, "int": int, "fraction": float, "heads": str}[self.kind](value)


# Paper defaults (arXiv 2506.03700): threshold 0.75, at most 5 early tokens.
SETTINGS: tuple[Setting, ...] = (
    Setting("exit_layers", "layers", None,
            "where a token may exit",
            default_text="the heads folder's, else layers at 1/4, 1/2, 3/4 of the depth",
            allowed_text="increasing 0-based layer indices in [1, L-1]"),
    Setting("threshold", "fraction", 0.75,
            "a token exits at the first exit layer whose top-1 probability reaches it",
            default_text="the heads folder's, else 0.75"),
    Setting("num_speculative_tokens", "int", 5,
            "maximum draft length per verification step"),
    Setting("heads", "heads", None,
            "exit heads (T_i)", readme_key="`model` / `heads`",
            default_text="shipped heads matching the model, else identity heads",
            allowed_text="a heads folder, or `\"identity\"`"),
    Setting("adaptive", "bool", True,
            "measure tokens/s with and without drafting per batch-size bucket and draft only "
            "where it pays (backs off under load; docs/performance/backoff.md)"),
    Setting("deferred", "bool", True,
            "deferred-layer verification: a draft's verification runs only the layers after "
            "its drafted depth, and a last draft attempt with no confident exit is resumed, "
            "not rerun (exact; docs/performance/deferred-verification.md)"),
    Setting("gemm_padding", "bool", True,
            "run the model's small CPU matmuls on the row count this machine runs fastest, "
            "measured at engine start (oneDNN is slower at 1-2 rows than at 4-6 on some "
            "CPUs); exact: rows never mix (docs/performance/gemm-padding.md)"),
    Setting("gemm_pad_rows", "int", None,
            "with `gemm_padding`: run every matmul of fewer rows on this many rows, instead "
            "of the padding measured at engine start", nullable=True,
            default_text="`null` (measured)"),
    Setting("shortlist", "bool", True,
            "screen exit checks on the heads folder's vocabulary shortlist (when it has one) "
            "and run the full LM head only for rows that pass; no exit on a shortlisted "
            "token is lost"),
    Setting("full_head_check", "bool", True,
            "confirm a shortlist-screened exit on the full LM head; `false`: a greedy "
            "request's draft exits on the shortlist's top-1 when its shortlist probability "
            "reaches the threshold, with no full LM head while drafting (sampled requests "
            "keep it); output is unchanged either way, only which drafts are made",
            default_text="the heads folder's `full_head_check`, else `true`"),
    Setting("lookup", "bool", True,
            "lookup drafts: the tokens that followed the longest earlier occurrence of the "
            "request's newest tokens (prompt and output so far), found with vLLM's own "
            "n-gram matcher; they cost no layers to draft"),
    Setting("lookup_min_match", "int", 2,
            "shortest recurring suffix (tokens) that yields a lookup draft"),
    Setting("lookup_max_match", "int", 5,
            "longest suffix the matcher tries",
            allowed_text="integer >= `lookup_min_match`"),
    Setting("lookup_max_tokens", "int", None,
            "most lookup tokens per step; each request drafts fewer, or none, as its own "
            "measured lookup acceptance says pays", nullable=True,
            default_text="`num_speculative_tokens`",
            allowed_text="1 .. `num_speculative_tokens`"),
    Setting("lookup_cache", "bool", True,
            "when a request's own tokens hold no match, search earlier responses of this "
            "engine"),
    Setting("lookup_cache_tokens", "int", 16384,
            "capacity of that cache (tokens, 4 bytes each); the oldest responses are "
            "evicted first", low=16),
    Setting("lookup_corpus", "bool", True,
            "when neither finds a match, draft the model's own most frequent continuation "
            "of the request's last 1-8 tokens, from the heads folder's corpus of its answers "
            "to training prompts (`corpus.safetensors`; the shipped SmolLM2 and "
            "Qwen2.5-Coder-0.5B heads have one); judged apart from repeats, with its own acceptance estimate per request"),
    Setting("corpus", "heads", None,
            "where corpus drafts come from: another folder's `corpus.safetensors`, for example "
            "that of a smaller model with the same tokenizer (`\"Qwen2.5-Coder-0.5B-Instruct\"`'s "
            "took Qwen2.5-Coder-1.5B's MT-Bench from 1.11x to 1.22x, 1.16 to 1.34 tokens per "
            "step; docs/performance/models.md)",
            default_text="the heads folder's corpus, or the one its config.json names in "
                         "`corpus_from` (the shipped Qwen2.5-Coder-1.5B heads name the 0.5B's)",
            allowed_text="a folder holding `corpus.safetensors`, or the name of a shipped "
                         "heads folder"),
    Setting("corpus_min_prob", "fraction", 0.4,
            "a corpus draft continues while the product of its tokens' frequencies in the "
            "corpus stays at or above this"),
    Setting("self_draft", "bool", True,
            "early-exit self-drafts, alone or after lookup tokens in the same draft; per "
            "request they pause after steps whose self-drafts were all rejected (doubling "
            "pauses; an attempt with no confident exit is not one), and with `adaptive` a second back-off decides whether they pay on top "
            "of lookups (off until its re-checks show they pay)"),
    Setting("disable_by_batch_size", "int", 16,
            "no drafts in a step whose batch holds this many requests or more, counting "
            "requests still prefilling (vLLM V0's setting of that name); below it the "
            "back-off decides. 16 because no bench run on the 2-core CPU measured a whole-run "
            "gain from drafting at batch 16 (docs/performance/load.md); `null` lifts it",
            nullable=True),
    Setting("tree", "bool", False,
            "token trees (ProPD): other earlier occurrences of the request's newest tokens, "
            "the exit heads' next likeliest tokens and the corpus's runners-up add branches "
            "beside the main draft (an occurrence "
            "that goes on past the draft's end lengthens it), all verified in one forward "
            "in which each node attends to the request's tokens and its own ancestors only; "
            "the longest branch the full model agrees with is kept (greedy and sampled "
            "requests without penalties, bad words, logit bias, allowed tokens, min-tokens, "
            "logprobs or structured output; exact; docs/guides/token-trees.md)"),
    Setting("tree_branches", "int", 3,
            "most branches a tree adds beside the main draft per request and step"),
    Setting("tree_nodes", "int", 4,
            "most nodes those branches add per request and step (vLLM schedules up to "
            "`num_speculative_tokens` + this many rows per request when `tree` is on; with "
            "`adaptive`, a request's lookup draft may fill them too where its measured "
            "acceptance says a longer chain pays, and branches take the rows it leaves)"),
    Setting("tree_prune_top_k", "int", None,
            "early pruning (ProPD): after the first exit layer of the verification forward, "
            "the exit head scores each tree node's parent, and a branch node outside its "
            "parent's top k (with everything below it) skips the remaining layers; it can "
            "cost accepted tokens, never change output; `null`: no pruning", nullable=True),
    Setting("sampled_drafts", "bool", True,
            "position-keyed sampling for requests with temperature > 0, so that their tokens "
            "do not depend on speculation, and drafts for them, kept only where they equal "
            "the target's own draw (docs/guides/how-it-works.md, \"Sampled requests\"; CPU engines); `false`: "
            "vLLM's own sampler and no drafts for sampled requests"),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def default(key: str) -> Any:
    return BY_KEY[key].default


def markdown_table() -> str:
    """The README's settings table (``method`` first: it selects AdaDecode)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|",
             '| `method` | | `"adadecode"` | selects AdaDecode |']
    for s in SETTINGS:
        key = s.readme_key or f"`{s.key}`"
        lines.append(f"| {key} | {s.default_cell()} | {s.allowed()} | {s.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
