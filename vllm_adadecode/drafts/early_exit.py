"""Early-exit self-drafts: the target's own first layers and its exit heads.

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

import torch

from .. import sampling
from ..engine.model import ModelAdapter
from ..engine.runner import RunnerBatch
from ..engine.sampler import keyed_draw
from ..engine.segments import LayerSegments
from ..heads import ExitHeads
from ..policy import carried_suffix, exits, top1
from .base import LayerState, RequestDraft, exit_at


class EarlyExitDrafter:
    """Drafts with the target's first layers and the exit heads at ``exit_layers``."""

    def __init__(self, model: ModelAdapter, segments: LayerSegments, heads: ExitHeads, *,
                 exit_layers, threshold: float, use_shortlist: bool, stats,
                 full_head_check: bool = True):
        self.model = model
        self.segments = segments
        self.exit_layers = tuple(exit_layers)
        self.threshold = threshold
        self.stats = stats
        dtype = model.dtype
        # None = identity head (skip the matmul).
        self.transforms = {
            x: None if heads.is_identity(x) else heads.transforms[x].to(dtype)
            for x in self.exit_layers
        }
        self.full_head_check = full_head_check
        # Token trees: the head's likeliest tokens kept beside each attempt (0: none).
        self.tree_alternatives = 0
        self.shortlist = None  # (token ids, their LM-head rows, logit scale)
        if use_shortlist and heads.shortlist is not None:
            rows = model.lm_head_rows(heads.shortlist)
            if rows is not None:
                self.shortlist = (heads.shortlist, rows[0].to(dtype), rows[1])

    def draft(self, batch: RunnerBatch, drafting: list[RequestDraft]) -> None:
        """Draft tokens for each request until none exits or its budget is spent."""
        self._embed_lookup_inputs(drafting)
        while drafting:
            exited = self._draft_step(batch, drafting)
            drafting = [d for d in exited if d.room]

    def _embed_lookup_inputs(self, drafting: list[RequestDraft]) -> None:
        """Embeddings of the inputs a source's tokens added, for requests that
        self-draft next (one batched lookup), as the first layer segment expects them."""
        with_lookup = [d for d in drafting if d.n_lookup]
        if not with_lookup:
            return
        ids = [t for d in with_lookup for t in d.lookup_inputs]
        emb = self.model.embed(torch.tensor(ids))
        start = 0
        for d in with_lookup:
            d.hidden = [emb[start + i: start + i + 1] for i in range(d.n_lookup)]
            start += d.n_lookup

    def _draft_step(self, batch: RunnerBatch, drafting: list[RequestDraft]) -> list[RequestDraft]:
        """Draft one more token for each request; return those whose token exited."""
        new_h = self.model.embed(torch.tensor([d.token for d in drafting]))
        new_res: torch.Tensor | None = None
        alive = list(range(len(drafting)))
        exited: list[RequestDraft] = []
        depth = -1
        ctx = ctx_key = None
        for exit_layer in self.exit_layers:
            reqs = [drafting[i] for i in alive]
            n_carry = [carried_suffix(d.depth, depth) for d in reqs]
            hs, rs, pos, q_lens = [], [], [], []
            for j, (d, c) in enumerate(zip(reqs, n_carry)):
                if c:
                    hs.extend(d.hidden[-c:])
                    rs.extend(d.residual[-c:])
                hs.append(new_h[j: j + 1])
                if new_res is not None:
                    rs.append(new_res[j: j + 1])
                pos.extend(range(d.position - c, d.position + 1))
                q_lens.append(c + 1)
            hidden = torch.cat(hs)
            residual = torch.cat(rs) if new_res is not None else None
            rows = [d.row for d in reqs]
            key = (tuple(pos), tuple(rows), tuple(q_lens))
            if ctx is None or key != ctx_key:  # same tokens as the last segment: reuse
                ctx, ctx_key = batch.attention(positions=pos, rows=rows, query_lens=q_lens), key
            hidden, residual = ctx.run(self.segments(depth + 1, exit_layer + 1), hidden, residual)
            self.stats.layer_evals += len(pos) * (exit_layer - depth)
            self.stats.head_evals += len(reqs)
            depth = exit_layer
            ends = torch.tensor(q_lens).cumsum(0) - 1  # row of each newest token
            sampled = [d.sampled is not None for d in reqs]
            token, prob, full = self._exit_top1(exit_layer, hidden[ends], residual[ends],
                                                sampled)
            go = exits(prob, self.threshold)
            if any(sampled):
                token = self._couple(reqs, token, go, full)
            alternatives = self._alternatives(full, token) if self.tree_alternatives else {}
            go = go.tolist()
            token = token.tolist()
            still = []
            start = 0
            for j, (d, c) in enumerate(zip(reqs, n_carry)):
                for k in range(c):  # carried tokens now reach this depth
                    idx = len(d.depth) - c + k
                    d.hidden[idx] = hidden[start + k: start + k + 1]
                    d.residual[idx] = residual[start + k: start + k + 1]
                    d.depth[idx] = depth
                end = start + c
                if go[j]:
                    d.hidden.append(hidden[end: end + 1])
                    d.residual.append(residual[end: end + 1])
                    d.depth.append(depth)
                    d.drafted.append(token[j])
                    d.origins.append(exit_at(exit_layer))
                    if j in alternatives:
                        d.exit_alternatives[len(d.drafted) - 1] = alternatives[j]
                    d.token = token[j]
                    d.position += 1
                    exited.append(d)
                    self.stats.exit_counts[exit_layer] += 1
                else:
                    still.append(j)
                    if exit_layer == self.exit_layers[-1]:
                        d.tail = LayerState(hidden[end: end + 1], residual[end: end + 1], depth)
                        if j in alternatives:  # not confident: its likeliest tokens
                            d.exit_alternatives[len(d.drafted)] = (
                                [token[j]] + alternatives[j])[: self.tree_alternatives]
                start = end + 1
            if not still:
                break
            new_h = hidden[ends[still]]
            new_res = residual[ends[still]]
            alive = [alive[j] for j in still]
        return exited

    def _alternatives(self, full, token: torch.Tensor) -> dict[int, list[int]]:
        """Per row: its most likely tokens after the top-1 (``tree_alternatives``
        of them), a token tree's branches; from the full LM head where it ran,
        else (with a shortlist) from the shortlist's rows."""
        rows, logits, short_top = full
        top: dict[int, list[int]] = {}
        if short_top is not None:
            top = dict(enumerate(short_top.tolist()))
        if logits is not None and len(rows):
            full_top = logits.topk(self.tree_alternatives + 1, dim=-1).indices.tolist()
            top.update(zip(rows.tolist(), full_top))
        return {int(r): [t for t in ts if t != int(token[r])][: self.tree_alternatives]
                for r, ts in top.items()}

    def _exit_top1(self, exit_layer: int, hidden: torch.Tensor, residual: torch.Tensor,
                   sampled: list[bool]):
        """Top-1 token and probability of the exit head, per row.

        With a shortlist, rows are screened on the shortlist's LM-head rows
        first. For a token t in the shortlist, softmax over the shortlist gives
        p_short(t) >= p_full(t) (fewer terms in the denominator), so a row whose
        shortlist top-1 is below the threshold cannot exit on a shortlisted
        token; it keeps that (upper-bound) probability and does not exit. Rows
        that pass are decided on the full LM head, exactly as without a shortlist,
        unless ``full_head_check`` is off: then a greedy row that passes exits on
        its shortlist top-1 with no full LM head (verification still decides
        what is kept); sampled rows always take the full head, whose
        distribution their draw needs.
        """
        transform = self.transforms[exit_layer]
        if transform is None:
            # Identical to the model's own final step: fused add + final norm.
            normed = self.model.final_norm(hidden.clone(), residual.clone())
        else:
            normed = self.model.final_norm((hidden + residual) @ transform.T, None)
        if self.shortlist is None:
            self.stats.full_head_evals += normed.shape[0]
            logits = self.model.compute_logits(normed)
            return (*top1(logits), (torch.arange(normed.shape[0]), logits, None))
        ids, rows, scale = self.shortlist
        short = (normed @ rows.T) * scale
        best, prob = top1(short)
        token = ids[best]
        # A tree's branches where the full LM head does not run: the
        # shortlist's likeliest tokens.
        short_top = (ids[short.topk(self.tree_alternatives + 1, dim=-1).indices]
                     if self.tree_alternatives else None)
        passed = exits(prob, self.threshold)
        if not self.full_head_check:
            passed = passed & torch.tensor(sampled, dtype=torch.bool)
        maybe = passed.nonzero().squeeze(1)
        logits = None
        if maybe.numel():
            self.stats.full_head_evals += maybe.numel()
            logits = self.model.compute_logits(normed[maybe])
            token[maybe], prob[maybe] = top1(logits)
        return token, prob, (maybe, logits, short_top)

    def head_top_k(self, exit_layer: int, hidden: torch.Tensor, residual: torch.Tensor,
                   k: int) -> torch.Tensor:
        """The exit head's ``k`` most likely next tokens per row (full LM head):
        token-tree pruning's score."""
        transform = self.transforms[exit_layer]
        if transform is None:
            normed = self.model.final_norm(hidden.clone(), residual.clone())
        else:
            normed = self.model.final_norm((hidden + residual) @ transform.T, None)
        self.stats.full_head_evals += normed.shape[0]
        return self.model.compute_logits(normed).topk(k, dim=-1).indices

    def _couple(self, reqs: list[RequestDraft], token: torch.Tensor, go: torch.Tensor, full):
        """Sampled requests' exiting drafts: the exit head's distribution,
        processed with the request's temperature, top-k and top-p, drawn with
        the noise the target will use at that position (same seed, same
        position), so the draft equals the target's draw wherever the two
        distributions are close."""
        rows, logits, _ = full
        token = token.clone()
        for i, r in enumerate(rows.tolist()):
            d = reqs[r]
            if d.sampled is None or not bool(go[r]):
                continue
            s = d.sampled
            key = sampling.keys([s.seed], [d.position + 1])
            token[r] = keyed_draw(logits[i: i + 1], key, s.temperature, s.top_k, s.top_p)[0]
        return token
