"""AdaDecodeProposer: the drafter vLLM's model runner calls, one step at a time.

A step (``_propose``) reads top to bottom:

1. settle: the tokens the last step emitted say how many of its drafts held;
2. gate: the back-off decides whether this step drafts, and self-drafts
   (drafts/backoff.py);
3. sources: each request's lookup draft, from its own tokens, else the cache of
   earlier responses, else the corpus (drafts/lookup.py, cache.py, corpus.py);
4. early exit: self-drafts from where those end, through the target's own first
   layers and the exit heads (drafts/early_exit.py);
5. record: what each request drafted, for the next step's settle, and the
   drafted layer states, for the deferred forward (engine/verify.py).

vLLM builds it as its custom-class proposer; the runner hooks (engine/) call
it through the ``RunnerDrafter`` interface.
"""

from __future__ import annotations

import atexit
import os
import time

import torch

from . import sampling
from .config import AdaDecodeConfig
from .drafts.adapt import DraftAdaptation
from .drafts.backoff import BackOff
from .drafts.base import CACHE, CORPUS, LOOKUP, PendingDraft, RequestDraft, Sampled
from .drafts.cache import ResponseCache
from .drafts.corpus import DraftCorpus, load_corpus_tokens
from .drafts.early_exit import EarlyExitDrafter
from .drafts.lookup import SequenceLookup
from .drafts.tree import build_tree
from .engine import gemm, install, sampler
from .engine.drafter import RunnerDrafter
from .engine.model import ModelAdapter
from .engine.runner import RunnerBatch, compile_layers_enabled, dynamo_graphs
from .engine.segments import LayerSegments
from .engine.tree import TreeVerification
from .engine.verify import DeferredVerification, DraftedStates
from .heads import ExitHeads
from .policy import draft_budget
from .stats import DrafterStats


# A request that drafted nothing last step (its tokens still count as greedy steps).
_NOTHING_PENDING = PendingDraft((), False, 0, "lookup", "greedy")


class AdaDecodeProposer(RunnerDrafter):
    """vLLM drafter (loaded through vLLM's custom-class proposer hook)."""

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.config = config = AdaDecodeConfig.from_dict(
            vllm_config.additional_config["adadecode"])
        self.max_model_len = vllm_config.model_config.max_model_len
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self.counters = DrafterStats()
        self.per_request = os.environ.get("ADADECODE_STATS") == "1"
        # Per-request lengths and early stop; with "adaptive": false every
        # request drafts all it can on every step.
        self.adapt = DraftAdaptation(config.chain_tokens, fixed=not config.adaptive)
        self.backoff = BackOff(adaptive=config.adaptive, lookup=config.lookup,
                               self_draft=config.self_draft,
                               disable_by_batch_size=config.disable_by_batch_size,
                               cost=self.adapt.cost, self_rates=self.adapt.self_rates)
        # Draft sources, tried in order until one proposes.
        self.lookup = self.cache = self.corpus = None
        if config.lookup:
            self.lookup = SequenceLookup(config.lookup_min_match, config.lookup_max_match,
                                         self.max_model_len)
            self.lookup.warm_up()
            if config.lookup_cache:
                self.cache = ResponseCache(self.lookup, config.lookup_cache_tokens)
            if config.lookup_corpus and config.corpus:
                tokens = load_corpus_tokens(config.corpus)  # checked at engine start
                if tokens is not None:
                    self.corpus = DraftCorpus(tokens, min_prob=config.corpus_min_prob)
        # Token trees: branches from other occurrences of the request's suffix,
        # the exit heads' likely tokens and the corpus's runners-up.
        self.trees = TreeVerification() if config.tree else None
        self.early_exit: EarlyExitDrafter | None = None  # built in load_model
        self.verification: DeferredVerification | None = None
        self.segments: LayerSegments | None = None
        # engine/gemm.py, set in load_model: row counts padded, and the measured
        # ms of one decoder layer's matmuls at 1, 2, ... rows
        self.gemm_padding: dict[int, int] | None = None
        self.gemm_row_ms: list[float] | None = None
        self._graphs_at_start: int | None = None
        # Drafts proposed in the previous step, per request; the next step's
        # sampled tokens tell how many of them were accepted.
        self._pending: dict[str, PendingDraft] = {}
        # Requests seen in the batch, with the runner's record of each: when one
        # is gone, its response enters the cache and its drafting state is dropped.
        self._live: dict[str, object] = {}
        install.install_runner_hooks()
        # Position-keyed sampling: seeds of the requests (their own, or drawn
        # at arrival); None when sampled requests are left to vLLM's sampler.
        if config.sampled_drafts and sampler.keyed_sampling_supported():
            self.sampling_seeds = sampling.Seeds(vllm_config.model_config.seed)
            sampler.install_keyed_sampling()
        log = os.environ.get("ADADECODE_STEP_LOG")
        self._step_log = open(log, "a") if log else None
        self.profile = os.environ.get("ADADECODE_PROFILE") == "1"
        if self.profile:
            atexit.register(lambda: print(self.counters.report(), flush=True))

    # ---- engine start ----------------------------------------------------------
    def load_model(self, target_model) -> None:
        model = ModelAdapter(target_model)
        config = self.config
        if config.gemm_padding:
            self.gemm_padding, self.gemm_row_ms = gemm.install(target_model,
                                                               rows=config.gemm_pad_rows)
        if self.trees is not None:
            from .engine.tree import check_model

            check_model(target_model)
        heads = (ExitHeads.load(config.heads) if config.heads
                 else ExitHeads.identity(config.exit_layers, model.hidden_size))
        self.segments = LayerSegments(
            model.layers, compile=compile_layers_enabled(self.vllm_config),
            boundaries=[x + 1 for x in config.exit_layers])
        self.early_exit = EarlyExitDrafter(
            model, self.segments, heads, exit_layers=config.exit_layers,
            threshold=config.threshold, use_shortlist=config.shortlist, stats=self.counters,
            full_head_check=config.full_head_check)
        if self.trees is not None:
            self.early_exit.tree_alternatives = config.tree_branches
        if config.deferred:
            self.verification = DeferredVerification(model, self.segments, self.counters)
            self.deferred_forward = self.verification.forward
            if self.trees is not None and config.tree_prune_top_k:
                self.verification.pruner = (config.exit_layers[0], config.tree_prune_top_k,
                                            self.early_exit.head_top_k)

    def warm_up(self) -> None:
        """Compile the layer segments at engine start (called after vLLM's
        own warm-up), so the first requests that draft do not wait for it."""
        if self.segments is None or not self.segments.compile:
            return
        t0 = time.perf_counter()
        model = self.early_exit.model
        n = self.segments.warm_up(self.vllm_config, model.hidden_size, model.dtype)
        self._graphs_at_start = dynamo_graphs()
        install.logger.info(
            "AdaDecode: %d layer segments ready in %.1f s (%d graphs loaded from "
            "saved artifacts, %d compiled and saved)", n, time.perf_counter() - t0,
            self.segments.loaded, self.segments.saved)

    # ---- the step --------------------------------------------------------------
    def propose_for_runner(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        t0 = time.perf_counter()
        try:
            return self._propose(runner, sampled_token_ids)
        finally:
            self.counters.seconds += time.perf_counter() - t0
            self.counters.calls += 1
            if self.profile and self.counters.calls % 100 == 0:
                print(self.counters.report(), flush=True)

    @torch.inference_mode()
    def _propose(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        batch = RunnerBatch(runner)
        self._settle(batch, sampled_token_ids)
        joined = self._track(batch)
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        gate = self.backoff.gate(batch.num_reqs, sampled_token_ids, joined)
        if not gate.draft:
            return out
        n_active = sum(1 for s in sampled_token_ids if s)
        self.adapt.begin_step(n_active)
        requests = self._requests(batch, sampled_token_ids)
        drafting = []
        for d in requests:
            self._source_draft(batch, d)
            if gate.self_draft and d.room and self.adapt.may_self_draft(d.req_id):
                d.self_attempt = True
                drafting.append(d)
        self_seconds = 0.0
        if drafting:
            t0 = time.perf_counter()
            self.early_exit.draft(batch, drafting)
            self_seconds = time.perf_counter() - t0
        if self.trees is not None:
            for d in requests:
                self._grow_tree(batch, d)
        # A batch-1 step counts for the self-draft pause rule if its drafts, if
        # any, are all self-drafts.
        step_class = (self.adapt.step_class()
                      if not any(d.n_lookup or d.tree for d in requests) else None)
        self.backoff.drafted(n_active, sum(d.tree.size if d.tree else len(d.drafted)
                                           for d in requests), bool(drafting),
                             sum(d.tree.off_chain for d in requests if d.tree), self_seconds,
                             step_class)
        if self._step_log is not None:
            self._log_step(n_active, batch.num_reqs, sampled_token_ids, requests, joined)
        for d in requests:
            out[d.row] = list(d.tree.tokens) if d.tree is not None else d.drafted
            self._record(d)
        return out

    def _grow_tree(self, batch: RunnerBatch, d: RequestDraft) -> None:
        """Branches beside a plain request's draft (greedy, or sampled by
        position), in the nodes its budget leaves: the continuation of the
        newest other occurrence of its newest tokens (which often goes on past
        the draft's end), the exit heads' other likely tokens at its
        self-drafted positions (and its likeliest ones where the last attempt
        was not confident), the corpus's runners-up where they disagree with
        the draft, then older occurrences."""
        if not (d.drafted or d.exit_alternatives) or not batch.plain(d.row):
            return
        room = draft_budget(self.vllm_config.speculative_config.num_speculative_tokens,
                            d.position - len(d.drafted), self.max_model_len) - len(d.drafted)
        drafted = len(d.drafted)
        branch_nodes, probe = self.adapt.tree_nodes(
            d.req_id, min(self.config.tree_nodes, room), drafted, d.lookup_kind)
        if branch_nodes <= 0:
            return
        nodes = len(d.drafted) + branch_nodes
        t0 = time.perf_counter()
        tokens = batch.token_ids(d.row)
        found = (self.lookup.continuations(tokens, nodes, 2 * self.config.tree_branches)
                 if self.lookup is not None else [])
        exits = [d.drafted[:j] + [t] for j, alts in sorted(d.exit_alternatives.items())
                 for t in alts]
        corpus = self._corpus_branches(tokens, d.drafted, nodes)
        labelled = [(source, alt) for source, alts in (
            ("lookup", found[:1]), ("exit", exits), ("corpus", corpus), ("lookup", found[1:]))
            for alt in alts]
        tree = build_tree(d.drafted, [alt for _, alt in labelled], max_nodes=nodes,
                          max_branches=self.config.tree_branches,
                          labels=[source for source, _ in labelled])
        if tree is not None:
            # Verify only the part that pays: off-chain rows cost more than
            # the main chain's (StepCost).
            chain, off = self.adapt.tree_shape(d.req_id, tree.main_len - drafted,
                                               tree.off_chain, probe, drafted, d.lookup_kind)
            if (chain, off) != (tree.main_len - drafted, tree.off_chain):
                self.counters.tree_cut += 1
            if chain or off:
                d.tree = tree.trim(drafted + chain, off)
                self.adapt.tree_commit(d.req_id, d.tree.main_len - drafted,
                                       d.tree.off_chain, drafted, d.lookup_kind)
        self.counters.lookup_seconds += time.perf_counter() - t0

    def _corpus_branches(self, tokens, drafted: list[int], nodes: int) -> list[list[int]]:
        """At each drafted position, the corpus's runners-up to the drafted
        token, each followed by the corpus's own continuation (root first), in
        an equal share of the tree's nodes: wide trees, not one long branch."""
        if self.corpus is None:
            return []
        out: list[list[int]] = []
        limit = self.config.tree_branches
        each = max(1, self.config.tree_nodes // limit)  # nodes per runner-up branch
        ctx = [int(t) for t in tokens[-self.corpus.max_n:]]
        for j, tok in enumerate(drafted):
            if j + 1 >= nodes:
                break
            for r in self.corpus.runners_up(ctx, tok, limit - len(out)):
                out.append(drafted[:j] + [r] + self.corpus.propose(ctx + [r], each - 1))
            if len(out) >= limit:
                break
            ctx = (ctx + [tok])[-self.corpus.max_n:]
        return out

    def _requests(self, batch: RunnerBatch, sampled_token_ids) -> list[RequestDraft]:
        """A draft for each request that may draft this step: it sampled a
        token, has room before max_model_len, and is greedy or (with
        position-keyed sampling) sampled, so its draw at a position does not
        depend on speculation."""
        requests = []
        for row, sampled in enumerate(sampled_token_ids):
            greedy = batch.is_greedy(row)
            if not sampled or not (greedy or self.sampling_seeds is not None):
                continue
            position = batch.num_tokens(row) - 1
            budget = draft_budget(self.config.num_speculative_tokens, position,
                                  self.max_model_len)
            if budget <= 0:
                continue
            d = RequestDraft(row, batch.req_id(row), sampled[-1], position, budget)
            if not greedy:
                d.sampled = Sampled(self.sampling_seeds.get(d.req_id, batch.seed(row)),
                                    *batch.sampling_params(row))
            requests.append(d)
        return requests

    def _source_draft(self, batch: RunnerBatch, d: RequestDraft) -> None:
        """Source tokens first: the continuation of the request's longest
        recurring suffix, else of an earlier response, else the corpus's most
        frequent continuation, as many as the request's observed acceptance
        says pay. They run no layers here; a self-draft that follows carries
        them through its layers."""
        if self.lookup is None:
            return
        t0 = time.perf_counter()
        toks: list[int] = []
        origin, kind, tokens = LOOKUP, "lookup", None
        req = d.req_id
        try:
            # How many tokens would pay for this request in this step, decided
            # before searching: none, and the search is skipped.
            budget = draft_budget(self.config.chain_tokens, d.position, self.max_model_len)
            cap = min(self.adapt.lookup_length(req), budget)
            if cap > 0:
                tokens = batch.token_ids(d.row)
                # The request's own tokens, then the cache of earlier responses.
                # Both share one acceptance estimate per request: judging long,
                # short and cache matches apart drafted less and measured slower
                # (docs/performance/lookup-and-corpus.md).
                found = self.lookup.propose(tokens, cap)
                if not found.shape[0] and self.cache is not None:
                    found, origin = self.cache.propose(tokens, cap), CACHE
                toks = found.tolist()
            if not toks and self.corpus is not None:
                # Nothing recurs: the model's own usual continuation. Judged
                # apart: right several times less often than a repeat.
                cap = min(self.adapt.lookup_length(req, "corpus"), budget)
                if cap > 0:
                    tokens = batch.token_ids(d.row) if tokens is None else tokens
                    toks, origin, kind = self.corpus.propose(tokens, cap), CORPUS, "corpus"
            self.adapt.commit(req, len(toks), kind)
        finally:
            self.counters.lookup_seconds += time.perf_counter() - t0
        if not toks:
            return
        m = len(toks)
        # Drafter inputs at positions p .. p+m-1 (the newest sampled token, then
        # all source tokens but the last): not yet run through any layer.
        d.lookup_inputs = [d.token] + toks[:-1]
        d.hidden = [None] * m
        d.residual = [None] * m
        d.depth = [-1] * m
        d.drafted = list(toks)
        d.origins = [origin] * m
        d.n_lookup = m
        d.lookup_kind = kind
        d.token = toks[-1]
        d.position += m

    def _record(self, d: RequestDraft) -> None:
        """What a request drafted: for the next step's settle, the counters, and
        (deferred verification) the layer states its verification resumes."""
        c = self.counters
        if d.drafted:
            n_exit = len(d.drafted) - d.n_lookup
            c.steps_by_sources["+".join(k for k, n in (("lookup", d.n_lookup),
                                                        ("exit", n_exit)) if n)] += 1
            c.deferred_layer_evals += sum(self.num_layers - 1 - x for x in d.depth)
        if d.tree is not None:
            self.trees.hold(d.req_id, d.position - len(d.drafted), d.tree)
        if d.drafted or d.self_attempt:
            self._pending[d.req_id] = PendingDraft(
                d.origins, d.self_attempt, d.n_lookup, d.lookup_kind,
                "greedy" if d.sampled is None else "sampled")
        if (self.verification is not None and (d.drafted or d.tail)
                and (d.tail is not None or any(x >= 0 for x in d.depth))):
            # States of positions first .. first + len - 1, depth non-increasing:
            # the drafter inputs, including a last attempt that did not exit.
            depth, hidden, residual = list(d.depth), list(d.hidden), list(d.residual)
            if d.tail is not None:
                hidden.append(d.tail.hidden)
                residual.append(d.tail.residual)
                depth.append(d.tail.depth)
            self.verification.hold(d.req_id, DraftedStates(
                d.position - len(d.drafted), depth, hidden, residual, len(d.drafted),
                extra=d.tree.size - len(d.drafted) if d.tree is not None else 0))

    # ---- bookkeeping -----------------------------------------------------------
    def _settle(self, batch: RunnerBatch, sampled_token_ids: list[list[int]]) -> None:
        """Count last step's drafts as accepted or rejected, by exit layer and
        by source, and feed each request's draft adaptation."""
        pending, self._pending = self._pending, {}
        for row, sampled in enumerate(sampled_token_ids):
            if not sampled:
                continue
            req = batch.req_id(row)
            accepted = len(sampled) - 1
            p = pending.get(req, _NOTHING_PENDING)
            lengthened = None
            tree = self.trees.settled.pop(req, None) if self.trees is not None else None
            if tree is not None:
                # Verified as a tree: the drafted tokens held for their agreeing
                # prefix only; the rest of the accepted path is the tree's gain.
                path, on_chain, nodes, main_len, pruned, lost, diverged, gained_by = tree
                drafted = len(p.origins)
                on_draft = min(on_chain, drafted)
                self.counters.tree_verified(path, on_draft, nodes, drafted, pruned, lost,
                                            diverged, gained_by, main_len=main_len)
                self.adapt.tree_verified(nodes - main_len, path - on_draft if diverged else 0)
                if not diverged and on_draft == drafted and main_len > drafted:
                    # The nodes that lengthened the main chain continue another
                    # occurrence: judged as lookup tokens past the draft.
                    lengthened = (main_len - drafted, path - on_draft)
                self.counters.tree_sampled += p.sampling == "sampled"
                accepted = on_draft
            self.counters.verified(p, accepted)
            if p.n_lookup:
                self.adapt.lookup_verified(req, p.n_lookup, min(accepted, p.n_lookup),
                                           p.lookup_kind)
            if lengthened:
                self.adapt.lookup_verified(req, *lengthened)
            if p.self_attempt and accepted >= p.n_lookup:
                # The self-drafts were judged only if every source token before them held.
                self.adapt.self_verified(req, accepted - p.n_lookup,
                                         len(p.origins) - p.n_lookup)
            if self.per_request:
                self.counters.per_request(req, len(sampled) - 1)

    def _track(self, batch: RunnerBatch) -> bool:
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

    def _log_step(self, n_active: int, num_reqs: int, sampled_token_ids,
                  requests: list[RequestDraft], joined: bool) -> None:
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

    # ---- RPCs ------------------------------------------------------------------
    def stats(self, reset: bool = True) -> dict:
        """Counters since the last reset, with the drafter's state (JSON-friendly)."""
        seg = self.segments
        out = {
            **self.counters.as_dict(),
            "num_layers": self.num_layers,
            # matmul row counts padded ({rows: padded rows}); None: padding off
            # or the model's matmuls are not oneDNN's
            "gemm_padding": ({str(k): v for k, v in self.gemm_padding.items()}
                             if self.gemm_padding is not None else None),
            "gemm_row_ms": self.gemm_row_ms,
            "compiled_segments": seg.num_compiled if seg is not None else 0,
            # of those, graphs loaded from artifacts saved by an earlier start,
            # and graphs compiled ahead of time and saved by this one
            "segments_loaded": seg.loaded if seg is not None else 0,
            "segments_saved": seg.saved if seg is not None else 0,
            # torch.compile graphs built after the engine's warm-up (cumulative):
            # 0 means no request waited for a compilation.
            "graphs_compiled_serving": (dynamo_graphs() - self._graphs_at_start
                                        if self._graphs_at_start is not None else None),
            "keyed_sampling": self.sampling_seeds is not None,
            "lookup_cache": ({"responses": len(self.cache), "tokens": self.cache.num_tokens,
                              "max_tokens": self.cache.max_tokens} if self.cache else None),
            "corpus": ({"tokens": self.corpus.num_tokens, "contexts": len(self.corpus)}
                       if self.corpus else None),
            "step_cost": self.adapt.cost.summary(),
            # self-draft pauses (drafts/adapt.py): request-steps a pause
            # skipped, pauses lifted because attempts pay, and the batch-1
            # rates that decide
            "self_pauses": {**self.adapt.self_pauses,
                            "rates": self.adapt.self_rates.summary()},
            **self.backoff.summary(),
        }
        if reset:
            self.counters.reset()
            self.adapt.self_pauses.clear()
            self.backoff.clear()
        return out

    def reset_lookup_cache(self) -> int:
        """Drop every cached response; returns how many there were."""
        if self.cache is None:
            return 0
        n = len(self.cache)
        self.cache = ResponseCache(self.lookup, self.config.lookup_cache_tokens)
        return n
