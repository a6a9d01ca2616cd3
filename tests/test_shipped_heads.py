"""The exit heads and corpora shipped for SmolLM2-135M-Instruct,
Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B-Instruct (whose corpus is the
0.5B's)."""

import json
from pathlib import Path

import pytest
import torch

from vllm_adadecode.heads import SHIPPED_DIR, ExitHeads, base_model_fingerprint

# (folder, model fixture, hidden size, vocabulary, shortlist size, largest weights file)
SHIPPED = [("SmolLM2-135M-Instruct", "smollm2", 576, 49152, 4096, 10 * 2**20),
           ("Qwen2.5-Coder-0.5B-Instruct", "qwen05b", 896, 151936, 1423, 10 * 2**20),
           # one 1536 x 1536 head (layer 3), stored in fp16
           ("Qwen2.5-Coder-1.5B-Instruct", "qwen15b", 1536, 151936, 4500, 5 * 2**20)]
WITH_CORPUS = [s for s in SHIPPED if (SHIPPED_DIR / s[0] / "corpus.safetensors").is_file()]


@pytest.fixture(params=SHIPPED, ids=[s[0] for s in SHIPPED])
def shipped(request):
    name, fixture, hidden, vocab, shortlist, size = request.param
    return dict(heads=SHIPPED_DIR / name, model=request.getfixturevalue(fixture),
                hidden=hidden, vocab=vocab, shortlist=shortlist, size=size)


def test_shipped_heads_match_the_packaged_model(shipped):
    folder = shipped["heads"]
    heads = ExitHeads.load(folder)
    assert heads.base_model_fingerprint == base_model_fingerprint(shipped["model"])
    assert heads.hidden_size == shipped["hidden"] and heads.metadata["trained"] is True
    assert (folder / "exit_heads.safetensors").stat().st_size < shipped["size"]  # small
    # the vocabulary shortlist covers most of the model's held-out response tokens
    assert heads.shortlist is not None and heads.shortlist.numel() == shipped["shortlist"]
    assert int(heads.shortlist.max()) < shipped["vocab"]
    assert heads.metadata["training"]["shortlist_held_out_coverage"] > 0.8


def test_shipped_heads_are_the_default_for_their_model(shipped):
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=shipped["model"], speculative_config={"method": "adadecode"}) \
        .create_engine_config()
    ada = cfg.additional_config["adadecode"]
    heads = ExitHeads.load(shipped["heads"])
    assert ada["heads"] == str(shipped["heads"].resolve())
    assert ada["exit_layers"] == heads.exit_layers and ada["threshold"] == heads.threshold


def test_shipped_heads_are_not_used_for_another_model(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=tiny_llama, speculative_config={"method": "adadecode"}) \
        .create_engine_config()
    assert cfg.additional_config["adadecode"]["heads"] is None


@pytest.mark.parametrize("name", [s[0] for s in SHIPPED])
def test_training_prompts_are_disjoint_from_every_evaluated_prompt(name):
    from vllm_adadecode import prompts as P
    from vllm_adadecode.training.data import load_prompts

    t = json.loads((SHIPPED_DIR / name / "config.json").read_text())["training"]
    train = load_prompts(t["data"], t["num_prompts"], t["seed"])
    assert len(train) == t["num_prompts"]
    if t.get("text_corpus"):  # heads trained on a corpus's answers: that corpus's prompts too
        c = json.loads((SHIPPED_DIR / t["text_corpus"] / "config.json").read_text())["corpus"]
        train += load_prompts(c["data"], c["num_prompts"], c["seed"])
        assert len(train) > t["num_prompts"]
    evaluated = {p.text for p in P.humaneval("eval") + P.mtbench("eval") + P.sharegpt("eval")}
    assert evaluated and not evaluated & {p.text for p in train}


def test_explicit_layers_outside_the_shipped_heads_use_identity_heads(smollm2):
    from vllm.engine.arg_utils import EngineArgs

    for spec in ({"exit_layers": [29]}, {"heads": "identity"}):
        cfg = EngineArgs(model=smollm2, speculative_config={"method": "adadecode", **spec}) \
            .create_engine_config()
        assert cfg.additional_config["adadecode"]["heads"] is None


@pytest.mark.parametrize("name, vocab", [(s[0], s[3]) for s in WITH_CORPUS])
def test_shipped_corpus_is_the_models_answers_to_training_prompts_only(name, vocab):
    import numpy as np

    from vllm_adadecode import prompts as P
    from vllm_adadecode.drafts.corpus import DraftCorpus, load_corpus_tokens
    from vllm_adadecode.training.data import load_prompts

    folder = SHIPPED_DIR / name
    c = json.loads((folder / "config.json").read_text())["corpus"]
    prompts = load_prompts(c["data"], c["num_prompts"], c["seed"])
    assert len(prompts) == c["num_prompts"]
    evaluated = {p.text for p in P.humaneval("eval") + P.mtbench("eval") + P.sharegpt("eval")
                 + P.documents("eval")}
    assert evaluated and not evaluated & {p.text for p in prompts}
    tokens = load_corpus_tokens(folder, vocab_size=vocab)
    assert int((tokens == -1).sum()) <= c["num_prompts"]  # one separator per answer
    assert DraftCorpus(tokens).num_tokens == c["tokens"] == int(np.sum(tokens >= 0))


def test_the_15b_heads_borrow_the_05b_corpus():
    """The 1.5B's folder has no corpus of its own: its config.json names the
    0.5B's (the same tokenizer), which the engine then loads by default."""
    from vllm_adadecode.config import _borrowed_corpus

    folder = SHIPPED_DIR / "Qwen2.5-Coder-1.5B-Instruct"
    heads = ExitHeads.load(folder)
    assert not (folder / "corpus.safetensors").exists()
    assert heads.metadata["corpus_from"] == "Qwen2.5-Coder-0.5B-Instruct"
    assert _borrowed_corpus(str(folder), heads.metadata["corpus_from"]) == str(
        (SHIPPED_DIR / "Qwen2.5-Coder-0.5B-Instruct").resolve())
    assert {t.dtype for t in heads.transforms.values()} == {torch.float16}
    # drafting at layer 3 only, on the shortlist's top-1 (heads-defaults; the
    # training run's three heads: docs/performance/models.md)
    assert heads.exit_layers == [3] and heads.threshold == 0.5
    assert heads.metadata["full_head_check"] is False
    assert set(heads.metadata["training"]["held_out_agreement"]) == {"3", "5", "8"}


def test_the_15b_default_config_loads_the_05b_corpus(qwen15b, qwen05b):
    from vllm.engine.arg_utils import EngineArgs

    assert (Path(qwen15b) / "tokenizer.json").read_bytes() == \
        (Path(qwen05b) / "tokenizer.json").read_bytes()
    cfg = EngineArgs(model=qwen15b, speculative_config={"method": "adadecode"}) \
        .create_engine_config()
    assert cfg.additional_config["adadecode"]["corpus"] == str(
        (SHIPPED_DIR / "Qwen2.5-Coder-0.5B-Instruct").resolve())


def test_shortlist_text_comes_from_train_split_conversations_only():
    """``shortlist --source text`` counts the replies of train-split ShareGPT
    conversations; no eval-split conversation contributes."""
    from vllm_adadecode import prompts as P

    train, evals = P._sharegpt_split("train"), P._sharegpt_split("eval")
    assert train and evals and not {p.text for p, _ in train} & {p.text for p, _ in evals}
    replies = P.sharegpt_replies("train", 50)
    assert len(replies) == 50 and all(isinstance(r, str) and r for r in replies)
    first = [t.get("value") for _, conv in train for t in conv
             if t.get("from") in ("gpt", "assistant", "chatgpt") and t.get("value")][:50]
    assert replies == first
