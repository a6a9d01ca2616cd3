"""What every draft source shares: the interface, a request's draft within one
step, and where each drafted token came from.

A draft source in the style of vLLM's proposers: given a request's tokens so
far, propose up to ``k`` next tokens; it never verifies and knows no engine
internals. Lookup (lookup.py), the response cache (cache.py) and the corpus
(corpus.py) are such sources; early exits (early_exit.py) run the target's own
first layers and so work on a whole step's ``RequestDraft``s at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch


class DraftSource(Protocol):
    name: str  # "lookup", "cache", "corpus"

    def propose(self, tokens: np.ndarray, k: int) -> Sequence[int]:
        """Up to ``k`` tokens to follow ``tokens`` (empty: no proposal)."""


@dataclass(frozen=True)
class Origin:
    """Where a drafted token came from: a source's name, and for an early
    exit, the exit layer."""

    source: str  # "lookup", "cache", "corpus" or "exit"
    exit_layer: int | None = None


LOOKUP = Origin("lookup")  # the request's own earlier tokens
CACHE = Origin("cache")  # an earlier response of this engine
CORPUS = Origin("corpus")  # the model's own responses to training prompts


@lru_cache(maxsize=None)
def exit_at(layer: int) -> Origin:
    return Origin("exit", layer)


class Sampled(NamedTuple):
    """A sampled request's draw settings (position-keyed sampling)."""

    seed: int
    temperature: float
    top_k: int | None
    top_p: float | None


class LayerState(NamedTuple):
    """A token's state after the layers it ran: hidden, residual (1 x d each)
    and depth (the last layer run)."""

    hidden: torch.Tensor
    residual: torch.Tensor
    depth: int


@dataclass
class RequestDraft:
    """One request's draft within a step."""

    row: int  # index in the runner's input batch
    req_id: str
    token: int  # newest token: input of the next early-exit step
    position: int
    budget: int  # most tokens this step may draft
    drafted: list[int] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)  # per drafted token
    self_attempt: bool = False  # early-exit drafting ran for this request
    n_lookup: int = 0  # leading drafted tokens that came from a source
    lookup_kind: str = "lookup"  # whose acceptance estimate they feed: "lookup" or "corpus"
    # Token ids of the drafter inputs a source's tokens add (the newest sampled
    # token, then all but the last source token); embedded before early exits.
    lookup_inputs: list[int] = field(default_factory=list)
    # Per drafter input (position order): hidden, residual (1 x d each; None
    # until embedded or run) and depth (-1: no layer run yet).
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    residual: list[torch.Tensor | None] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    # The newest token's state when no exit layer was confident (it ran up to
    # the last exit layer). Verification resumes it.
    tail: LayerState | None = None
    sampled: Sampled | None = None  # None: greedy
    tree: object | None = None  # a DraftTree (drafts/tree.py) when branches ride along
    # Token trees: the exit heads' other likely tokens, by the index in ``drafted``
    # they stand beside (index len(drafted): where the last attempt was not confident).
    exit_alternatives: dict[int, list[int]] = field(default_factory=dict)

    @property
    def room(self) -> bool:
        return len(self.drafted) < self.budget


@dataclass(frozen=True)
class PendingDraft:
    """A request's drafts proposed in one step, judged by the next step's tokens."""

    origins: Sequence[Origin]
    self_attempt: bool
    n_lookup: int
    lookup_kind: str
    sampling: str  # "greedy" or "sampled"
