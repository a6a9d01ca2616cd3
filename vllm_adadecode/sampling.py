"""Position-keyed sampling: a sampled token that does not depend on speculation.

The token at position p of a sampled request is the Gumbel-max draw over the
logits after vLLM's own processing (penalties, logit bias, allowed tokens,
temperature, min-p, top-k, top-p), with noise that is a fixed function of the
request's seed, p and the vocabulary index (a counter-based generator: no state
advances between steps). So the draw at p is the same whether p is sampled in a
plain step, verified as a draft, or sampled again after a rejected draft, in any
batch: exact-match verification of a sampled request then keeps its output
independent of drafting, and a drafter that draws with the same key matches
the target wherever the two distributions are close (the coupling).

This module holds the pure parts: the key of (seed, position), the seeds drawn
at arrival for requests without one, and the keys of the sampler call in
progress. The noise itself is vLLM's CPU Gumbel-max kernel, reached through
``engine.sampler.gumbel_argmax``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

_MASK63 = np.uint64(0x7FFF_FFFF_FFFF_FFFF)
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_M1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_M2 = np.uint64(0x94D0_49BB_1331_11EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def keys(seeds, positions) -> torch.Tensor:
    """The noise key of each (seed, position) pair: int64 in [0, 2**63)."""
    s = np.asarray(seeds, dtype=np.int64).astype(np.uint64)
    p = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    k = _splitmix64(_splitmix64(s) ^ _splitmix64(p ^ _M2)) & _MASK63
    return torch.from_numpy(k.astype(np.int64))


class Seeds:
    """Each request's sampling seed: its own, or one drawn at arrival.

    Drawn from a generator seeded with the engine's seed, in batch order, so
    every tensor-parallel rank draws the same seed for the same request.
    """

    def __init__(self, engine_seed: int | None):
        self._gen = torch.Generator().manual_seed(int(engine_seed or 0))
        self._seeds: dict[str, int] = {}

    def get(self, req_id: str, seed: int | None) -> int:
        s = self._seeds.get(req_id)
        if s is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._gen).item())
            s = self._seeds[req_id] = int(seed)
        return s

    def retain(self, live: set[str]) -> None:
        """Forget requests that left the batch (called when the table grows)."""
        self._seeds = {r: s for r, s in self._seeds.items() if r in live}

    def __len__(self) -> int:
        return len(self._seeds)


class StepKeys:
    """The keys of one step: per request, its seed and the position its first
    logits row predicts; a drafted row j of the request predicts position + j."""

    def __init__(self, seeds: np.ndarray, first_positions: np.ndarray):
        self.seeds = seeds
        self.first_positions = first_positions

    def at_depth(self, depth: int) -> torch.Tensor:
        return keys(self.seeds, self.first_positions + depth)


_active: list[torch.Tensor] = []


@contextlib.contextmanager
def keyed(row_keys: torch.Tensor) -> Iterator[None]:
    """Sampler calls inside draw row i with the noise of ``row_keys[i]``."""
    _active.append(row_keys)
    try:
        yield
    finally:
        _active.pop()


def active_keys() -> torch.Tensor | None:
    return _active[-1] if _active else None
