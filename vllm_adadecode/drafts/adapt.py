"""Per-request draft length and self-draft early stop (pure Python, no vLLM).

Lookup drafts cost no layers in drafting, but each one is a row in the
verification forward. If each next lookup token is accepted with probability
p given the ones before it were, k drafts yield p + ... + p^k more tokens for
the cost of k more rows in the step. A request drafts the k that most raises
the step's tokens per second, and no lookup tokens when no k does.

What k more rows cost depends on the batch. At batch 1 a drafted row adds
about 5-10% to a step that yields one token. At batch 16 it adds about 4% to
a step that yields about twelve (measured: a request with several query tokens
takes another attention path than decoding), several times more per token
gained. ``StepCost`` fits the cost of a step from the engine's own recent
steps, per batch size; without a fit it falls back to ``VERIFY_COST``, the
batch-1 ratios measured once on SmolLM2-135M fp32. The requests of one step
are decided in turn, each seeing the rows and expected tokens of those before
it (``begin_step``, ``lookup_length``, ``commit``). p is estimated per request
from its own verified lookups, shrunk toward the engine-wide estimate.

Self-drafts (early exits) stop per request as Kangaroo's and DEL's do: after
a step whose self-drafts were all rejected, the request skips self-drafting for
a number of steps that doubles with each further failure (up to
``max_self_skip``); an accepted self-draft resets it. An attempt with no
confident exit drafts nothing and is not a failure: the layers it ran are
resumed by verification, not run again. A pause holds only where it pays
(``SelfAttemptRates``): at batch 1 the engine measures the tokens per second
of plain steps and of steps that attempted self-drafts after 1, 2, and 3 or
more rejected attempts in a row, and a paused request attempts anyway where
its class's steps are the faster. Where a head's rejected drafts are often
followed by accepted ones, a pause would give those tokens away; where more
rejections follow, it saves the attempts (docs/performance/models.md).

With ``fixed`` (the engine's ``"adaptive": false``) every request drafts the
most it can on every step. The engine-level back-off (governor.py) decides, per batch size, whether
drafting pays at all; this module decides how much each request drafts.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from .governor import bucket, bucket_name

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


class StepCost:
    """What a step costs with ``extra`` drafted rows beside its ``batch``
    requests, ``off`` of them token-tree rows off their tree's main chain,
    fitted while serving.

    Per batch-size bucket (as the back-off's: 1, 2-3, 4-7, ...), the recent
    measured steps' seconds are fitted as ``a + b * batch + c * extra + e *
    off`` by least squares. ``c`` is everything a drafted row adds: its rows
    in the forward (where several query tokens of one request take another
    attention path than decoding), the LM head and verification over it.
    ``e`` is what an off-chain tree row adds on top: its attention runs apart
    from vLLM's kernel, in every layer (engine/tree.py); it is fitted only
    where such rows vary, else 0. Until a bucket has enough steps of both
    kinds, and for relative costs without timings, the batch-1 ratios
    ``VERIFY_COST`` stand in (one request, its rows).

    A forward's cost is not linear in its rows: on this CPU a batch-1 forward
    over 8 new tokens costs 1.21x one token on Qwen2.5-Coder-1.5B where 6
    cost 1.05x (the matrix kernels' tiling). So each count of drafted rows
    seen in at least ``min_row_steps`` steps also gets its measured offset
    from the line (the median residual of those steps), and a count of rows
    is judged at what it measured, not at the line fitted mostly on shorter
    drafts. Coefficients and offsets change only in ``refit``, so
    tensor-parallel ranks can share rank 0's (``as_floats``)."""

    def __init__(self, window: int = 256, min_steps: int = 16, min_spread: int = 2,
                 min_row_steps: int = 4):
        self.window = window
        self.min_steps = min_steps
        self.min_spread = min_spread  # drafted rows must vary by this much for a fit
        self.min_row_steps = min_row_steps
        self.samples: dict[int, deque] = {}
        # Per bucket: (a, b, c, e, offset at 0 drafted rows, at 1, ..., at MAX_ROWS).
        self.fits: dict[int, tuple[float, ...]] = {}

    bucket = staticmethod(bucket)
    MAX_ROWS = 24  # drafted rows per step that get their own measured offset
    FIT_LEN = 5 + MAX_ROWS

    def step(self, batch: int, extra: int, off: int = 0) -> float:
        fit = self.fits.get(self.bucket(batch))
        if fit is None:  # one request's relative cost at batch 1
            return VERIFY_COST[min(1 + extra, len(VERIFY_COST) - 1)]
        a, b, c, e = fit[:4]
        offset = fit[4 + extra] if extra <= self.MAX_ROWS and len(fit) > 4 + extra else 0.0
        return a + b * batch + c * extra + e * off + offset

    def fitted(self, batch: int) -> bool:
        return self.bucket(batch) in self.fits

    def observe(self, seconds: float, batch: int, extra: int, off: int = 0) -> None:
        """A measured step (no prefill in it)."""
        if seconds <= 0 or batch < 1 or extra < 0 or not 0 <= off <= extra:
            return
        self.samples.setdefault(self.bucket(batch), deque(maxlen=self.window)).append(
            (seconds, batch, extra, off))

    def refit(self) -> dict[int, tuple[float, float, float, float]]:
        """Least-squares coefficients per bucket with enough steps whose
        drafted rows vary (a fit whose row cost comes out negative is not
        used; an off-chain cost that comes out negative is refitted as 0).
        Steps over three times the bucket's median are left out: a step that
        also did other work (a preemption, a late prefill chunk)."""
        import numpy as np

        fits = {}
        for bkt, samples in self.samples.items():
            if len(samples) < self.min_steps:
                continue
            arr = np.array(samples, dtype=np.float64)
            arr = arr[arr[:, 0] <= 3.0 * np.median(arr[:, 0])]
            if len(arr) < self.min_steps or np.ptp(arr[:, 2]) < self.min_spread:
                continue
            x = np.column_stack([np.ones(len(arr)), arr[:, 1], arr[:, 2], arr[:, 3]])
            if np.ptp(arr[:, 1]) == 0:  # one batch size: fold b into a
                x[:, 1] = 0.0
            if np.ptp(arr[:, 3]) == 0:  # off-chain rows never varied: not fitted
                x[:, 3] = 0.0
            coef = np.linalg.lstsq(x, arr[:, 0], rcond=None)[0]
            if coef[3] < 0:
                x[:, 3] = 0.0
                coef = np.linalg.lstsq(x, arr[:, 0], rcond=None)[0]
            a, b, c, e = (float(v) for v in coef)
            if c > 0 and a + b * arr[:, 1].mean() > 0:
                residual = arr[:, 0] - x @ coef
                offsets = [0.0] * (self.MAX_ROWS + 1)
                for rows in range(self.MAX_ROWS + 1):
                    seen = residual[arr[:, 2] == rows]
                    if len(seen) >= self.min_row_steps:
                        offsets[rows] = float(np.median(seen))
                fits[bkt] = (a, b, c, e, *offsets)
        return fits

    def summary(self) -> dict[str, dict]:
        """Per fitted bucket (named by its batch sizes): a step's milliseconds
        without drafts at the bucket's mean batch, per drafted row, what an
        off-chain tree row adds on top, and the measured offsets from that line
        by count of drafted rows (where they are not 0)."""
        out = {}
        for bkt, fit in sorted(self.fits.items()):
            a, b, c, e = fit[:4]
            samples = self.samples.get(bkt) or [(0.0, 1 << (bkt - 1), 0, 0)]
            batch = sum(x[1] for x in samples) / len(samples)
            out[bucket_name(bkt)] = {
                "batch": round(batch, 2), "step_ms": round(1e3 * (a + b * batch), 3),
                "row_ms": round(1e3 * c, 3), "off_row_ms": round(1e3 * e, 3),
                "row_offsets_ms": {rows: round(1e3 * v, 2) for rows, v in enumerate(fit[4:])
                                   if v},
                "steps": len(samples)}
        return out

    def set_fits(self, fits: dict[int, tuple[float, ...]]) -> None:
        self.fits = dict(fits)

    def as_floats(self, fits: dict[int, tuple[float, ...]], buckets) -> list[float]:
        """``fits`` for ``buckets`` as one flat list (zeros: no fit), for a broadcast."""
        out: list[float] = []
        for bkt in buckets:
            fit = tuple(fits.get(bkt, ()))
            out += list(fit) + [0.0] * (self.FIT_LEN - len(fit))
        return out

    def from_floats(self, flat: list[float], buckets) -> dict[int, tuple[float, ...]]:
        """The inverse of ``as_floats``: buckets with a positive row cost."""
        n = self.FIT_LEN
        return {bkt: tuple(flat[n * i:n * i + n]) for i, bkt in enumerate(buckets)
                if flat[n * i + 2] > 0}


_FALLBACK_COST = StepCost()  # never fitted: the batch-1 ratios


class SelfAttemptRates:
    """Tokens per second of batch-1 steps by what their request did: a plain
    step (``PLAIN``: no drafts, no self-draft attempt: a pause, or the
    back-off's plain step) or a step whose only drafts came from a self-draft
    attempt made after ``k`` rejected attempts in a row (class ``k``; 3 stands
    for 3 or more), as decaying sums of steps, tokens and seconds (a step's
    seconds include its drafting pass). At batch 1 a step is one request's, so
    what an attempt costs and yields is measured whole, with no model of the
    drafting pass or the rows: a self-drafted row can cost less to verify than
    a lookup row (the drafter ran its first layers), and the pass grows with
    every token drafted.

    A class pays where its steps' tokens per second beat the plain steps' by
    ``margin``, both with at least ``min_steps`` steps. Verdicts change only in
    ``refit``, so tensor-parallel ranks can share rank 0's."""

    PLAIN = -1
    CLASSES = 3

    def __init__(self, decay: float = 0.95, min_steps: float = 4.0, margin: float = 0.02):
        self.decay = decay
        self.min_steps = min_steps
        self.margin = margin
        self.sums: dict[int, list[float]] = {}  # class -> [steps, tokens, seconds]
        self.verdicts = [False] * self.CLASSES  # classes 1..CLASSES

    def observe(self, cls: int, tokens: int, seconds: float) -> None:
        """A measured batch-1 step of class ``cls`` (``PLAIN``, or 0..CLASSES)."""
        if seconds <= 0 or tokens <= 0:
            return
        s = self.sums.setdefault(cls, [0.0, 0.0, 0.0])
        for i, v in enumerate((1.0, float(tokens), seconds)):
            s[i] = s[i] * self.decay + v

    def rate(self, cls: int) -> float | None:
        """Tokens per second of the class's steps, or None: too few steps."""
        s = self.sums.get(cls)
        return s[1] / s[2] if s and s[0] >= self.min_steps and s[2] > 0 else None

    def refit(self) -> list[float]:
        """Per class 1..CLASSES, 1.0 where its attempts pay, else 0.0."""
        plain = self.rate(self.PLAIN)
        out = []
        for cls in range(1, self.CLASSES + 1):
            rate = self.rate(cls)
            out.append(float(plain is not None and rate is not None
                             and rate > plain * (1.0 + self.margin)))
        return out

    def set_verdicts(self, flags: list[float]) -> None:
        self.verdicts = [f > 0.5 for f in flags[:self.CLASSES]]

    def pays(self, failures: int) -> bool:
        """Whether an attempt after ``failures`` (>= 1) rejected ones in a row pays."""
        return failures >= 1 and self.verdicts[min(failures, self.CLASSES) - 1]

    def summary(self) -> dict[str, dict]:
        """Per class seen ("plain", "0" .. "3"): decayed steps and tokens per second."""
        return {("plain" if cls == self.PLAIN else str(cls)):
                {"steps": round(s[0], 1), "tok_per_s": round(s[1] / s[2], 3) if s[2] else None}
                for cls, s in sorted(self.sums.items())}


def lookup_gain(p: float, k: int) -> float:
    """Expected accepted tokens of k lookup drafts: p + p^2 + ... + p^k."""
    gain, term = 0.0, 1.0
    for _ in range(k):
        term *= p
        gain += term
    return gain


def best_lookup_length(p: float, k_max: int, margin: float = 0.02, *,
                       cost: StepCost | None = None, batch: int = 1, extra: int = 0,
                       tokens: float | None = None, off: int = 0) -> int:
    """The number of lookup drafts (0..k_max) that most raises the step's
    tokens per unit of cost, when each is accepted with probability p given the
    previous ones. The step so far: ``batch`` requests and ``extra`` drafted
    rows (``off`` of them off a token tree's main chain), expected to yield
    ``tokens`` tokens (default: one per request). A
    length must raise the step's throughput by ``margin`` of one token's share
    (``margin / tokens``), so at batch 1 it beats a plain step by ``margin``."""
    cost = cost or _FALLBACK_COST
    tokens = float(batch) if tokens is None else tokens
    base = tokens / cost.step(batch, extra, off)
    best_k, best = 0, base * (1.0 + margin / max(tokens, 1.0))
    gain, term = 0.0, 1.0
    for k in range(1, k_max + 1):
        term *= p
        gain += term
        ratio = (tokens + gain) / cost.step(batch, extra + k, off)
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
    # Per kind: steps without lookup drafts allowed, since the last probe.
    lookup_skipped: dict[str, int] = field(default_factory=dict)
    self_failures: int = 0  # self-draft attempts in a row with no accepted token
    self_skip: int = 0  # steps left before the next self-draft attempt

    @classmethod
    def new(cls) -> "RequestDrafting":
        return cls()


class DraftAdaptation:
    """Decisions for every request of an engine, and the engine-wide lookup
    acceptance that a new request starts from."""

    MAX_OFF_EVERY = 128  # longest interval between trees kept whole to measure siblings

    def __init__(self, k_max: int, *, probe_every: int = 8, max_self_skip: int = 32,
                 prior: float = 0.5, fixed: bool = False):
        self.k_max = k_max
        self.fixed = fixed  # no adaptation: k_max lookup tokens, self-drafts every step
        self.probe_every = probe_every
        self.max_self_skip = max_self_skip
        self.engine: dict[str, Acceptance] = {}  # per kind of match, all requests
        self.prior = prior
        self.requests: dict[str, RequestDrafting] = {}
        self.cost = StepCost()
        self.self_rates = SelfAttemptRates()
        # Request-steps a pause skipped, and pauses lifted because attempts pay.
        self.self_pauses: Counter = Counter()
        self._self_class: int | None = None  # this step's, at batch 1 (None: several)
        # Token trees: tokens gained per node off the main chain (siblings:
        # dearer rows), engine-wide (decaying sums; nodes that lengthen the
        # main chain are judged by the request's lookup acceptance); and per
        # request the steps since a tree was last allowed.
        self.off = Acceptance(decay=0.99)  # accepted: tokens gained; trials: nodes
        self.off_prior = 0.1
        self._tree_skipped: dict[str, int] = {}
        # Trees built whose off-chain nodes were cut since one was kept whole
        # (engine-wide, as the off-chain gain is): one is kept whole every
        # ``_off_every`` such trees, an interval that doubles (up to
        # ``MAX_OFF_EVERY``) each time a tree's off-chain nodes gain nothing
        # and goes back to ``probe_every`` when they gain.
        self._off_skipped = 0
        self._off_every = probe_every
        # The step being decided: its requests, drafted rows so far (off-chain
        # tree rows among them) and the tokens they are expected to yield (one
        # per request, plus accepted drafts).
        self._batch, self._extra, self._off, self._tokens = 1, 0, 0, 1.0

    def begin_step(self, batch_size: int) -> None:
        """A new step with ``batch_size`` requests, none drafted yet."""
        self._batch, self._extra, self._off = max(1, batch_size), 0, 0
        self._tokens = float(self._batch)
        self._self_class = SelfAttemptRates.PLAIN if self._batch == 1 else None

    def step_class(self) -> int | None:
        """This step's class for ``SelfAttemptRates`` (batch 1): ``PLAIN`` if
        its request made no self-draft attempt, else the rejected attempts in
        a row before it (at most ``CLASSES``); None in a larger batch."""
        return self._self_class

    def state(self, req_id: str) -> RequestDrafting:
        st = self.requests.get(req_id)
        if st is None:
            st = self.requests[req_id] = RequestDrafting.new()
        return st

    def forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
        self._tree_skipped.pop(req_id, None)

    # ---- token trees -----------------------------------------------------------
    def off_gain(self) -> float:
        """Estimated tokens a node off the main chain adds to a step (engine-wide)."""
        return self.off.estimate(self.off_prior, 4.0)

    def chain_gain(self, req_id: str, nodes: int, drafted: int, kind: str = "lookup") -> float:
        """Expected tokens ``nodes`` nodes that lengthen a request's main chain
        add: they count only where its ``drafted`` tokens (of ``kind``) all
        held, and they continue another occurrence of its newest tokens, so
        each holds with the request's lookup acceptance."""
        if nodes <= 0:
            return 0.0
        held = self.lookup_p(req_id, kind) ** drafted
        return held * lookup_gain(self.lookup_p(req_id), nodes)

    def _tree_cost(self) -> StepCost | None:
        """The cost model trees are sized by at this batch size: the fit, the
        batch-1 ratios for one request alone, or None (no fit of this larger
        batch size: trees only on probes)."""
        if self.cost.fitted(self._batch):
            return self.cost
        return _FALLBACK_COST if self._batch == 1 else None

    def _ratio(self, cost: StepCost, gain: float, rows: int, off: int) -> float:
        return ((self._tokens + gain)
                / cost.step(self._batch, self._extra + rows, self._off + off))

    def tree_nodes(self, req_id: str, max_nodes: int, drafted: int = 0,
                   kind: str = "lookup") -> tuple[int, bool]:
        """Nodes a request's tree may add this step, and whether this is a
        probe: as many as pay as main-chain nodes or as off-chain nodes (at a
        main-chain row's cost), so no tree is built where none could pay;
        ``max_nodes`` every ``probe_every`` steps where none does, so the
        estimates keep being measured, where a probe is affordable
        (``_probe_affordable``). ``tree_shape`` then sizes the tree that was
        built."""
        if self.fixed or max_nodes <= 0:
            return max(0, max_nodes), False
        cost = self._tree_cost()
        best_n = 0
        if cost is not None:
            go = self.off_gain()
            best = self._ratio(cost, 0.0, 0, 0) * (1.0 + 0.02 / max(self._tokens, 1.0))
            for n in range(1, max_nodes + 1):
                gain = max(self.chain_gain(req_id, n, drafted, kind), go * n)
                ratio = self._ratio(cost, gain, n, 0)
                if ratio > best:
                    best_n, best = n, ratio
        if best_n:
            self._tree_skipped[req_id] = 0
            return best_n, False
        skipped = self._tree_skipped.get(req_id, 0) + 1
        probe = skipped >= self.probe_every and self._probe_affordable(cost, max_nodes)
        self._tree_skipped[req_id] = 0 if probe else skipped
        return (max_nodes, True) if probe else (0, False)

    def _probe_affordable(self, cost: StepCost | None, nodes: int) -> bool:
        """Whether a whole-tree probe of ``nodes`` rows may run in this step:
        always alone in the batch; in a larger batch only where its measured
        cost fit exists and says the probe's rows (priced as off-chain rows)
        cost at most one request's share of the step. Where rows are dear
        (a small model at high concurrency) no probe runs, and the engine
        verifies what a linear draft verifies; the gains the probes measure
        are engine-wide, so probes at smaller batches keep them current."""
        if self._batch == 1:
            return True
        if cost is None or not cost.fitted(self._batch):
            return False
        base = cost.step(self._batch, self._extra, self._off)
        more = cost.step(self._batch, self._extra + nodes, self._off + nodes) - base
        return base > 0 and more <= base / self._batch

    def tree_shape(self, req_id: str, chain: int, off: int, probe: bool = False,
                   drafted: int = 0, kind: str = "lookup") -> tuple[int, int]:
        """How much of a built tree to verify: ``chain`` nodes lengthen its
        main chain past the request's ``drafted`` tokens and ``off`` lie off
        it. The shape with the most tokens per unit of cost among the main
        chain cut after each of its nodes (no off-chain node) and the whole
        tree; (0, 0) when none beats the bare draft. A probe, fixed drafting,
        or the ``_off_every``-th tree in a row whose off-chain nodes would be
        dropped keeps it whole (so their gain keeps being measured)."""
        if self.fixed or probe:
            return chain, off
        cost = self._tree_cost() or _FALLBACK_COST
        go = self.off_gain()
        best_shape = (0, 0)
        best = self._ratio(cost, 0.0, 0, 0) * (1.0 + 0.02 / max(self._tokens, 1.0))
        shapes = [(c, 0) for c in range(1, chain + 1)] + ([(chain, off)] if off else [])
        for c, o in shapes:
            gain = self.chain_gain(req_id, c, drafted, kind) + go * o
            ratio = self._ratio(cost, gain, c + o, o)
            if ratio > best:
                best_shape, best = (c, o), ratio
        if off and not best_shape[1]:
            self._off_skipped += 1
            if self._off_skipped >= self._off_every:
                self._off_skipped = 0
                return chain, off
        elif off:
            self._off_skipped = 0
        return best_shape

    def tree_commit(self, req_id: str, chain: int, off: int, drafted: int = 0,
                    kind: str = "lookup") -> None:
        """A tree adds ``chain`` main-chain and ``off`` off-chain rows to this step."""
        self._extra += chain + off
        self._off += off
        self._tokens += self.chain_gain(req_id, chain, drafted, kind) + self.off_gain() * off

    def tree_verified(self, off: int, gained: int) -> None:
        """A tree's ``off`` nodes off its main chain were verified and its
        accepted path gained ``gained`` tokens through them (0 unless it left
        the main chain for a sibling)."""
        if off > 0:
            f = self.off.decay ** off
            self.off.accepted = self.off.accepted * f + gained
            self.off.trials = self.off.trials * f + off
            self._off_every = (self.probe_every if gained > 0
                               else min(2 * self._off_every, self.MAX_OFF_EVERY))

    def lookup_p(self, req_id: str, kind: str = "lookup") -> float:
        """Estimated acceptance of the next lookup token of this kind of match
        for this request: its own count, shrunk toward the engine's."""
        engine = self.engine.get(kind)
        engine_p = engine.estimate(self.prior) if engine else self.prior
        own = self.state(req_id).lookup.get(kind)
        return own.estimate(engine_p) if own else engine_p

    def lookup_length(self, req_id: str, kind: str = "lookup") -> int:
        """Lookup drafts a request may propose this step: the best length for
        its estimated acceptance and the step so far (0: do not search); one
        token every ``probe_every`` steps when none pays, so the estimate
        keeps being measured."""
        if self.fixed:
            return self.k_max
        st = self.state(req_id)
        p = self.lookup_p(req_id, kind)
        if self.cost.fitted(self._batch):
            k = best_lookup_length(p, self.k_max, cost=self.cost, batch=self._batch,
                                   extra=self._extra, tokens=self._tokens, off=self._off)
        else:
            # No fit yet for this batch size: each request as if alone (batch
            # 1), but at most one token beside other requests until the fit
            # says what a row costs there (16 requests drafting 5 rows each
            # made steps 3.5x slower at concurrency 16, all rejected).
            k = best_lookup_length(p, self.k_max if self._batch == 1 else 1)
        if k:
            st.lookup_skipped[kind] = 0
            return k
        st.lookup_skipped[kind] = st.lookup_skipped.get(kind, 0) + 1
        if st.lookup_skipped[kind] >= self.probe_every:
            st.lookup_skipped[kind] = 0
            return 1
        return 0

    def commit(self, req_id: str, k: int, kind: str = "lookup") -> None:
        """The request drafts ``k`` lookup tokens in this step: later requests
        of the step see its rows and expected tokens."""
        if k > 0:
            self._extra += k
            self._tokens += lookup_gain(self.lookup_p(req_id, kind), k)

    def lookup_verified(self, req_id: str, proposed: int, accepted: int,
                        kind: str = "lookup") -> None:
        own = self.state(req_id).lookup
        own.setdefault(kind, Acceptance()).update(proposed, accepted)
        self.engine.setdefault(kind, Acceptance(decay=0.995)).update(proposed, accepted)

    def may_self_draft(self, req_id: str) -> bool:
        """Whether the request attempts self-drafts in this step: yes unless
        it is in a pause after rejected ones, and, at batch 1, unless attempts
        after as many rejections are measured to pay (``SelfAttemptRates``)."""
        if self.fixed:
            return True
        st = self.state(req_id)
        if st.self_skip > 0:
            if self._batch == 1 and self.self_rates.pays(st.self_failures):
                st.self_skip = 0
                self.self_pauses["lifted"] += 1
            else:
                st.self_skip -= 1
                self.self_pauses["paused"] += 1
                return False
        if self._self_class is not None:
            self._self_class = min(st.self_failures, SelfAttemptRates.CLASSES)
        return True

    def self_verified(self, req_id: str, accepted: int, drafted: int) -> None:
        """A step in which the request attempted self-drafts made ``drafted``
        and kept ``accepted`` of them. An attempt that made none (no exit was
        confident) is not a failure: verification resumes the layers it ran,
        so it spent only its exit checks, and the pause stays as it was."""
        st = self.state(req_id)
        if accepted > 0:
            st.self_failures = 0
            st.self_skip = 0
        elif drafted > 0:
            st.self_failures += 1
            st.self_skip = min(2 ** st.self_failures - 1, self.max_self_skip)
