"""Response-cache drafts: a request's suffix found in earlier responses of this engine.

A bounded token buffer (responses separated by a marker, oldest evicted first)
searched with the lookup drafts' matcher (lookup.py) when the request's own
tokens hold no match.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .lookup import SequenceLookup

SEPARATOR = -1  # between cached responses and before the search pattern


class ResponseCache:
    """Earlier responses of this engine, searched for a request's suffix.

    Holds at most ``max_tokens`` tokens; adding a response evicts the oldest
    ones until it fits (a response longer than the cap keeps its last
    ``max_tokens`` tokens). Searching copies the pattern (the request's last
    ``max_match`` tokens) behind the cached tokens and runs the sequence
    matcher over the whole buffer, so a match is a longest suffix that occurred
    in a cached response; the proposal stops at that response's end.
    """

    name = "cache"

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
