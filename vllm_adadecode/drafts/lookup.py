"""Lookup drafts: tokens the request has already seen, at no layer cost.

Given a request's tokens so far (prompt and output), find the longest recent
suffix of them (``min_match`` to ``max_match`` tokens) that occurred earlier in
the same sequence and propose the tokens that followed it. The matcher is
vLLM's own n-gram matcher (the one its ``ngram`` method uses, reached through
``engine.runner.ngram_matcher``): a KMP scan compiled by numba.
"""

from __future__ import annotations

import numpy as np

from ..engine.runner import ngram_matcher


class SequenceLookup:
    """Propose the continuation of the longest repeated suffix of a sequence."""

    name = "lookup"

    def __init__(self, min_match: int, max_match: int, max_model_len: int):
        self.min_match = min_match
        self.max_match = max_match
        self.max_model_len = max_model_len
        self._match = ngram_matcher()

    def warm_up(self) -> None:
        """Compile the numba matcher now (about a second), not in a request."""
        self.propose(np.array([1, 2, 3, 1, 2], dtype=np.int32), 2)

    def propose(self, tokens: np.ndarray, k: int, max_len: int | None = None) -> np.ndarray:
        """Up to ``k`` tokens that followed the longest earlier occurrence of
        the sequence's suffix; empty when no suffix of ``min_match`` tokens
        recurs. ``max_len`` bounds the sequence length plus the proposal
        (default: the model's max_model_len)."""
        if k <= 0 or tokens.shape[0] <= self.min_match:
            return tokens[:0]
        limit = self.max_model_len if max_len is None else max_len
        return self._match(tokens, self.min_match, self.max_match, limit, k)

    def continuations(self, tokens: np.ndarray, k: int, limit: int) -> list[list[int]]:
        """The tokens that followed each earlier occurrence of the sequence's
        last ``min_match`` tokens, newest occurrence first, up to ``limit``
        distinct continuations of at most ``k`` tokens (a token tree's branches)."""
        n, L = self.min_match, int(tokens.shape[0])
        if k <= 0 or limit <= 0 or L <= n:
            return []
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: L - 1], n)
        starts = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
        out: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for s in starts[::-1]:
            cont = tuple(tokens[s + n: s + n + k].tolist())
            if cont and cont not in seen:
                seen.add(cont)
                out.append(list(cont))
                if len(out) >= limit:
                    break
        return out
