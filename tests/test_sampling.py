"""Position-keyed sampling: a sampled request's tokens do not depend on
speculation, and they follow the distribution vLLM's processing defines.

Unit tests check the keys and the kernel draw; engine tests (real vLLM, CPU)
check (a) seeded sampled outputs identical with drafting on, off and at draft
lengths 1 and 5, mixed with greedy rows in one batch; (b) the distribution of a
position's token over many seeds against the processed softmax; (c) top-k,
top-p, min-p, repetition penalty and logit bias each shaping it as vLLM's
sampler does; (d) greedy rows unchanged.

The statistical tests are chi-square goodness-of-fit tests at a false-alarm
rate of 1e-3 each (6 of them: at most 0.6% for the file, if the keyed noise
behaves as independent draws); their seeds are fixed, so a run either always
passes or always fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_adadecode import sampling

ALPHA = 1e-3


# ---- keys and seeds (no engine) ------------------------------------------
def test_keys_are_a_fixed_function_of_seed_and_position():
    k1 = sampling.keys([7, 7, 8], [100, 101, 100])
    k2 = sampling.keys([7, 7, 8], [100, 101, 100])
    assert torch.equal(k1, k2)
    assert len(set(k1.tolist())) == 3  # seed and position both matter
    assert (k1 >= 0).all()
    # Large and negative seeds map into the kernel's non-negative range too.
    big = sampling.keys([2**62, -5], [0, 2**40])
    assert (big >= 0).all() and big.dtype == torch.int64


def test_seeds_drawn_at_arrival_repeat_across_ranks_and_keep_given_seeds():
    a, b = sampling.Seeds(0), sampling.Seeds(0)
    draws_a = [a.get(f"r{i}", None) for i in range(5)]
    draws_b = [b.get(f"r{i}", None) for i in range(5)]
    assert draws_a == draws_b  # every tensor-parallel rank draws the same seeds
    assert len(set(draws_a)) == 5
    assert a.get("r0", None) == draws_a[0]  # drawn once per request
    assert a.get("given", 1234) == 1234
    a.retain({"given"})
    assert len(a) == 1
    assert sampling.Seeds(1).get("r0", None) != draws_a[0]


def test_step_keys_advance_with_depth():
    step = sampling.StepKeys(np.array([3, 4]), np.array([10, 20]))
    assert torch.equal(step.at_depth(2), sampling.keys([3, 4], [12, 22]))


# ---- the kernel draw (vLLM's CPU Gumbel-max, no engine) --------------------
@pytest.fixture(scope="module")
def gumbel_argmax():
    from vllm_adadecode.engine import sampler

    if not sampler.keyed_sampling_supported():
        pytest.skip("vLLM's CPU Gumbel-max kernel is not available")
    return sampler.gumbel_argmax


def test_keyed_draw_depends_only_on_its_row(gumbel_argmax):
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    keys = sampling.keys(np.arange(6), np.full(6, 50))
    full = gumbel_argmax(logits, keys)
    for i in range(6):  # alone, or in another batch, a row draws the same token
        assert gumbel_argmax(logits[i: i + 1], keys[i: i + 1]).item() == full[i].item()
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    assert torch.equal(gumbel_argmax(logits[perm], keys[perm]), full[perm])


def test_keyed_draws_follow_the_softmax(gumbel_argmax):
    from scipy.stats import chisquare

    torch.manual_seed(1)
    logits = torch.randn(64) * 2.0
    logits[40:] = float("-inf")  # a cut support, as top-k leaves it
    n = 20000
    keys = sampling.keys(np.full(n, 99), np.arange(n))
    drawn = gumbel_argmax(logits.expand(n, -1), keys)
    assert int(drawn.max()) < 40
    counts = np.bincount(drawn.numpy(), minlength=64)[:40]
    expected = torch.softmax(logits[:40], 0).double().numpy()
    assert chisquare(counts, expected * counts.sum() / expected.sum()).pvalue > ALPHA


# ---- engine tests ----------------------------------------------------------
from .test_engine import PROMPTS8, TINY_SPEC, _tiny  # noqa: E402

# Lookups and self-drafts (threshold 0.005: exits nearly always confident),
# every step drafting: drafts for sampled rows are kept and rejected.
KEYED = {**TINY_SPEC, "deferred": True, "lookup": True, "lookup_cache": False,
         "num_speculative_tokens": 5}
KEYED_1 = {**KEYED, "num_speculative_tokens": 1}
NO_DRAFTS = {**KEYED, "lookup": False, "self_draft": False}
MIXED = [
    {"temperature": 0.0},
    {"temperature": 0.3, "seed": 11},
    {"temperature": 0.7, "seed": 12, "top_p": 0.9},
    {"temperature": 0.0, "repetition_penalty": 1.2},
    {"temperature": 1.0, "seed": 13, "top_k": 20},
    {"temperature": 0.5, "seed": 14, "min_p": 0.05, "repetition_penalty": 1.1},
    {"temperature": 0.0},
    {"temperature": 0.3, "seed": 15, "logit_bias": {"1000": 2.0}},
]
SAMPLED = [i for i, s in enumerate(MIXED) if s["temperature"] > 0]
GREEDY = [i for i in range(len(MIXED)) if i not in SAMPLED]


@pytest.fixture(scope="module")
def keyed_runs(engine, tiny_llama):
    return {
        "k5": _tiny(engine, tiny_llama, sampling=MIXED, speculative_config=KEYED),
        "k1": _tiny(engine, tiny_llama, sampling=MIXED, speculative_config=KEYED_1),
        # No drafts, one request at a time: other batches, other steps.
        "off": _tiny(engine, tiny_llama, sampling=MIXED, speculative_config=NO_DRAFTS,
                     concurrency=1),
        "vanilla": _tiny(engine, tiny_llama, sampling=MIXED),
    }


@pytest.mark.engine
def test_seeded_sampled_outputs_do_not_depend_on_drafting(keyed_runs):
    k5, k1, off = keyed_runs["k5"], keyed_runs["k1"], keyed_runs["off"]
    for i in SAMPLED:
        assert k5["token_ids"][i] == off["token_ids"][i], f"request {i}"
        assert k1["token_ids"][i] == off["token_ids"][i], f"request {i}"
    # Drafts for sampled rows were kept and rejected.
    d = k5["drafter"]
    assert d["keyed_sampling"] is True
    assert 0 < d["accepted_by_sampling"]["sampled"] < d["drafted_by_sampling"]["sampled"]
    assert d["drafted_by_source"].get("exit", 0) > 0  # coupled self-drafts
    assert k1["drafter"]["drafted_by_sampling"]["sampled"] > 0
    assert not any(off["drafter"]["drafted_by_sampling"].values())
    # The sampled rows really sample (distinct seeds, distinct outputs).
    assert len({tuple(k5["token_ids"][i]) for i in SAMPLED}) == len(SAMPLED)


@pytest.mark.engine
def test_greedy_rows_mixed_with_keyed_sampled_rows_identical_to_vanilla(keyed_runs):
    for name in ("k5", "k1", "off"):
        for i in GREEDY:
            assert keyed_runs[name]["token_ids"][i] == keyed_runs["vanilla"]["token_ids"][i], (
                name, i)


SMOL_SAMPLED = [{"temperature": 0.6, "seed": 7 + i, "top_p": 0.95} for i in range(8)]


@pytest.mark.engine
def test_smollm2_sampled_lookup_drafts_identical_with_drafting_off(engine, smollm2):
    """The packaged model, sampled at temperature 0.6: lookup drafts (prompts
    that ask for a copy, code) are kept and rejected, and every request's tokens
    equal those of the same engine without drafts."""
    from .test_lookup_engine import LOOKUP_ONLY, _smol

    on = _smol(engine, smollm2, sampling=SMOL_SAMPLED, speculative_config=LOOKUP_ONLY)
    off = _smol(engine, smollm2, sampling=SMOL_SAMPLED,
                speculative_config={**LOOKUP_ONLY, "lookup": False})
    assert on["token_ids"] == off["token_ids"]
    d = on["drafter"]
    assert 0 < d["accepted_by_source"]["lookup"] < d["drafted_by_source"]["lookup"]
    assert d["accepted_by_sampling"]["sampled"] == on["spec"]["num_accepted_tokens"]
    # Measured 1.85 tokens per step (seeded, position-keyed: the same on every
    # run). 1.2 leaves a 35% margin; the check is that sampled lookups pay.
    assert on["tokens_per_step"] > 1.2
    assert not any(off["drafter"]["drafted_by_sampling"].values())


# (b) and (c): the first output token of one prompt over many seeds.
N_SEEDS = 1500
# For the tiny random model, one of this prompt's own tokens is among its
# likeliest next tokens (found by a search), so repetition penalty shows.
PROMPT = "The weather in the mountainsVENT was"


def _configs(bias_token: int) -> dict[str, dict]:
    return {
        "temperature": {"temperature": 0.4},
        "top_k": {"temperature": 0.6, "top_k": 8},
        "top_p": {"temperature": 0.5, "top_p": 0.5},
        "min_p": {"temperature": 0.5, "min_p": 0.15},
        "repetition_penalty": {"temperature": 0.4, "repetition_penalty": 2.0},
        "logit_bias": {"temperature": 0.4, "logit_bias": {str(bias_token): 0.6}},
    }


def _reference(logits: torch.Tensor, prompt_ids: list[int], cfg: dict) -> np.ndarray:
    """The processed distribution, step by step as vLLM's sampler processes."""
    x = logits.double().clone()
    for t, b in cfg.get("logit_bias", {}).items():
        x[int(t)] += b
    rp = cfg.get("repetition_penalty", 1.0)
    if rp != 1.0:
        ids = torch.tensor(sorted(set(prompt_ids)))
        x[ids] = torch.where(x[ids] > 0, x[ids] / rp, x[ids] * rp)
    x = x / cfg["temperature"]
    p = torch.softmax(x, 0)
    if "min_p" in cfg:
        p = torch.where(p >= cfg["min_p"] * p.max(), p, 0.0)
    if "top_k" in cfg:
        keep = torch.topk(p, cfg["top_k"]).indices
        p = torch.zeros_like(p).index_copy_(0, keep, p[keep])
    if "top_p" in cfg:
        order = torch.argsort(p, descending=True)
        before = torch.cumsum(p[order], 0) - p[order]  # mass above each token
        cut = torch.zeros_like(p)
        cut[order] = torch.where(before < cfg["top_p"] * p.sum(), p[order], 0.0)
        p = cut
    return (p / p.sum()).numpy()


@pytest.fixture(scope="module")
def tiny_next_token_logits(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return ids, logits


@pytest.fixture(scope="module")
def many_seeds(engine, tiny_llama, tiny_next_token_logits):
    ids, logits = tiny_next_token_logits
    bias_token = int(torch.argsort(logits, descending=True)[5])
    configs = _configs(bias_token)
    sampling_list, prompts = [], []
    for c, cfg in enumerate(configs.values()):
        for s in range(N_SEEDS):
            sampling_list.append({**cfg, "seed": 100_000 * (c + 1) + s})
            prompts.append(PROMPT)
    res = engine(model=tiny_llama, prompts=prompts, raw_prompts=True, max_tokens=1,
                 concurrency=64, sampling=sampling_list, return_prompt_ids=True,
                 speculative_config=KEYED)
    return configs, res


@pytest.mark.engine
@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p", "min_p",
                                  "repetition_penalty", "logit_bias"])
def test_token_distribution_over_seeds_matches_processed_softmax(
        name, many_seeds, tiny_next_token_logits):
    from scipy.stats import chisquare

    ids, logits = tiny_next_token_logits
    configs, res = many_seeds
    names = list(configs)
    c = names.index(name)
    got_ids = res["prompt_token_ids"][c * N_SEEDS]
    assert got_ids == ids  # the reference saw the engine's prompt
    drawn = np.array([t[0] for t in res["token_ids"][c * N_SEEDS:(c + 1) * N_SEEDS]])
    ref = _reference(logits, ids, configs[name])
    # Same support: nothing outside what the processing leaves.
    assert (ref[drawn] > 0).all(), f"{name}: a token outside the processed support"
    obs = np.bincount(drawn, minlength=len(ref))
    big = ref * N_SEEDS >= 5  # bins: tokens expected 5+ times, then the rest together
    assert big.sum() >= 3, f"{name}: too few bins for a test ({big.sum()})"
    f_obs, f_exp = _bins(obs, ref, big)
    assert chisquare(f_obs, f_exp).pvalue > ALPHA, name
    if name != "temperature":
        # The setting changed the outcome: the unprocessed distribution is refuted.
        base = _reference(logits, ids, {"temperature": configs[name]["temperature"]})
        f_obs0, f_exp0 = _bins(obs, base, base * N_SEEDS >= 5)
        assert chisquare(f_obs0, f_exp0).pvalue < ALPHA, f"{name} had no effect"


def _bins(obs: np.ndarray, ref: np.ndarray, big: np.ndarray):
    n = obs.sum()
    f_obs = np.append(obs[big], obs[~big].sum()).astype(float)
    f_exp = np.append(ref[big], ref[~big].sum()) * n
    if f_exp[-1] < 5:  # a remainder too small for its own bin joins the last one
        f_obs = np.append(f_obs[:-2], f_obs[-2:].sum())
        f_exp = np.append(f_exp[:-2], f_exp[-2:].sum())
    return f_obs, f_exp * f_obs.sum() / f_exp.sum()


@pytest.mark.engine
def test_seeded_requests_prefilled_in_chunks(engine, tiny_llama):
    """vLLM 0.32 on CPU kills the engine when a seeded request's prompt is
    prefilled in chunks (it rolls the request's generator back with
    set_offset, which CPU generators lack). With position-keyed sampling the
    engine serves them, and the tokens equal those of an unchunked prefill."""
    from vllm_adadecode.prompts import humaneval

    long_text = "\n\n".join(p.text for p in humaneval()[:12])
    prompts = [long_text[i * 50:] for i in range(4)]
    sampling = [{"temperature": 0.8, "seed": 40 + i} for i in range(4)]
    chunked = engine(model=tiny_llama, prompts=prompts, raw_prompts=True, max_tokens=16,
                     concurrency=4, sampling=sampling, speculative_config=KEYED,
                     max_num_batched_tokens=256, return_prompt_ids=True)
    whole = engine(model=tiny_llama, prompts=prompts, raw_prompts=True, max_tokens=16,
                   concurrency=4, sampling=sampling, speculative_config=KEYED)
    assert min(len(p) for p in chunked["prompt_token_ids"]) > 256  # really chunked
    assert chunked["token_ids"] == whole["token_ids"]
    assert all(len(t) == 16 for t in chunked["token_ids"])
