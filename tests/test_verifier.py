"""The exact-match rule (no engine)."""

import torch

from vllm_adadecode.engine.verify import PLACEHOLDER_TOKEN_ID as P, exact_match


def test_keeps_agreeing_prefix_and_replaces_first_mismatch():
    out = exact_match(
        draft_token_ids=torch.tensor([5, 6, 7, 1, 2, 9]),
        num_draft_tokens=[3, 0, 3],
        target_token_ids=torch.tensor([5, 6, 8, 1, 2, 9]),
        bonus_token_ids=torch.tensor([[40], [41], [42]]),
        max_spec_len=3,
    )
    assert out.tolist() == [
        [5, 6, 8, P],  # third draft wrong -> full model's 8, rest dropped
        [41, P, P, P],  # no drafts -> the (sampled or greedy) bonus token
        [1, 2, 9, 42],  # all agree -> bonus follows
    ]


def test_first_draft_wrong_emits_only_the_full_models_token():
    out = exact_match(torch.tensor([3, 4]), [2], torch.tensor([7, 4]), torch.tensor([[1]]), 2)
    assert out.tolist() == [[7, P, P]]  # the later agreement does not count


def test_matches_greedy_decoding_on_random_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        B = int(torch.randint(1, 5, (1,), generator=g))
        lens = torch.randint(0, 4, (B,), generator=g).tolist()
        n = sum(lens)
        target = torch.randint(0, 3, (n,), generator=g)
        draft = torch.where(torch.rand(n, generator=g) < 0.7, target, (target + 1) % 3)
        bonus = torch.randint(0, 3, (B, 1), generator=g)
        out = exact_match(draft, lens, target, bonus, 3)
        k = 0
        for i, d in enumerate(lens):
            expect = []
            for j in range(d):
                expect.append(int(target[k + j]))
                if draft[k + j] != target[k + j]:
                    break
            else:
                expect.append(int(bonus[i]))
            k += d
            row = [t for t in out[i].tolist() if t != P]
            assert row == expect


def test_match_draws_keeps_drafts_while_they_equal_the_draws():
    from vllm_adadecode.engine.verify import match_draws

    drawn = torch.tensor([[5, 6, 7, 8],    # all 3 drafts hold: 3 + the next draw
                          [5, 9, 7, 8],    # second draft differs: emit 5, 9
                          [4, 6, 7, 8],    # first differs: emit the draw only
                          [5, 6, 7, 8],    # no drafts: the draw at depth 0
                          [5, 6, 7, 8]])   # judged only 1 of 3 (min-tokens): 5, 6
    drafts = [[5, 6, 7], [5, 6, 7], [5, 6, 7], [], [5, 6, 7]]
    out = match_draws(drafts, [3, 3, 3, 0, 1], drawn)
    assert out.tolist() == [[5, 6, 7, 8], [5, 9, -1, -1], [4, -1, -1, -1],
                            [5, -1, -1, -1], [5, 6, -1, -1]]
