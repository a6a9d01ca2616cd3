"""Per-request draft length and self-draft early stop (pure Python, no vLLM).

Lookup drafts cost no layers in drafting, but each one is a row in the
verification forward. A forward over n new tokens costs ``VERIFY_COST[n]``
times a one-token forward (measured here: SmolLM2-135M fp32, batch 1, vLLM's
engine). If each next lookup token is accepted with probability p given the
ones before it were, k drafts yield 1 + p + ... + p^k tokens for a cost of
VERIFY_COST[k + 1]; a request drafts the k that maximises that ratio, and no
lookup tokens when no k beats a plain step. p is estimated per request from
its own verified lookups, shrunk toward the engine-wide estimate.

Self-drafts (early exits) stop per request as Kangaroo's and DEL's do: after
an attempt that yields no accepted token, the request skips self-drafting for
a number of steps that doubles with each further failure (up to
``max_self_skip``); an accepted self-draft resets it.

With ``fixed`` (the engine's ``"adaptive": false``) every request drafts the
most it can on every step. The engine-level back-off (governor.py) decides, per batch size, whether
drafting pays at all; this module decides how much each request drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Relative cost of one forward over n new tokens (index n), batch 1; measured
# 1.10 (2), 1.21 (4), 1.29 (6), 1.45 (8), 1.54 (16), linear in between.
_MEASURED = {1: 1.0, 2: 1.10, 4: 1.21, 6: 1.29, 8: 1.45, 16: 1.54}


def _interpolate(n: int) -> float:
    keys = sorted(_MEASURED)
    if n >= keys[-1]:
        return _MEASURED[keys[-1]] + 0.02 * (n - keys[-1])
    for a, b in zip(keys, keys[1:]):
        if a <= n <= b:
            return _MEASURED[a] + (_MEASURED[b] - _MEASURED[a]) * (n - a) / (b - a)
    return 1.0


VERIFY_COST = [1.0] + [_interpolate(n) for n in range(1, 65)]


def best_lookup_length(p: float, k_max: int, margin: float = 0.02) -> int:
    """The number of lookup drafts (0..k_max) with the most tokens per unit of
    verification cost, when each is accepted with probability p given the
    previous ones; 0 unless some length beats a plain step by ``margin``."""
    best_k, best = 0, 1.0 + margin
    gain, term = 1.0, 1.0
    for k in range(1, k_max + 1):
        term *= p
        gain += term
        ratio = gain / VERIFY_COST[min(k + 1, len(VERIFY_COST) - 1)]
        if ratio > best:
            best_k, best = k, ratio
    return best_k


@dataclass
class Acceptance:
    """Per-token acceptance of a draft source, counted as a decaying sum."""

    accepted: float = 0.0
    trials: float = 0.0
    decay: float = 0.95

    def update(self, proposed: int, accepted: int) -> None:
        """``proposed`` drafts of this source in one step, the first ``accepted``
        of them kept: ``accepted`` successes, then one failure unless all were kept."""
        if proposed <= 0:
            return
        f = self.decay ** (accepted + 1)
        self.accepted = self.accepted * f + accepted
        self.trials = self.trials * f + accepted + (1 if accepted < proposed else 0)

    def estimate(self, prior: float, weight: float = 2.0) -> float:
        return (self.accepted + weight * prior) / (self.trials + weight)


@dataclass
class RequestDrafting:
    """One request's draft-source state across steps."""

    # Lookup acceptance per kind of match (e.g. "lookup", "lookup-long", "cache").
    lookup: dict[str, Acceptance] = field(default_factory=dict)
    lookup_skipped: int = 0  # steps with a match but no lookup drafts, since the last
    self_failures: int = 0  # self-draft attempts in a row with no accepted token
    self_skip: int = 0  # steps left before the next self-draft attempt

    @classmethod
    def new(cls) -> "RequestDrafting":
        return cls()


class DraftAdaptation:
    """Decisions for every request of an engine, and the engine-wide lookup
    acceptance that a new request starts from."""

    def __init__(self, k_max: int, *, probe_every: int = 8, max_self_skip: int = 32,
                 prior: float = 0.5, fixed: bool = False):
        self.k_max = k_max
        self.fixed = fixed  # no adaptation: k_max lookup tokens, self-drafts every step
        self.probe_every = probe_every
        self.max_self_skip = max_self_skip
        self.engine: dict[str, Acceptance] = {}  # per kind of match, all requests
        self.prior = prior
        self.requests: dict[str, RequestDrafting] = {}

    def state(self, req_id: str) -> RequestDrafting:
        st = self.requests.get(req_id)
        if st is None:
            st = self.requests[req_id] = RequestDrafting.new()
        return st

    def forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    def lookup_p(self, req_id: str, kind: str = "lookup") -> float:
        """Estimated acceptance of the next lookup token of this kind of match
        for this request: its own count, shrunk toward the engine's."""
        engine = self.engine.get(kind)
        engine_p = engine.estimate(self.prior) if engine else self.prior
        own = self.state(req_id).lookup.get(kind)
        return own.estimate(engine_p) if own else engine_p

    def lookup_length(self, req_id: str, kind: str = "lookup") -> int:
        """Lookup drafts to propose for a request that has a match: the best
        length for its estimated acceptance; one token every ``probe_every``
        matched steps when none pays, so the estimate keeps being measured."""
        if self.fixed:
            return self.k_max
        st = self.state(req_id)
        k = best_lookup_length(self.lookup_p(req_id, kind), self.k_max)
        if k:
            st.lookup_skipped = 0
            return k
        st.lookup_skipped += 1
        if st.lookup_skipped >= self.probe_every:
            st.lookup_skipped = 0
            return 1
        return 0

    def lookup_verified(self, req_id: str, proposed: int, accepted: int,
                        kind: str = "lookup") -> None:
        own = self.state(req_id).lookup
        own.setdefault(kind, Acceptance()).update(proposed, accepted)
        self.engine.setdefault(kind, Acceptance(decay=0.995)).update(proposed, accepted)

    def may_self_draft(self, req_id: str) -> bool:
        if self.fixed:
            return True
        st = self.state(req_id)
        if st.self_skip > 0:
            st.self_skip -= 1
            return False
        return True

    def self_verified(self, req_id: str, accepted: int) -> None:
        """A step in which the request attempted self-drafts kept ``accepted`` of them."""
        st = self.state(req_id)
        if accepted > 0:
            st.self_failures = 0
            st.self_skip = 0
        else:
            st.self_failures += 1
            st.self_skip = min(2 ** st.self_failures - 1, self.max_self_skip)
