"""LayerSegments: ranges that cross exit boundaries run as fixed pieces."""

import torch

from vllm_adadecode.engine.segments import LayerSegments


class AddLayer(torch.nn.Module):
    """A stand-in decoder layer with vLLM's (positions, hidden, residual) signature."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else residual + hidden
        return hidden * 0 + self.k, residual


def test_ranges_split_at_boundaries_and_match_one_pass():
    layers = [AddLayer(k) for k in range(10)]
    seg = LayerSegments(layers, compile=False, boundaries=[3, 7])
    h = torch.ones(2, 4)
    whole = LayerSegments(layers, compile=False)(0, 10)(None, h, None)
    split = seg(0, 10)(None, h, None)
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
    # only the gaps between boundaries were built, however the ranges were cut
    seg(3, 10)(None, h, None)
    seg(0, 7)(None, h, None)
    assert sorted(seg._fns) == [(0, 3), (3, 7), (7, 10)]
