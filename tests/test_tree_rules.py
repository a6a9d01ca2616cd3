"""Token trees without an engine: the tree's layout, the exact-match walk, the
branches lookups find, and tree attention over vLLM's paged CPU KV cache."""

import random

import numpy as np
import pytest
import torch

from vllm_adadecode.drafts.lookup import SequenceLookup
from vllm_adadecode.drafts.tree import DraftTree, build_tree


def _random_tree(rng: random.Random) -> tuple[DraftTree, list[int], list[list[int]], int]:
    main = [rng.randrange(6) for _ in range(rng.randrange(1, 6))]
    alts = [[rng.randrange(6) for _ in range(rng.randrange(1, 7))] for _ in range(rng.randrange(1, 6))]
    max_nodes = len(main) + rng.randrange(1, 8)
    return build_tree(main, alts, max_nodes=max_nodes, max_branches=3), main, alts, max_nodes


def test_build_tree_keeps_the_main_chain_first_and_parents_before_children():
    rng = random.Random(0)
    built = 0
    for _ in range(500):
        tree, main, alts, max_nodes = _random_tree(rng)
        if tree is None:
            # no alternative added a node: each is a prefix of the main chain
            assert all(a[: len(main)] == main[: len(a)] for a in alts)
            continue
        built += 1
        m = tree.main_len
        assert tree.size <= max_nodes and m >= len(main)
        assert list(tree.tokens[: len(main)]) == main
        # the main chain: consecutive nodes, each its parent's first child, ending at a leaf
        assert list(tree.parents[:m]) == list(range(m)) and m not in tree.parents
        if m > len(main):  # lengthened by alternatives that went past its end
            assert any(a[:m] == list(tree.tokens[:m]) for a in alts)
        assert all(p < i for i, p in enumerate(tree.parents, start=1))
        # siblings differ, so the walk is unambiguous
        seen = set()
        for tok, p in zip(tree.tokens, tree.parents):
            assert (p, tok) not in seen
            seen.add((p, tok))
        # at most three branches leave the main chain or an earlier branch
        new_kids = sum(1 for i, p in enumerate(tree.parents, start=1)
                       if i > tree.main_len and p != i - 1)
        assert new_kids <= 3 and (new_kids >= 1 or m > len(main))
    assert built > 300


def test_an_alternative_past_the_draft_lengthens_the_main_chain_and_labels_follow():
    tree = build_tree([1, 2], [[1, 2, 3, 4], [5, 6], [1, 7]], max_nodes=7, max_branches=3,
                      labels=["lookup", "corpus", "exit"])
    assert tree.tokens == (1, 2, 3, 4, 7, 5, 6) and tree.main_len == 4
    assert tree.parents == (0, 1, 2, 3, 1, 0, 6)
    assert tree.labels == ("draft", "draft", "lookup", "lookup", "exit", "corpus", "corpus")
    # a path through the sibling 7 leaves the main chain; one past 2 does not
    assert tree.walk([1, 2, 3, 4, 9, 0, 0, 0])[1] == [1, 2, 3, 4]
    assert tree.walk([1, 7, 0, 0, 0, 0, 0, 0])[1] == [1, 5]


def _paths(tree: DraftTree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[a - 1] for a in tree.ancestors(i)) for i in range(1, tree.size + 1)}


def test_trimming_keeps_a_main_chain_prefix_and_whole_branch_prefixes():
    tree = build_tree([1, 2], [[1, 2, 3, 4], [5, 6], [1, 7]], max_nodes=7, max_branches=3,
                      labels=["lookup", "corpus", "exit"])
    assert tree.trim(4, 3) is tree
    cut = tree.trim(3, 0)  # the main chain to one node past the draft, no sibling
    assert (cut.tokens, cut.parents, cut.main_len, cut.off_chain) == ((1, 2, 3), (0, 1, 2), 3, 0)
    assert cut.labels == ("draft", "draft", "lookup")
    cut = tree.trim(2, 2)  # the sibling 7 of node 2 and the branch 5 from the root
    assert (cut.tokens, cut.parents, cut.main_len) == ((1, 2, 7, 5), (0, 1, 1, 0), 2)
    cut = tree.trim(1, 3)  # node 1 keeps only its first child: the branch 7 leaves with node 2
    assert (cut.tokens, cut.parents, cut.main_len) == ((1, 5, 6), (0, 0, 2), 1)
    rng = random.Random(3)
    for _ in range(500):
        tree = _random_tree(rng)[0]
        if tree is None:
            continue
        chain, off = rng.randrange(1, tree.main_len + 1), rng.randrange(0, tree.off_chain + 1)
        cut = tree.trim(chain, off)
        assert cut.main_len == chain and cut.off_chain <= off
        assert cut.tokens[:chain] == tree.tokens[:chain]
        assert list(cut.parents[:chain]) == list(range(chain)) and chain not in cut.parents
        assert all(p < i for i, p in enumerate(cut.parents, start=1))
        assert _paths(cut) <= _paths(tree)
        # depth first: each node's subtree follows it without a gap
        for i in range(1, cut.size + 1):
            below = [j for j in range(1, cut.size + 1) if i in cut.ancestors(j)]
            assert below == list(range(i, i + len(below)))
        if off >= tree.off_chain and chain == tree.main_len:
            assert cut == tree


def test_pruning_in_the_forward_drops_only_whole_subtrees_after_the_last_node_that_stays():
    """Rows dropped from the verification forward form the end of the
    request's rows (each attention call reads a request's rows as a contiguous
    run of positions); a node pruning would drop before one that stays runs
    on and stays in the walk."""
    from vllm_adadecode.engine.tree import TreeRows

    rng = random.Random(3)
    seen_kept = 0
    for _ in range(500):
        tree = _random_tree(rng)[0]
        if tree is None:
            continue
        top = {p: {rng.randrange(6)} for p in range(tree.size + 1)}
        rows = TreeRows(0, 10, 50, tree, torch.arange(8), 32)
        dropped = rows.prune(top)
        n = tree.size
        assert dropped == [10 + i for i in range(n - len(dropped) + 1, n + 1)]
        assert rows.pruned <= tree.prune(top)
        for i in rows.pruned:  # closed under children
            assert all(j in rows.pruned for j in range(1, n + 1) if tree.parents[j - 1] == i)
        seen_kept += len(tree.prune(top) - rows.pruned) > 0
    assert seen_kept > 20  # the rule mattered


def _brute_force(tree: DraftTree, targets: list[int], pruned=frozenset()):
    """The longest root path of unpruned nodes whose every node equals the
    target at its parent."""
    best: list[int] = []
    for node in range(1, tree.size + 1):
        path = tree.ancestors(node)
        if any(n in pruned for n in path):
            continue
        if all(tree.tokens[n - 1] == targets[([0] + path)[i]] for i, n in enumerate(path)):
            if len(path) > len(best):
                best = path
    emitted = [targets[x] for x in [0] + best]
    return emitted, best


def test_walk_equals_the_longest_agreeing_root_path():
    rng = random.Random(1)
    for _ in range(2000):
        tree, *_ = _random_tree(rng)
        if tree is None:
            continue
        targets = [rng.randrange(6) for _ in range(tree.size + 1)]
        emitted, path, lost = tree.walk(targets)
        assert (emitted, path) == _brute_force(tree, targets) and not lost


def test_pruning_drops_subtrees_and_only_costs_tokens():
    """Pruned branch nodes take their subtrees with them; the main chain is
    never pruned; the walk over the pruned tree emits the full model's tokens
    (a prefix of the unpruned walk's path) and says when a pruned node would
    have been accepted."""
    rng = random.Random(2)
    lost_seen = 0
    for _ in range(2000):
        tree, *_ = _random_tree(rng)
        if tree is None:
            continue
        top = {p: {rng.randrange(6) for _ in range(2)} for p in range(tree.size + 1)
               if rng.random() < 0.8}
        pruned = tree.prune(top)
        assert all(i > tree.main_len for i in pruned)
        for i in range(1, tree.size + 1):
            p = tree.parents[i - 1]
            if i > tree.main_len and (p in pruned or (p in top and tree.tokens[i - 1] not in top[p])):
                assert i in pruned
            elif i in pruned:
                raise AssertionError(f"node {i} pruned without cause")
        targets = [rng.randrange(6) for _ in range(tree.size + 1)]
        emitted, path, lost = tree.walk(targets, pruned)
        full_emitted, full_path, _ = tree.walk(targets)
        assert (emitted, path) == _brute_force(tree, targets, pruned)
        assert full_path[: len(path)] == path and full_emitted[: len(emitted) - 1] == emitted[:-1]
        assert lost == (len(full_path) > len(path))
        lost_seen += lost
    assert lost_seen > 0


def test_lookup_continuations_newest_occurrence_first():
    look = SequenceLookup(2, 5, 1000)
    toks = np.array([7, 8, 1, 2, 9, 9, 7, 8, 3, 4, 5, 7, 8, 1, 2, 0, 7, 8], dtype=np.int32)
    assert look.continuations(toks, 3, 5) == [[1, 2, 0], [3, 4, 5], [1, 2, 9]]
    assert look.continuations(toks, 3, 2) == [[1, 2, 0], [3, 4, 5]]
    assert look.continuations(np.array([1, 2, 3], dtype=np.int32), 3, 5) == []


def _write(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    from vllm import _custom_ops as ops

    nb, h, bs, d2 = kv.shape
    kc, vc = kv.view(nb, h, 2 * bs, d2 // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")


@pytest.mark.parametrize("call_subset", [False, True])
def test_tree_attention_equals_attention_over_prefix_and_ancestors(call_subset):
    """Off-chain rows attend to the prefix (positions 0..p) and their own
    ancestors, read from the paged cache that vLLM's own write op filled."""
    from types import SimpleNamespace

    from vllm_adadecode.engine.tree import TreeRows, attend_off_chain, check_layout

    torch.manual_seed(0)
    H, Hkv, D, bs, nb = 4, 2, 32, 32, 8
    check_layout("vec", torch.float32, Hkv, bs, D)
    tree = build_tree([5, 6, 7], [[5, 9, 1], [8, 2]], max_nodes=8, max_branches=3)
    p, n = 40, tree.size  # root at position 40: the prefix spans two blocks
    table_row = torch.tensor([3, 6, 1, 0])  # logical block -> physical block
    L = p + n + 1
    k_all, v_all = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
    kv = torch.zeros(nb, Hkv, bs, 2 * D)
    pos = torch.arange(L)
    _write(kv, k_all, v_all, table_row[pos // bs] * bs + pos % bs)
    start = 5  # the request's first row in the flat batch
    rows = TreeRows(0, start, p, tree, table_row, bs)
    q_flat = torch.randn(start + n + 1, H, D)
    out = torch.zeros_like(q_flat)
    call_rows = None
    if call_subset:  # a deferred segment runs only some rows
        call_rows = torch.tensor([1, 3] + list(range(start + 2, start + n + 1)))
        q_call, out_call = q_flat[call_rows], torch.zeros(len(call_rows), H, D)
    else:
        q_call, out_call = q_flat, out
    plan = [(torch.searchsorted(call_rows, rows.off_rows) if call_subset else rows.off_rows,
             rows.blocks, rows.offsets, rows.mask)]
    impl = SimpleNamespace(scale=D ** -0.5)
    attend_off_chain(impl, SimpleNamespace(isa="vec"), q_call, kv, out_call, plan)
    for j, node in enumerate(range(tree.main_len + 1, n + 1)):
        cols = list(range(p + 1)) + [p + a for a in tree.ancestors(node)]
        k, v = k_all[cols].repeat_interleave(H // Hkv, 1), v_all[cols].repeat_interleave(H // Hkv, 1)
        q = q_flat[start + node]
        w = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * D ** -0.5, dim=-1)
        ref = torch.einsum("hl,lhd->hd", w, v)
        got = out_call[(call_rows == start + node).nonzero().item()] if call_subset \
            else out[start + node]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the rotary positions are the nodes' depths past the root
    depths = tree.depths()[tree.main_len:]
    assert rows.rope.tolist() == [p + d for d in depths]


def test_with_trees_a_sized_lookup_chain_may_fill_every_scheduled_row():
    """With ``tree`` and ``adaptive`` on, a request's main lookup draft may take
    all ``num_speculative_tokens + tree_nodes`` rows vLLM schedules (sized by
    its measured acceptance, as a linear draft is); without trees, with fixed
    drafting, or under an explicit ``lookup_max_tokens``, the linear caps hold."""
    from vllm_adadecode.config import AdaDecodeConfig
    from vllm_adadecode.drafts.adapt import DraftAdaptation

    base = dict(exit_layers=(2,), num_speculative_tokens=5, tree_nodes=4)
    assert AdaDecodeConfig(**base, tree=True).chain_tokens == 9
    assert AdaDecodeConfig(**base, tree=False).chain_tokens == 5
    assert AdaDecodeConfig(**base, tree=True, adaptive=False).chain_tokens == 5
    assert AdaDecodeConfig(**base, tree=True, lookup_max_tokens=3).chain_tokens == 3
    # A request whose lookups always held: the sized length reaches past the
    # linear draft's 5 rows, into the tree's.
    adapt = DraftAdaptation(AdaDecodeConfig(**base, tree=True).chain_tokens)
    for _ in range(40):
        adapt.lookup_verified("r", 9, 9)
    adapt.begin_step(1)
    assert adapt.lookup_length("r") > 5
