"""AdaDecode on the real vLLM engine (CPU): parity with vanilla, drafting, batching.

Every engine runs in a child process (one at a time); identical jobs are shared
between tests through the session-scoped ``engine`` fixture.
"""

import pytest

from vllm_adadecode.prompts import mixed

pytestmark = pytest.mark.engine

TINY_SPEC = {"method": "adadecode", "exit_layers": [1, 3, 5], "threshold": 0.005,
             "num_speculative_tokens": 4}
PROMPTS8 = [p.text for p in mixed(8)]
MIXED_SAMPLING = [
    {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": 100 + i}
    for i in range(8)
]


def _tiny(engine, model, **kw):
    job = dict(model=model, prompts=PROMPTS8, max_tokens=48, concurrency=4)
    job.update(kw)
    return engine(**job)


def test_tiny_llama_greedy_parity_with_drafts_kept_and_rejected(engine, tiny_llama):
    van = _tiny(engine, tiny_llama)
    ada = _tiny(engine, tiny_llama, speculative_config=TINY_SPEC)
    assert ada["token_ids"] == van["token_ids"]
    spec = ada["spec"]
    assert spec["num_draft_tokens"] > 0
    assert 0 < spec["num_accepted_tokens"] < spec["num_draft_tokens"]  # both paths ran
    assert len(spec["accepted_per_pos"]) == 4


def test_tiny_llama_mixed_greedy_and_sampled_batch(engine, tiny_llama):
    van = _tiny(engine, tiny_llama, sampling=MIXED_SAMPLING)
    ada = _tiny(engine, tiny_llama, sampling=MIXED_SAMPLING, speculative_config=TINY_SPEC)
    greedy = [i for i, s in enumerate(MIXED_SAMPLING) if s["temperature"] == 0]
    sampled = [i for i in range(8) if i not in greedy]
    for i in greedy:
        assert ada["token_ids"][i] == van["token_ids"][i]
    # Sampled requests get no drafts, so with a per-request seed they draw the
    # very same tokens as without speculation: the distribution is untouched.
    for i in sampled:
        assert ada["token_ids"][i] == van["token_ids"][i]
    assert any(ada["token_ids"][i] != ada["token_ids"][i - 1] for i in sampled)
    assert ada["spec"]["num_draft_tokens"] > 0


def test_tensor_parallel_2_gives_the_same_tokens(engine, tiny_llama):
    one = _tiny(engine, tiny_llama, speculative_config=TINY_SPEC)
    two = _tiny(engine, tiny_llama, speculative_config=TINY_SPEC, tensor_parallel_size=2)
    assert two["token_ids"] == one["token_ids"]
    assert two["spec"]["num_draft_tokens"] > 0


SMOL32 = [p.text for p in mixed(32)]


def test_smollm2_32_prompts_128_tokens_identical_to_vanilla(engine, smollm2):
    job = dict(model=smollm2, prompts=SMOL32, max_tokens=128, concurrency=8, dtype="float32")
    van = engine(**job)
    ada = engine(**job, speculative_config={"method": "adadecode"})
    same = [a == b for a, b in zip(ada["token_ids"], van["token_ids"])]
    assert all(same), f"{same.count(False)} of 32 outputs differ"
    assert sum(len(t) for t in van["token_ids"]) > 32 * 64
    assert ada["spec"]["num_draft_tokens"] > 0


def test_smollm2_exit_at_last_layer_accepts_every_draft(engine, smollm2):
    """The last layer's exit head (identity) is the full model: every draft is right."""
    ada = engine(model=smollm2, prompts=PROMPTS8, max_tokens=64, concurrency=4,
                 speculative_config={"method": "adadecode", "exit_layers": [29],
                                     "threshold": 0.05})
    spec = ada["spec"]
    assert spec["num_draft_tokens"] > 100
    assert spec["num_accepted_tokens"] == spec["num_draft_tokens"]
    assert ada["tokens_per_step"] > 2.0
