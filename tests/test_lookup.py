"""Lookup drafts and per-request draft adaptation, without an engine
(the matcher is vLLM's own, imported from the installed vLLM)."""

import numpy as np
import pytest

from vllm_adadecode.drafts.adapt import (VERIFY_COST, Acceptance, DraftAdaptation,
                                         SelfAttemptRates, StepCost, best_lookup_length)
from vllm_adadecode.drafts.cache import ResponseCache
from vllm_adadecode.drafts.lookup import SequenceLookup


def _arr(xs):
    return np.array(xs, dtype=np.int32)


@pytest.fixture(scope="module")
def lookup():
    lk = SequenceLookup(min_match=2, max_match=5, max_model_len=4096)
    lk.warm_up()
    return lk


def test_sequence_lookup_proposes_what_followed_the_repeated_suffix(lookup):
    seq = _arr([7, 1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert lookup.propose(seq, 3).tolist() == [4, 5, 9]
    assert lookup.propose(seq, 10).tolist() == [4, 5, 9, 1, 2, 3]  # up to the end
    assert lookup.propose(seq, 0).tolist() == []


def test_sequence_lookup_needs_min_match_tokens(lookup):
    assert lookup.propose(_arr([1, 2, 3, 4, 5, 6, 3]), 3).tolist() == []  # 1-token match only
    assert lookup.propose(_arr([5, 6, 1, 2, 3, 4, 5, 6]), 2).tolist() == [1, 2]


def test_sequence_lookup_respects_max_model_len():
    lk = SequenceLookup(min_match=2, max_match=5, max_model_len=10)
    seq = _arr([1, 2, 3, 4, 5, 6, 1, 2])
    assert lk.propose(seq, 5).tolist() == [3, 4]  # positions 8, 9 only


def test_response_cache_matches_earlier_responses(lookup):
    cache = ResponseCache(lookup, max_tokens=100)
    cache.add([10, 11, 12, 13, 14])
    cache.add([20, 21, 22])
    req = _arr([99, 98, 11, 12])
    assert cache.propose(req, 4).tolist() == [13, 14]  # stops at that response's end
    assert cache.propose(_arr([5, 6, 7]), 4).tolist() == []


def test_response_cache_stays_under_its_cap_and_evicts_oldest(lookup):
    cache = ResponseCache(lookup, max_tokens=20)
    rng = np.random.default_rng(0)
    for i in range(30):
        cache.add(rng.integers(0, 1000, size=int(rng.integers(3, 15))))
        assert cache.num_tokens <= 20
    first = [500, 501, 502, 503, 504, 505]
    cache.add(first)
    assert cache.propose(_arr([1, 500, 501]), 3).tolist() == [502, 503, 504]
    for _ in range(5):
        cache.add(rng.integers(2000, 3000, size=6))
    assert cache.num_tokens <= 20
    assert cache.propose(_arr([1, 500, 501]), 3).tolist() == []  # evicted
    cache.add(list(range(100, 150)))  # longer than the cap: its last 20 tokens
    assert cache.num_tokens == 20 and len(cache) == 1
    assert cache.propose(_arr([131, 132]), 2).tolist() == [133, 134]


def test_best_lookup_length_follows_acceptance():
    assert best_lookup_length(0.0, 8) == 0
    assert best_lookup_length(0.05, 8) == 0
    ks = [best_lookup_length(p, 8) for p in (0.2, 0.5, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] >= 1 and ks[-1] == 8
    assert best_lookup_length(0.95, 3) == 3
    assert VERIFY_COST[2] == pytest.approx(1.10) and VERIFY_COST[8] == pytest.approx(1.45)


def test_acceptance_counts_successes_then_one_failure():
    a = Acceptance(decay=1.0)
    a.update(4, 4)
    assert (a.accepted, a.trials) == (4, 4)
    a.update(4, 1)
    assert (a.accepted, a.trials) == (5, 6)
    assert a.estimate(prior=0.5, weight=2.0) == pytest.approx(6 / 8)


def test_adaptation_shrinks_and_probes_after_rejections():
    ad = DraftAdaptation(k_max=5, probe_every=4)
    start = ad.lookup_length("r")
    assert start >= 2
    for _ in range(20):
        ad.lookup_verified("r", 3, 0)
    lengths = [ad.lookup_length("r") for _ in range(8)]
    assert lengths == [0, 0, 0, 1, 0, 0, 0, 1]  # probes keep measuring
    for _ in range(30):
        ad.lookup_verified("r", 5, 5)
    assert ad.lookup_length("r") == 5
    # a new request starts from the engine-wide estimate
    assert ad.lookup_p("new") > ad.prior


def test_self_draft_early_stop_doubles_and_resets():
    ad = DraftAdaptation(k_max=5, max_self_skip=8)
    assert ad.may_self_draft("r")
    ad.self_verified("r", 0, 1)
    assert [ad.may_self_draft("r") for _ in range(2)] == [False, True]
    # an attempt with no confident exit drafted nothing: not a failure
    ad.self_verified("r", 0, 0)
    assert ad.may_self_draft("r")
    ad.self_verified("r", 0, 3)
    assert [ad.may_self_draft("r") for _ in range(4)] == [False, False, False, True]
    for _ in range(5):
        ad.self_verified("r", 0, 2)
    assert ad.state("r").self_skip == 8
    ad.self_verified("r", 0, 0)
    assert ad.state("r").self_skip == 8 and ad.state("r").self_failures == 7
    ad.self_verified("r", 2, 2)
    assert ad.may_self_draft("r")


def test_a_self_draft_pause_holds_only_where_attempts_after_rejections_pay():
    """At batch 1 the engine times plain steps and steps that attempted
    self-drafts after k rejected attempts in a row. A pause after one
    rejection is lifted where such attempts are measured faster than plain
    steps (the 1.5B's layer-3 head on code: 1.64 tokens in 0.36 s against 1
    in 0.27 s); it holds where they are slower, before anything is measured,
    and in larger batches (a step there is several requests')."""
    rates = SelfAttemptRates()
    assert rates.refit() == [0.0, 0.0, 0.0]  # nothing measured
    for _ in range(10):
        rates.observe(SelfAttemptRates.PLAIN, 1, 0.27)
        rates.observe(1, 2 if _ % 3 else 1, 0.36)  # 1.67 tokens: 4.6 tok/s against 3.7
        rates.observe(2, 1, 0.33)  # rejected again: 3.0 tok/s
    assert rates.refit() == [1.0, 0.0, 0.0]  # class 3 (3 or more) never seen
    assert rates.rate(3) is None and rates.summary()["plain"]["steps"] > 4

    ad = DraftAdaptation(k_max=5, max_self_skip=8)
    ad.self_rates.set_verdicts(rates.refit())
    ad.begin_step(1)
    ad.self_verified("r", 0, 2)  # one rejection: a pause of 1 step, lifted
    assert ad.may_self_draft("r") and ad.step_class() == 1
    assert ad.self_pauses == {"lifted": 1}
    ad.self_verified("r", 0, 2)  # two in a row: that class does not pay
    ad.begin_step(1)
    assert [ad.may_self_draft("r") for _ in range(4)] == [False, False, False, True]
    assert ad.self_pauses["paused"] == 3
    ad.self_verified("r", 1, 2)
    ad.self_verified("r", 0, 2)  # one rejection again, but beside another request
    ad.begin_step(2)
    assert not ad.may_self_draft("r") and ad.step_class() is None


def _fitted_cost(row_ms: float = 2.0) -> StepCost:
    """A cost fitted on steps like those measured at concurrency 16 here: a
    16-request step of about 47 ms, each drafted row about ``row_ms`` more; and
    at batch 1 about 23 ms plus 1.5 ms per drafted row."""
    rng = np.random.default_rng(0)
    cost = StepCost()
    for _ in range(200):
        extra = int(rng.integers(0, 6)) if rng.random() < 0.5 else 0
        cost.observe(0.023 + 0.0015 * extra + rng.normal(0, 0.0005), 1, extra)
        batch = int(rng.integers(12, 17))
        extra = int(rng.integers(0, 30)) if rng.random() < 0.5 else 0
        cost.observe(0.007 + 0.0025 * batch + row_ms * 1e-3 * extra
                     + rng.normal(0, 0.001), batch, extra)
    cost.set_fits(cost.refit())
    return cost


def test_step_cost_fit_recovers_the_row_cost():
    cost = _fitted_cost()
    assert cost.fitted(1) and cost.fitted(16) and not cost.fitted(64)
    per_row_16 = cost.step(16, 10) - cost.step(16, 9)
    per_row_1 = cost.step(1, 3) - cost.step(1, 2)
    assert per_row_16 == pytest.approx(0.002, rel=0.1)
    assert per_row_1 == pytest.approx(0.0015, rel=0.1)
    assert cost.step(16, 0) == pytest.approx(0.047, rel=0.05)
    # Too few steps with drafts: no fit, the batch-1 ratios stand in.
    sparse = StepCost()
    for _ in range(40):
        sparse.observe(0.05, 16, 0)
    assert sparse.refit() == {}
    assert sparse.step(16, 1) == pytest.approx(VERIFY_COST[2])


def test_lookup_length_is_batch_aware():
    cost = _fitted_cost()
    p = 0.4
    alone = best_lookup_length(p, 5, cost=cost, batch=1)
    loaded = best_lookup_length(p, 5, cost=cost, batch=16)
    assert alone >= 1 and loaded == 0  # pays at batch 1, not at batch 16
    assert best_lookup_length(0.95, 5, cost=cost, batch=16) >= 1
    # With cheap rows it pays at batch 16 too.
    assert best_lookup_length(p, 5, cost=_fitted_cost(row_ms=0.3), batch=16) >= 1


def test_later_requests_of_a_step_see_earlier_drafts():
    ad = DraftAdaptation(k_max=5)
    ad.cost = _fitted_cost(row_ms=0.5)
    for _ in range(10):
        ad.lookup_verified("sure", 5, 5)
    ad.begin_step(16)
    k = ad.lookup_length("sure")
    assert k >= 1
    before = (ad._extra, ad._tokens)
    ad.commit("sure", k)
    assert ad._extra == before[0] + k and ad._tokens > before[1]
    ad.begin_step(16)
    assert (ad._batch, ad._extra, ad._tokens) == (16, 0, 16.0)


def test_step_cost_summary_names_buckets():
    summary = _fitted_cost().summary()
    assert set(summary) == {"1", "8-15", "16-31"}
    assert summary["1"]["row_ms"] == pytest.approx(1.5, rel=0.1)


def test_fit_needs_no_plain_steps_and_ignores_outliers():
    cost = StepCost()
    rng = np.random.default_rng(1)
    for i in range(64):
        extra = int(rng.integers(5, 40))
        seconds = 0.045 + 0.0014 * extra + (0.4 if i % 16 == 0 else 0.0)  # a few stalls
        cost.observe(seconds, 16, extra)
    cost.set_fits(cost.refit())
    assert cost.fitted(16)
    assert cost.step(16, 1) - cost.step(16, 0) == pytest.approx(0.0014, rel=0.05)


def test_without_a_fit_a_loaded_step_drafts_one_token_per_request():
    ad = DraftAdaptation(k_max=5)
    for _ in range(10):
        ad.lookup_verified("sure", 5, 5)
    ad.begin_step(1)
    assert ad.lookup_length("sure") == 5
    ad.begin_step(16)
    assert ad.lookup_length("sure") == 1


def test_tree_size_follows_the_branch_gain_and_the_row_cost():
    """Tree nodes: many where a node has gained tokens and rows are cheap,
    none where rows are dear or where no fit of this batch size exists."""
    ad = DraftAdaptation(k_max=5)
    for _ in range(20):
        ad.tree_verified(4, 4)  # every sibling node gained a token
    ad.begin_step(1)
    assert ad.tree_nodes("a", 4) == (4, False)  # batch 1: the measured ratios say rows are cheap
    ad.cost = _fitted_cost(row_ms=0.3)
    ad.begin_step(16)
    assert ad.tree_nodes("a", 4) == (4, False)  # cheap rows at batch 16
    ad.cost = _fitted_cost(row_ms=20.0)
    ad.begin_step(16)
    assert ad.tree_nodes("b", 4) == (0, False)  # dear rows
    ad.cost = StepCost()
    ad.begin_step(16)
    sizes = [ad.tree_nodes("c", 4) for _ in range(16)]
    assert sizes == [(0, False)] * 16  # no fit at batch 16: no tree, not even a probe
    for _ in range(200):
        ad.tree_verified(4, 0)  # siblings stopped gaining
        ad.lookup_verified("d", 5, 0)  # and the request's lookups never hold
    ad.begin_step(1)
    assert ad.tree_nodes("d", 4, drafted=2) == (0, False)


def test_tree_probes_run_only_where_their_rows_cost_a_request_share():
    """Where no tree pays, a whole-tree probe runs every ``probe_every``
    steps: always alone in the batch, and in a larger batch only where the
    fitted cost says its rows cost at most one request's share of the step.
    Where rows are dear, the engine verifies exactly the linear draft."""
    ad = DraftAdaptation(k_max=5)
    for _ in range(200):
        ad.tree_verified(4, 0)  # siblings never gain: no tree pays anywhere

    def sizes(req, batch, cost):
        ad.cost = cost
        out = []
        for _ in range(16):
            ad.begin_step(batch)
            for _ in range(200):
                ad.lookup_verified(req, 5, 0)
            out.append(ad.tree_nodes(req, 4, drafted=2))
        return out

    assert sizes("alone", 1, StepCost()).count((4, True)) == 2
    assert sizes("unfitted", 16, StepCost()) == [(0, False)] * 16
    # 16 requests, a 47 ms step: one request's share is about 2.9 ms.
    assert sizes("dear", 16, _fitted_cost(row_ms=2.0)) == [(0, False)] * 16  # 4 rows: 8 ms
    assert sizes("cheap", 16, _fitted_cost(row_ms=0.3)).count((4, True)) == 2  # 4 rows: 1.2 ms
    # A probe held back by dear rows runs at the next affordable step.
    assert sizes("dear", 1, StepCost())[0] == (4, True)


def _tree_cost(off_row_ms: float) -> StepCost:
    """Batch-1 steps of 100 ms, 5 ms per drafted row, and ``off_row_ms`` more
    for each row off a tree's main chain."""
    rng = np.random.default_rng(1)
    cost = StepCost()
    for _ in range(200):
        extra = int(rng.integers(0, 10))
        off = int(rng.integers(0, extra + 1)) if rng.random() < 0.5 else 0
        cost.observe(0.1 + 0.005 * extra + off_row_ms * 1e-3 * off
                     + rng.normal(0, 0.0005), 1, extra, off)
    cost.set_fits(cost.refit())
    return cost


def test_step_cost_fits_what_an_off_chain_row_adds():
    cost = _tree_cost(off_row_ms=4.0)
    fit = cost.summary()["1"]
    assert fit["row_ms"] == pytest.approx(5.0, abs=0.3)
    assert fit["off_row_ms"] == pytest.approx(4.0, abs=0.3)
    assert cost.step(1, 6, 3) - cost.step(1, 6, 0) == pytest.approx(0.012, abs=0.001)
    # Never a row that costs less off the chain: a negative fit is refitted as 0.
    assert _tree_cost(off_row_ms=-3.0).fits[1][3] == 0.0
    # Steps whose off-chain rows never varied fit no off-chain cost.
    flat = StepCost()
    for i in range(40):
        flat.observe(0.1 + 0.005 * (i % 6), 1, i % 6, 0)
    flat.set_fits(flat.refit())
    assert flat.fits[1][3] == 0.0 and flat.step(1, 4, 2) == flat.step(1, 4, 0)


def _jump_cost(jump_ms: float) -> StepCost:
    """Batch-1 steps of 240 ms, 3 ms per drafted row up to 5 rows, and
    ``jump_ms`` more from 6 rows on (a matrix kernel's tiling step, as the
    1.5B's 6 vs 8 new tokens); most steps draft 0-5 rows."""
    rng = np.random.default_rng(2)
    cost = StepCost()
    for i in range(250):
        extra = int(rng.integers(0, 6)) if i % 5 else int(rng.integers(6, 10))
        cost.observe(0.24 + 0.003 * extra + (jump_ms * 1e-3 if extra >= 6 else 0.0)
                     + rng.normal(0, 0.001), 1, extra)
    cost.set_fits(cost.refit())
    return cost


def test_step_cost_judges_each_count_of_rows_at_what_it_measured():
    """A line fitted mostly on short drafts would price 9 rows at about 4
    rows' worth more than 5; the measured offsets price them as they ran."""
    cost = _jump_cost(40.0)
    true = {5: 0.255, 7: 0.301, 9: 0.307}
    for rows, seconds in true.items():
        assert cost.step(1, rows) == pytest.approx(seconds, abs=0.004)
    offs = cost.summary()["1"]["row_offsets_ms"]
    assert set(offs) == set(range(10)) and offs[6] > 10.0 > offs[3]
    # Tensor-parallel ranks get every coefficient and offset through one flat list.
    buckets = range(1, 12)
    flat = cost.as_floats(cost.fits, buckets)
    assert len(flat) == 11 * StepCost.FIT_LEN
    assert cost.from_floats(flat, buckets) == cost.fits
    # Lengthening a request's 5 lookup tokens to 9 pays under the line, not at
    # the measured cost of 9 rows.
    ad = DraftAdaptation(k_max=5)
    for _ in range(60):  # acceptance 0.8 per token
        ad.lookup_verified("r", 5, 4)
    ad.begin_step(1)
    ad.commit("r", 5)
    ad.cost = _jump_cost(0.0)
    assert ad.tree_nodes("r", 4, drafted=5)[0] == 4
    ad.begin_step(1)
    ad.commit("r", 5)
    ad.cost = _jump_cost(40.0)
    assert ad.tree_nodes("r", 4, drafted=5)[0] == 0


def test_tree_shape_keeps_what_pays_of_each_kind_of_node():
    """A built tree is cut to the shape with the most tokens per unit of cost:
    the main chain alone where siblings gain little for their dearer rows, the
    whole tree where they gain, nothing where no node gains, and a probe keeps
    the tree whole. Nodes that lengthen the main chain are judged by the
    request's own lookup acceptance."""
    ad = DraftAdaptation(k_max=5)
    ad.cost = _tree_cost(off_row_ms=20.0)
    for _ in range(50):
        ad.lookup_verified("r", 5, 5)  # this request's lookups hold
        ad.tree_verified(4, 0)  # siblings gained nothing
    ad.begin_step(1)
    # the main chain alone, and every 8th tree whole at first, so the siblings
    # stay measured; each whole tree whose siblings gain nothing doubles the
    # interval (up to 128), and a gain brings it back to 8
    ad._off_every = 8
    shapes = [ad.tree_shape("r", 3, 4, drafted=2) for _ in range(16)]
    assert shapes.count((3, 0)) == 14 and shapes.count((3, 4)) == 2
    whole = []
    for i in range(1000):
        if ad.tree_shape("r", 3, 4, drafted=2) == (3, 4):
            whole.append(i)
            ad.tree_verified(4, 0)
    gaps = [b - a for a, b in zip(whole, whole[1:])]
    assert gaps[:4] == [16, 32, 64, 128] and set(gaps[4:]) == {128}
    ad.tree_verified(4, 1)
    assert ad._off_every == 8
    assert ad.tree_shape("r", 3, 4, probe=True, drafted=2) == (3, 4)
    for _ in range(200):
        ad.tree_verified(4, 4)  # now siblings gain a token each
    assert ad.tree_shape("r", 3, 4, drafted=2) == (3, 4)
    for _ in range(400):
        ad.tree_verified(4, 0)  # nothing gains: siblings, and another request's lookups
        ad.lookup_verified("q", 5, 0)
    assert ad.tree_shape("q", 3, 0, drafted=2) == (0, 0)
    assert ad.tree_nodes("q", 4, drafted=2) == (0, False)
    # Lengthening pays only as far as the request's drafts are likely to hold.
    assert ad.chain_gain("r", 3, 2) > 1.5 and ad.chain_gain("q", 3, 2) < 0.05
    fixed = DraftAdaptation(k_max=5, fixed=True)
    assert fixed.tree_shape("r", 3, 4) == (3, 4) and fixed.tree_nodes("r", 4) == (4, False)
