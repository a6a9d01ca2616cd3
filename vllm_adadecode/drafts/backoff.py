"""The back-off, in one place: whether a step drafts at all, and whether it
self-drafts.

Three measures decide, in this order:

* ``disable_by_batch_size``: no drafts in a step whose batch holds that many
  requests or more (prompts still prefilling count too: a wave of new requests
  otherwise opens steps below the limit in which the back-off would try drafts
  next to a prefill; docs/performance/load.md);
* the drafting governor (``"adaptive": true``; governor.py): per batch-size
  bucket, drafting steps against plain steps, by measured throughput;
* the self-draft governor (with lookups and self-drafts both on): among steps
  that draft, whether early-exit self-drafts pay on top of lookups. Self-drafts
  start off in every bucket and are re-checked every ``explore_every`` steps; the
  pairs those re-checks give decide once there are enough, without a learning
  phase that tries them on every second drafting step (an attempt at 12-15
  requests costs a sixth to a quarter of a step; docs/performance/backoff.md).

The step-cost fit that sizes each request's lookup draft and token tree
(adapt.py) learns from the same steps: ``BackOff`` times each step and refits
it every ``COST_SYNC_EVERY`` calls, on tensor-parallel rank 0's timings for
every rank. A step's self-drafting pass is taken out of its time: it is spent
before those sizes matter, and left in, it would price every drafted row at
its drafting pass (62-86 ms a row at batch 1 on Qwen2.5-Coder-1.5B, where a
verified row costs about 10; docs/guides/token-trees.md).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from ..engine.runner import tp_agree, tp_broadcast
from .adapt import SelfAttemptRates, StepCost
from .governor import Governor

# Drafter calls between refits of the step-cost model (shared across tensor-parallel ranks).
COST_SYNC_EVERY = 8


class Gate(NamedTuple):
    draft: bool  # the step may propose drafts
    self_draft: bool  # ... and early-exit self-drafts among them


NO_DRAFTS = Gate(False, False)


class BackOff:
    def __init__(self, *, adaptive: bool, lookup: bool, self_draft: bool,
                 disable_by_batch_size: int | None, cost: StepCost,
                 self_rates: SelfAttemptRates | None = None):
        self.self_draft = self_draft
        self.cap = disable_by_batch_size
        self.cost = cost
        self.self_rates = self_rates or SelfAttemptRates()
        self.governor = Governor() if adaptive else None
        self.self_governor = (Governor(unmeasured=False, learn=False)
                              if adaptive and lookup and self_draft else None)
        self.calls = self._call = 0
        # The last step's start (the drafter's call), its requests and the
        # draft rows it scheduled beside them (for the step-cost fit), and its
        # class for the self-draft pause rule (batch 1; None: not one).
        self._step_start: float | None = None
        self._step_shape: tuple[int, int, int, float] | None = None
        self._step_class: int | None = None

    def gate(self, num_reqs: int, sampled_token_ids: list[list[int]], joined: bool) -> Gate:
        """This step's decision. ``num_reqs`` counts every request in the batch,
        prompts still prefilling too; ``joined``: a request joined (its prefill
        ran in the step just done)."""
        self._call, self.calls = self.calls, self.calls + 1
        n_active = sum(1 for s in sampled_token_ids if s)
        capped = self.cap is not None and num_reqs >= self.cap
        if self.governor is None:
            return NO_DRAFTS if capped else Gate(True, self.self_draft)
        if not n_active:
            self._step_start = None
            self._idle(self.governor, self.self_governor)
            return NO_DRAFTS
        now, emitted = time.perf_counter(), sum(map(len, sampled_token_ids))
        # A step that ran a prefill (a request joined, or one is still
        # prefilling) is not a measure of drafting: at batch 1 a long prompt's
        # prefill would count as one slow step.
        measured = not joined and n_active == num_reqs
        self._observe_step(now, measured, emitted)
        self._step_shape = (n_active, 0, 0, 0.0)  # until drafts are proposed
        self._step_class = SelfAttemptRates.PLAIN if n_active == 1 else None
        if capped:
            # Too many requests to draft for: a plain step, outside the back-off's pairs.
            self._idle(self.governor, self.self_governor)
            return NO_DRAFTS
        if not tp_agree(self.governor.decide(now, emitted, n_active, measured)):
            self._idle(self.self_governor)
            return NO_DRAFTS
        go_self = self.self_draft
        if self.self_governor is not None:
            go_self = tp_agree(self.self_governor.decide(now, emitted, n_active, measured))
        return Gate(True, go_self)

    def drafted(self, n_active: int, draft_rows: int, self_drafted: bool,
                off_rows: int = 0, self_seconds: float = 0.0,
                step_class: int | None = None) -> None:
        """Label the step by what it did: drafts proposed (``off_rows`` of the
        rows off a token tree's main chain), self-drafts attempted (taking
        ``self_seconds``); ``step_class``: its class for the self-draft pause
        rule (``SelfAttemptRates``; None: not a batch-1 step whose drafts, if
        any, are all self-drafts)."""
        if self.governor is not None:
            self.governor.drafted(draft_rows > 0 or self_drafted)
            if self.self_governor is not None:
                self.self_governor.drafted(self_drafted)
        self._step_shape = (n_active, draft_rows, off_rows, self_seconds)
        self._step_class = step_class

    @staticmethod
    def _idle(*governors) -> None:
        for g in governors:
            if g is not None:
                g.idle()

    def _observe_step(self, now: float, measured: bool, emitted: int = 0) -> None:
        """The step since the last call (``emitted`` tokens), for the
        step-cost fit and the self-draft pause rule (adapt.py). Every
        ``COST_SYNC_EVERY`` calls both are redone, on rank 0's steps for every
        tensor-parallel rank (lookup lengths and self-draft attempts follow
        from them, and all ranks must propose the same drafts)."""
        last, self._step_start = self._step_start, now
        shape, self._step_shape = self._step_shape, None
        cls, self._step_class = self._step_class, None
        if measured and last is not None and shape is not None and now - last < 5.0:
            n_active, rows, off, self_seconds = shape
            self.cost.observe(now - last - self_seconds, n_active, rows, off)
            if cls is not None:
                self.self_rates.observe(cls, emitted, now - last)
        if self._call % COST_SYNC_EVERY == 0:
            buckets = range(1, 12)
            fits = self.cost.as_floats(self.cost.refit(), buckets)
            flat = tp_broadcast(fits + self.self_rates.refit())
            self.cost.set_fits(self.cost.from_floats(flat[:len(fits)], buckets))
            self.self_rates.set_verdicts(flat[len(fits):])

    def summary(self) -> dict:
        return {"backoff": self.governor.summary() if self.governor else None,
                "backoff_self_draft": (self.self_governor.summary() if self.self_governor
                                       else None)}

    def clear(self) -> None:
        for g in (self.governor, self.self_governor):
            if g:
                g.decisions.clear()
                g.steps.clear()
