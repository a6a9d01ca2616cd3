"""What a request can ask for, through AdaDecode on the real engine (CPU).

One batch of SmolLM2 requests, each asking for something vLLM's sampler or
scheduler does on top of plain decoding: structured outputs (JSON schema,
regex, choice), logprobs and prompt logprobs, greedy n > 1, stop strings,
and sampled requests with bad words, allowed token ids, min_tokens and
presence/frequency penalties. Three engines run the same batch:

* vanilla vLLM;
* AdaDecode drafting on every step (``adaptive: false``: lookups, the corpus
  and self-drafts, no back-off);
* the same AdaDecode engine with drafting off.

Greedy requests must equal vanilla's, logprobs included. Sampled requests
must equal the drafting-off engine's (position-keyed sampling: a sampled
token does not depend on drafting), and each setting must show its effect.
A second test puts the tiny model under KV pressure with chunked prefill on,
so that the scheduler preempts requests that hold drafts.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from .test_engine import DEFERRED
from .test_lookup_engine import PASSAGE

pytestmark = pytest.mark.engine

PERSON = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
COPY = f"Repeat this text exactly, word for word:\n\n{PASSAGE}"
GREEDY = {
    "json": ("Alice is 30 years old. Describe her as JSON with her name and age.",
             {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}}),
    "regex": ("When did the first person walk on the moon? Give the date.",
              {"structured_outputs": {"regex": r"(19|20)\d\d-[01]\d-[0-3]\d"}}),
    "choice": ("Is the sky blue on a clear day? Answer yes or no.",
               {"structured_outputs": {"choice": ["yes", "no"]}}),
    "logprobs": (COPY, {"logprobs": 3, "prompt_logprobs": 2}),
    # vLLM refuses n > 1 at temperature 0; top_k=1 samples the argmax itself
    "n2": (COPY, {"n": 2, "temperature": 1.0, "top_k": 1, "seed": 5}),
    "stop": (COPY, {"stop": ["road repairs"]}),
}
SAMPLED = {
    "bad_words": (COPY, {"bad_words": [" the", " The", " to"]}),
    "allowed": (COPY, {}),  # allowed_token_ids: filled in from the prompt's tokens
    "min_tokens": ("Say hi.", {"min_tokens": 48}),
    "penalties": (COPY, {"presence_penalty": 1.0, "frequency_penalty": 1.0}),
}
NAMES = list(GREEDY) + list(SAMPLED)
MAX_TOKENS = 64
DRAFTING = {"method": "adadecode", "adaptive": False}
NO_DRAFTS = {**DRAFTING, "lookup": False, "self_draft": False}


@pytest.fixture(scope="module")
def runs(engine, smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    allowed = sorted(set(tok(PASSAGE)["input_ids"]) | {tok.eos_token_id})
    prompts, sampling = [], []
    for name in NAMES:
        text, fields = {**GREEDY, **SAMPLED}[name]
        fields = dict(fields)
        if name in SAMPLED:
            fields.update(temperature=0.8, seed=1000 + NAMES.index(name))
        else:
            fields.setdefault("temperature", 0.0)
        if name == "allowed":
            fields["allowed_token_ids"] = allowed
        prompts.append(text)
        sampling.append(fields)
    job = dict(model=smollm2, prompts=prompts, sampling=sampling, max_tokens=MAX_TOKENS,
               concurrency=len(prompts), details=True, return_prompt_ids=True)
    out = {"vanilla": engine(**job), "drafting": engine(**job, speculative_config=DRAFTING),
           "off": engine(**job, speculative_config=NO_DRAFTS)}
    return out, tok, allowed


def _row(res, name):
    return res["details"][NAMES.index(name)]


def _text(res, name, k=0):
    return _row(res, name)["completions"][k]["text"]


def test_drafts_were_kept_and_rejected_in_this_batch(runs):
    out, _, _ = runs
    d = out["drafting"]
    assert 0 < d["spec"]["num_accepted_tokens"] < d["spec"]["num_draft_tokens"]
    assert not out["off"]["spec"]["num_draft_tokens"]
    # requests of every kind got drafts verified (per-request counters)
    verified = {name: st for name, st in zip(NAMES, d["drafter"]["per_prompt"]) if st}
    assert {"logprobs", "n2", "stop", "bad_words", "penalties"} <= set(verified), verified


@pytest.mark.parametrize("name", list(GREEDY))
def test_greedy_request_identical_to_vanilla(runs, name):
    out, _, _ = runs
    van, ada = _row(out["vanilla"], name), _row(out["drafting"], name)
    assert [c["token_ids"] for c in ada["completions"]] == \
        [c["token_ids"] for c in van["completions"]]
    assert [c["finish_reason"] for c in ada["completions"]] == \
        [c["finish_reason"] for c in van["completions"]]


def test_structured_outputs_follow_their_schema(runs):
    out, _, _ = runs
    for res in (out["vanilla"], out["drafting"]):
        person = json.loads(_text(res, "json"))
        assert set(person) == {"name", "age"} and isinstance(person["age"], int), person
        assert re.fullmatch(r"(19|20)\d\d-[01]\d-[0-3]\d", _text(res, "regex"))
        assert _text(res, "choice") in ("yes", "no")


def _close(a, b):
    """Two {token: logprob} lists: the same tokens, the same values (to fp32
    rounding: a verification forward covers other rows than a plain step)."""
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        if pa is None or pb is None:
            assert pa is pb
            continue
        assert set(pa) == set(pb)
        for t in pa:
            assert math.isclose(pa[t], pb[t], rel_tol=1e-4, abs_tol=1e-4), (t, pa[t], pb[t])


def test_logprobs_and_prompt_logprobs_equal_vanilla(runs):
    out, _, _ = runs
    van, ada = _row(out["vanilla"], "logprobs"), _row(out["drafting"], "logprobs")
    lp_van, lp_ada = van["completions"][0]["logprobs"], ada["completions"][0]["logprobs"]
    assert len(lp_ada) == len(ada["completions"][0]["token_ids"]) > 10
    # 3 alternatives per position, plus the sampled token when it is not among them
    assert all(3 <= len(p) <= 4 for p in lp_ada)
    _close(lp_ada, lp_van)
    plp = ada["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(out["drafting"]["prompt_token_ids"][
        NAMES.index("logprobs")])
    _close(plp, van["prompt_logprobs"])


def test_greedy_n2_gives_two_completions_equal_to_the_greedy_answer(runs):
    """n=2 with top_k=1: sampled requests (drafted and verified on the sampled
    path) whose every draw is the argmax, so both completions are the greedy
    answer to the same prompt."""
    out, _, _ = runs
    greedy = _row(out["vanilla"], "logprobs")["completions"][0]["token_ids"]  # same prompt
    for name in ("vanilla", "drafting"):
        comps = _row(out[name], "n2")["completions"]
        assert len(comps) == 2
        assert comps[0]["token_ids"] == comps[1]["token_ids"] == greedy, name


def test_stop_string_ends_the_request(runs):
    out, _, _ = runs
    for res in (out["vanilla"], out["drafting"]):
        c = _row(res, "stop")["completions"][0]
        assert c["finish_reason"] == "stop" and c["stop_reason"] == "road repairs", c
        assert "road repairs" not in c["text"] and "library wing" in c["text"]


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_request_does_not_depend_on_drafting(runs, name):
    out, _, _ = runs
    on, off = _row(out["drafting"], name), _row(out["off"], name)
    assert on["completions"][0]["token_ids"] == off["completions"][0]["token_ids"]


def test_sampled_settings_take_effect(runs):
    out, tok, allowed = runs
    res, van = out["drafting"], out["vanilla"]
    banned = {tuple(tok(w, add_special_tokens=False)["input_ids"]) for w in SAMPLED[
        "bad_words"][1]["bad_words"]}
    ids = _row(res, "bad_words")["completions"][0]["token_ids"]
    assert all(len(b) == 1 for b in banned)  # each a single token here
    assert not {b[0] for b in banned} & set(ids)
    greedy_copy = _row(van, "logprobs")["completions"][0]["token_ids"]  # the same prompt
    assert {b[0] for b in banned} & set(greedy_copy)  # unbanned, the copy uses them
    assert set(_row(res, "allowed")["completions"][0]["token_ids"]) <= set(allowed)
    assert len(_row(res, "min_tokens")["completions"][0]["token_ids"]) >= 48
    assert len(_row(van, "min_tokens")["completions"][0]["token_ids"]) >= 48
    # penalised, the copy drifts from the greedy copy sooner than unpenalised text would
    pen = _row(res, "penalties")["completions"][0]["token_ids"]
    assert pen != greedy_copy


def test_preemption_under_kv_pressure_with_chunked_prefill(engine, tiny_llama):
    """The tiny model, greedy, prompts prefilled in 64-token chunks and 24 KV
    blocks of 32 tokens (768 tokens) for 8 requests of 76-177 prompt tokens
    and 128 new ones: the scheduler preempts requests (their drafted slots
    included) and runs them again; the tokens equal vanilla's under the same
    pressure."""
    from vllm_adadecode.prompts import humaneval

    prompts = [p.text[:900] for p in humaneval()[:8]]
    job = dict(model=tiny_llama, prompts=prompts, raw_prompts=True, max_tokens=128,
               sampling=[{"temperature": 0.0, "ignore_eos": True}] * 8,
               concurrency=8, max_num_batched_tokens=64, block_size=32,
               num_gpu_blocks_override=24, max_model_len=512, return_prompt_ids=True)
    van = engine(**job)
    ada = engine(**job, speculative_config=DEFERRED)
    assert ada["token_ids"] == van["token_ids"]
    assert max(len(p) for p in ada["prompt_token_ids"]) > 64  # prefilled in chunks
    assert van["spec"]["preemptions"] > 0 and ada["spec"]["preemptions"] > 0
    assert 0 < ada["spec"]["num_accepted_tokens"] < ada["spec"]["num_draft_tokens"]
