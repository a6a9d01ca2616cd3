"""Token trees (ProPD, arXiv 2402.13485): several candidate continuations of a
request, verified in one forward. Pure: no engine, no torch.

A ``DraftTree`` holds its nodes in depth-first order with the main chain (the
linear draft every other source builds) first, so main-chain node ``j`` sits at
flat index ``j`` (1-based; index 0 is the root, the request's newest sampled
token). That keeps everything the linear path relies on in place: the drafter's
layer states and KV for the main chain, and the flat slots vLLM gives the rows.
An alternative that agrees with the whole main draft and goes on lengthens the
main chain (its rows are a linear draft's rows, cheaper to verify than a
branch's); other branches follow, each node after its parent.

``walk`` is the exact-match rule on a tree: from the root, move to the child
whose token equals the full model's token at the current node, and emit the
full model's tokens along the way; the first token no child holds ends the
step (the correction, or the bonus token after a leaf).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]  # node i + 1's token, depth-first, main chain first
    parents: tuple[int, ...]  # node i + 1's parent's flat index (0: the root)
    main_len: int  # nodes 1 .. main_len are the main chain (each node's first child)
    # Per node: "draft" for the request's own draft, else the source of the
    # alternative that added it (empty: no labels kept).
    labels: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def off_chain(self) -> int:
        return len(self.tokens) - self.main_len

    def trim(self, chain: int, off: int) -> "DraftTree":
        """The tree cut to its first ``chain`` main-chain nodes and, depth
        first, at most ``off`` off-chain nodes whose branch leaves the main
        chain before its cut (so each kept node's parent is kept, and the main
        chain stays each node's first child)."""
        chain = max(0, min(chain, self.main_len))
        keep = list(range(1, chain + 1))
        kept = {0, *keep}
        for i in range(self.main_len + 1, self.size + 1):
            if len(keep) - chain >= off:
                break
            p = self.parents[i - 1]
            if p in kept and (p > self.main_len or p < chain):
                keep.append(i)
                kept.add(i)
        if len(keep) == self.size:
            return self
        flat = {node: j for j, node in enumerate(keep, start=1)}
        flat[0] = 0
        return DraftTree(tuple(self.tokens[n - 1] for n in keep),
                         tuple(flat[self.parents[n - 1]] for n in keep), chain,
                         tuple(self.labels[n - 1] for n in keep) if self.labels else ())

    def depths(self) -> list[int]:
        """Depth of nodes 1..N (a child of the root has depth 1)."""
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return d[1:]

    def ancestors(self, node: int) -> list[int]:
        """Flat indices of ``node``'s ancestors and itself, root (0) excluded."""
        out = []
        while node:
            out.append(node)
            node = self.parents[node - 1]
        return out[::-1]

    def walk(self, targets: Sequence[int],
             pruned: frozenset[int] = frozenset()) -> tuple[list[int], list[int], bool]:
        """The tokens to emit and the accepted nodes' flat indices, given the
        full model's token at every node (``targets[i]``: at flat index i,
        the root first), with ``pruned`` nodes left out; and whether a pruned
        node would have been accepted where the walk stopped."""
        children: list[dict[int, int]] = [{} for _ in range(len(self.tokens) + 1)]
        for i, (tok, p) in enumerate(zip(self.tokens, self.parents), start=1):
            children[p].setdefault(tok, i)
        emitted, path, cur = [], [], 0
        while True:
            t = int(targets[cur])
            emitted.append(t)
            nxt = children[cur].get(t)
            if nxt is None or nxt in pruned:
                return emitted, path, nxt is not None
            path.append(nxt)
            cur = nxt

    def prune(self, parent_top_k: dict[int, set[int]]) -> frozenset[int]:
        """Branch nodes (off the main chain) whose token is not among their
        parent's top-k (``parent_top_k``: flat index -> tokens), and everything
        below them."""
        out: set[int] = set()
        for i in range(self.main_len + 1, len(self.tokens) + 1):
            p = self.parents[i - 1]
            if p in out or (p in parent_top_k and self.tokens[i - 1] not in parent_top_k[p]):
                out.add(i)
        return frozenset(out)


def build_tree(main: Sequence[int], alternatives: Iterable[Sequence[int]], *,
               max_nodes: int, max_branches: int,
               labels: Sequence[str] | None = None) -> DraftTree | None:
    """The main chain plus as many alternatives as fit in ``max_nodes`` nodes and
    ``max_branches`` new branches (an alternative that shares a prefix with the
    tree adds only its new tail; the first to go past the main draft's end
    lengthens the main chain). None when no alternative adds a node.
    ``labels``: each alternative's source, kept per node it adds."""
    main = [int(t) for t in main][:max_nodes]
    toks: list[int] = []
    par: list[int] = []
    lab: list[str] = []
    kids: list[dict[int, int]] = [{}]  # per node (0: root), token -> node
    label = "draft"

    def add(tok: int, parent: int) -> int:
        toks.append(tok)
        par.append(parent)
        lab.append(label)
        kids.append({})
        kids[parent][tok] = len(toks)
        return len(toks)

    cur = 0
    for t in main:
        cur = add(t, cur)
    branches = 0
    for i, alt in enumerate(alternatives):
        if branches >= max_branches or len(toks) >= max_nodes:
            break
        label = labels[i] if labels is not None else "branch"
        cur, grew = 0, False
        for t in alt:
            t = int(t)
            nxt = kids[cur].get(t)
            if nxt is None:
                if len(toks) >= max_nodes:
                    break
                nxt, grew = add(t, cur), True
            cur = nxt
        branches += grew
    if not branches:
        return None
    # Depth first, children in insertion order: the main chain keeps 1..len(main).
    order: list[int] = []
    stack = [0]
    while stack:
        node = stack.pop()
        if node:
            order.append(node)
        stack.extend(reversed(list(kids[node].values())))
    flat = {node: i for i, node in enumerate(order, start=1)}
    flat[0] = 0
    main_len, cur = 0, 0  # the first-child chain: flat indices 1 .. main_len
    while kids[cur]:
        cur = next(iter(kids[cur].values()))
        main_len += 1
    return DraftTree(tuple(toks[n - 1] for n in order),
                     tuple(flat[par[n - 1]] for n in order), main_len,
                     tuple(lab[n - 1] for n in order))
