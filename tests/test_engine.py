"""AdaDecode on the real vLLM engine (CPU): parity with vanilla, drafting, batching.

Every engine runs in a child process (one at a time); identical jobs are shared
between tests through the session-scoped ``engine`` fixture.
"""

import json
from pathlib import Path

import pytest

from vllm_adadecode.prompts import mixed

pytestmark = pytest.mark.engine

# adaptive off: these tests are about drafting itself, which must happen every step
# lookup off: they test early-exit self-drafts (lookups have tests of their own)
TINY_SPEC = {"method": "adadecode", "exit_layers": [1, 3, 5], "threshold": 0.005,
             "num_speculative_tokens": 4, "adaptive": False, "deferred": False,
             "lookup": False}
DEFERRED = {**TINY_SPEC, "deferred": True}
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
    """With ``sampled_drafts: false`` (vLLM's own sampler for sampled requests;
    position-keyed sampling has tests of its own in test_sampling.py)."""
    van = _tiny(engine, tiny_llama, sampling=MIXED_SAMPLING)
    ada = _tiny(engine, tiny_llama, sampling=MIXED_SAMPLING,
                speculative_config={**TINY_SPEC, "sampled_drafts": False})
    greedy = [i for i, s in enumerate(MIXED_SAMPLING) if s["temperature"] == 0]
    sampled = [i for i in range(8) if i not in greedy]
    for i in greedy:
        assert ada["token_ids"][i] == van["token_ids"][i]
    # Sampled requests get no drafts, so with a per-request seed they draw the
    # very same tokens as without speculation: the distribution is untouched.
    for i in sampled:
        assert ada["token_ids"][i] == van["token_ids"][i]
    # They really sample: each differs from the greedy answer to its own prompt.
    greedy = _tiny(engine, tiny_llama)
    assert all(ada["token_ids"][i] != greedy["token_ids"][i] for i in sampled)
    assert ada["spec"]["num_draft_tokens"] > 0


# Greedy requests whose greedy token vLLM's sampler may move: allowed tokens,
# repetition penalty, logprobs, min-tokens, logit bias (which vLLM refuses
# with its own speculative methods). While any is in the batch, drafts
# are verified on vLLM's own processed logits; otherwise on the raw argmax.
PROCESSED_GREEDY = [
    {"temperature": 0.0, "allowed_token_ids": [1000, 1001, 1002]},
    {"temperature": 0.0, "repetition_penalty": 1.3},
    {"temperature": 0.0, "logprobs": 3},
    {"temperature": 0.0, "min_tokens": 40},
    {"temperature": 0.0, "logit_bias": {"1000": 8.0}},
] + [{"temperature": 0.0}] * 3


def test_greedy_rows_with_logits_processing_identical_to_vanilla(engine, tiny_llama):
    van = _tiny(engine, tiny_llama, sampling=PROCESSED_GREEDY)
    ada = _tiny(engine, tiny_llama, sampling=PROCESSED_GREEDY, speculative_config=DEFERRED)
    assert ada["token_ids"] == van["token_ids"]
    assert set(van["token_ids"][0]) <= {1000, 1001, 1002}  # the mask took effect
    assert van["token_ids"][4].count(1000) > 0  # and the bias
    spec = ada["spec"]
    assert 0 < spec["num_accepted_tokens"] < spec["num_draft_tokens"]


def test_engines_one_after_another_in_one_process(engine, tiny_llama):
    """``LLM(...)``, ``del``, ``LLM(...)`` in one process: a second engine starts
    after a first one drafted from lookups (which loads numba), and a third
    after it; each gives vanilla's tokens. (vLLM 0.32's CPU worker could not
    start a second engine once numba was loaded; the plugin registers vLLM's
    CPU kernel overrides once per process.) The test suite's job host relies
    on this; here it is checked on its own."""
    host = engine.host  # the session's job host (it may have run jobs before)
    job = dict(model=tiny_llama, prompts=PROMPTS8[:4], max_tokens=16, concurrency=4,
               enforce_eager=True, progress=False, warmup=False)
    looked = host.run({**job, "speculative_config": {**TINY_SPEC, "lookup": True}})
    van = host.run(job)
    again = host.run({**job, "speculative_config": {**TINY_SPEC, "lookup": True}})
    assert looked["pid"] == van["pid"] == again["pid"]  # one process
    assert looked["token_ids"] == van["token_ids"] == again["token_ids"]
    assert looked["spec"]["num_draft_tokens"] == again["spec"]["num_draft_tokens"] > 0


# Tensor parallelism: the TP=2 engines are test_lookup_engine.py's (mp executor:
# lookups, the response cache and self-drafts, deferred verification) and
# test_ray.py's (Ray executor: self-drafts verified by recomputation, with the
# back-off on, both ranks following rank 0's decision). Each costs three
# processes, so no other test starts one.


SMOL32 = [p.text for p in mixed(32)]


@pytest.mark.full
def test_smollm2_32_prompts_128_tokens_identical_to_vanilla(engine, smollm2):
    """Full tier: the real-model parity sweep with the default settings (the
    default suite checks them on 10 prompts: test_default_settings_draft_from_lookups)."""
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
                                     "threshold": 0.05, "adaptive": False,
                                     "lookup": False})
    spec = ada["spec"]
    # Measured (greedy, no back-off: the same on every run of vLLM 0.32): 439
    # drafts, all accepted, 7.75 tokens per step. The bounds leave 4x margins:
    # they check that drafting happened and ran deep, not its exact amount;
    # the equality is the point of the test.
    assert spec["num_draft_tokens"] > 100
    assert spec["num_accepted_tokens"] == spec["num_draft_tokens"]
    assert ada["tokens_per_step"] > 2.0


# ---- deferred-layer verification ---------------------------------------------
def test_deferred_verification_tiny_parity_and_layer_savings(engine, tiny_llama):
    van = _tiny(engine, tiny_llama)
    rec = _tiny(engine, tiny_llama, speculative_config=TINY_SPEC)
    dfr = _tiny(engine, tiny_llama, speculative_config=DEFERRED)
    assert dfr["token_ids"] == van["token_ids"]
    spec = dfr["spec"]
    assert 0 < spec["num_accepted_tokens"] < spec["num_draft_tokens"]
    # same drafts as with recomputation: verification order does not change them
    assert spec["num_draft_tokens"] == rec["spec"]["num_draft_tokens"]
    d = dfr["drafter"]
    assert d["verify_layers_skipped"] > 0 and rec["drafter"]["verify_layers_skipped"] == 0
    # every drafted position skipped exactly the layers the drafter ran:
    # skipped + still owed = L per drafted position
    L = d["num_layers"]
    drafted_positions = d["verify_layers_skipped"] + d["deferred_layer_evals"]
    assert drafted_positions % L == 0
    assert drafted_positions // L == spec["num_draft_tokens"]
    # last attempts without a confident exit were resumed, not run again
    assert d["attempt_layers_reused"] > 0 and rec["drafter"]["attempt_layers_reused"] == 0


def test_compiled_drafter_and_deferred_forward_match_compiled_vanilla(engine, tiny_llama):
    """Without enforce_eager the drafter's layer segments and the deferred
    forward run as torch.compile graphs, like vLLM's own forward. The one
    compiled-engine test of the default suite (about 2.5 minutes: each
    compiled start costs a minute); the full tier adds a second start that
    loads the saved segments, and SmolLM2 compiled."""
    van = _tiny(engine, tiny_llama, enforce_eager=False)
    dfr = _tiny(engine, tiny_llama, speculative_config=DEFERRED, enforce_eager=False)
    assert dfr["token_ids"] == van["token_ids"]
    assert 0 < dfr["spec"]["num_accepted_tokens"] < dfr["spec"]["num_draft_tokens"]
    d = dfr["drafter"]
    # exit layers 1, 3, 5 of 6: pieces [0, 2), [2, 4), [4, 6), all compiled at
    # engine start, so serving compiled nothing
    assert d["compiled_segments"] == 3
    assert d["graphs_compiled_serving"] == 0
    # each piece's two graphs (one row, several rows) were either loaded from
    # an earlier start's artifacts or compiled ahead of time and saved
    assert d["segments_loaded"] + d["segments_saved"] == 6


@pytest.mark.full
def test_second_compiled_start_loads_every_segment(engine, tiny_llama):
    """Full tier: a second start on the same cache loads all six graphs and
    decodes the same tokens (warm starts)."""
    van = _tiny(engine, tiny_llama, enforce_eager=False)
    first = _tiny(engine, tiny_llama, speculative_config=DEFERRED, enforce_eager=False)
    again = _tiny(engine, tiny_llama, speculative_config=DEFERRED, enforce_eager=False,
                  start=2)  # a job of its own: a second engine start
    assert again["token_ids"] == van["token_ids"]
    assert again["spec"]["num_draft_tokens"] == first["spec"]["num_draft_tokens"]
    assert again["drafter"]["segments_loaded"] == 6
    assert again["drafter"]["segments_saved"] == 0
    assert again["drafter"]["graphs_compiled_serving"] == 0


@pytest.mark.full
def test_smollm2_compiled_identical_to_compiled_vanilla(engine, smollm2):
    """Full tier: SmolLM2 compiled (no enforce_eager), the shipped heads,
    drafting on every step: vanilla's tokens. Each compiled SmolLM2 start
    costs 1.5-3 minutes here, which is why the default suite compiles only
    the tiny model."""
    from .test_lookup_engine import _smol

    van = _smol(engine, smollm2, enforce_eager=False)
    ada = _smol(engine, smollm2, enforce_eager=False,
                speculative_config={"method": "adadecode", "adaptive": False})
    assert ada["token_ids"] == van["token_ids"]
    assert 0 < ada["spec"]["num_accepted_tokens"] < ada["spec"]["num_draft_tokens"]
    assert ada["drafter"]["compiled_segments"] >= 1
    assert ada["drafter"]["graphs_compiled_serving"] == 0


def test_deferred_verification_mixed_batch_with_prefills(engine, tiny_llama):
    """Sampled rows, greedy rows with drafts and prefill chunks share steps.

    Sampled rows are unseeded here: vLLM 0.32 on CPU fails on seeded requests
    whose prefill is chunked (CPU generators have no offset to rewind), with or
    without speculation.
    """
    sampling = [{"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8}
                for i in range(8)]
    job = dict(sampling=sampling, max_num_batched_tokens=64,  # prompts prefill in chunks
               return_prompt_ids=True)
    van = _tiny(engine, tiny_llama, **job)
    dfr = _tiny(engine, tiny_llama, speculative_config=DEFERRED, **job)
    assert sum(len(p) > 64 for p in dfr["prompt_token_ids"]) >= 2  # really chunked
    for i in range(0, 8, 2):
        assert dfr["token_ids"][i] == van["token_ids"][i]
    # The sampled rows ran to their end and really sampled: each differs from
    # the greedy answer to its prompt, and from vanilla's unseeded draw.
    greedy = _tiny(engine, tiny_llama)
    for i in range(1, 8, 2):
        assert 0 < len(dfr["token_ids"][i]) <= 48
        assert dfr["token_ids"][i] != greedy["token_ids"][i]
    assert dfr["drafter"]["verify_layers_skipped"] > 0
    assert 0 < dfr["spec"]["num_accepted_tokens"] < dfr["spec"]["num_draft_tokens"]


def test_deferred_verification_prefix_cache_holds_complete_kv(engine, tiny_llama):
    """A second round re-reads, from the prefix cache, blocks written while
    verifying drafts; wrong deep-layer KV there would change its output."""
    job = dict(second_round=True, enable_prefix_caching=True, block_size=32)
    van = _tiny(engine, tiny_llama, **job)
    dfr = _tiny(engine, tiny_llama, speculative_config=DEFERRED, **job)
    assert dfr["token_ids"] == van["token_ids"]
    assert dfr["second_round"]["token_ids"] == van["second_round"]["token_ids"]
    assert dfr["second_round"]["prefix_cache_hit_tokens"] > 0


SMOL_IDENTITY = {"method": "adadecode", "heads": "identity", "exit_layers": [18, 24],
                 "threshold": 0.5, "adaptive": False, "deferred": True}


def test_deferred_verification_smollm2_identical(engine, smollm2):
    """Identity exit heads at layers 18 and 24 of 30, deferred verification,
    on the 10 prompts the lookup tests use (their vanilla job is shared)."""
    from .test_lookup_engine import _smol

    van = _smol(engine, smollm2)
    dfr = _smol(engine, smollm2, speculative_config=SMOL_IDENTITY)
    assert dfr["token_ids"] == van["token_ids"]
    # Measured: 193 of 976 drafts accepted (10 prompts, 64 tokens, the same on
    # every run: greedy, no back-off). 50 leaves a 3.9x margin; the check is
    # that identity exits at these depths are still kept, and still rejected.
    assert dfr["spec"]["num_accepted_tokens"] > 50
    assert dfr["spec"]["num_accepted_tokens"] < dfr["spec"]["num_draft_tokens"]
    assert dfr["drafter"]["verify_layers_skipped"] > 0


@pytest.mark.full
def test_deferred_verification_smollm2_32_prompts_identical(engine, smollm2):
    """Full tier: the same on 32 prompts of 128 tokens."""
    job = dict(model=smollm2, prompts=SMOL32, max_tokens=128, concurrency=8, dtype="float32")
    van = engine(**job)
    dfr = engine(**job, speculative_config=SMOL_IDENTITY)
    same = [a == b for a, b in zip(dfr["token_ids"], van["token_ids"])]
    assert all(same), f"{same.count(False)} of 32 outputs differ"
    # the 10-prompt run accepts 193 (above); 32 prompts of twice the length
    # accept several times that: 100 is a floor, not an estimate
    assert dfr["spec"]["num_accepted_tokens"] > 100
    assert dfr["drafter"]["verify_layers_skipped"] > 0


@pytest.fixture(scope="module")
def tiny_shortlist_heads(tiny_llama, tmp_path_factory):
    """Identity heads at TINY_SPEC's layers, with the whole vocabulary and with
    half of it as shortlist."""
    import torch

    from vllm_adadecode.heads import ExitHeads, base_model_fingerprint

    cfg = json.loads((Path(tiny_llama) / "config.json").read_text())
    root = tmp_path_factory.mktemp("shortlist")
    out = {}
    for name, ids in (("all", torch.arange(cfg["vocab_size"])),
                      ("half", torch.arange(0, cfg["vocab_size"], 2))):
        heads = ExitHeads.identity(TINY_SPEC["exit_layers"], cfg["hidden_size"],
                                   base_model_fingerprint=base_model_fingerprint(tiny_llama))
        heads.shortlist = ids
        out[name] = str(heads.save(root / name))
    return out


def test_shortlist_screen_keeps_every_exit_decision(engine, tiny_llama, tiny_shortlist_heads):
    """Screening on a shortlist that holds the whole vocabulary changes no exit
    decision (the same drafts as the full LM head) while sending only the rows
    that pass the screen to the full LM head; a half-vocabulary shortlist still
    gives vanilla's tokens."""
    van = _tiny(engine, tiny_llama)
    full = _tiny(engine, tiny_llama, speculative_config=TINY_SPEC)
    every = _tiny(engine, tiny_llama,
                  speculative_config={**TINY_SPEC, "heads": tiny_shortlist_heads["all"]})
    half = _tiny(engine, tiny_llama,
                 speculative_config={**TINY_SPEC, "heads": tiny_shortlist_heads["half"]})
    assert every["token_ids"] == van["token_ids"] and half["token_ids"] == van["token_ids"]
    assert every["drafter"]["exits"] == full["drafter"]["exits"]
    assert every["spec"]["num_draft_tokens"] == full["spec"]["num_draft_tokens"]
    d = every["drafter"]
    assert 0 < d["full_head_evals"] < d["head_evals"]
    assert full["drafter"]["full_head_evals"] == full["drafter"]["head_evals"]
    assert half["spec"]["num_draft_tokens"] > 0
    # "shortlist": false: the heads' shortlist is ignored, every exit check
    # uses the full LM head, and the drafts are the full head's
    off = _tiny(engine, tiny_llama, speculative_config={
        **TINY_SPEC, "heads": tiny_shortlist_heads["half"], "shortlist": False})
    assert off["token_ids"] == van["token_ids"]
    assert off["drafter"]["full_head_evals"] == off["drafter"]["head_evals"] > 0
    assert off["drafter"]["exits"] == full["drafter"]["exits"]
    # "full_head_check": false: greedy drafts exit on the shortlist's top-1 and
    # never reach the full LM head; verification keeps vanilla's tokens
    quick = _tiny(engine, tiny_llama, speculative_config={
        **TINY_SPEC, "heads": tiny_shortlist_heads["half"], "full_head_check": False})
    assert quick["token_ids"] == van["token_ids"]
    assert quick["drafter"]["full_head_evals"] == 0 < quick["drafter"]["head_evals"]
    assert quick["spec"]["num_draft_tokens"] > 0
