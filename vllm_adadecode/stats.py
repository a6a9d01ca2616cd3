"""The drafter's counters: what it drafted, from which source, what verification
kept, and where its time went. Read through the ``adadecode_stats`` worker RPC
(``engine/rpc.py``); tensor-parallel workers' counters merge with
``merge_stats``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .drafts.base import PendingDraft


@dataclass
class DrafterStats:
    """Counters since the last reset (``reset`` zeroes them in place: the
    drafter's parts hold this object)."""

    calls: int = 0
    seconds: float = 0.0  # time spent drafting
    lookup_seconds: float = 0.0  # time spent matching (in-sequence, cache, corpus)
    layer_evals: int = 0  # decoder-layer token evaluations in drafting
    head_evals: int = 0  # exit-head token evaluations
    full_head_evals: int = 0  # of those, checked on the full vocabulary
    # Layers the verification pass would still owe the drafted tokens if it
    # skipped what the drafter ran (sum over drafts of L - 1 - final depth).
    deferred_layer_evals: int = 0
    # Layer evaluations the verification pass skipped (deferred verification).
    verify_layers_skipped: int = 0
    # Of those, layers of last draft attempts that found no confident exit:
    # verification resumed them instead of running them again.
    attempt_layers_reused: int = 0
    exit_counts: Counter = field(default_factory=Counter)  # exit layer -> exits
    accepted_by_exit: Counter = field(default_factory=Counter)
    rejected_by_exit: Counter = field(default_factory=Counter)
    drafted_by_source: Counter = field(default_factory=Counter)
    accepted_by_source: Counter = field(default_factory=Counter)
    # Request-steps by the sources their draft mixed: "lookup", "exit",
    # "lookup+exit" (source tokens, then self-drafts from where they end).
    steps_by_sources: Counter = field(default_factory=Counter)
    # Drafted and accepted tokens of greedy and of sampled requests.
    drafted_by_sampling: Counter = field(default_factory=Counter)
    accepted_by_sampling: Counter = field(default_factory=Counter)
    requests: dict = field(default_factory=dict)  # req id -> [steps, accepted drafts]
    # Token trees: request-steps verified as a tree, their nodes, the nodes the
    # tree added beyond the request's own draft; steps whose accepted path went
    # past the draft's agreeing prefix, and the tokens that gained; of those
    # steps, the ones that left the main chain for a sibling branch (the others
    # continued past its end).
    tree_steps: int = 0
    tree_nodes: int = 0
    tree_branch_nodes: int = 0
    tree_branch_wins: int = 0
    tree_branch_tokens: int = 0
    tree_diverged: int = 0
    tree_sampled: int = 0  # tree steps of sampled requests
    # Sizing: trees cut to the shape that pays (adapt.py ``tree_shape``), and
    # tree steps with no node off the main chain (a lengthened linear draft).
    tree_cut: int = 0
    tree_chain_only: int = 0
    tree_off_nodes: int = 0  # nodes verified off their tree's main chain
    # tokens gained past the main draft, by the source of the first node beyond it
    tree_gain_by_source: Counter = field(default_factory=Counter)
    # Early pruning: branch nodes dropped after the first exit layer, and steps
    # where a dropped node would have been accepted.
    tree_pruned: int = 0
    tree_pruned_lost: int = 0

    def reset(self) -> None:
        fresh = DrafterStats()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def verified(self, pending: PendingDraft, accepted: int) -> None:
        """Count one request's drafts of the last step: ``accepted`` of them held."""
        self.drafted_by_sampling[pending.sampling] += len(pending.origins)
        self.accepted_by_sampling[pending.sampling] += min(accepted, len(pending.origins))
        for i, origin in enumerate(pending.origins):
            self.drafted_by_source[origin.source] += 1
            if i < accepted:
                self.accepted_by_source[origin.source] += 1
            if origin.exit_layer is not None:
                by = self.accepted_by_exit if i < accepted else self.rejected_by_exit
                by[origin.exit_layer] += 1

    def tree_verified(self, accepted: int, on_chain: int, nodes: int, drafted: int,
                      pruned: int = 0, lost: int = 0, diverged: int = 0,
                      gained_by: str = "", main_len: int | None = None) -> None:
        """A tree of ``nodes`` nodes, the request's ``drafted`` tokens first and
        its main chain ``main_len`` long, kept ``accepted`` nodes, ``on_chain``
        of them the request's own draft."""
        self.tree_steps += 1
        self.tree_diverged += diverged
        self.tree_pruned += pruned
        self.tree_pruned_lost += lost
        self.tree_nodes += nodes
        self.tree_branch_nodes += nodes - drafted
        if main_len is not None:
            self.tree_off_nodes += nodes - main_len
            self.tree_chain_only += nodes == main_len
        if accepted > on_chain:
            self.tree_branch_wins += 1
            self.tree_branch_tokens += accepted - on_chain
            self.tree_gain_by_source[gained_by or "branch"] += accepted - on_chain

    def per_request(self, req_id: str, accepted: int) -> None:
        st = self.requests.setdefault(req_id, [0, 0])
        st[0] += 1
        st[1] += accepted

    def as_dict(self) -> dict:
        """JSON-friendly counters (layer keys are strings)."""
        def by_layer(c: Counter) -> dict:
            return {str(k): v for k, v in sorted(c.items())}

        return {
            "calls": self.calls,
            "draft_seconds": self.seconds,
            "draft_layer_evals": self.layer_evals,
            "head_evals": self.head_evals,
            "full_head_evals": self.full_head_evals,
            "deferred_layer_evals": self.deferred_layer_evals,
            "verify_layers_skipped": self.verify_layers_skipped,
            "attempt_layers_reused": self.attempt_layers_reused,
            "exits": by_layer(self.exit_counts),
            "accepted_by_exit": by_layer(self.accepted_by_exit),
            "rejected_by_exit": by_layer(self.rejected_by_exit),
            "requests": dict(self.requests),
            "drafted_by_source": dict(self.drafted_by_source),
            "accepted_by_source": dict(self.accepted_by_source),
            "lookup_seconds": self.lookup_seconds,
            "steps_by_sources": dict(self.steps_by_sources),
            "drafted_by_sampling": dict(self.drafted_by_sampling),
            "accepted_by_sampling": dict(self.accepted_by_sampling),
            "tree": {"steps": self.tree_steps, "nodes": self.tree_nodes,
                     "branch_nodes": self.tree_branch_nodes,
                     "branch_wins": self.tree_branch_wins,
                     "branch_tokens": self.tree_branch_tokens,
                     "diverged": self.tree_diverged, "sampled": self.tree_sampled,
                     "cut": self.tree_cut, "chain_only": self.tree_chain_only,
                     "off_nodes": self.tree_off_nodes,
                     **{f"gain_{k}": self.tree_gain_by_source[k]
                        for k in ("lookup", "exit", "corpus")},
                     "pruned": self.tree_pruned, "pruned_lost": self.tree_pruned_lost},
        }

    def report(self) -> str:
        return (f"[adadecode] drafting: {self.calls} calls, {self.seconds:.2f} s, "
                f"exits per layer {dict(sorted(self.exit_counts.items()))}, "
                f"layer evals {self.layer_evals}, head evals {self.head_evals}")


def merge_stats(per_worker: list[dict]) -> dict:
    """Combine drafter counters from tensor-parallel workers.

    Every TP rank drafts the same tokens, so counts are taken from the first
    worker; time is the slowest worker's.
    """
    out = dict(per_worker[0])
    out["draft_seconds"] = max(s["draft_seconds"] for s in per_worker)
    return out
