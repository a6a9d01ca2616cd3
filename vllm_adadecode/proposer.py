"""AdaDecodeProposer: the drafter that runs inside vLLM's model runner.

Each draft step feeds every drafting request's newest token through the
target's own decoder layers (the same modules: no copy of weights), segment by
segment between exit layers. At each exit layer the exit head (T_i, then the
model's final norm and LM head) gives a top-1 token and probability; the token
exits at the first exit layer whose probability reaches the threshold. A
request whose token is confident at no exit layer stops drafting for this step.

Earlier drafted tokens that exited shallower than the newest token goes are
carried along (their deferred layers run batched with it), so every layer the
newest token attends through has the KV of all earlier positions. All KV goes
into the target's own paged KV blocks through the target's attention layers.
"""

from __future__ import annotations

import atexit
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import patches, sampling
from .config import AdaDecodeConfig
from .drafts.adapt import DraftAdaptation
from .drafts.corpus import DraftCorpus, load_corpus_tokens
from .drafts.lookup import ResponseCache, SequenceLookup
from .governor import Governor
from .heads import ExitHeads
from .policy import carried_suffix, draft_budget, exits, top1

# Draft sources other than an exit layer (exit layers are >= 0).
LOOKUP = -1  # the request's own earlier tokens
CACHE = -2  # an earlier response of this engine
CORPUS = -3  # the model's own responses to training prompts (drafts/corpus.py)
SOURCE_NAMES = {LOOKUP: "lookup", CACHE: "cache", CORPUS: "corpus"}


def source_name(source: int) -> str:
    return SOURCE_NAMES.get(source, "exit")


@dataclass
class _Draft:
    """One request's drafting state within a step."""

    row: int  # index in the runner's input batch
    token: int  # newest token: input of the current draft step
    position: int
    budget: int
    drafted: list[int] = field(default_factory=list)
    # Where each drafted token came from: its exit layer, or LOOKUP / CACHE.
    exit_layers: list[int] = field(default_factory=list)
    self_attempt: bool = False  # early-exit drafting ran for this request
    n_lookup: int = 0  # leading drafted tokens that came from a lookup
    lookup_kind: str = "lookup"  # whose acceptance estimate they feed: "lookup" or "corpus"
    # Per drafted token (position order): hidden, residual (1 x d each), depth.
    hidden: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    # The newest token's state when no exit layer was confident (it ran up to
    # the last exit layer): (hidden, residual, depth). Verification resumes it.
    tail: tuple | None = None
    # A sampled request (position-keyed sampling): (seed, temperature, top_k,
    # top_p); its self-drafts are drawn with the target's noise. None: greedy.
    sampled: tuple | None = None


# Drafter calls between refits of the step-cost model (shared across tensor-parallel ranks).
_COST_SYNC_EVERY = 8


class AdaDecodeProposer:
    """vLLM drafter (loaded through vLLM's custom-class proposer hook)."""

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.config = AdaDecodeConfig.from_dict(vllm_config.additional_config["adadecode"])
        self.max_model_len = vllm_config.model_config.max_model_len
        self.model = None
        self._graphs_at_start: int | None = None
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self._reset_stats()
        # Drafts proposed in the previous step, per request: their exit layers.
        # The next step's sampled tokens tell how many of them were accepted.
        self._pending: dict[str, list[int]] = {}
        # Per-request counters (steps, accepted) for benchmark breakdowns only.
        self.per_request = os.environ.get("ADADECODE_STATS") == "1"
        self.governor = Governor() if self.config.adaptive else None
        # With both sources on, a second back-off decides, among steps that
        # draft, whether early-exit self-drafts pay on top of lookups. It sees
        # only steps the first one lets draft. Self-drafts start off in every
        # batch-size bucket and are re-checked every explore_every steps; the
        # pairs those re-checks give decide once there are enough, without a
        # learning phase that tries them on every second drafting step (an
        # attempt at 12-15 requests costs a sixth to a quarter of a step;
        # docs/PERFORMANCE.md sections 18 and 19).
        self.self_governor = (Governor(unmeasured=False, learn=False) if self.config.adaptive
                              and self.config.lookup and self.config.self_draft else None)
        # Per-request lengths and early stop; with "adaptive": false every
        # request drafts all it can on every step.
        self.adapt = DraftAdaptation(self.config.lookup_tokens,
                                     fixed=not self.config.adaptive)
        # The last step's start (the drafter's call), its requests and the
        # draft rows it scheduled beside them (for the step-cost fit).
        self._step_start: float | None = None
        self._step_shape: tuple[int, int] | None = None
        self.lookup = self.cache = None
        if self.config.lookup:
            self.lookup = SequenceLookup(self.config.lookup_min_match,
                                         self.config.lookup_max_match, self.max_model_len)
            self.lookup.warm_up()
            if self.config.lookup_cache:
                self.cache = ResponseCache(self.lookup, self.config.lookup_cache_tokens)
        self.corpus = None
        if self.config.lookup and self.config.lookup_corpus and self.config.heads:
            tokens = load_corpus_tokens(self.config.heads)  # checked at engine start
            if tokens is not None:
                self.corpus = DraftCorpus(tokens, min_prob=self.config.corpus_min_prob)
        # Requests seen in the batch, with the runner's record of each: when one
        # is gone, its response enters the cache and its drafting state is dropped.
        self._live: dict[str, object] = {}
        # Deferred verification: per request, the drafted positions' depths and
        # hidden states, consumed by the next forward (deferred_forward).
        self._states: dict[str, tuple[int, list[int], list, list]] = {}
        if not self.config.deferred:
            self.deferred_forward = None
        patches.install_runner_hooks()
        # Position-keyed sampling: seeds of the requests (their own, or drawn
        # at arrival); None when sampled requests are left to vLLM's sampler.
        self.sampling_seeds = None
        if self.config.sampled_drafts and patches.keyed_sampling_supported():
            self.sampling_seeds = sampling.Seeds(vllm_config.model_config.seed)
            patches.install_keyed_sampling()
        log = os.environ.get("ADADECODE_STEP_LOG")
        self._step_log = open(log, "a") if log else None
        self.profile = os.environ.get("ADADECODE_PROFILE") == "1"
        if self.profile:
            atexit.register(self._report)

    def _reset_stats(self) -> None:
        self.exit_counts: Counter[int] = Counter()
        self.accepted_by_exit: Counter[int] = Counter()
        self.rejected_by_exit: Counter[int] = Counter()
        self.seconds = 0.0  # time spent drafting
        self.layer_evals = 0  # decoder-layer token evaluations in drafting
        self.head_evals = 0  # exit-head token evaluations
        self.full_head_evals = 0  # of those, checked on the full vocabulary
        # Layers the verification pass would still owe the drafted tokens if it
        # skipped what the drafter ran (sum over drafts of L - 1 - final depth).
        self.deferred_layer_evals = 0
        # Layer evaluations the verification pass skipped (deferred verification).
        self.verify_layers_skipped = 0
        # Of those, layers of last draft attempts that found no confident exit:
        # verification resumed them instead of running them again.
        self.attempt_layers_reused = 0
        self.calls = 0
        self.requests: dict[str, list[int]] = {}  # req id -> [steps, accepted drafts]
        self.drafted_by_source: Counter[str] = Counter()
        self.accepted_by_source: Counter[str] = Counter()
        self.lookup_seconds = 0.0  # time spent matching (in-sequence and cache)
        # Request-steps by the sources their draft mixed: "lookup", "exit",
        # "lookup+exit" (lookup tokens, then self-drafts from where they end).
        self.steps_by_sources: Counter[str] = Counter()
        # Drafted and accepted tokens of greedy and of sampled requests.
        self.drafted_by_sampling: Counter[str] = Counter()
        self.accepted_by_sampling: Counter[str] = Counter()

    def stats(self, reset: bool = True) -> dict:
        """Counters since the last reset (JSON-friendly; layer keys are strings)."""
        out = {
            "calls": self.calls,
            "draft_seconds": self.seconds,
            "draft_layer_evals": self.layer_evals,
            "head_evals": self.head_evals,
            "full_head_evals": self.full_head_evals,
            "deferred_layer_evals": self.deferred_layer_evals,
            "verify_layers_skipped": self.verify_layers_skipped,
            "attempt_layers_reused": self.attempt_layers_reused,
            "num_layers": self.num_layers,
            "compiled_segments": self.segments.num_compiled if self.model is not None else 0,
            # of those, graphs loaded from artifacts saved by an earlier start,
            # and graphs compiled ahead of time and saved by this one
            "segments_loaded": self.segments.loaded if self.model is not None else 0,
            "segments_saved": self.segments.saved if self.model is not None else 0,
            # torch.compile graphs built after the engine's warm-up (cumulative):
            # 0 means no request waited for a compilation.
            "graphs_compiled_serving": (patches.dynamo_graphs() - self._graphs_at_start
                                        if self._graphs_at_start is not None else None),
            "exits": {str(k): v for k, v in sorted(self.exit_counts.items())},
            "accepted_by_exit": {str(k): v for k, v in sorted(self.accepted_by_exit.items())},
            "rejected_by_exit": {str(k): v for k, v in sorted(self.rejected_by_exit.items())},
            "requests": dict(self.requests),
            "drafted_by_source": dict(self.drafted_by_source),
            "accepted_by_source": dict(self.accepted_by_source),
            "lookup_seconds": self.lookup_seconds,
            "steps_by_sources": dict(self.steps_by_sources),
            "drafted_by_sampling": dict(self.drafted_by_sampling),
            "accepted_by_sampling": dict(self.accepted_by_sampling),
            "keyed_sampling": self.sampling_seeds is not None,
            "lookup_cache": ({"responses": len(self.cache), "tokens": self.cache.num_tokens,
                              "max_tokens": self.cache.max_tokens} if self.cache else None),
            "corpus": ({"tokens": self.corpus.num_tokens, "contexts": len(self.corpus)}
                       if self.corpus else None),
            "step_cost": self.adapt.cost.summary(),
            "backoff": self.governor.summary() if self.governor else None,
            "backoff_self_draft": (self.self_governor.summary() if self.self_governor
                                   else None),
        }
        if reset:
            self._reset_stats()
            for g in (self.governor, self.self_governor):
                if g:
                    g.decisions.clear()
                    g.steps.clear()
        return out

    def reset_lookup_cache(self) -> int:
        """Drop every cached response; returns how many there were."""
        if self.cache is None:
            return 0
        n = len(self.cache)
        self.cache = ResponseCache(self.lookup, self.config.lookup_cache_tokens)
        return n

    def _settle(self, batch, sampled_token_ids: list[list[int]]) -> None:
        """Count last step's drafts as accepted or rejected, by exit layer and
        by source, and feed each request's draft adaptation."""
        pending, self._pending = self._pending, {}
        for row, sampled in enumerate(sampled_token_ids):
            if not sampled:
                continue
            req = batch.req_id(row)
            accepted = len(sampled) - 1
            layers, self_attempt, n_lookup, kind, how = pending.get(
                req, ((), False, 0, "lookup", "greedy"))
            self.drafted_by_sampling[how] += len(layers)
            self.accepted_by_sampling[how] += min(accepted, len(layers))
            for i, layer in enumerate(layers):
                name = source_name(layer)
                self.drafted_by_source[name] += 1
                if i < accepted:
                    self.accepted_by_source[name] += 1
                if layer >= 0:
                    (self.accepted_by_exit if i < accepted else self.rejected_by_exit)[layer] += 1
            if n_lookup:
                self.adapt.lookup_verified(req, n_lookup, min(accepted, n_lookup), kind)
            if self_attempt and accepted >= n_lookup:
                # The self-drafts were judged only if every lookup token before them held.
                self.adapt.self_verified(req, accepted - n_lookup)
            if self.per_request:
                st = self.requests.setdefault(req, [0, 0])
                st[0] += 1
                st[1] += accepted

    def _report(self) -> None:
        print(f"[adadecode] drafting: {self.calls} calls, {self.seconds:.2f} s, "
              f"exits per layer {dict(sorted(self.exit_counts.items()))}, "
              f"layer evals {self.layer_evals}, head evals {self.head_evals}", flush=True)

    # ---- vLLM hooks ----------------------------------------------------------
    def load_model(self, target_model) -> None:
        self.model = target_model
        self.layers = patches.decoder_layers(target_model)
        hidden_size = patches.hidden_size(target_model)
        if self.config.heads:
            heads = ExitHeads.load(self.config.heads)
        else:
            heads = ExitHeads.identity(self.config.exit_layers, hidden_size)
        param = next(target_model.parameters())
        self.dtype = param.dtype
        self.hidden_size = hidden_size
        self.segments = patches.LayerSegments(
            self.layers, compile=patches.compile_layers_enabled(self.vllm_config),
            boundaries=[x + 1 for x in self.config.exit_layers])
        # None = identity head (skip the matmul).
        self.shortlist = None  # (token ids, their LM-head rows, logit scale)
        if self.config.shortlist and heads.shortlist is not None:
            rows = patches.lm_head_rows(target_model, heads.shortlist)
            if rows is not None:
                self.shortlist = (heads.shortlist, rows[0].to(param.dtype), rows[1])
        self.transforms = {
            x: None if heads.is_identity(x) else heads.transforms[x].to(param.dtype)
            for x in self.config.exit_layers
        }

    def warm_up(self) -> None:
        """Compile the layer segments at engine start (called after vLLM's
        own warm-up), so the first requests that draft do not wait for it."""
        if self.model is None or not self.segments.compile:
            return
        t0 = time.perf_counter()
        n = self.segments.warm_up(self.vllm_config, self.hidden_size, self.dtype)
        self._graphs_at_start = patches.dynamo_graphs()
        patches.logger.info(
            "AdaDecode: %d layer segments ready in %.1f s (%d graphs loaded from "
            "saved artifacts, %d compiled and saved)", n, time.perf_counter() - t0,
            self.segments.loaded, self.segments.saved)

    def propose(self, *args, **kwargs):  # vLLM's custom-class signature
        raise RuntimeError(
            "AdaDecodeProposer.propose is reached through the runner hook installed "
            "by vllm_adadecode.patches; the hook is missing"
        )

    # ---- drafting -----------------------------------------------------------
    def propose_for_runner(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        t0 = time.perf_counter()
        try:
            return self._propose(runner, sampled_token_ids)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            if self.profile and self.calls % 100 == 0:
                self._report()

    @torch.inference_mode()
    def _propose(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        batch = patches.RunnerBatch(runner)
        self._settle(batch, sampled_token_ids)
        joined = self._track(batch)
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        go_self = self.config.self_draft
        n_active = sum(1 for s in sampled_token_ids if s)
        cap = self.config.disable_by_batch_size
        # The batch's size for disable_by_batch_size counts every request in
        # it, prompts still prefilling too: a wave of new requests otherwise
        # opens steps below the limit in which the back-off would try drafts
        # next to a prefill (docs/PERFORMANCE.md section 18).
        capped = cap is not None and batch.num_reqs >= cap
        if self.governor is None and capped:
            return out
        if self.governor is not None:
            if not n_active:
                self._step_start = None
                self.governor.idle()
                if self.self_governor is not None:
                    self.self_governor.idle()
                return out
            now, emitted = time.perf_counter(), sum(map(len, sampled_token_ids))
            # A step that ran a prefill (a request joined, or one is still
            # prefilling) is not a measure of drafting: at batch 1 a long
            # prompt's prefill would count as one slow step.
            measured = not joined and n_active == batch.num_reqs
            self._observe_step(now, measured)
            self._step_shape = (n_active, 0)  # until drafts are proposed
            if capped:
                # Too many requests to draft for (disable_by_batch_size): a
                # plain step, outside the back-off's pairs.
                self.governor.idle()
                if self.self_governor is not None:
                    self.self_governor.idle()
                return out
            go = self.governor.decide(now, emitted, n_active, measured)
            if not patches.tp_agree(go):
                if self.self_governor is not None:
                    self.self_governor.idle()
                return out
            if self.self_governor is not None:
                go_self = patches.tp_agree(self.self_governor.decide(now, emitted, n_active,
                                                                     measured))
        requests: list[_Draft] = []
        drafting: list[_Draft] = []
        self.adapt.begin_step(n_active)
        for row, sampled in enumerate(sampled_token_ids):
            # Sampled requests get drafts only with position-keyed sampling
            # (their draw at a position does not depend on speculation then).
            greedy = batch.is_greedy(row)
            if not sampled or not (greedy or self.sampling_seeds is not None):
                continue
            position = batch.num_tokens(row) - 1
            budget = draft_budget(self.config.num_speculative_tokens, position, self.max_model_len)
            if budget <= 0:
                continue
            d = _Draft(row, sampled[-1], position, budget)
            req = batch.req_id(row)
            if not greedy:
                d.sampled = (self.sampling_seeds.get(req, batch.seed(row)),
                             *batch.sampling_params(row))
            if self.lookup is not None:
                self._lookup_draft(batch, d, req)
            if go_self and len(d.drafted) < d.budget and self.adapt.may_self_draft(req):
                d.self_attempt = True
                drafting.append(d)
            requests.append(d)
        if self.governor is not None:
            # Label the step by what it did: drafts proposed, self-drafts attempted.
            self.governor.drafted(any(d.drafted for d in requests) or bool(drafting))
            if self.self_governor is not None:
                self.self_governor.drafted(bool(drafting))
        self._embed_lookup_inputs(drafting)
        while drafting:
            exited = self._draft_step(batch, drafting)
            drafting = [d for d in exited if len(d.drafted) < d.budget]
        self._step_shape = (n_active, sum(len(d.drafted) for d in requests))
        if self._step_log is not None:
            self._log_step(n_active, batch.num_reqs, sampled_token_ids, requests, joined)
        for d in requests:
            out[d.row] = d.drafted
            if d.drafted:
                n_exit = len(d.drafted) - d.n_lookup
                key = "+".join(k for k, n in (("lookup", d.n_lookup), ("exit", n_exit)) if n)
                self.steps_by_sources[key] += 1
            if d.drafted or d.self_attempt:
                self._pending[batch.req_id(d.row)] = (
                    d.exit_layers, d.self_attempt, d.n_lookup, d.lookup_kind,
                    "greedy" if d.sampled is None else "sampled")
            if d.drafted:
                self.deferred_layer_evals += sum(self.num_layers - 1 - x for x in d.depth)
            if (self.config.deferred and (d.drafted or d.tail)
                    and (d.tail is not None or any(x >= 0 for x in d.depth))):
                # States of positions first .. first + len - 1, depth non-increasing:
                # the drafter inputs, including a last attempt that did not exit.
                first = d.position - len(d.drafted)
                depth, hidden, residual = list(d.depth), list(d.hidden), list(d.residual)
                if d.tail is not None:
                    hidden.append(d.tail[0])
                    residual.append(d.tail[1])
                    depth.append(d.tail[2])
                self._states[batch.req_id(d.row)] = (first, depth, hidden, residual,
                                                     len(d.drafted))
        return out

    def _log_step(self, n_active: int, num_reqs: int, sampled_token_ids,
                  requests: list[_Draft], joined: bool) -> None:
        """One JSON line per drafter call that reaches drafting
        (``ADADECODE_STEP_LOG``, for profiling): when, the requests that sampled
        (``batch``) and all requests in the batch, prompts still prefilling
        too (``reqs``), the tokens the step just emitted, whether a request
        joined, and the draft rows proposed for the next step."""
        import json

        self._step_log.write(json.dumps({
            "t": time.perf_counter(), "batch": n_active, "reqs": num_reqs,
            "emitted": sum(len(x) for x in sampled_token_ids), "joined": joined,
            "lookup": sum(d.n_lookup for d in requests),
            "exit": sum(len(d.drafted) - d.n_lookup for d in requests)}) + "\n")
        self._step_log.flush()

    def _observe_step(self, now: float, measured: bool) -> None:
        """The step since the last call, for the step-cost fit (drafts/adapt.py).
        Every ``_COST_SYNC_EVERY`` calls the fit is redone, on rank 0's steps
        for every tensor-parallel rank (lookup lengths follow from it, and all
        ranks must propose the same drafts)."""
        last, self._step_start = self._step_start, now
        shape, self._step_shape = self._step_shape, None
        if measured and last is not None and shape is not None and now - last < 5.0:
            self.adapt.cost.observe(now - last, *shape)
        if self.calls % _COST_SYNC_EVERY == 0:
            fits = self.adapt.cost.refit()
            buckets = range(1, 12)
            flat = [v for bkt in buckets for v in fits.get(bkt, (0.0, 0.0, 0.0))]
            flat = patches.tp_broadcast(flat)
            self.adapt.cost.set_fits({
                bkt: tuple(flat[3 * i:3 * i + 3]) for i, bkt in enumerate(buckets)
                if flat[3 * i + 2] > 0})

    def _track(self, batch: "patches.RunnerBatch") -> bool:
        """Requests that left the runner since the last step: their responses
        go into the lookup cache, their drafting state is dropped. Returns
        whether a request joined (its prefill ran in the step just done)."""
        live = [batch.req_id(r) for r in range(batch.num_reqs)]
        live_set = set(live)
        for req in [r for r in self._live if r not in live_set]:
            if batch.request_state(req) is not None:
                continue  # paused or preempted, not finished
            state = self._live.pop(req)
            self.adapt.forget(req)
            if self.cache is not None and state is not None:
                self.cache.add(batch.output_token_ids(state))
        joined = False
        for req in live:
            if req not in self._live:
                self._live[req] = batch.request_state(req)
                joined = True
        return joined

    def _lookup_draft(self, batch: "patches.RunnerBatch", d: _Draft, req: str) -> None:
        """Lookup tokens first: the continuation of the request's longest
        recurring suffix (else of an earlier response, else the corpus's most
        frequent continuation), as many as the request's observed acceptance
        says pay. They run no layers here; a self-draft that follows carries
        them through its layers."""
        t0 = time.perf_counter()
        toks: list[int] = []
        source, kind, tokens = LOOKUP, "lookup", None
        try:
            # How many lookup tokens would pay for this request in this step,
            # decided before searching: none, and the search is skipped.
            cap = min(self.adapt.lookup_length(req), self.config.lookup_tokens, d.budget)
            if cap > 0:
                tokens = batch.token_ids(d.row)
                # The request's own tokens, then the cache of earlier responses.
                # Both share one acceptance estimate per request: judging long,
                # short and cache matches apart drafted less and measured slower
                # (docs/PERFORMANCE.md section 9).
                found = self.lookup.propose(tokens, cap)
                if not found.shape[0] and self.cache is not None:
                    found, source = self.cache.propose(tokens, cap), CACHE
                toks = found.tolist()
            if not toks and self.corpus is not None:
                # Nothing recurs: the model's own usual continuation. Judged
                # apart: right several times less often than a repeat.
                cap = min(self.adapt.lookup_length(req, "corpus"), self.config.lookup_tokens,
                          d.budget)
                if cap > 0:
                    tokens = batch.token_ids(d.row) if tokens is None else tokens
                    toks, source, kind = self.corpus.propose(tokens, cap), CORPUS, "corpus"
            self.adapt.commit(req, len(toks), kind)
        finally:
            self.lookup_seconds += time.perf_counter() - t0
        if not toks:
            return
        m = len(toks)
        # Drafter inputs at positions p .. p+m-1 (the newest sampled token, then
        # all lookup tokens but the last): not yet run through any layer.
        d.hidden = [d.token] + toks[:-1]  # token ids until _embed_lookup_inputs
        d.residual = [None] * m
        d.depth = [-1] * m
        d.drafted = list(toks)
        d.exit_layers = [source] * m
        d.n_lookup = m
        d.lookup_kind = kind
        d.token = toks[-1]
        d.position += m

    def _embed_lookup_inputs(self, drafting: list[_Draft]) -> None:
        """Embeddings of the lookup-drafted inputs of requests that self-draft
        next (one batched lookup), as the first layer segment expects them."""
        with_lookup = [d for d in drafting if d.n_lookup]
        if not with_lookup:
            return
        ids = [t for d in with_lookup for t in d.hidden]
        emb = patches.embed(self.model, torch.tensor(ids))
        start = 0
        for d in with_lookup:
            d.hidden = [emb[start + i : start + i + 1] for i in range(d.n_lookup)]
            start += d.n_lookup

    def _draft_step(self, batch: "patches.RunnerBatch", drafting: list[_Draft]) -> list[_Draft]:
        """Draft one more token for each request; return those whose token exited."""
        new_h = patches.embed(self.model, torch.tensor([d.token for d in drafting]))
        new_res: torch.Tensor | None = None
        alive = list(range(len(drafting)))
        exited: list[_Draft] = []
        depth = -1
        ctx = ctx_key = None
        for exit_layer in self.config.exit_layers:
            reqs = [drafting[i] for i in alive]
            n_carry = [carried_suffix(d.depth, depth) for d in reqs]
            hs, rs, pos, q_lens = [], [], [], []
            for j, (d, c) in enumerate(zip(reqs, n_carry)):
                if c:
                    hs.extend(d.hidden[-c:])
                    rs.extend(d.residual[-c:])
                hs.append(new_h[j : j + 1])
                if new_res is not None:
                    rs.append(new_res[j : j + 1])
                pos.extend(range(d.position - c, d.position + 1))
                q_lens.append(c + 1)
            hidden = torch.cat(hs)
            residual = torch.cat(rs) if new_res is not None else None
            rows = [d.row for d in reqs]
            key = (tuple(pos), tuple(rows), tuple(q_lens))
            if ctx is None or key != ctx_key:  # same tokens as the last segment: reuse
                ctx, ctx_key = batch.attention(positions=pos, rows=rows, query_lens=q_lens), key
            hidden, residual = ctx.run(self.segments(depth + 1, exit_layer + 1), hidden, residual)
            self.layer_evals += len(pos) * (exit_layer - depth)
            self.head_evals += len(reqs)
            depth = exit_layer
            ends = torch.tensor(q_lens).cumsum(0) - 1  # row of each newest token
            token, prob, full = self._exit_top1(exit_layer, hidden[ends], residual[ends])
            go = exits(prob, self.config.threshold)
            if any(d.sampled for d in reqs):
                token = self._couple(reqs, token, go, full)
            go = go.tolist()
            token = token.tolist()
            still = []
            start = 0
            for j, (d, c) in enumerate(zip(reqs, n_carry)):
                for k in range(c):  # carried tokens now reach this depth
                    idx = len(d.depth) - c + k
                    d.hidden[idx] = hidden[start + k : start + k + 1]
                    d.residual[idx] = residual[start + k : start + k + 1]
                    d.depth[idx] = depth
                end = start + c
                if go[j]:
                    d.hidden.append(hidden[end : end + 1])
                    d.residual.append(residual[end : end + 1])
                    d.depth.append(depth)
                    d.drafted.append(token[j])
                    d.exit_layers.append(exit_layer)
                    d.token = token[j]
                    d.position += 1
                    exited.append(d)
                    self.exit_counts[exit_layer] += 1
                else:
                    still.append(j)
                    if exit_layer == self.config.exit_layers[-1]:
                        d.tail = (hidden[end : end + 1], residual[end : end + 1], depth)
                start = end + 1
            if not still:
                break
            new_h = hidden[ends[still]]
            new_res = residual[ends[still]]
            alive = [alive[j] for j in still]
        return exited

    # ---- deferred-layer verification ------------------------------------------
    @torch.inference_mode()
    def deferred_forward(self, runner, input_ids: torch.Tensor, positions: torch.Tensor):
        """The target forward for a step that verifies drafts, skipping the
        layers the drafter already ran; None when no scheduled token has a
        drafted state (vLLM's own forward runs).

        A request's scheduled tokens are its newest sampled token p, then its
        drafts p+1..p+k (k may be 0). Positions p..p+k-1 were drafter inputs and
        carry a depth (non-increasing with position, because earlier drafts are
        carried as deep as later ones); so does p+k when its own draft attempt
        found no confident exit (it ran to the last exit layer). Every other
        token has depth -1. Layer l runs the tokens with depth < l: per request a contiguous
        suffix of its scheduled tokens, so each segment of layers gets attention
        metadata (and KV writes) for exactly the tokens it processes.
        """
        states, self._states = self._states, {}
        if not states:
            return None
        batch = patches.RunnerBatch(runner)
        qsl = batch.query_start_loc().tolist()
        n = qsl[-1]  # scheduled tokens (the input may be padded beyond them)
        depth = [-1] * n
        seeded: list[tuple[int, list, list]] = []
        reused = 0
        for row in range(batch.num_reqs):
            st = states.get(batch.req_id(row))
            if st is None:
                continue
            first, depths, hs, rs, n_drafts = st
            start, end = qsl[row], qsl[row + 1]
            m = end - start  # scheduled tokens: p and the drafts kept for verification
            if m < 1 or m > len(depths) + 1 or int(positions[start]) != first:
                continue  # scheduled otherwise than drafted: verify every layer
            k = min(m, len(depths))
            depth[start:start + k] = depths[:k]
            seeded.append((start, hs[:k], rs[:k]))
            reused += sum(x + 1 for x in depths[n_drafts:k])
        if not seeded:
            return None
        L = len(self.layers)
        hidden = torch.empty(n, self.hidden_size, dtype=self.dtype)
        residual = torch.empty_like(hidden)
        for start, hs, rs in seeded:
            hidden[start:start + len(hs)] = torch.cat(hs)
            residual[start:start + len(rs)] = torch.cat(rs)
        depth_t = torch.tensor(depth)
        bounds = sorted({0, L} | {x + 1 for x in set(depth) if 0 <= x + 1 < L})
        rows_of = torch.repeat_interleave(torch.arange(batch.num_reqs), torch.tensor(qsl).diff())
        pos_all = positions[:n].to(torch.int64)
        for a, b in zip(bounds, bounds[1:]):
            idx = (depth_t < a).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            req_rows = rows_of[idx]
            rows, counts = torch.unique_consecutive(req_rows, return_counts=True)
            if a == 0:
                h_in, r_in = patches.embed(self.model, input_ids[idx]), None
            else:
                h_in, r_in = hidden[idx], residual[idx]
            ctx = batch.attention(positions=pos_all[idx].tolist(), rows=rows.tolist(),
                                  query_lens=counts.tolist())
            h, r = ctx.run(self.segments(a, b), h_in, r_in)
            hidden[idx], residual[idx] = h, r
        self.verify_layers_skipped += sum(x + 1 for x in depth if x >= 0) - reused
        self.attempt_layers_reused += reused
        out = patches.final_norm(self.model, hidden, residual)
        if int(input_ids.shape[0]) > n:
            out = torch.cat([out, out.new_zeros(int(input_ids.shape[0]) - n, out.shape[1])])
        return out

    def _exit_top1(self, exit_layer: int, hidden: torch.Tensor, residual: torch.Tensor):
        """Top-1 token and probability of the exit head, per row.

        With a shortlist, rows are screened on the shortlist's LM-head rows
        first. For a token t in the shortlist, softmax over the shortlist gives
        p_short(t) >= p_full(t) (fewer terms in the denominator), so a row whose
        shortlist top-1 is below the threshold cannot exit on a shortlisted
        token; it keeps that (upper-bound) probability and does not exit. Rows
        that pass are decided on the full LM head, exactly as without a shortlist.
        """
        transform = self.transforms[exit_layer]
        if transform is None:
            # Identical to the model's own final step: fused add + final norm.
            normed = patches.final_norm(self.model, hidden.clone(), residual.clone())
        else:
            normed = patches.final_norm(self.model, (hidden + residual) @ transform.T, None)
        if self.shortlist is None:
            self.full_head_evals += normed.shape[0]
            logits = patches.compute_logits(self.model, normed)
            return (*top1(logits), (torch.arange(normed.shape[0]), logits))
        ids, rows, scale = self.shortlist
        best, prob = top1((normed @ rows.T) * scale)
        token = ids[best]
        maybe = exits(prob, self.config.threshold).nonzero().squeeze(1)
        logits = None
        if maybe.numel():
            self.full_head_evals += maybe.numel()
            logits = patches.compute_logits(self.model, normed[maybe])
            token[maybe], prob[maybe] = top1(logits)
        return token, prob, (maybe, logits)

    def _couple(self, reqs: list[_Draft], token: torch.Tensor, go: torch.Tensor, full):
        """Sampled requests' exiting drafts: the exit head's distribution,
        processed with the request's temperature, top-k and top-p, drawn with
        the noise the target will use at that position (same seed, same
        position), so the draft equals the target's draw wherever the two
        distributions are close."""
        rows, logits = full
        token = token.clone()
        for i, r in enumerate(rows.tolist()):
            d = reqs[r]
            if d.sampled is None or not bool(go[r]):
                continue
            seed, temperature, top_k, top_p = d.sampled
            key = sampling.keys([seed], [d.position + 1])
            token[r] = patches.keyed_draw(logits[i: i + 1], key, temperature, top_k, top_p)[0]
        return token


def merge_stats(per_worker: list[dict]) -> dict:
    """Combine drafter counters from tensor-parallel workers.

    Every TP rank drafts the same tokens, so counts are taken from the first
    worker; time is the slowest worker's.
    """
    out = dict(per_worker[0])
    out["draft_seconds"] = max(s["draft_seconds"] for s in per_worker)
    return out
