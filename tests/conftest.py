"""Shared fixtures. Engines run in child processes (vllm_adadecode.bench.worker),
one at a time; results are cached per session so each engine starts once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_adadecode.models import packaged_model_dir

    return str(packaged_model_dir())


TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,  # head_dim 32: the smallest the CPU attention backend takes
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def build_tiny_llama(out: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """A random Llama with SmolLM2's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        tie_word_embeddings=False,
        initializer_range=0.1,  # deep layers change the prediction: drafts get rejected
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **TINY,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # peakier logits: some exits are confident
        model.model.embed_tokens.weight.mul_(2.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for f in ("chat_template.jinja",):
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2))


class EngineRuns:
    """Memoised engine jobs: the same job runs once per session."""

    def __init__(self, log: Path):
        self.log = log
        self._cache: dict[str, dict] = {}

    def __call__(self, **job) -> dict:
        from vllm_adadecode.bench.worker import run_job

        key = json.dumps(job, sort_keys=True)
        if key not in self._cache:
            job.setdefault("enforce_eager", True)
            job.setdefault("progress", False)
            self._cache[key] = run_job(job, log_path=str(self.log))
        return self._cache[key]


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> EngineRuns:
    log = tmp_path_factory.mktemp("logs") / "engines.log"
    runs = EngineRuns(log)
    yield runs
    if os.environ.get("CI") and log.exists():
        print(f"\n[engine log: {log}]\n" + log.read_text()[-4000:])
