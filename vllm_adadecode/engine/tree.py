"""Token-tree verification on vLLM's CPU attention (the vLLM-facing half of
``drafts/tree.py``).

A tree's nodes are the request's ordinary draft rows, depth first with the
main chain first (``DraftTree``). vLLM gives row ``i`` the flat position and KV
slot ``p + i``; this module makes the forward treat them as a tree:

* **Positions.** An off-chain node at depth ``d`` gets the rotary position
  ``p + d`` (its slot stays ``p + i``).
* **Attention.** vLLM's CPU attention op takes no mask, only causal or not per
  sequence, so main-chain rows (whose ancestors are exactly the rows before
  them) keep the kernel's result, and each off-chain row's output is replaced
  by attention over the request's prefix (positions ``0 .. p``) and its own
  ancestors, read from the paged KV cache after this layer's KV write, in torch
  (``scaled_dot_product_attention`` with an ancestor mask). The cache's layout
  is checked against vLLM's own write op once per process.
* **Commit.** When the accepted path leaves the main chain, the accepted nodes'
  K/V are copied, in every layer, into the slots of positions ``p + 1 ..
  p + a`` that vLLM counts as committed; every other node lies past the
  committed length and is overwritten before it is read.

``TreeVerification`` holds the drafter's trees between steps; ``begin`` (the
``_model_forward`` hook) turns them into this step's ``TreeStep``, which the
attention patch reads while the forward runs and the verifier consumes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..drafts.tree import DraftTree

# Attention plans for the forward that is running, by id of the attention
# metadata object each attention call receives (one per KV-cache group and
# per layer segment the deferred forward runs).
_PLANS: dict[int, list] = {}
# The step whose forward ran with trees; the verifier takes it.
_CURRENT: "TreeStep | None" = None
_LAYOUT_CHECKED: set = set()


class TreeLayoutError(RuntimeError):
    pass


def paged_kv(kv_cache: torch.Tensor):
    """Views of one layer's CPU KV cache ``[blocks, kv_heads, block, 2*head]``:
    keys ``[blocks, kv_heads, head, block]`` (vLLM's CPU kernels keep each
    block's keys transposed) and values ``[blocks, kv_heads, block, head]``."""
    nb, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    halves = kv_cache.view(nb, h, 2, bs * d)
    return halves[:, :, 0].view(nb, h, d, bs), halves[:, :, 1].view(nb, h, bs, d)


def check_layout(isa: str, dtype: torch.dtype, kv_heads: int, block_size: int,
                 head_size: int) -> None:
    """Write known K/V with vLLM's own cache-write op and read them back through
    ``paged_kv``; refuse tree verification when they differ."""
    key = (isa, dtype, kv_heads, block_size, head_size)
    if key in _LAYOUT_CHECKED:
        return
    from vllm import _custom_ops as ops

    nb = 3
    kv = torch.zeros(nb, kv_heads, block_size, 2 * head_size, dtype=dtype)
    kc, vc = kv.view(nb, kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    n = min(7, nb * block_size)
    k = torch.randn(n, kv_heads, head_size).to(dtype)
    v = torch.randn(n, kv_heads, head_size).to(dtype)
    slots = torch.randperm(nb * block_size)[:n].to(torch.int64)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    K, V = paged_kv(kv)
    b, o = slots // block_size, slots % block_size
    if not (torch.equal(K[b, :, :, o], k) and torch.equal(V[b, :, o, :], v)):
        raise TreeLayoutError(
            f"adadecode 'tree': vLLM's CPU KV cache layout for isa {isa!r} is not the one "
            "tree verification reads; set \"tree\": false")
    _LAYOUT_CHECKED.add(key)


class TreeRows:
    """One request's tree in this step's flat batch."""

    def __init__(self, row: int, start: int, root: int, tree: DraftTree, table_row, bs: int):
        self.row, self.start, self.root, self.tree = row, start, root, tree
        n = tree.size
        # Slots of positions 0 .. p + n: the prefix, the root, then every node.
        pos = torch.arange(root + n + 1)
        self.blocks, self.offsets = table_row[pos // bs].to(torch.int64), pos % bs
        m = tree.main_len
        depths = tree.depths()
        self.off_rows = torch.arange(start + m + 1, start + n + 1)  # flat rows
        self.rope = torch.tensor([root + d for d in depths[m:]], dtype=torch.int64)
        mask = torch.zeros(n - m, root + n + 1, dtype=torch.bool)
        mask[:, : root + 1] = True
        for j, node in enumerate(range(m + 1, n + 1)):
            for a in tree.ancestors(node):
                mask[j, root + a] = True
        self.mask = mask
        self.pruned: frozenset[int] = frozenset()  # nodes early pruning dropped

    def parent_rows(self) -> list[int]:
        """Flat indices of the branch nodes' parents (what pruning scores)."""
        m = self.tree.main_len
        return sorted({self.tree.parents[i - 1] for i in range(m + 1, self.tree.size + 1)})

    def prune(self, top_k: dict[int, set[int]]) -> list[int]:
        """Drop branch nodes outside their parent's top-k; their flat rows.

        Only the nodes after the last one that stays are dropped: each
        attention call reads a request's rows as a contiguous run of positions
        ending at its last row (vLLM's causal rule), so a row missing from the
        middle would shift every main-chain row before it. A node to drop
        before one that stays runs on and is verified like any other (depth
        first, a dropped node's subtree follows it: what is dropped is whole
        subtrees)."""
        drop = self.tree.prune(top_k)
        stays = [i for i in range(1, self.tree.size + 1) if i not in drop]
        last = stays[-1] if stays else 0
        self.pruned = frozenset(i for i in drop if i > last)
        return [self.start + i for i in sorted(self.pruned)]


class TreeStep:
    """This step's trees, the rows they occupy, and what verification made of them."""

    def __init__(self, runner, entries: list[TreeRows], layer_names: list[str],
                 results: dict):
        self.runner = runner
        self.entries = entries
        self.layer_names = layer_names
        self.off_rows = torch.cat([e.off_rows for e in entries])
        self.rope = torch.cat([e.rope for e in entries])
        # req -> (accepted, of them on the main chain, nodes, main length, pruned
        # nodes, 1 if a pruned node would have been accepted, 1 if the accepted
        # path left the main chain for a sibling branch, the source of the first
        # accepted node beyond the request's own draft or "")
        self.results = results

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        out = positions.clone()
        out[self.off_rows] = self.rope.to(out.dtype)
        return out

    def plan(self, call_rows: torch.Tensor | None) -> list:
        """(query rows, blocks, offsets, mask) per tree request, for an attention
        call over ``call_rows`` (flat rows, increasing; None: every row)."""
        plan = []
        for e in self.entries:
            q, mask = e.off_rows, e.mask
            if e.pruned:  # pruned rows left the forward
                keep = torch.tensor([i not in e.pruned for i in
                                     range(e.tree.main_len + 1, e.tree.size + 1)])
                q, mask = q[keep], mask[keep]
            if not q.numel():  # a main chain only: vLLM's kernel did it all
                continue
            if call_rows is not None:
                q = torch.searchsorted(call_rows, q)
            plan.append((q, e.blocks, e.offsets, mask))
        return plan

    def register(self, attn_metadata, call_rows: torch.Tensor | None = None) -> None:
        """Attach plans to the metadata objects an attention call will receive."""
        metas = attn_metadata.values() if isinstance(attn_metadata, dict) else [attn_metadata]
        plan = self.plan(call_rows)
        for meta in {id(m): m for m in metas}.values():
            _PLANS[id(meta)] = plan


def end_forward() -> None:
    _PLANS.clear()


def take_step() -> "TreeStep | None":
    global _CURRENT
    step, _CURRENT = _CURRENT, None
    return step


class TreeVerification:
    """The drafter's trees, held from its step to the next step's forward."""

    def __init__(self):
        self.pending: dict[str, tuple[int, DraftTree]] = {}  # req -> (root position, tree)
        # Per request, what its last tree step kept (``TreeStep.results``).
        self.settled: dict[str, tuple[int, ...]] = {}

    def hold(self, req_id: str, root: int, tree: DraftTree) -> None:
        """A request's tree for the next step; ``root``: the position of its
        newest sampled token."""
        self.pending[req_id] = (root, tree)

    def begin(self, runner, positions: torch.Tensor) -> TreeStep | None:
        """This step's tree rows, when the scheduler kept every node of a held
        tree at the position it was drafted for; a tree it trimmed is verified
        as the linear list it now is."""
        global _CURRENT
        from .runner import RunnerBatch

        trees, self.pending = self.pending, {}
        _CURRENT = None
        if not trees:
            return None
        batch = RunnerBatch(runner)
        qsl = batch.query_start_loc().tolist()
        table = batch.block_table.block_table.cpu
        entries = []
        for row in range(batch.num_reqs):
            held = trees.get(batch.req_id(row))
            if held is None:
                continue
            root, tree = held
            start, end = qsl[row], qsl[row + 1]
            if end - start != tree.size + 1 or int(positions[start]) != root:
                continue
            entries.append(TreeRows(row, start, root, tree, table[row], batch.block_size))
        if not entries:
            return None
        names = [n for g in batch.attn_groups for n in g.layer_names]
        _CURRENT = TreeStep(runner, entries, names, self.settled)
        return _CURRENT


def attend_off_chain(impl, layer, query: torch.Tensor, kv_cache: torch.Tensor,
                     output: torch.Tensor, plan: list) -> None:
    """Replace the off-chain rows' attention output: each attends to its
    request's prefix and its own ancestors (the KV of this layer is written)."""
    nb, h, bs, d2 = kv_cache.shape
    check_layout(layer.isa, kv_cache.dtype, h, bs, d2 // 2)
    K, V = paged_kv(kv_cache)
    for q_rows, blocks, offsets, mask in plan:
        k = K[blocks, :, :, offsets]  # [L, kv_heads, head]
        v = V[blocks, :, offsets, :]
        q = query[q_rows].transpose(0, 1)  # [heads, n, head]
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1).to(q.dtype),
                                           v.transpose(0, 1).to(q.dtype), attn_mask=mask,
                                           scale=impl.scale, enable_gqa=True)
        output[q_rows] = o.transpose(0, 1).to(output.dtype)


def install_tree_attention() -> None:
    """``CPUAttentionBackendImpl.forward``, followed by the off-chain rows'
    tree attention when the running forward has a plan for this call."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from .patching import patch

    def make(original):
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    *args, **kwargs):
            out = original(self, layer, query, key, value, kv_cache, attn_metadata, output,
                           *args, **kwargs)
            if _PLANS and attn_metadata is not None:
                plan = _PLANS.get(id(attn_metadata))
                if plan:
                    attend_off_chain(self, layer, query, kv_cache, output, plan)
            return out
        return forward

    patch(CPUAttentionBackendImpl, "forward", make)


def check_model(model) -> None:
    """Refuse ``"tree": true`` at engine start for attention that tree
    verification cannot reproduce (naming the setting and the reason)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from ..errors import AdaDecodeConfigError

    for name, module in model.named_modules():
        impl = getattr(module, "impl", None)
        if impl is None or not hasattr(module, "layer_name"):
            continue
        if not isinstance(impl, CPUAttentionBackendImpl):
            reason = f"runs on {type(impl).__name__}, not vLLM's CPU attention backend"
        else:
            reason = check_tree_support(impl)
        if reason:
            raise AdaDecodeConfigError(
                f"adadecode 'tree': attention layer {name}: {reason}, which tree "
                "verification does not reproduce; set \"tree\": false")


def check_tree_support(impl) -> str | None:
    """Why tree attention cannot reproduce this layer's attention, or None."""
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi"
    if getattr(impl, "sinks", None) is not None:
        return "attention sinks"
    if getattr(impl, "logits_soft_cap", None):
        return "a logits soft cap"
    sw = getattr(impl, "sliding_window", None)
    if sw not in (None, -1, (-1, -1), [-1, -1]):
        return f"a sliding window ({sw})"
    if getattr(impl, "kv_cache_dtype", "auto") != "auto":
        return f"a {impl.kv_cache_dtype} KV cache"
    return None


def verify(step: TreeStep, num_draft_tokens, targets_of) -> dict[int, list[int]]:
    """Walk each tree on the full model's tokens and commit the accepted
    nodes' KV; returns the tokens to emit per batch row. ``targets_of(row,
    first, n)`` gives the full model's token at the batch row's logits rows
    first .. first + n - 1 (its nodes, the root first)."""
    k = np.asarray(num_draft_tokens, dtype=np.int64)
    firsts = np.concatenate([[0], np.cumsum(k + 1)[:-1]])
    emitted: dict[int, list[int]] = {}
    moves: list[tuple[TreeRows, list[int]]] = []
    for e in step.entries:
        n = e.tree.size
        if e.row >= len(k) or k[e.row] != n:
            continue  # not verified as this tree: the linear rule stands
        toks, path, lost = e.tree.walk(targets_of(e.row, int(firsts[e.row]), n + 1), e.pruned)
        emitted[e.row] = toks
        on_chain = 0  # accepted main-draft nodes (the rest came from branches)
        while (on_chain < min(len(path), e.tree.main_len)
               and path[on_chain] == on_chain + 1):
            on_chain += 1
        diverged = any(node != depth for depth, node in enumerate(path, start=1))
        # the source of the first accepted node that was not the request's own draft
        gained_by = next((e.tree.labels[i - 1] for i in path
                          if e.tree.labels and e.tree.labels[i - 1] != "draft"), "")
        step.results[step.runner.input_batch.req_ids[e.row]] = (
            len(path), on_chain, n, e.tree.main_len, len(e.pruned), int(lost), int(diverged),
            gained_by)
        if diverged:
            moves.append((e, path))
    if moves:
        _commit(step, moves)
    return emitted


def _commit(step: TreeStep, moves) -> None:
    """Copy each accepted off-chain node's K/V into the slot of its depth."""
    src_b, src_o, dst_b, dst_o = [], [], [], []
    for e, path in moves:
        for depth, node in enumerate(path, start=1):
            if node != depth:  # node > depth: sources lie past every earlier destination
                src_b.append(e.blocks[e.root + node])
                src_o.append(e.offsets[e.root + node])
                dst_b.append(e.blocks[e.root + depth])
                dst_o.append(e.offsets[e.root + depth])
    sb, so = torch.stack(src_b), torch.stack(src_o)
    db, do = torch.stack(dst_b), torch.stack(dst_o)
    ctx = step.runner.compilation_config.static_forward_context
    seen: set[int] = set()
    for name in step.layer_names:
        kv = getattr(ctx.get(name), "kv_cache", None)
        if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
            continue
        seen.add(kv.data_ptr())
        K, V = paged_kv(kv)
        # Every source is read before any destination is written.
        K[db, :, :, do] = K[sb, :, :, so]
        V[db, :, do, :] = V[sb, :, so, :]
