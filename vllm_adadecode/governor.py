"""Back-off: draft only where drafting is measured to pay.

Speculation that wins at batch 1 can lose under load, when the verification
pass is compute-bound and every rejected draft costs real time. The governor
measures, per batch-size bucket (1, 2-3, 4-7, 8-15, ...), the engine's output
rate (tokens emitted per second of wall time, one engine step at a time) after
steps that drafted and after steps that did not, and drafts only in buckets
where drafting has the higher median rate. It keeps re-checking the other
choice every ``explore_every`` steps, so a bucket whose balance changes (other
prompts, other load) is re-decided.

An observation spans one drafting call to the next: the drafting done in call
t, then the engine step that verifies it; the tokens that step emitted arrive
with call t+1. Pure Python, no vLLM: unit-tested on its own.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque


class Governor:
    def __init__(self, explore_every: int = 16, window: int = 16, max_gap_s: float = 5.0):
        self.explore_every = explore_every
        self.window = window
        self.max_gap_s = max_gap_s  # longer gaps are idle time, not a step
        self.rates: dict[tuple[int, bool], deque] = {}
        self.steps: Counter[int] = Counter()
        self.decisions: Counter[tuple[int, bool]] = Counter()
        self._last: tuple[float, int, bool] | None = None

    @staticmethod
    def bucket(batch_size: int) -> int:
        """1 -> 1, 2-3 -> 2, 4-7 -> 3, 8-15 -> 4, 16-31 -> 5, ..."""
        return max(1, batch_size).bit_length()

    def rate(self, bucket: int, drafted: bool) -> float | None:
        r = self.rates.get((bucket, drafted))
        return statistics.median(r) if r else None

    def decide(self, now: float, tokens_emitted: int, batch_size: int) -> bool:
        """Record the step that just finished; return whether to draft now."""
        if self._last is not None:
            t0, b, drafted = self._last
            dt = now - t0
            if 0 < dt <= self.max_gap_s and tokens_emitted > 0:
                self.rates.setdefault((b, drafted), deque(maxlen=self.window)).append(
                    tokens_emitted / dt)
        b = self.bucket(batch_size)
        n = self.steps[b]
        self.steps[b] += 1
        with_draft, without = self.rate(b, True), self.rate(b, False)
        if with_draft is None:
            choice = True
        elif without is None:
            choice = False
        else:
            best = with_draft >= without
            choice = (not best) if n % self.explore_every == 0 else best
        self._last = (now, b, choice)
        self.decisions[(b, choice)] += 1
        return choice

    def idle(self) -> None:
        """No step follows (nothing to decode): the next gap is not a step."""
        self._last = None

    def summary(self) -> dict[str, dict]:
        """Per bucket (named by its batch sizes): steps drafted/skipped and median rates."""
        out = {}
        for b in sorted(self.steps):
            lo, hi = (1 << (b - 1)), (1 << b) - 1
            name = str(lo) if lo == hi else f"{lo}-{hi}"
            out[name] = {
                "draft_steps": self.decisions[(b, True)],
                "skip_steps": self.decisions[(b, False)],
                "tokens_per_s_drafting": self.rate(b, True),
                "tokens_per_s_not_drafting": self.rate(b, False),
            }
        return out
