"""Run one vLLM engine job in this process and write its results as JSON.

    python -m vllm_adadecode.bench.worker JOB.json OUT.json

A job names the model, the speculative config (None for vanilla), the prompts
(user turns; the model's chat template is applied here), max_tokens and the
concurrency (vLLM's max_num_seqs). ``run_job`` starts this in a child process
with the CPU runtime environment, so only one engine exists at a time and it
is fully gone when the child exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SPEC_METRICS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_pos",
}


class _PeakRSS:
    """Peak resident memory of this process tree, sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def _counters(llm) -> dict[str, Any]:
    out: dict[str, Any] = {v: 0 for v in SPEC_METRICS.values()}
    out["accepted_per_pos"] = []
    for m in llm.get_metrics():
        key = SPEC_METRICS.get(m.name)
        if key is None:
            continue
        out[key] = list(m.values) if hasattr(m, "values") else m.value
    return out


def _delta(after: dict, before: dict) -> dict:
    d = {}
    for k, v in after.items():
        if isinstance(v, list):
            b = before.get(k) or [0] * len(v)
            d[k] = [x - y for x, y in zip(v, b + [0] * (len(v) - len(b)))]
        else:
            d[k] = v - before.get(k, 0)
    return d


def _start_engine(job: dict[str, Any], max_num_seqs: int):
    from vllm import LLM

    kwargs = dict(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 2048),
        max_num_seqs=max_num_seqs,
        seed=job.get("seed", 0),
        enforce_eager=job.get("enforce_eager", False),
        tensor_parallel_size=job.get("tensor_parallel_size", 1),
        disable_log_stats=False,
    )
    for key in ("max_num_batched_tokens", "enable_prefix_caching", "block_size",
                "async_scheduling", "distributed_executor_backend"):
        if job.get(key) is not None:
            kwargs[key] = job[key]
    if job.get("speculative_config"):
        kwargs["speculative_config"] = job["speculative_config"]
    return LLM(**kwargs)


def _sampling_fields(fields: dict) -> dict:
    """SamplingParams fields from JSON (whose object keys are strings)."""
    if "logit_bias" in fields:
        fields = {**fields, "logit_bias": {int(k): v for k, v in fields["logit_bias"].items()}}
    return fields


def _chat(tok, prompts: list[str]) -> list[str]:
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def _drafter_stats(llm) -> dict | None:
    """The AdaDecode drafter's counters (tensor-parallel ranks merged), reset on read."""
    from ..patches import STATS_RPC

    per_worker = [s for s in llm.collective_rpc(STATS_RPC) if s]
    if not per_worker:
        return None
    from ..proposer import merge_stats

    return merge_stats(per_worker)


def _step_times(llm) -> dict | None:
    """Seconds per part of the engine's steps since the last read (tensor-parallel
    rank 0); the first call installs the timers."""
    from ..patches import STEP_TIMES_RPC

    times = [t for t in llm.collective_rpc(STEP_TIMES_RPC) if t]
    return times[0] if times else None


def execute(job: dict[str, Any]) -> dict[str, Any]:
    if "runs" in job:
        return execute_sweep(job)
    from vllm import SamplingParams

    rss = _PeakRSS()
    t0 = time.perf_counter()
    llm = _start_engine(job, job.get("concurrency", 1))
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    texts = list(job["prompts"]) if job.get("raw_prompts") else _chat(tok, job["prompts"])
    max_tokens = job.get("max_tokens", 128)
    if job.get("sampling"):  # per-prompt SamplingParams fields, e.g. temperature, seed
        params = [SamplingParams(max_tokens=max_tokens, **_sampling_fields(s))
                  for s in job["sampling"]]
    else:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if job.get("warmup", True):
        llm.generate(texts[:2], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    before = _counters(llm)
    _drafter_stats(llm)  # reset
    t0 = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=job.get("progress", True))
    elapsed = time.perf_counter() - t0
    counters = _delta(_counters(llm), before)
    drafter = _drafter_stats(llm)
    second = None
    if job.get("second_round"):
        # Continue every conversation from its own output: its blocks (written
        # while verifying drafts) come back from the prefix cache when enabled.
        from vllm.inputs import TokensPrompt

        cont = [TokensPrompt(prompt_token_ids=list(o.prompt_token_ids) + list(
            o.outputs[0].token_ids)) for o in outs]
        outs2 = llm.generate(cont, SamplingParams(temperature=0.0, max_tokens=16),
                             use_tqdm=False)
        second = {"token_ids": [list(o.outputs[0].token_ids) for o in outs2],
                  "prefix_cache_hit_tokens": sum(o.num_cached_tokens or 0 for o in outs2)}
    from ..patches import WORKER_INFO_RPC

    workers = llm.collective_rpc(WORKER_INFO_RPC) if job.get("worker_info") else None
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    n_out = sum(len(t) for t in token_ids)
    result = {
        "startup_s": startup,
        "elapsed_s": elapsed,
        "output_tokens": n_out,
        "tokens_per_s": n_out / elapsed if elapsed > 0 else 0.0,
        "token_ids": token_ids,
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs] if job.get(
            "return_prompt_ids") else None,
        "texts": [o.outputs[0].text for o in outs],
        "spec": counters,
        "drafter": drafter,
        "second_round": second,
        "workers": workers,
        **acceptance_stats(counters, token_ids),
    }
    del llm
    result["peak_rss_mb"] = rss.stop() / 2**20
    return result


def _generate_inflight(llm, prompts: list[str], params, concurrency: int, tag: str,
                       progress: str | None):
    """Keep ``concurrency`` requests in flight (as a server would under that load)
    until every prompt is answered. Returns token ids, per-request latency, wall
    seconds and the request-id -> prompt-index map."""
    from tqdm import tqdm

    engine = llm.llm_engine
    n = len(prompts)
    tokens: list[list[int] | None] = [None] * n
    latency = [0.0] * n
    index: dict[str, int] = {}
    started: dict[int, float] = {}
    bar = tqdm(total=n, desc=progress, unit="req", leave=False, disable=progress is None)
    nxt = 0
    t0 = time.perf_counter()
    while nxt < n or engine.has_unfinished_requests():
        while nxt < n and len(started) < concurrency:
            ext = f"{tag}-{nxt}"
            rid = engine.add_request(ext, prompts[nxt],
                                     params(nxt) if callable(params) else params)
            index[ext] = index[rid] = nxt  # outputs carry the external id
            started[nxt] = time.perf_counter()
            nxt += 1
        for out in engine.step():
            if out.finished:
                i = index[out.request_id]
                tokens[i] = list(out.outputs[0].token_ids)
                latency[i] = time.perf_counter() - started.pop(i)
                bar.update(1)
    elapsed = time.perf_counter() - t0
    bar.close()
    return tokens, latency, elapsed, index


def _per_prompt(requests: dict[str, list[int]], index: dict[str, int], n: int):
    """Drafter per-request [steps, accepted] aligned with the prompts. Workers may
    see vLLM's internal id (the external id plus a suffix)."""
    out: list[list[int] | None] = [None] * n
    for rid, st in requests.items():
        i = index.get(rid)
        if i is None:
            i = next((j for ext, j in index.items() if rid.startswith(ext + "-")), None)
        if i is not None:
            out[i] = st
    return out


def execute_sweep(job: dict[str, Any]) -> dict[str, Any]:
    """One engine, several runs: each run is a prompt list at one concurrency.

    The engine's max_num_seqs is the largest concurrency; each run keeps its own
    number of requests in flight. The prefix cache is reset before every run so
    no run reuses another's prompts.
    """
    from vllm import SamplingParams

    rss = _PeakRSS()
    runs = job["runs"]
    t0 = time.perf_counter()
    llm = _start_engine(job, max(r["concurrency"] for r in runs))
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    temperature = float(job.get("temperature", 0.0))
    if temperature > 0:  # every method samples prompt i with seed + i
        def params(i):
            return SamplingParams(temperature=temperature, max_tokens=job.get("max_tokens", 128),
                                  seed=job.get("seed", 0) + i)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 128),
                                seed=job.get("seed", 0))
    if job.get("warmup", True):
        llm.generate(_chat(tok, runs[0]["prompts"][:2]),
                     SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    _drafter_stats(llm)  # reset
    _step_times(llm)  # install the timers
    results = []
    for k, run in enumerate(runs):
        texts = _chat(tok, run["prompts"])
        llm.reset_prefix_cache()
        from ..patches import RESET_RPC

        llm.collective_rpc(RESET_RPC)  # no run drafts from another run's answers
        before = _counters(llm)
        tokens, latency, elapsed, index = _generate_inflight(
            llm, texts, params, run["concurrency"], f"run{k}", run.get("progress"))
        counters = _delta(_counters(llm), before)
        n_out = sum(len(t) for t in tokens)
        times = _step_times(llm)
        drafter = _drafter_stats(llm)
        if drafter is not None:
            drafter["per_prompt"] = _per_prompt(drafter.pop("requests"), index, len(tokens))
        results.append({
            "elapsed_s": elapsed,
            "output_tokens": n_out,
            "tokens_per_s": n_out / elapsed if elapsed > 0 else 0.0,
            "token_ids": tokens,
            "latency_s": latency,
            "spec": counters,
            "drafter": drafter,
            "step_times": times,
            **acceptance_stats(counters, tokens),
        })
    # InprocClient (engine core in this process) or SyncMPClient (its own process)
    client = type(llm.llm_engine.engine_core).__name__
    del llm
    return {"startup_s": startup, "runs": results, "peak_rss_mb": rss.stop() / 2**20,
            "engine_core_client": client}


def acceptance_stats(counters: dict, token_ids: list[list[int]]) -> dict[str, float]:
    """Tokens per verification step and acceptance rate from vLLM's counters.

    Each request's first output token comes from its prefill; every later step
    verifies the drafts it has and emits 1 + (accepted drafts) tokens. So over
    all requests, steps = decoded tokens - accepted, and mean accepted tokens
    per verification step = decoded tokens / steps (1.0 without speculation).
    """
    decoded = sum(max(0, len(t) - 1) for t in token_ids)
    accepted = counters.get("num_accepted_tokens", 0)
    steps = decoded - accepted
    drafted = counters.get("num_draft_tokens", 0)
    return {
        "tokens_per_step": decoded / steps if steps > 0 else 1.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
    }


def run_job(job: dict[str, Any], *, log_path: str | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh child process (one engine at a time)."""
    from ..cpu_env import runtime_env

    env = runtime_env(tensor_parallel_size=job.get("tensor_parallel_size", 1))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("ADADECODE_STATS", "1")  # per-request drafter counters
    if job.get("in_process"):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with tempfile.TemporaryDirectory() as d:
        job_file, out_file = Path(d) / "job.json", Path(d) / "out.json"
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "vllm_adadecode.bench.worker", str(job_file), str(out_file)]
        log = open(log_path, "a") if log_path else None
        try:
            proc = subprocess.run(cmd, env=env, stdout=log or None, stderr=log or None,
                                  timeout=job.get("timeout_s", 3600))
        finally:
            if log:
                log.close()
        if proc.returncode != 0 or not out_file.exists():
            where = f"; see {log_path}" if log_path else ""
            raise RuntimeError(f"engine job failed with exit code {proc.returncode}{where}")
        return json.loads(out_file.read_text())


if __name__ == "__main__":
    job_path, out_path = sys.argv[1], sys.argv[2]
    res = execute(json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(res))
    sys.stdout.flush()
    os._exit(0)  # engine teardown threads must not keep the child alive
