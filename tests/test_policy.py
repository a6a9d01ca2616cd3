"""Pure drafting decisions (no engine)."""

import pytest
import torch

from vllm_adadecode.config import default_exit_layers
from vllm_adadecode.policy import carried_suffix, draft_budget, exits, top1


def test_top1_matches_softmax():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]])
    token, prob = top1(logits)
    ref = torch.softmax(logits, -1)
    assert token.tolist() == [1, 0]
    assert torch.allclose(prob, ref.max(-1).values)


def test_exit_when_top1_reaches_threshold():
    prob = torch.tensor([0.74, 0.75, 0.9])
    assert exits(prob, 0.75).tolist() == [False, True, True]


def test_carried_suffix_takes_tokens_at_the_newest_depth():
    # drafted tokens' depths never increase along positions
    assert carried_suffix([20, 10, 10], 10) == 2
    assert carried_suffix([20, 20], 10) == 0
    assert carried_suffix([], -1) == 0
    with pytest.raises(ValueError):
        carried_suffix([20, 5], 10)  # a drafted token behind the newest one: a bug


def test_draft_budget_respects_max_model_len():
    assert draft_budget(5, position=10, max_model_len=100) == 5
    assert draft_budget(5, position=97, max_model_len=100) == 2
    assert draft_budget(5, position=99, max_model_len=100) == 0


def test_default_exit_layers_are_valid_and_increasing():
    assert default_exit_layers(32) == (8, 16, 24)
    for n in range(2, 64):
        layers = default_exit_layers(n)
        assert layers and all(1 <= x < n for x in layers)
        assert list(layers) == sorted(set(layers))
