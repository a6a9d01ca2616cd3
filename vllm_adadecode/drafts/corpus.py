"""Corpus drafts: continuations the model itself wrote before, for any prompt.

Lookups in the request's own tokens need a repeat; most chat answers have few.
But a small model's answers share many phrases with its other answers
("Here's a ...", "In conclusion, ..."). A ``DraftCorpus`` holds the model's own
greedy responses to training prompts (shipped in its heads folder as
``corpus.safetensors``) and answers one question: after these last tokens,
which token did the model write most often? It drafts that token, appends it
to the context and asks again, while the product of the answers' frequencies
stays at or above ``min_prob``.

The table: for every context length n in ``min_n..max_n`` and every position of
the corpus, the n tokens before it (a 64-bit hash, the length mixed in) and the
token there; per context, its ``RANKS`` most frequent next tokens and their
shares. The longest context of the request's tail found in the table answers.
The runners-up are a token tree's branches where the corpus is less sure
(``runners_up``). Built in
about a second per 300k corpus tokens at engine start, searched with one
``np.searchsorted`` per drafted token. A hash collision can only make a draft
wrong, which verification rejects like any other wrong draft.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CorpusError

CORPUS_FILE = "corpus.safetensors"
CORPUS_KEY = "corpus.tokens"  # int32 token ids, responses separated by SEPARATOR
SEPARATOR = -1
MAX_CORPUS_TOKENS = 16 * 1024 * 1024  # a larger file is refused before it is read
RANKS = 3  # next tokens kept per context, most frequent first

_MASK = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15  # odd: multiplication is a bijection mod 2^64
_LEN_MIX = 0xC2B2AE3D27D4EB4F


def _mix(h, n):
    """The key of a context hash ``h`` of length ``n`` (numpy uint64 or int)."""
    if isinstance(h, np.ndarray):
        return h * np.uint64(_LEN_MIX) + np.uint64(n)
    return (h * _LEN_MIX + n) & _MASK


class DraftCorpus:
    """The model's most frequent continuations in its own responses."""

    name = "corpus"

    def __init__(self, tokens: np.ndarray, *, min_n: int = 1, max_n: int = 8,
                 min_prob: float = 0.4):
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise CorpusError("a corpus is a 1-D array of token ids")
        if tokens.shape[0] and int(tokens.min()) < SEPARATOR:
            raise CorpusError(f"corpus token ids must be >= 0 (or {SEPARATOR} between "
                              "responses)")
        self.min_n, self.max_n, self.min_prob = min_n, max_n, min_prob
        self.num_tokens = int((tokens >= 0).sum())
        self.keys, self.next, self.prob = self._build(tokens)

    def _build(self, tokens: np.ndarray):
        t = (tokens + 1).astype(np.uint64)  # the separator becomes 0
        ok = tokens >= 0
        keys, nxt = [], []
        h = np.zeros_like(t)
        valid = ok.copy()  # the token at j exists
        with np.errstate(over="ignore"):
            for n in range(1, self.max_n + 1):
                # h[j]: hash of tokens[j-n:j], newest token lowest power
                if n == 1:
                    h = np.concatenate([[np.uint64(0)], t[:-1]])
                else:
                    h = np.concatenate([[np.uint64(0)], h[:-1]]) * np.uint64(_BASE) \
                        + np.concatenate([[np.uint64(0)], t[:-1]])
                prev_ok = np.concatenate([np.zeros(n, dtype=bool), ok[:-n]]) if n <= len(ok) \
                    else np.zeros_like(ok)
                valid &= prev_ok
                if n >= self.min_n and valid.any():
                    keys.append(_mix(h[valid], n))
                    nxt.append(tokens[valid])
        if not keys:
            return (np.zeros(0, np.uint64), np.zeros((0, RANKS), np.int32),
                    np.zeros((0, RANKS), np.float32))
        k, x = np.concatenate(keys), np.concatenate(nxt)
        order = np.lexsort((x, k))
        k, x = k[order], x[order]
        # counts of each (context, next token)
        new = np.ones(len(k), dtype=bool)
        new[1:] = (k[1:] != k[:-1]) | (x[1:] != x[:-1])
        start = np.flatnonzero(new)
        count = np.diff(np.append(start, len(k)))
        pk, px = k[start], x[start]
        # per context (in key order): total, and its RANKS most frequent next
        # tokens (the smaller token first on ties), -1 where it has fewer
        first = np.ones(len(pk), dtype=bool)
        first[1:] = pk[1:] != pk[:-1]
        group = np.cumsum(first) - 1
        total = np.bincount(group, weights=count)
        order = np.lexsort((-count, group))
        g = group[order]
        at = np.arange(len(order))
        rank = at - np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], at, 0))
        keep = rank < RANKS
        g, r, o = g[keep], rank[keep], order[keep]
        nexts = np.full((int(group[-1]) + 1, RANKS), -1, dtype=np.int32)
        probs = np.zeros((int(group[-1]) + 1, RANKS), dtype=np.float32)
        nexts[g, r] = px[o]
        probs[g, r] = count[o] / total[g]
        return pk[first], nexts, probs

    def __len__(self) -> int:
        return len(self.keys)

    def _found(self, tail: list[int]) -> np.ndarray:
        """Table rows of the suffixes of ``tail`` the corpus knows, longest last."""
        qs, h, p = [], 0, 1
        for n in range(1, min(self.max_n, len(tail)) + 1):
            h = (h + (tail[-n] + 1) * p) & _MASK
            p = (p * _BASE) & _MASK
            if n >= self.min_n:
                qs.append(_mix(h, n))
        if not qs or not len(self.keys):
            return np.zeros(0, dtype=np.int64)
        q = np.array(qs, dtype=np.uint64)
        idx = np.searchsorted(self.keys, q)
        idx[idx >= len(self.keys)] = 0
        return idx[self.keys[idx] == q]

    def _next(self, tail: list[int]) -> tuple[int, float] | None:
        """The most frequent next token after the longest known suffix of ``tail``."""
        found = self._found(tail)
        if not found.shape[0]:
            return None
        i = found[-1]  # the longest context found
        return int(self.next[i, 0]), float(self.prob[i, 0])

    def runners_up(self, tokens, exclude: int, limit: int,
                   min_share: float = 0.1) -> list[int]:
        """Up to ``limit`` next tokens other than ``exclude`` after the longest
        known suffix of ``tokens`` (the context corpus drafts read), most
        frequent first, each with at least ``min_share`` of its continuations.
        None where that context has one continuation: a shorter context's
        guesses would be weaker than the draft's."""
        found = self._found([int(x) for x in tokens[-self.max_n:]])
        if not found.shape[0]:
            return []
        i = found[-1]
        return [int(t) for t, pr in zip(self.next[i], self.prob[i])
                if t >= 0 and t != exclude and pr >= min_share][:limit]

    def propose(self, tokens: np.ndarray, k: int) -> list[int]:
        """Up to ``k`` tokens continuing ``tokens``, while the product of their
        frequencies stays at or above ``min_prob``."""
        tail = [int(x) for x in tokens[-self.max_n:]]
        out: list[int] = []
        cum = 1.0
        while len(out) < k:
            nxt = self._next(tail)
            if nxt is None:
                break
            cum *= nxt[1]
            if cum < self.min_prob:
                break
            out.append(nxt[0])
            tail = tail[1:] + [nxt[0]] if len(tail) >= self.max_n else tail + [nxt[0]]
        return out


def corpus_tokens(responses) -> np.ndarray:
    """Token-id lists joined into one corpus array, separated by SEPARATOR."""
    parts: list[int] = []
    for r in responses:
        if len(r):
            parts.extend(int(x) for x in r)
            parts.append(SEPARATOR)
    return np.array(parts, dtype=np.int32)


def save_corpus(folder: str | Path, tokens: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    path = Path(folder) / CORPUS_FILE
    save_file({CORPUS_KEY: np.ascontiguousarray(tokens, dtype=np.int32)}, str(path))
    return path


def load_corpus_tokens(folder: str | Path, vocab_size: int | None = None) -> np.ndarray | None:
    """The corpus of a heads folder, or None when it has none. Refused (with the
    file named) when too large, of another dtype or shape, or holding ids
    outside the vocabulary. safetensors only: nothing is unpickled."""
    path = Path(folder) / CORPUS_FILE
    if not path.is_file():
        return None
    limit = MAX_CORPUS_TOKENS * 4 + 1024 * 1024
    if path.stat().st_size > limit:
        raise CorpusError(f"{path}: {path.stat().st_size} bytes, over the {limit}-byte limit "
                          f"({MAX_CORPUS_TOKENS} tokens)")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorpusError(f"{path}: not a readable safetensors file ({e})") from None
    tokens = tensors.get(CORPUS_KEY)
    if set(tensors) != {CORPUS_KEY} or tokens is None:
        raise CorpusError(f"{path}: expected exactly one tensor {CORPUS_KEY!r}, "
                          f"found {sorted(tensors)}")
    if tokens.dtype != np.int32 or tokens.ndim != 1:
        raise CorpusError(f"{path}: {CORPUS_KEY!r} must be a 1-D int32 array, "
                          f"got {tokens.dtype} with shape {tokens.shape}")
    if tokens.shape[0] and (int(tokens.min()) < SEPARATOR
                            or (vocab_size is not None and int(tokens.max()) >= vocab_size)):
        raise CorpusError(f"{path}: token ids must lie in [0, {vocab_size}) "
                          f"(or be {SEPARATOR} between responses)")
    return tokens
