"""Soak test: `vllm serve` with AdaDecode under a seeded mix of what a server meets.

    vllm-adadecode soak [--requests 200] [--inflight 32] [--seed 0]
                        [--kv-blocks N] [--prefix-caching] [--out soak.json]

Starts a plain `vllm serve` on 127.0.0.1, sends the mix and records the
answers; then the same with AdaDecode. The mix: chat and completion requests,
streaming and not, greedy and sampled (seeded; some with n > 1), prompts from
one token to near max_model_len, max_tokens up to the edge of max_model_len,
stop strings, shared prefixes, and a share of clients that disconnect in the
middle of a stream or give up on a plain request. Up to ``inflight`` requests
are open at once. The report: requests sent / completed / aborted by the
client / failed, greedy answers identical between the two servers (every
greedy request that both completed), server errors in each log, each server's
peak memory, and the time per output token (p50 / p99, streaming requests).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_MODEL_LEN = 2048
# Log lines that are a server error (not a client's abort or disconnect).
_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|EngineDeadError")
_ABORT = re.compile(r"abort|cancel|disconnect", re.I)


@dataclass
class Req:
    """One request of the mix (what is sent, and what the client does)."""

    index: int
    api: str  # "chat" or "completion"
    prompt: Any  # token ids (completion) or messages (chat)
    max_tokens: int
    temperature: float
    seed: int | None
    n: int
    stream: bool
    stop: list[str] | None
    abort_after: float | None  # seconds (plain) or chunks (stream) before giving up

    def body(self, model: str) -> dict:
        b = {"model": model, "max_tokens": self.max_tokens, "temperature": self.temperature,
             "n": self.n, "stream": self.stream}
        if self.seed is not None:
            b["seed"] = self.seed
        if self.stop:
            b["stop"] = self.stop
        if self.api == "chat":
            b["messages"] = self.prompt
        else:
            b["prompt"] = self.prompt
        return b


def build_mix(n: int, seed: int, texts: list[str], tokenizer, *, abort_share: float = 0.2,
              max_model_len: int = MAX_MODEL_LEN) -> list[Req]:
    """A seeded mix of ``n`` requests from real prompt texts."""
    rng = random.Random(seed)
    pool = tokenizer("\n\n".join(texts))["input_ids"]
    shared = pool[:300]  # a prefix several requests start with (prefix caching)
    reqs = []
    for i in range(n):
        r = rng.random()
        edge = r >= 0.92  # max_tokens reaches max_model_len exactly
        if r < 0.05:
            length = 1
        elif r < 0.70:
            length = rng.randint(4, 200)
        elif r < 0.85:
            length = rng.randint(200, 1000)
        elif not edge:
            length = rng.randint(1000, max_model_len - 48)
        else:
            length = max_model_len - rng.randint(8, 200)
        start = rng.randrange(0, max(1, len(pool) - length))
        ids = pool[start:start + length]
        if rng.random() < 0.25 and length > len(shared):
            ids = shared + ids[len(shared):]
        room = max_model_len - len(ids)
        if edge:
            max_tokens = room  # to the edge of max_model_len
        else:
            max_tokens = min(room, rng.choice([8, 16, 32, 64, 128]))
        sampled = rng.random() < 0.35
        api = "chat" if rng.random() < 0.4 and 8 < length <= 1000 else "completion"
        prompt: Any = ids
        if api == "chat":
            text = tokenizer.decode(ids[: min(len(ids), 400)])
            prompt = [{"role": "user", "content": text}]
            max_tokens = min(max_tokens, 128)
        stream = rng.random() < 0.5
        abort = rng.random() < abort_share
        reqs.append(Req(
            index=i, api=api, prompt=prompt, max_tokens=max(1, max_tokens),
            temperature=rng.choice([0.6, 0.8, 1.0]) if sampled else 0.0,
            seed=rng.randrange(2**31) if sampled else None,
            n=rng.choice([2, 3]) if sampled and rng.random() < 0.3 else 1,
            stream=stream,
            stop=rng.choice([["\n\n"], ["."], ["def ", "\n\n\n"]]) if rng.random() < 0.2 else None,
            abort_after=(rng.randint(1, 6) if stream else rng.uniform(0.2, 2.0)) if abort else None,
        ))
    return reqs


@dataclass
class Outcome:
    index: int
    status: str  # "completed", "aborted" (by the client) or "failed"
    texts: list[str] = field(default_factory=list)
    http_status: int | None = None
    error: str | None = None
    tokens: int = 0
    tpot_s: float | None = None  # streaming: (last - first chunk) / (chunks - 1)


async def _one(client, base: str, model: str, req: Req) -> Outcome:
    import httpx

    path = "/v1/chat/completions" if req.api == "chat" else "/v1/completions"
    body = req.body(model)
    try:
        if not req.stream:
            coro = client.post(base + path, json=body)
            if req.abort_after is not None:
                try:
                    resp = await asyncio.wait_for(coro, req.abort_after)
                except asyncio.TimeoutError:
                    return Outcome(req.index, "aborted")
            else:
                resp = await coro
            if resp.status_code != 200:
                return Outcome(req.index, "failed", http_status=resp.status_code,
                               error=resp.text[:300])
            data = resp.json()
            texts = [c["message"]["content"] if req.api == "chat" else c["text"]
                     for c in sorted(data["choices"], key=lambda c: c["index"])]
            return Outcome(req.index, "completed", texts, 200,
                           tokens=data["usage"]["completion_tokens"])
        texts: dict[int, str] = {}
        times: list[float] = []
        async with client.stream("POST", base + path, json=body) as resp:
            if resp.status_code != 200:
                return Outcome(req.index, "failed", http_status=resp.status_code,
                               error=(await resp.aread()).decode()[:300])
            chunks = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:]).get("choices", []):
                    piece = (c.get("delta", {}).get("content") if req.api == "chat"
                             else c.get("text")) or ""
                    texts[c["index"]] = texts.get(c["index"], "") + piece
                times.append(time.perf_counter())
                chunks += 1
                if req.abort_after is not None and chunks >= req.abort_after:
                    return Outcome(req.index, "aborted")  # the client goes away
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 2 and req.n == 1 else None
        return Outcome(req.index, "completed", [texts.get(i, "") for i in range(req.n)], 200,
                       tokens=len(times), tpot_s=tpot)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        return Outcome(req.index, "failed", error=f"{type(e).__name__}: {e}"[:300])


async def _drive(base: str, model: str, reqs: list[Req], inflight: int, progress) -> list[Outcome]:
    import httpx

    sem = asyncio.Semaphore(inflight)
    limits = httpx.Limits(max_connections=inflight + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def run(r: Req) -> Outcome:
            async with sem:
                out = await _one(client, base, model, r)
                progress(1)
                return out

        return await asyncio.gather(*(run(r) for r in reqs))


class _Server:
    """`vllm serve MODEL ARGS` on 127.0.0.1 (a free port), its log, its peak memory."""

    def __init__(self, model: str, args: list[str], log_path: Path, timeout: float = 900):
        import psutil

        from .cpu_env import runtime_env

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        vllm = str(Path(sys.executable).parent / "vllm")
        cmd = [vllm, "serve", model, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--host", "127.0.0.1", "--port", str(port), *args]
        self.log = open(log_path, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=runtime_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.peak = 0
        self._stop = threading.Event()
        self._ps = psutil.Process(self.proc.pid)
        threading.Thread(target=self._watch, daemon=True).start()
        self._wait_healthy(timeout)
        self.startup_s = time.perf_counter() - self.t0

    def _watch(self):
        import psutil

        while not self._stop.is_set():
            try:
                total = sum(p.memory_info().rss for p in
                            [self._ps, *self._ps.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(0.5)

    def _wait_healthy(self, timeout: float):
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited early; see {self.log_path}")
            try:
                if urllib.request.urlopen(self.base + "/health", timeout=5).status == 200:
                    return
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"vllm serve did not become healthy; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        self._stop.set()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def server_errors(log_text: str) -> list[str]:
    """Error lines of a server log while it served (before its shutdown began)
    that are not about a client's abort."""
    lines = []
    for ln in log_text.splitlines():
        if "[shutdown]" in ln:
            break  # stopping the server ends its engine: not a serving error
        if _ERROR.search(ln) and not _ABORT.search(ln):
            lines.append(ln)
    return lines


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_soak(*, model: str, requests: int = 200, inflight: int = 32, seed: int = 0,
             kv_blocks: int | None = None, prefix_caching: bool = False,
             speculative_config: dict | None = None, log_dir: Path, texts: list[str],
             enforce_eager: bool = False, progress: bool = True,
             control: bool = False, chunked_prefill: bool = False) -> dict:
    """Serve the mix with a plain server, then with AdaDecode (``control``:
    a second plain server instead, to see what differs between two identical
    servers under the same mix)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    mix = build_mix(requests, seed, texts, tok)
    common = ["--max-num-seqs", str(inflight)]
    common += ["--enable-prefix-caching"] if prefix_caching else ["--no-enable-prefix-caching"]
    if kv_blocks:
        common += ["--num-gpu-blocks-override", str(kv_blocks)]
    if enforce_eager:
        common += ["--enforce-eager"]
    if not chunked_prefill:
        # vLLM 0.32 on CPU: a seeded sampled request whose prompt is prefilled
        # in chunks kills the engine ("CPU Generator does not use offset");
        # the plain server meets it too (docs/RELIABILITY.md).
        common += ["--no-enable-chunked-prefill", "--max-num-batched-tokens",
                   str(MAX_MODEL_LEN)]
    spec = speculative_config or {"method": "adadecode"}
    servers = {"vanilla": common,
               "adadecode": common + (["--speculative-config", json.dumps(spec)]
                                      if not control else [])}
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": dict(model=model, requests=requests, inflight=inflight,
                                               seed=seed, kv_blocks=kv_blocks,
                                               prefix_caching=prefix_caching,
                                               chunked_prefill=chunked_prefill, control=control,
                                               speculative_config=spec,
                                               max_model_len=MAX_MODEL_LEN),
                              "mix": _mix_summary(mix), "servers": {}}
    answers: dict[str, list[Outcome]] = {}
    for name, args in servers.items():
        srv = _Server(model, args, log_dir / f"soak-{name}.log")
        try:
            bar = tqdm(total=len(mix), desc=f"soak {name}", unit="req", disable=not progress)
            t0 = time.perf_counter()
            outs = asyncio.run(_drive(srv.base, model, mix, inflight, bar.update))
            wall = time.perf_counter() - t0
            bar.close()
            alive = srv.alive()
            metrics = _metrics(srv.base) if alive else {}
        finally:
            srv.stop()
        answers[name] = outs
        tpots = [o.tpot_s for o in outs if o.tpot_s is not None]
        errors = server_errors(srv.log_path.read_text(errors="replace"))
        report["servers"][name] = {
            "startup_s": round(srv.startup_s, 1), "wall_s": round(wall, 1),
            "sent": len(outs),
            "completed": sum(o.status == "completed" for o in outs),
            "aborted_by_client": sum(o.status == "aborted" for o in outs),
            "failed": sum(o.status == "failed" for o in outs),
            "failures": [asdict(o) for o in outs if o.status == "failed"][:10],
            "server_errors": len(errors), "server_error_lines": errors[:10],
            "alive_at_end": alive,
            "preemptions": metrics.get("vllm:num_preemptions_total"),
            "prefix_cache_hits": metrics.get("vllm:prefix_cache_hits_total"),
            "spec_decode_drafts": metrics.get("vllm:spec_decode_num_drafts_total"),
            "spec_decode_accepted": metrics.get("vllm:spec_decode_num_accepted_tokens_total"),
            "peak_rss_mb": round(srv.peak / 2**20),
            "tpot_ms_p50": _ms(_percentile(tpots, 0.5)),
            "tpot_ms_p99": _ms(_percentile(tpots, 0.99)),
        }
    van, ada = answers["vanilla"], answers["adadecode"]
    greedy = [r.index for r in mix if r.temperature == 0.0
              and van[r.index].status == ada[r.index].status == "completed"]
    differ = [i for i in greedy if van[i].texts != ada[i].texts]
    report["greedy_compared"] = len(greedy)
    report["greedy_identical"] = len(greedy) - len(differ)
    report["greedy_differing"] = differ[:20]
    return report


def _metrics(base: str) -> dict[str, float]:
    """Counters from the server's Prometheus /metrics (summed over labels)."""
    import urllib.request

    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        name = name.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def _mix_summary(mix: list[Req]) -> dict:
    plens = [len(r.prompt) if r.api == "completion" else -1 for r in mix]
    return {
        "chat": sum(r.api == "chat" for r in mix), "completion": sum(r.api == "completion" for r in mix),
        "stream": sum(r.stream for r in mix), "greedy": sum(r.temperature == 0 for r in mix),
        "sampled": sum(r.temperature > 0 for r in mix), "n_gt_1": sum(r.n > 1 for r in mix),
        "stop_strings": sum(bool(r.stop) for r in mix),
        "client_aborts_planned": sum(r.abort_after is not None for r in mix),
        "one_token_prompts": sum(p == 1 for p in plens),
        "longest_prompt": max(plens),
        "max_tokens_to_edge": sum(r.api == "completion" and len(r.prompt) + r.max_tokens
                                  == MAX_MODEL_LEN for r in mix),
    }


def format_report(rep: dict) -> str:
    lines = [f"soak: {rep['settings']['requests']} requests, up to "
             f"{rep['settings']['inflight']} in flight, seed {rep['settings']['seed']}, "
             f"kv blocks {rep['settings']['kv_blocks'] or 'default'}, prefix caching "
             f"{'on' if rep['settings']['prefix_caching'] else 'off'}",
             "mix: " + ", ".join(f"{k} {v}" for k, v in rep["mix"].items()),
             f"{'server':<10} {'sent':>5} {'done':>5} {'aborted':>8} {'failed':>7} "
             f"{'errors':>7} {'peak MB':>8} {'TPOT p50':>9} {'p99 ms':>7} {'wall s':>7}"]
    for name, s in rep["servers"].items():
        lines.append(f"{name:<10} {s['sent']:>5} {s['completed']:>5} {s['aborted_by_client']:>8} "
                     f"{s['failed']:>7} {s['server_errors']:>7} {s['peak_rss_mb']:>8} "
                     f"{s['tpot_ms_p50'] or 0:>9.2f} {s['tpot_ms_p99'] or 0:>7.2f} "
                     f"{s['wall_s']:>7.1f}")
    for name, s in rep["servers"].items():
        lines.append(f"{name}: preemptions {s['preemptions']}, prefix-cache hits "
                     f"{s['prefix_cache_hits']}, drafts {s['spec_decode_drafts']}, accepted "
                     f"{s['spec_decode_accepted']}, start {s['startup_s']} s")
    lines.append(f"greedy answers identical: {rep['greedy_identical']}/{rep['greedy_compared']}")
    return "\n".join(lines)
