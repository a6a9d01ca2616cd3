"""Back-off: draft only where drafting is measured to pay.

Speculation that wins at batch 1 can lose under load, when the verification
pass is compute-bound and every rejected draft costs real time. The governor
measures, per batch-size bucket (1, 2-3, 4-7, 8-15, ...), the engine's output
(tokens emitted and wall time, one engine step at a time) after steps that
drafted and after steps that did not, and drafts only in buckets where the
drafting steps have the higher throughput. It keeps re-checking the other
choice every ``explore_every`` steps, so a bucket whose balance changes (other
prompts, other load) is re-decided.

An observation spans one drafting call to the next: the drafting done in call
t, then the engine step that verifies it; the tokens that step emitted arrive
with call t+1. Pure Python, no vLLM: unit-tested on its own.

Rates are compared in pairs: a plain step and the drafting step right after
it, at the same batch size, form one pair. Within a bucket the batch size
drifts (requests finish or arrive), and throughput moves with it; medians of
unpaired rates taken at different moments can then favour whichever choice
happened to be measured at the larger batch. Pairs cancel that. Until a
bucket has a pair, its unpaired medians decide.

Over a bucket's recent pairs the two choices are compared by throughput: all
tokens the drafting steps emitted over all their time, against the same for
their plain partners. Not by the median of per-pair ratios: a lookup draft is
either rejected (its step a little slower, most steps) or accepted several
tokens deep (two to four times the tokens, fewer steps), so the median pair
loses while the total gains (docs/performance/lookup-and-corpus.md, attempt 3).

A step is labelled by what it did (``drafted``): a step allowed to draft in
which no request had a draft is a plain step.

A governor built with ``learn=False`` (the self-draft back-off) has no
learning phase: each bucket starts from its ``unmeasured`` choice and re-checks
the other one every ``explore_every`` steps; each re-check, paired with the
step before it, adds a pair, and once a bucket holds ``min_pairs`` pairs they
decide as above. A choice that is usually wrong then costs one step in
``explore_every`` while a fresh engine learns, instead of every second step.

A learning bucket stops alternating early (a bucket without learning leaves
its ``unmeasured`` choice early) once ``early_pairs`` pairs put the
paired ratio far from 1 (``early_ratio`` or more, or its inverse): lookups on
code that triple a step's throughput need not spend 12 plain steps proving
it; in a 5-prompt HumanEval bench on Qwen2.5-Coder-1.5B that learning cost 9
steps of 76 (docs/performance/backoff.md). Until the bucket holds
``min_pairs`` pairs, its re-checks thin out only while the verdict stays that
clear: as soon as later pairs bring the ratio closer to 1, they return to the
base rate.

Re-checks cost: where drafting loses by 20%, re-checking every 16th step costs
about 1.5% of decoding. A re-check that finds the paired ratio clearly away
from 1 (by ``settled_margin`` or more) doubles the bucket's interval, up to
``max_explore_every``; a close ratio, or a change of decision, brings it back to
``explore_every``.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter, deque


def bucket(batch_size: int) -> int:
    """Batch-size bucket: 1 -> 1, 2-3 -> 2, 4-7 -> 3, 8-15 -> 4, 16-31 -> 5, ..."""
    return max(1, batch_size).bit_length()


def bucket_name(b: int) -> str:
    """The batch sizes of bucket ``b``: "1", "2-3", "4-7", ..."""
    lo, hi = (1 << (b - 1)), (1 << b) - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


class Governor:
    def __init__(self, explore_every: int = 16, window: int = 32, max_gap_s: float = 5.0,
                 max_explore_every: int = 64, settled_margin: float = 0.1,
                 min_pairs: int = 12, unmeasured: bool | None = None, learn: bool = True,
                 early_pairs: int = 4, early_ratio: float = 1.5):
        self.explore_every = explore_every
        # False: no learning alternation. A bucket takes ``unmeasured`` until
        # its re-checks (one step of the other choice every explore_every
        # steps, each paired with the step before it, at the base rate until
        # then) have given min_pairs pairs; then the pairs decide.
        self.learn = learn
        if not learn and unmeasured is None:
            raise ValueError("a Governor that does not learn needs an 'unmeasured' choice")
        # The choice in a bucket that its learning steps left unmeasured (no
        # pair, no rate of one choice), re-checked like any decision; None
        # keeps alternating until it is measured.
        self.unmeasured = unmeasured
        self.max_explore_every = max(explore_every, max_explore_every)
        self.settled_margin = settled_margin
        # Per bucket: steps between re-checks, steps since the last one, and
        # the decision they re-check.
        self.interval: dict[int, int] = {}
        self._since: Counter[int] = Counter()
        self._decided: dict[int, bool] = {}
        self.window = window
        # A bucket alternates drafting and plain steps until it holds this many
        # pairs: one step's outcome is too noisy a verdict when a draft either
        # fails or wins big.
        self.min_pairs = min(min_pairs, window)
        # ... unless this many pairs already put the ratio at early_ratio or
        # beyond (or at its inverse or below).
        self.early_pairs = min(early_pairs, self.min_pairs)
        self.early_ratio = early_ratio
        self._last_choice: dict[int, bool] = {}
        self.max_gap_s = max_gap_s  # longer gaps are idle time, not a step
        self.rates: dict[tuple[int, bool], deque] = {}
        # Per bucket: (tokens, seconds) of a drafting step and of an adjacent
        # plain step at the same batch size.
        self.pairs: dict[int, deque] = {}
        self.steps: Counter[int] = Counter()
        self.decisions: Counter[tuple[int, bool]] = Counter()
        self._last: tuple[float, int, bool, int] | None = None  # time, bucket, choice, batch
        # Last observation: batch size, choice, tokens, seconds.
        self._prev: tuple[int, bool, int, float] | None = None

    bucket = staticmethod(bucket)

    def rate(self, bucket: int, drafted: bool) -> float | None:
        r = self.rates.get((bucket, drafted))
        return statistics.median(r) if r else None

    def paired_ratio(self, bucket: int) -> float | None:
        """Throughput of the drafting steps over that of their plain partners,
        across the bucket's recent pairs."""
        p = self.pairs.get(bucket)
        if not p:
            return None
        tok_d = sum(x[0] for x in p)
        sec_d = sum(x[1] for x in p)
        tok_n = sum(x[2] for x in p)
        sec_n = sum(x[3] for x in p)
        return (tok_d / sec_d) / (tok_n / sec_n)

    def _observe(self, now: float, tokens_emitted: int) -> None:
        t0, b, drafted, size = self._last
        dt = now - t0
        if not (0 < dt <= self.max_gap_s and tokens_emitted > 0):
            self._prev = None
            return
        self.rates.setdefault((b, drafted), deque(maxlen=self.window)).append(tokens_emitted / dt)
        prev = self._prev
        # A pair is a plain step and the drafting step right after it. Not a
        # drafting step and the plain step after it: which steps are plain
        # can follow the drafting step's outcome (a request pauses its
        # self-drafts after a rejected one; a lookup that diverged may find no
        # match next), so that pairing picks the drafting steps that did
        # worst (on Qwen2.5-Coder-1.5B it read 1.10 where every drafting step
        # against every plain one read 1.40, and plain-then-drafting 1.29;
        # docs/performance/models.md).
        if prev is not None and prev[0] == size and not prev[1] and drafted:
            pair = (tokens_emitted, dt, *prev[2:])
            self.pairs.setdefault(b, deque(maxlen=self.window)).append(pair)
            self._prev = None  # each step in one pair at most: pairs are independent
            return
        self._prev = (size, drafted, tokens_emitted, dt)

    def _best(self, b: int) -> bool | None:
        """Whether drafting pays in bucket b; None when not yet measured both ways."""
        ratio = self.paired_ratio(b)
        if ratio is not None:
            return ratio >= 1.0
        with_draft, without = self.rate(b, True), self.rate(b, False)
        if with_draft is None or without is None:
            return None
        return with_draft >= without

    def decide(self, now: float, tokens_emitted: int, batch_size: int,
               measured: bool = True) -> bool:
        """Record the step that just finished; return whether to draft now.

        ``measured=False``: the step that just finished also did other work
        (a prompt's prefill), so its time says nothing about drafting; it is
        left out, and pairs with neither neighbour."""
        if self._last is not None:
            if measured:
                self._observe(now, tokens_emitted)
            else:
                self._prev = None
        b = self.bucket(batch_size)
        self.steps[b] += 1
        few_pairs = len(self.pairs.get(b, ())) < self.min_pairs
        learning = (self.learn and few_pairs and self.steps[b] <= 4 * self.min_pairs
                    and not self._clear_early(b))
        if learning:
            best = None
        elif not self.learn and few_pairs and not self._clear_early(b):
            best = self.unmeasured
        else:
            best = self._best(b)
            if best is None:
                best = self.unmeasured
        if best is None:
            choice = not self._last_choice.get(b, False)  # learning: draft, plain, ...
        else:
            choice = self._choose(b, best)
        self._last_choice[b] = choice
        self._last = (now, b, choice, batch_size)
        self.decisions[(b, choice)] += 1
        return choice

    def _clear_early(self, b: int) -> bool:
        """Whether the bucket's few pairs already give a clear verdict."""
        if len(self.pairs.get(b, ())) < self.early_pairs:
            return False
        ratio = self.paired_ratio(b)
        return ratio >= self.early_ratio or ratio <= 1.0 / self.early_ratio

    def _choose(self, b: int, best: bool) -> bool:
        """``best``, except on re-check steps, whose spacing adapts."""
        if self._decided.get(b) != best:  # new decision: re-check at the base rate
            self._decided[b] = best
            self.interval[b] = self.explore_every
            self._since[b] = 0
        self._since[b] += 1
        if self._since[b] <= self.interval[b]:
            return best
        self._since[b] = 0
        ratio = self.paired_ratio(b)
        settled = ratio is not None and abs(ratio - 1.0) >= self.settled_margin
        if len(self.pairs.get(b, ())) < self.min_pairs and not self._clear_early(b):
            settled = False  # few pairs, no clear verdict yet: keep them coming
        self.interval[b] = (min(2 * self.interval[b], self.max_explore_every) if settled
                            else self.explore_every)
        return not best

    def drafted(self, drafted: bool) -> None:
        """What the step just decided actually did: a step allowed to draft in
        which no request had a draft is measured as a plain step."""
        if self._last is None or self._last[2] == drafted:
            return
        t0, b, choice, size = self._last
        self.decisions[(b, choice)] -= 1
        self.decisions[(b, drafted)] += 1
        self._last = (t0, b, drafted, size)
        self._last_choice[b] = drafted

    def idle(self) -> None:
        """No step follows (nothing to decode): the next gap is not a step."""
        self._last = None
        self._prev = None

    def summary(self) -> dict[str, dict]:
        """Per bucket (named by its batch sizes): steps drafted/skipped, median
        rates, and the paired drafting/not-drafting ratio that decides."""
        out = {}
        for b in sorted(self.steps):
            out[bucket_name(b)] = {
                "draft_steps": self.decisions[(b, True)],
                "skip_steps": self.decisions[(b, False)],
                "tokens_per_s_drafting": self.rate(b, True),
                "tokens_per_s_not_drafting": self.rate(b, False),
                "paired_ratio": self.paired_ratio(b),  # throughput, drafting / plain
                "pairs": len(self.pairs.get(b, ())),
                "recheck_every": self.interval.get(b, self.explore_every),
            }
        return out


def lookup_like_run(gov: Governor, steps: int, accept_p: float, seed: int, *,
                    plain_s: float = 0.040, draft_s: float = 0.046,
                    accepted_s: float = 0.048,
                    accepted_tokens: int = 5) -> tuple[float, list[bool]]:
    """Drive ``gov`` at batch 1 on a simulated clock with lookup-like drafts: a
    drafting step is accepted ``accepted_tokens`` deep with probability
    ``accept_p`` (taking ``accepted_s``), else rejected (``draft_s``, slower
    than a plain step's ``plain_s``). Returns (tokens per second, each step's
    choice: True where it drafted). The back-off's tests and its probe
    (scripts/probes) share it."""
    rng = random.Random(seed)
    t, emitted, tokens, choices = 0.0, 0, 0, []
    for _ in range(steps):
        choice = gov.decide(t, emitted, 1)
        choices.append(choice)
        if choice and rng.random() < accept_p:
            t, emitted = t + accepted_s, accepted_tokens
        else:
            t, emitted = t + (draft_s if choice else plain_s), 1
        tokens += emitted
    return tokens / t, choices
