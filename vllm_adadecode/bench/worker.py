"""Run one vLLM engine job in this process and write its results as JSON.

    python -m vllm_adadecode.bench.worker JOB.json OUT.json

A job names the model, the speculative config (None for vanilla), the prompts
(user turns; the model's chat template is applied here), max_tokens and the
concurrency (vLLM's max_num_seqs). ``run_job`` starts this in a child process
with the CPU runtime environment, so only one engine exists at a time and it
is fully gone when the child exits.

(Near 600 lines, one module on purpose: the job itself and its two hosts, a
child process per job and the long-lived ``JobHost``, share one code path, so
both run exactly the same job.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
    "vllm:num_preemptions": "preemptions",
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
                "async_scheduling", "distributed_executor_backend",
                "num_gpu_blocks_override"):
        if job.get(key) is not None:
            kwargs[key] = job[key]
    if job.get("speculative_config"):
        kwargs["speculative_config"] = job["speculative_config"]
    return LLM(**kwargs)


def _sampling_fields(fields: dict) -> dict:
    """SamplingParams fields from JSON (whose object keys are strings);
    ``structured_outputs`` is a dict of vLLM's StructuredOutputsParams fields."""
    if "logit_bias" in fields:
        fields = {**fields, "logit_bias": {int(k): v for k, v in fields["logit_bias"].items()}}
    if "structured_outputs" in fields:
        from vllm.sampling_params import StructuredOutputsParams

        fields = {**fields,
                  "structured_outputs": StructuredOutputsParams(**fields["structured_outputs"])}
    return fields


def _logprobs(positions) -> list | None:
    """vLLM's per-position {token id: Logprob} as JSON ({"id": logprob})."""
    if positions is None:
        return None
    return [None if p is None else {str(t): lp.logprob for t, lp in p.items()}
            for p in positions]


def _details(outs) -> list[dict]:
    """Every completion of every request (n > 1 too): tokens, text, why it
    ended, logprobs; and the prompt's logprobs."""
    return [{"prompt_logprobs": _logprobs(o.prompt_logprobs),
             "completions": [{"token_ids": list(c.token_ids), "text": c.text,
                              "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason,
                              "logprobs": _logprobs(c.logprobs)} for c in o.outputs]}
            for o in outs]


def _chat(tok, prompts: list[str]) -> list[str]:
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def _drafter_stats(llm) -> dict | None:
    """The AdaDecode drafter's counters (tensor-parallel ranks merged), reset on read."""
    from ..engine.rpc import STATS_RPC

    per_worker = [s for s in llm.collective_rpc(STATS_RPC) if s]
    if not per_worker:
        return None
    from ..stats import merge_stats

    return merge_stats(per_worker)


def _step_times(llm) -> dict | None:
    """Seconds per part of the engine's steps since the last read (tensor-parallel
    rank 0); the first call installs the timers."""
    from ..engine.rpc import STEP_TIMES_RPC

    times = [t for t in llm.collective_rpc(STEP_TIMES_RPC) if t]
    return times[0] if times else None


class _CpuTimes:
    """CPU seconds (user, system) spent during a timed run by this process
    (the frontend, or the whole engine when its core runs in-process) and by
    each child process (the engine core), and their thread counts."""

    def __init__(self):
        import psutil

        self._me = psutil.Process()
        self._start = self._snapshot()

    def _snapshot(self) -> dict[str, tuple[float, float, int, int]]:
        out = {}
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                # minor page faults: field 10 of /proc/PID/stat
                stat = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[p.name() if p.pid != self._me.pid else "frontend"] = (
                    t.user, t.system, p.num_threads(), int(stat[7]))
            except Exception:  # a child that exited meanwhile, or no /proc
                pass
        return out

    def stop(self) -> dict[str, dict[str, float]]:
        end = self._snapshot()
        out = {}
        for k, (u, s, n, f) in end.items():
            u0, s0, _, f0 = self._start.get(k, (0, 0, 0, 0))
            out[k] = {"user": round(u - u0, 3), "system": round(s - s0, 3), "threads": n,
                      "minor_faults": f - f0}
        return out


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
    if job.get("step_timers"):  # wrap the runner's methods in timers, as the bench does
        _step_times(llm)
    cpu = _CpuTimes()
    t0 = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=job.get("progress", True))
    elapsed = time.perf_counter() - t0
    cpu_s = cpu.stop()
    counters = _delta(_counters(llm), before)
    drafter = _drafter_stats(llm)
    if drafter is not None and "requests" in drafter:
        drafter["per_prompt"] = _per_prompt(drafter.pop("requests"),
                                            {o.request_id: i for i, o in enumerate(outs)},
                                            len(outs))
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
    from ..engine.rpc import WORKER_INFO_RPC

    workers = llm.collective_rpc(WORKER_INFO_RPC) if job.get("worker_info") else None
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    n_out = sum(len(t) for t in token_ids)
    result = {
        "pid": os.getpid(),
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
        "details": _details(outs) if job.get("details") else None,
        "cpu_s": cpu_s,
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
    """Drafter per-request [steps, accepted] aligned with the prompts (summed
    over a request's n > 1 completions). Workers see vLLM's internal id: the
    external id plus a suffix, behind "<k>_" for the k-th of n completions."""
    out: list[list[int] | None] = [None] * n
    for rid, st in requests.items():
        parent = re.sub(r"^\d+_", "", rid)
        i = index.get(rid, index.get(parent))
        if i is None:
            i = next((j for ext, j in index.items()
                      if rid.startswith(ext + "-") or parent.startswith(ext + "-")), None)
        if i is not None:
            out[i] = [a + b for a, b in zip(out[i] or [0, 0], st)]
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
        from ..engine.rpc import RESET_RPC

        llm.collective_rpc(RESET_RPC)  # no run drafts from another run's answers
        before = _counters(llm)
        cpu = _CpuTimes()
        tokens, latency, elapsed, index = _generate_inflight(
            llm, texts, params, run["concurrency"], f"run{k}", run.get("progress"))
        cpu_s = cpu.stop()
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
            "cpu_s": cpu_s,
            **acceptance_stats(counters, tokens,
                               drafter.get("per_prompt") if drafter is not None else None),
        })
    # InprocClient (engine core in this process) or SyncMPClient (its own process)
    client = type(llm.llm_engine.engine_core).__name__
    del llm
    return {"startup_s": startup, "runs": results, "peak_rss_mb": rss.stop() / 2**20,
            "engine_core_client": client}


def acceptance_stats(counters: dict, token_ids: list[list[int]],
                     per_prompt: list | None = None) -> dict[str, float]:
    """Tokens per verification step and acceptance rate.

    Each request's first output token comes from its prefill; every later step
    verifies the drafts it has and emits 1 + (accepted drafts) tokens. The
    drafter counts each request's steps (``per_prompt``: [steps, accepted] per
    request, the first step its prefill); then tokens per step = decoded
    tokens / decode steps. Without them, steps = decoded tokens - accepted
    from vLLM's counters, which overstates tokens per step where a request's
    last step accepts drafts past ``max_tokens`` (vLLM counts them, the output
    drops them): short answers that lookups draft almost whole.
    """
    decoded = sum(max(0, len(t) - 1) for t in token_ids)
    accepted = counters.get("num_accepted_tokens", 0)
    if per_prompt and len(per_prompt) == len(token_ids) and all(per_prompt):
        steps = sum(max(0, s[0] - 1) for s in per_prompt)
    else:
        steps = decoded - accepted
    drafted = counters.get("num_draft_tokens", 0)
    return {
        "tokens_per_step": decoded / steps if steps > 0 else 1.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
    }


def _job_env(job: dict[str, Any]) -> dict[str, str]:
    from ..cpu_env import runtime_env

    env = runtime_env(tensor_parallel_size=job.get("tensor_parallel_size", 1))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("ADADECODE_STATS", "1")  # per-request drafter counters
    if job.get("in_process"):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(job.get("env") or {})
    return env


def run_job(job: dict[str, Any], *, log_path: str | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh child process (one engine at a time). ``job["env"]``
    adds environment variables for that process."""
    env = _job_env(job)
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


class JobHost:
    """Engine jobs one after another in one long-lived child process.

    Each job still starts and shuts down its own vLLM engine (engine core in
    the host process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), but vLLM, torch and
    the plugin are imported once, and vLLM's cleanup between jobs
    (``cleanup_dist_env_and_memory``) is what vLLM's own test suite uses to run
    many engines in one process. A job starts in 2-3 s instead of about 10 s.

    For eager single-process engines only: jobs with tensor parallelism, a Ray
    executor or torch.compile (whose caches live in the process) belong in a
    fresh process (``run_job``). A job's ``env`` is set for that job and
    restored after it. If the host dies, the job fails with the end of the
    log and the next job starts a new host.
    """

    def __init__(self, log_path: str | None = None):
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._replies = None

    @staticmethod
    def accepts(job: dict[str, Any]) -> bool:
        return (job.get("tensor_parallel_size", 1) == 1
                and not job.get("distributed_executor_backend")
                and job.get("enforce_eager", False))

    def _start(self) -> None:
        env = _job_env({"in_process": True})
        read_fd, write_fd = os.pipe()
        log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_adadecode.bench.worker", "--host", str(write_fd)],
                env=env, stdin=subprocess.PIPE, stdout=log, stderr=log, text=True,
                pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
            if log is not subprocess.DEVNULL:
                log.close()
        self._replies = os.fdopen(read_fd, "r")

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        if not self.accepts(job):
            raise ValueError("JobHost runs eager single-process engine jobs only")
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        with tempfile.TemporaryDirectory() as d:
            out_file = Path(d) / "out.json"
            self._proc.stdin.write(json.dumps({"job": job, "out": str(out_file)}) + "\n")
            self._proc.stdin.flush()
            reply = self._replies.readline()
            if reply.strip() != "ok" or not out_file.exists():
                self.close()
                where = f"; see {self.log_path}" if self.log_path else ""
                why = reply.strip() or "the host exited"
                raise RuntimeError(f"engine job failed in the job host ({why}){where}")
            return json.loads(out_file.read_text())

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._replies is not None:
            self._replies.close()
            self._replies = None


@contextlib.contextmanager
def job_runner(*, one_process: bool = False, log_path: str | None = None):
    """A function that runs one engine job: ``run_job`` (a fresh process per
    job), or with ``one_process`` a JobHost's ``run`` (eager, single-process
    engines, one after another in one long-lived process; for quick checks,
    not timings)."""
    if not one_process:
        yield lambda job: run_job(job, log_path=log_path)
        return
    host = JobHost(log_path)
    try:
        yield host.run
    finally:
        host.close()


def _serve_jobs(reply_fd: int) -> None:
    """The JobHost's side: one JSON line per job on stdin, "ok" or "failed" per
    job on ``reply_fd``."""
    import gc
    import traceback

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    replies = os.fdopen(reply_fd, "w")
    for line in sys.stdin:
        msg = json.loads(line)
        job, saved = msg["job"], dict(os.environ)
        os.environ.update(job.get("env") or {})
        try:
            res = execute(job)
            Path(msg["out"]).write_text(json.dumps(res))
            status = "ok"
        except Exception:
            traceback.print_exc()
            status = "failed"
        finally:
            os.environ.clear()
            os.environ.update(saved)
            if status != "ok":
                # A job that ended normally deleted its engine, whose shutdown
                # ran this cleanup already (each pass is a full garbage
                # collection, about half a second here); a failed one may not have.
                cleanup_dist_env_and_memory()
                gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        replies.write(status + "\n")
        replies.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "--host":
        _serve_jobs(int(sys.argv[2]))
    job_path, out_path = sys.argv[1], sys.argv[2]
    res = execute(json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(res))
    sys.stdout.flush()
    os._exit(0)  # engine teardown threads must not keep the child alive
