"""The back-off governor, driven by a simulated clock."""

import pytest

from vllm_adadecode.drafts.governor import Governor, lookup_like_run


def simulate(gov: Governor, steps: int, batch: int, step_s: dict[bool, float],
             tokens: dict[bool, int], t: float = 0.0) -> tuple[list[bool], float]:
    """Each decision costs step_s[choice] of wall time and emits tokens[choice]."""
    choices = []
    emitted = 0
    for _ in range(steps):
        choice = gov.decide(t, emitted, batch)
        choices.append(choice)
        t += step_s[choice]
        emitted = tokens[choice] * batch
    return choices, t


def test_keeps_drafting_where_it_pays():
    gov = Governor(explore_every=16)
    # drafting: 60 ms per step, 2 tokens; not drafting: 40 ms, 1 token
    choices, _ = simulate(gov, 200, 1, {True: 0.06, False: 0.04}, {True: 2, False: 1})
    assert sum(choices[20:]) / len(choices[20:]) > 0.9
    assert not all(choices[20:])  # still re-checks the other choice


def test_backs_off_where_drafting_loses():
    gov = Governor(explore_every=16)
    # under load: drafting makes the step 2x slower for 1.3x the tokens
    choices, _ = simulate(gov, 200, 16, {True: 0.4, False: 0.2}, {True: 13, False: 10})
    late = choices[20:]
    assert sum(late) / len(late) < 0.1
    assert any(late)  # exploration continues
    s = gov.summary()["16-31"]
    assert s["tokens_per_s_not_drafting"] > s["tokens_per_s_drafting"]


def test_buckets_are_decided_separately():
    gov = Governor(explore_every=16)
    t = 0.0
    _, t = simulate(gov, 100, 1, {True: 0.06, False: 0.04}, {True: 2, False: 1}, t)
    gov.idle()
    big, t = simulate(gov, 100, 16, {True: 0.4, False: 0.2}, {True: 13, False: 10}, t + 100)
    gov.idle()
    small, _ = simulate(gov, 40, 1, {True: 0.06, False: 0.04}, {True: 2, False: 1}, t + 100)
    assert sum(big[20:]) < 10 and sum(small[1:]) > 30


def test_idle_gaps_are_not_steps():
    gov = Governor(max_gap_s=5.0)
    gov.decide(0.0, 0, 1)
    gov.decide(100.0, 1, 1)  # 100 s gap: the engine was idle
    assert gov.rate(1, True) is None
    gov.decide(100.05, 2, 1)
    assert gov.rate(1, False) is not None or gov.rate(1, True) is not None


def _drifting(gov: Governor, sizes: list[int], draft_cost: float) -> list[bool]:
    """Throughput grows with the batch (step time flat, one token per request);
    drafting makes each step ``draft_cost`` times longer and emits 3% more."""
    choices, t, emitted = [], 0.0, 0
    for b in sizes:
        choice = gov.decide(t, emitted, b)
        choices.append(choice)
        t += 0.1 * (draft_cost if choice else 1.0)
        emitted = round(b * (1.03 if choice else 1.0) * 100)
    return choices


def test_batch_drift_within_a_bucket_does_not_fool_the_comparison():
    # Requests arrive: 8 -> 15 in one bucket. Drafting loses 7% at every size,
    # but unpaired medians would compare drafting at 15 against not drafting
    # at 8 and draft.
    sizes = [8 + i // 20 for i in range(160)]
    gov = Governor(explore_every=16)
    choices = _drifting(gov, sizes, draft_cost=1.10)
    assert sum(choices[20:]) / len(choices[20:]) < 0.15
    assert gov.paired_ratio(4) < 1.0
    # and drafting that wins at every size is kept while requests finish
    gov = Governor(explore_every=16)
    choices = _drifting(gov, sizes[::-1], draft_cost=0.95)
    assert sum(choices[20:]) / len(choices[20:]) > 0.85
    assert gov.paired_ratio(4) > 1.0


def test_rechecks_thin_out_when_the_verdict_is_clear_and_come_back_when_it_changes():
    # Batch 1, drafting 25% slower: re-checks thin out from every 16th step
    # to every 64th.
    gov = Governor(explore_every=16, max_explore_every=64)
    losing = {True: 0.05, False: 0.04}, {True: 1, False: 1}
    choices, t = simulate(gov, 2000, 1, *losing)
    assert 2000 / 80 < sum(choices) < 2000 / 40  # every 16th step would be 125
    assert gov.summary()["1"]["recheck_every"] == 64
    # The load changes: drafting now emits 2 tokens per step (1.6x). The
    # re-checks see it, the bucket switches to drafting, and the spacing
    # returns to the base rate while the ratio is still mixed.
    choices, _ = simulate(gov, 1000, 1, {True: 0.05, False: 0.04}, {True: 2, False: 1}, t)
    assert sum(choices[-200:]) / 200 > 0.9
    assert gov.paired_ratio(1) > 1.0
    # A close call keeps the base rate.
    gov = Governor(explore_every=16, max_explore_every=64)
    choices, _ = simulate(gov, 2000, 1, {True: 0.042, False: 0.04}, {True: 1, False: 1})
    assert gov.summary()["1"]["recheck_every"] == 16
    assert sum(choices) > 2000 / 20


def test_rare_deep_accepts_pay_although_most_drafting_steps_lose():
    """Lookup-like drafts: 75% of drafting steps are rejected (1 token, 15%
    slower), 25% accepted 4 deep (5 tokens, 20% slower). The median pair
    loses; the throughput is 1.8 / 1.16 = 1.55x, so drafting is kept."""
    kept = 0
    for seed in range(20):
        gov = Governor(explore_every=16)
        _, choices = lookup_like_run(gov, 600, 0.25, seed)
        kept += sum(choices[100:]) / 500 > 0.85 and gov.paired_ratio(1) > 1.1
    # A bucket that sees no accepted draft in its first 12 (probability
    # 0.75 ** 12 = 3%) may back off for longer; 18 of 20 must keep drafting.
    assert kept >= 18


def test_a_step_is_labelled_by_what_it_did():
    """Allowed to draft, but no request had a draft: a plain step."""
    gov = Governor(explore_every=16)
    t = 0.0
    for i in range(40):
        gov.decide(t, 1, 1)
        gov.drafted(i % 2 == 0)  # half the allowed steps found nothing to draft
        t += 0.05 if i % 2 == 0 else 0.04
    s = gov.summary()["1"]
    assert s["draft_steps"] == 20 and s["skip_steps"] == 20
    assert s["pairs"] > 0 and gov.paired_ratio(1) < 1.0  # same tokens, slower


def test_steps_that_ran_a_prefill_are_left_out():
    """Batch 1, one request after another: drafting wins 2x, but each
    request's first step also ran a long prefill (0.5 s). Counted as steps,
    those make whichever choice they land on look slow; left out, they do not."""
    gov = Governor(explore_every=16)
    t, emitted, prefill = 0.0, 0, False
    for i in range(400):
        choice = gov.decide(t, emitted, 1, measured=not prefill)  # the step just done
        prefill = i % 20 == 0  # this step also runs the next request's prompt
        t += 0.5 if prefill else 0.0
        t, emitted = t + (0.06 if choice else 0.04), (3 if choice else 1)
    assert 1.8 < gov.paired_ratio(1) < 2.2  # counted, they gave 0.86
    assert gov.summary()["1"]["draft_steps"] > 300


def test_a_bucket_left_unmeasured_takes_the_given_choice_and_rechecks_it():
    # The self-draft back-off only sees steps the lookup back-off lets draft;
    # where those are isolated, no step is ever timed (idle between calls).
    def run(gov):
        choices = []
        for i in range(200):
            choices.append(gov.decide(float(i), 12, 12))
            gov.idle()
        return choices

    alternating = run(Governor(explore_every=16))
    assert sum(alternating[100:]) == 50  # learning never ends: every second step

    gov = Governor(explore_every=16, unmeasured=False)
    choices = run(gov)
    late = choices[100:]
    assert 0 < sum(late) <= len(late) // 16 + 1  # off, re-checked every 16th step
    assert gov.summary()["8-15"]["pairs"] == 0


def test_without_learning_a_bucket_starts_from_its_default_and_pairs_its_rechecks():
    # Drafting loses: no learning alternation, only a re-check every 16th step.
    gov = Governor(explore_every=16, unmeasured=False, learn=False)
    choices, _ = simulate(gov, 400, 16, {True: 0.4, False: 0.2}, {True: 13, False: 10})
    assert sum(choices[:48]) <= 3  # learning would have drafted on 24 of these
    s = gov.summary()["16-31"]
    assert s["pairs"] >= 4 and s["paired_ratio"] < 0.9
    assert s["recheck_every"] > 16  # a clear verdict: re-checks spread out

    # Drafting pays: off until the re-checks' pairs say so, then on.
    gov = Governor(explore_every=16, unmeasured=False, learn=False)
    choices, _ = simulate(gov, 400, 1, {True: 0.06, False: 0.04}, {True: 2, False: 1})
    first_on = next(i for i in range(len(choices) - 1) if choices[i] and choices[i + 1])
    assert 12 * 16 <= first_on <= 12 * 17 + 1
    late = choices[first_on:]
    assert sum(late) / len(late) > 0.9


def test_a_governor_without_learning_needs_a_default():
    import pytest

    with pytest.raises(ValueError, match="unmeasured"):
        Governor(learn=False)


def test_step_cost_fit_leaves_out_the_self_drafting_pass():
    """A step of 0.30 s (one drafting call to the next) whose self-drafting
    pass took 0.06 s enters the step-cost fit as 0.24 s with its 3 drafted
    rows: the pass is spent before the fit's sizes matter, and would price
    every drafted row at it."""
    from vllm_adadecode.drafts.adapt import StepCost
    from vllm_adadecode.drafts.backoff import BackOff

    cost = StepCost()
    backoff = BackOff(adaptive=True, lookup=True, self_draft=True,
                      disable_by_batch_size=None, cost=cost)
    backoff._call, backoff._step_start = 1, 10.0  # a call between two refits
    backoff.drafted(1, 3, True, 1, self_seconds=0.06)
    backoff._observe_step(10.30, measured=True)
    (seconds, batch, rows, off), = cost.samples[cost.bucket(1)]
    assert abs(seconds - 0.24) < 1e-9 and (batch, rows, off) == (1, 3, 1)


def test_batch_1_steps_are_timed_by_their_self_draft_class():
    """The back-off times each measured batch-1 step whole (its drafting pass
    included) under the class the drafter gave it: a plain step, or an
    attempt after k rejected ones. Steps with lookup drafts, steps of larger
    batches and steps that ran a prefill are not counted."""
    from vllm_adadecode.drafts.adapt import SelfAttemptRates, StepCost
    from vllm_adadecode.drafts.backoff import BackOff

    backoff = BackOff(adaptive=True, lookup=False, self_draft=True,
                      disable_by_batch_size=None, cost=StepCost())
    t = 10.0
    backoff._call, backoff._step_start = 1, t  # calls between two refits

    def step(cls, seconds, tokens, measured=True, n_active=1):
        nonlocal t
        backoff.drafted(n_active, 0 if cls == SelfAttemptRates.PLAIN else 2, cls is not None,
                        0, 0.05, step_class=cls)
        t += seconds
        backoff._observe_step(t, measured, tokens)

    step(SelfAttemptRates.PLAIN, 0.27, 1)
    step(1, 0.36, 3)
    step(1, 0.36, 2, measured=False)  # a prefill ran in it
    step(None, 0.40, 5, n_active=2)  # a larger batch, or lookup drafts
    sums = backoff.self_rates.sums
    assert set(sums) == {SelfAttemptRates.PLAIN, 1}
    assert sums[1] == [1.0, 3.0, pytest.approx(0.36)]
    assert sums[SelfAttemptRates.PLAIN] == [1.0, 1.0, pytest.approx(0.27)]


def test_a_clear_verdict_ends_learning_early_and_rechecks_stay_frequent():
    """Lookups on code: drafting triples a step's throughput. The bucket stops
    alternating after a few pairs instead of twelve, and its re-checks thin
    out. A close call still learns."""
    gov = Governor(explore_every=16, min_pairs=12, early_pairs=4)
    choices, t = simulate(gov, 100, 1, {True: 0.07, False: 0.05}, {True: 5, False: 1})
    # learning would alternate over the first 24 steps (12 plain)
    assert choices[:10].count(False) <= 5 and all(choices[10:16])
    assert sum(choices) >= 100 - 5 - 100 // 16 - 1
    assert gov.summary()["1"]["pairs"] < 12 and gov.summary()["1"]["recheck_every"] > 16
    # A close call does not end learning early: both choices within 10%.
    gov = Governor(explore_every=16, min_pairs=12, early_pairs=4)
    choices, _ = simulate(gov, 24, 1, {True: 0.044, False: 0.04}, {True: 1, False: 1})
    assert choices == [True, False] * 12
    # Without learning (the self-draft back-off), a clear win leaves the
    # default after a few re-check pairs instead of twelve.
    gov = Governor(explore_every=16, unmeasured=False, learn=False, early_pairs=4)
    choices, _ = simulate(gov, 300, 1, {True: 0.06, False: 0.04}, {True: 4, False: 1})
    first_on = next(i for i in range(len(choices) - 1) if choices[i] and choices[i + 1])
    assert 3 * 16 <= first_on <= 5 * 17 and sum(choices[first_on:]) / len(choices[first_on:]) > 0.9


def test_the_early_verdict_costs_nothing_where_drafting_loses_a_little():
    """Lookup-like drafts that lose 6% (2% of drafting steps accepted 4 deep,
    the rest rejected and 15% slower): over 100 seeds and 1,000 steps the
    early verdict drafts on at most 3% more of the steps than twelve pairs of
    learning did (about 1.5% more, measured), and emits within 0.5% as many
    tokens per second (0.1% fewer, measured)."""
    def run(early_pairs, seed):
        rate, choices = lookup_like_run(Governor(explore_every=16, early_pairs=early_pairs),
                                        1000, 0.02, seed)
        return rate, sum(choices)

    early = [run(4, s) for s in range(100)]
    learned = [run(12, s) for s in range(100)]
    assert sum(d for _, d in early) <= sum(d for _, d in learned) + 0.03 * 100 * 1000
    assert sum(r for r, _ in early) >= 0.995 * sum(r for r, _ in learned)
    assert sum(r for r, _ in early) / 100 < 25.0  # drafting does lose here


def test_plain_steps_that_follow_a_drafting_steps_outcome_do_not_bias_the_pairs():
    """A request pauses its self-drafts for a step after a rejected draft (the
    step is then plain). Drafting steps: accepted (3 tokens) or rejected (1
    token) half the time each, 0.05 s; plain: 1 token, 0.04 s; drafting pays
    (40 against 25 tokens/s). Pairing each plain step with the drafting step
    before it would pair every pause with a rejected draft (0.8)."""
    import random

    rng = random.Random(0)
    gov = Governor(explore_every=16)
    t, emitted, paused, drafted_steps = 0.0, 0, False, 0
    for _ in range(600):
        allowed = gov.decide(t, emitted, 1)
        drafts = allowed and not paused
        gov.drafted(drafts)
        paused = False
        if drafts:
            drafted_steps += 1
            accepted = rng.random() < 0.5
            paused = not accepted
            t, emitted = t + 0.05, (3 if accepted else 1)
        else:
            t, emitted = t + 0.04, 1
    assert 1.3 < gov.paired_ratio(1) < 1.9
    assert drafted_steps > 600 * 0.55  # drafting on: about 2 steps in 3 (1 in 3 paused)
