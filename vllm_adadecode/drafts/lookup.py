"""Lookup drafts: tokens the request has already seen, at no layer cost.

Given a request's tokens so far (prompt and output), find the longest recent
suffix of them (``min_match`` to ``max_match`` tokens) that occurred earlier in
the same sequence and propose the tokens that followed it. The matcher is
vLLM's own n-gram matcher (the one its ``ngram`` method uses, reached through
``patches.ngram_matcher``): a KMP scan compiled by numba.

``ResponseCache`` extends the search to earlier responses of this engine: a
bounded token buffer (responses separated by a marker, oldest evicted first)
searched with the same matcher when the request's own tokens hold no match.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .. import patches

SEPARATOR = -1  # between cached responses and before the search pattern


class SequenceLookup:
    """Propose the continuation of the longest repeated suffix of a sequence."""

    def __init__(self, min_match: int, max_match: int, max_model_len: int):
        self.min_match = min_match
        self.max_match = max_match
        self.max_model_len = max_model_len
        self._match = patches.ngram_matcher()

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


class ResponseCache:
    """Earlier responses of this engine, searched for a request's suffix.

    Holds at most ``max_tokens`` tokens; adding a response evicts the oldest
    ones until it fits (a response longer than the cap keeps its last
    ``max_tokens`` tokens). Searching copies the pattern (the request's last
    ``max_match`` tokens) behind the cached tokens and runs the sequence
    matcher over the whole buffer, so a match is a longest suffix that occurred
    in a cached response; the proposal stops at that response's end.
    """

    def __init__(self, lookup: SequenceLookup, max_tokens: int):
        self.lookup = lookup
        self.max_tokens = max_tokens
        self._responses: deque[np.ndarray] = deque()
        self.num_tokens = 0  # cached response tokens (separators not counted)
        self._buf = np.empty(0, dtype=np.int32)
        self._used = 0  # buffer length holding responses and separators
        self._dirty = False

    def __len__(self) -> int:
        return len(self._responses)

    def add(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=np.int32)[-self.max_tokens:]
        arr = arr[arr >= 0]  # never store a marker
        if arr.shape[0] < self.lookup.min_match + 1:
            return
        self._responses.append(arr)
        self.num_tokens += arr.shape[0]
        while self.num_tokens > self.max_tokens:
            self.num_tokens -= self._responses.popleft().shape[0]
        self._dirty = True

    def _rebuild(self) -> None:
        parts = []
        for r in self._responses:
            parts.append(r)
            parts.append(np.array([SEPARATOR], dtype=np.int32))
        used = sum(p.shape[0] for p in parts)
        self._buf = np.empty(used + self.lookup.max_match + 1, dtype=np.int32)
        if parts:
            self._buf[:used] = np.concatenate(parts)
        self._used = used
        self._dirty = False

    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        if not self._responses or k <= 0:
            return tokens[:0]
        if self._dirty:
            self._rebuild()
        pattern = tokens[-self.lookup.max_match:]
        n = pattern.shape[0]
        if n < self.lookup.min_match:
            return tokens[:0]
        end = self._used + n
        self._buf[self._used:end] = pattern
        found = self.lookup.propose(self._buf[:end], k, max_len=end + k)
        stop = np.nonzero(found == SEPARATOR)[0]
        if stop.shape[0]:
            found = found[:stop[0]]
        return found.copy()
