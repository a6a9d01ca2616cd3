"""Verification, all of it: a draft is kept only where the full model agrees.

* **The exact-match rule** (``exact_match``, ``match_draws``; pure). For each
  request, drafted tokens are compared with the full model's token at the same
  position. The longest agreeing prefix is kept; at the first disagreement the
  full model's token is emitted instead and the rest is dropped; when every
  draft agrees, the full model's next (bonus) token follows. The output is
  therefore exactly what decoding without speculation produces.
* **The sampler hook** (``install_exact_match_verifier``): replaces vLLM's
  rejection sampler in AdaDecode workers. A greedy batch that nothing can move
  is verified on one argmax pass over the logits; any other batch depth by
  depth, each depth drawn by vLLM's own sampler as a step without speculation
  would draw it (position-keyed for sampled requests: vllm_adadecode.sampling).
* **The deferred forward** (``DeferredVerification``): the target forward of a
  step that verifies drafts, running each drafted token only through the
  layers the drafter did not already run for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import sampling
from .model import ModelAdapter
from .runner import RunnerBatch
from .segments import LayerSegments
from .tree import take_step
from .tree import verify as verify_trees

PLACEHOLDER_TOKEN_ID = -1  # vLLM's marker for "no token in this slot"


def accepted_lengths(draft: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Leading agreements per row of padded [B, S] drafts/targets, capped by lengths."""
    S = draft.shape[1]
    valid = torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)
    agree = (draft == target) & valid
    return agree.to(torch.int32).cumprod(dim=1).sum(dim=1)


def exact_match(
    draft_token_ids: torch.Tensor,  # [num_draft_tokens], flattened over requests
    num_draft_tokens: Sequence[int],  # per request
    target_token_ids: torch.Tensor,  # [num_draft_tokens]: full model's greedy token
    bonus_token_ids: torch.Tensor,  # [B, 1]: the token after the last draft
    max_spec_len: int,
) -> torch.Tensor:
    """Tokens to emit per request, [B, max_spec_len + 1], padded with -1.

    One pass over Python lists: a step holds a few drafts per request, and
    a dozen small tensor operations cost more than the comparison itself
    (0.11 ms against 0.02 ms per step at batch 1, docs/performance/load.md)."""
    lengths = list(num_draft_tokens)
    width = max_spec_len + 1
    drafts = draft_token_ids.tolist()
    targets = target_token_ids.tolist()
    bonus = bonus_token_ids.reshape(-1).tolist()
    rows = []
    k = 0
    for i, n in enumerate(lengths):
        row = []
        for j in range(k, k + n):
            row.append(targets[j])  # the full model's token, kept or replacing the draft
            if drafts[j] != targets[j]:
                break
        else:
            row.append(bonus[i])  # every draft held (or none): the bonus token follows
        k += n
        rows.append(row + [PLACEHOLDER_TOKEN_ID] * (width - len(row)))
    out = torch.tensor(rows, dtype=torch.int32).reshape(len(lengths), width)
    return out.to(bonus_token_ids.device)


def match_draws(
    draft_token_ids: Sequence[Sequence[int]],  # per request, its drafts
    verifiable: Sequence[int],  # per request, how many leading drafts may be judged
    drawn: torch.Tensor,  # [B, S + 1]: the token drawn at each depth (S = max drafts)
) -> torch.Tensor:
    """Tokens to emit per request, [B, S + 1], padded with -1: the draws up to
    and including the first one that differs from its draft (all judged drafts
    and the draw after them when every judged draft holds)."""
    B, S1 = drawn.shape
    S = max(1, S1 - 1)
    draft = torch.full((B, S), PLACEHOLDER_TOKEN_ID, dtype=torch.int64)
    for i, d in enumerate(draft_token_ids):
        if len(d):
            draft[i, : len(d)] = torch.as_tensor(list(d), dtype=torch.int64)
    lengths = torch.as_tensor(list(verifiable), dtype=torch.int64)
    accepted = accepted_lengths(draft, drawn[:, :S].to(torch.int64), lengths)
    keep = torch.arange(S1).unsqueeze(0) <= accepted.unsqueeze(1)
    return torch.where(keep, drawn.to(torch.int64), PLACEHOLDER_TOKEN_ID).to(torch.int32)


# ---------------------------------------------------------------------------
# The sampler hook
# ---------------------------------------------------------------------------
def install_exact_match_verifier() -> None:
    """vLLM's ``RejectionSampler.forward``, replaced (AdaDecode workers only).

    A step without drafts is sampled by vLLM's own sampler (vLLM 0.32 sends
    every step of a speculative engine through the rejection sampler). When
    every request is greedy and nothing can move a greedy token (no logprobs,
    penalties, bad words, allowed tokens, min-tokens or logit bias), the argmax
    of every logits row is taken in one pass and the drafts verified on it,
    without vLLM's copies of the bonus and target rows (several milliseconds
    per step with 40+ drafted rows here). Any other batch is verified depth by
    depth (``_verify_by_depth``)."""
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.v1.outputs import SamplerOutput

    from .patching import patch

    def make(_original):
        def forward(self, metadata, draft_probs, logits, sampling_metadata):
            step = getattr(self, "_adadecode_step", None)
            trees = take_step()
            if (metadata.max_spec_len == 0
                    and logits.shape[0] == len(metadata.num_draft_tokens)):
                # No drafts in this step: one row per request; sample as an
                # engine without speculation does.
                with _step_keys(step, 0):
                    return self.sampler(logits=logits, sampling_metadata=sampling_metadata,
                                        predict_bonus_token=True)
            if _argmax_is_the_sample(sampling_metadata):
                # Every row greedy and nothing that changes its argmax: the
                # greedy token of every row in one pass, no copies of the logits.
                greedy = logits.argmax(dim=-1)
                out = exact_match(metadata.draft_token_ids, metadata.num_draft_tokens,
                                  greedy[metadata.target_logits_indices],
                                  greedy[metadata.bonus_logits_indices].unsqueeze(-1),
                                  metadata.max_spec_len)
                if trees is not None:
                    _tree_rows(out, trees, metadata,
                               lambda row, a, n: greedy[a:a + n].tolist())
                return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)
            res, drawn = _verify_by_depth(self.sampler, metadata, logits, sampling_metadata,
                                          step, trees)
            if trees is not None:
                # Each node's draw, at its own depth's position.
                _tree_rows(res.sampled_token_ids, trees, metadata,
                           lambda row, a, n: drawn[row, :n].tolist())
            return res
        return forward

    patch(rs.RejectionSampler, "forward", make)


def _tree_rows(out: torch.Tensor, trees, metadata, targets_of) -> None:
    """Overwrite the rows of requests verified as token trees (``engine/tree.py``)."""
    for row, toks in verify_trees(trees, metadata.num_draft_tokens, targets_of).items():
        out[row] = PLACEHOLDER_TOKEN_ID
        out[row, : len(toks)] = torch.tensor(toks, dtype=out.dtype)


def _step_keys(step, depth):
    """The keys of a sampler call whose row i predicts position ``first_i +
    depth`` (``depth``: one for every request, or one per request)."""
    import contextlib

    return contextlib.nullcontext() if step is None else sampling.keyed(step.at_depth(depth))


def _verify_by_depth(sampler, metadata, logits, sm, step, trees=None):
    """Exact-match verification for any batch: each depth j of the drafts is
    sampled by vLLM's own sampler, one row per request in batch order, exactly
    as a step without speculation would sample that position (the outputs so
    far plus the drafts before j feed penalties and bad words; with
    position-keyed sampling the noise is that of the position). A draft is kept
    while it equals the token drawn at its position; the first draw that
    differs is emitted instead, and every draw is what decoding without
    speculation emits there. Requests whose processing keeps state that drafts
    do not advance (min-tokens still active, a thinking budget) keep no drafts
    this step: their token at depth 0 is exact.

    A request verified as a token tree (``trees``: only plain requests, whose
    draw depends on nothing but the row's logits and position) has its node j
    drawn in call j, keyed by that node's depth, with its ancestors as the
    drafts before it. Returns the output and every draw ([requests, calls])."""
    import dataclasses

    import numpy as np
    from vllm.v1.outputs import LogprobsTensors, SamplerOutput
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    k = np.asarray(metadata.num_draft_tokens, dtype=np.int64)
    B, S = len(k), int(metadata.max_spec_len)
    starts = np.concatenate([[0], np.cumsum(k + 1)[:-1]]).astype(np.int64)
    verifiable = k.copy()
    for proc in sm.logitsprocs.non_argmax_invariant:
        if isinstance(proc, MinTokensLogitsProcessor):
            for i in proc.min_toks:
                if i < B:
                    verifiable[i] = 0
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        verifiable[:] = 0
    drafts = metadata.draft_token_ids.cpu().tolist()
    per_req = [drafts[c - n: c] for c, n in zip(np.cumsum(k).tolist(), k.tolist())]
    # Per tree request: each node's depth and the tokens before it (node 0: the root).
    node_depth: dict[int, list[int]] = {}
    before: dict[int, list[list[int]]] = {}
    for e in (trees.entries if trees is not None else ()):
        if e.row < B and k[e.row] == e.tree.size:
            node_depth[e.row] = [0] + e.tree.depths()
            before[e.row] = [[]] + [[e.tree.tokens[a - 1] for a in e.tree.ancestors(i)]
                                    for i in range(1, e.tree.size + 1)]
    need_outputs = bool(sm.output_token_ids)
    tokens, lps = [], []
    for j in range(S + 1):
        rows = torch.from_numpy(starts + np.minimum(j, k)).to(logits.device)
        depth = j
        if node_depth:
            depth = np.full(B, j, dtype=np.int64)
            for i, dd in node_depth.items():
                depth[i] = dd[min(j, len(dd) - 1)]
        sm_j = sm
        if need_outputs:
            sm_j = dataclasses.replace(sm, spec_token_ids=None, output_token_ids=[
                list(out) + (before[i][min(j, len(before[i]) - 1)] if i in before else d[:j])
                for i, (out, d) in enumerate(zip(sm.output_token_ids, per_req))])
        if j and sm.generators:
            # A seeded generator advances only for a position its request
            # really samples (vLLM's own sampler without position keys).
            sm_j = dataclasses.replace(sm_j, generators={
                i: g for i, g in sm.generators.items() if i < B and k[i] >= j})
        with _step_keys(step, depth):
            res = sampler(logits=logits[rows], sampling_metadata=sm_j)
        tokens.append(res.sampled_token_ids.reshape(B).long().cpu())
        lps.append(res.logprobs_tensors)
    drawn = torch.stack(tokens, dim=1)  # [B, S + 1]: the draw at each depth
    out = match_draws(per_req, verifiable.tolist(), drawn)
    logprobs = None
    if lps[0] is not None:
        # Row (request i, depth j) at i * (S + 1) + j, as vLLM's parse_output reads them.
        def stacked(field):
            return torch.stack([getattr(t, field) for t in lps], dim=1).flatten(0, 1)

        logprobs = LogprobsTensors(stacked("logprob_token_ids"), stacked("logprobs"),
                                   stacked("selected_token_ranks"))
    return (SamplerOutput(sampled_token_ids=out.to(logits.device), logprobs_tensors=logprobs),
            drawn)


def _argmax_is_the_sample(sm) -> bool:
    """Whether vLLM's sampler would emit each row's argmax of the raw logits:
    every request greedy, no logprobs, and none of the processing that can
    move a greedy token (allowed tokens, bad words, penalties, min-tokens,
    logit bias, a thinking budget, or any other processor)."""
    if not sm.all_greedy or sm.max_num_logprobs is not None or sm.logprob_token_ids:
        return False
    if sm.allowed_token_ids_mask is not None or sm.bad_words_token_ids or not sm.no_penalties:
        return False
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return False
    from vllm.v1.sample.logits_processor.builtin import (LogitBiasLogitsProcessor,
                                                         MinTokensLogitsProcessor)

    for proc in sm.logitsprocs.non_argmax_invariant:
        if isinstance(proc, MinTokensLogitsProcessor) and not proc.min_toks:
            continue
        if isinstance(proc, LogitBiasLogitsProcessor) and not proc.biases:
            continue
        return False
    return True


# ---------------------------------------------------------------------------
# The deferred forward
# ---------------------------------------------------------------------------
@dataclass
class DraftedStates:
    """One request's drafter inputs, as the next step's verification resumes them."""

    first: int  # position of the first drafter input
    depths: list[int]  # per position: the last layer run (non-increasing)
    hidden: list[torch.Tensor]  # per position, 1 x d
    residual: list[torch.Tensor]
    n_drafts: int  # positions that were drafts' inputs (a last attempt that did not exit follows)
    extra: int = 0  # token-tree nodes scheduled after the main chain (they run every layer)


class DeferredVerification:
    """The target forward for steps that verify drafts (``"deferred": true``).

    The drafter ``hold``s each request's drafted states; the runner hook calls
    ``forward`` in the next step."""

    def __init__(self, model: ModelAdapter, segments: LayerSegments, stats):
        self.model = model
        self.segments = segments
        self.stats = stats
        self.pending: dict[str, DraftedStates] = {}
        # Token-tree early pruning: (layer, k, scorer) with scorer(layer, hidden,
        # residual, k) -> top-k token ids per row; None: no pruning.
        self.pruner = None

    def hold(self, req_id: str, states: DraftedStates) -> None:
        self.pending[req_id] = states

    @torch.inference_mode()
    def forward(self, runner, input_ids: torch.Tensor, positions: torch.Tensor, tree=None):
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

        ``tree`` (an ``engine.tree.TreeStep``): this step's token trees, whose
        off-chain nodes follow the main chain, run every layer, and take their
        rotary positions and attention plans from it.
        """
        states, self.pending = self.pending, {}
        prune = tree is not None and self.pruner is not None
        if not states and not prune:
            return None
        batch = RunnerBatch(runner)
        qsl = batch.query_start_loc().tolist()
        n = qsl[-1]  # scheduled tokens (the input may be padded beyond them)
        depth = [-1] * n
        seeded: list[tuple[int, list, list]] = []
        reused = 0
        for row in range(batch.num_reqs):
            st = states.get(batch.req_id(row))
            if st is None:
                continue
            first, depths, hs, rs, n_drafts = (st.first, st.depths, st.hidden, st.residual,
                                               st.n_drafts)
            start, end = qsl[row], qsl[row + 1]
            m = end - start  # scheduled tokens: p and the drafts kept for verification
            if m < 1 or m > len(depths) + 1 + st.extra or int(positions[start]) != first:
                continue  # scheduled otherwise than drafted: verify every layer
            k = min(m, len(depths))
            depth[start:start + k] = depths[:k]
            seeded.append((start, hs[:k], rs[:k]))
            reused += sum(x + 1 for x in depths[n_drafts:k])
        if not seeded and not prune:
            return None
        L = len(self.model.layers)
        hidden = torch.empty(n, self.model.hidden_size, dtype=self.model.dtype)
        residual = torch.empty_like(hidden)
        for start, hs, rs in seeded:
            hidden[start:start + len(hs)] = torch.cat(hs)
            residual[start:start + len(rs)] = torch.cat(rs)
        depth_t = torch.tensor(depth)
        bounds = sorted({0, L} | {x + 1 for x in set(depth) if 0 <= x + 1 < L}
                        | ({self.pruner[0] + 1} if prune else set()))
        rows_of = torch.repeat_interleave(torch.arange(batch.num_reqs), torch.tensor(qsl).diff())
        pos_all = positions[:n].to(torch.int64)
        rope_all = pos_all if tree is None else tree.rope_positions(pos_all)
        for a, b in zip(bounds, bounds[1:]):
            idx = (depth_t < a).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            req_rows = rows_of[idx]
            rows, counts = torch.unique_consecutive(req_rows, return_counts=True)
            if a == 0:
                h_in, r_in = self.model.embed(input_ids[idx]), None
            else:
                h_in, r_in = hidden[idx], residual[idx]
            ctx = batch.attention(positions=pos_all[idx].tolist(), rows=rows.tolist(),
                                  query_lens=counts.tolist(),
                                  rope_positions=None if tree is None else rope_all[idx])
            if tree is not None:
                tree.register(ctx.attn_metadata, idx)
            h, r = ctx.run(self.segments(a, b), h_in, r_in)
            hidden[idx], residual[idx] = h, r
            if prune and b == self.pruner[0] + 1:
                self._prune(tree, hidden, residual, depth_t, L)
        self.stats.verify_layers_skipped += sum(x + 1 for x in depth if x >= 0) - reused
        self.stats.attempt_layers_reused += reused
        out = self.model.final_norm(hidden, residual)
        if int(input_ids.shape[0]) > n:
            out = torch.cat([out, out.new_zeros(int(input_ids.shape[0]) - n, out.shape[1])])
        return out

    def _prune(self, tree, hidden: torch.Tensor, residual: torch.Tensor,
               depth_t: torch.Tensor, num_layers: int) -> None:
        """ProPD's early pruning: the exit head scores every branch node's
        parent at the pruning layer; branch nodes outside their parent's top-k,
        and everything below them, run no further layer (their rows are never
        read: the tree walk leaves them out)."""
        layer, k, scorer = self.pruner
        rows, owners = [], []
        for e in tree.entries:
            for parent in e.parent_rows():
                rows.append(e.start + parent)
                owners.append((e, parent))
        if not rows:
            return
        idx = torch.tensor(rows)
        top = scorer(layer, hidden[idx], residual[idx], k).tolist()
        per_entry: dict[int, dict[int, set[int]]] = {}
        for (e, parent), toks in zip(owners, top):
            per_entry.setdefault(id(e), {})[parent] = set(toks)
        dropped = [r for e in tree.entries for r in e.prune(per_entry.get(id(e), {}))]
        if dropped:
            depth_t[torch.tensor(dropped)] = num_layers  # past every later segment
