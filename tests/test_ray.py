"""AdaDecode on vLLM's Ray executor, on this CPU machine: a Ray cluster of the
test's own on 127.0.0.1 (two CPUs, two placement slots), TP=2 over it, offline
and served, and a Ray worker killed mid-request. The cluster is stopped at the
end and no Ray process may be left behind."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from vllm_adadecode.cpu_env import runtime_env
from vllm_adadecode.raycpu import ENV as RAY_CPU_ENV

from .serving import ROOT, free_port, serve, stop
from .test_engine import TINY_SPEC, _tiny

pytestmark = pytest.mark.engine
VENV_BIN = Path(sys.executable).parent
BACKOFF = {**TINY_SPEC, "adaptive": True}
_RAY_PROCS = ("raylet", "gcs_server", "RayWorkerProc", "ray::", "ray/dashboard", "ray/_private",
              "ray/autoscaler")


def _ray_env(address: str | None = None) -> dict:
    env = runtime_env(tensor_parallel_size=2)
    env.update({RAY_CPU_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0",
                "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_HOST_IP": "127.0.0.1"})
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _ray_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
        except psutil.Error:
            continue
        if any(k in text for k in _RAY_PROCS) and p.pid != os.getpid():
            found.append(p)
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` on 127.0.0.1 with 2 CPUs and 2 GPU slots (the
    placement tokens RayCpuPlatform asks for); stopped after the module."""
    assert not _ray_processes(), "a Ray cluster is already running on this machine"
    port = free_port()
    address = f"127.0.0.1:{port}"
    subprocess.run(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--num-gpus=2", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=_ray_env(), check=True, capture_output=True, timeout=180)
    try:
        yield address
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=_ray_env(),
                       capture_output=True, timeout=180)
        deadline = time.time() + 60
        while _ray_processes() and time.time() < deadline:
            time.sleep(1)
        left = [p.pid for p in _ray_processes()]
        assert not left, f"Ray processes left behind: {left}"


def test_tensor_parallel_2_on_ray_gives_the_same_tokens(engine, tiny_llama, ray_cluster,
                                                         monkeypatch):
    """TP=2 over Ray, the back-off on, equals TP=1 (TP=2 on the mp executor
    is test_lookup_engine.py's), with drafts kept and rejected: both ranks
    follow rank 0's back-off decision (drafting runs collectives; ranks that
    disagreed would hang or differ)."""
    one = _tiny(engine, tiny_llama, speculative_config=TINY_SPEC)
    for key, value in _ray_env(ray_cluster).items():
        monkeypatch.setenv(key, value)
    ray2 = _tiny(engine, tiny_llama, speculative_config=BACKOFF, tensor_parallel_size=2,
                 distributed_executor_backend="ray", worker_info=True)
    workers = ray2["workers"]
    # Ray's workers, each bound to its rank's CPU as VLLM_CPU_OMP_THREADS_BIND=0|1 says.
    assert [w["class"] for w in workers] == ["RayCPUWorker", "RayCPUWorker"]
    assert [w["affinity"] for w in workers] == [[0], [1]]
    assert [w["omp_num_threads"] for w in workers] == ["1", "1"]
    assert ray2["token_ids"] == one["token_ids"]
    spec = ray2["spec"]
    assert 0 < spec["num_accepted_tokens"] < spec["num_draft_tokens"]  # kept and rejected
    assert ray2["drafter"]["backoff"]
    assert ray2["drafter"]["drafted_by_source"]


def _serve(tiny_llama, address, log_path):
    return serve(["--speculative-config", json.dumps(TINY_SPEC), "--tensor-parallel-size", "2",
                  "--distributed-executor-backend", "ray", "--max-num-seqs", "4"],
                 log_path, env=dict(_ray_env(address), MODEL=tiny_llama), timeout=480)


def test_served_over_ray_answers_then_fails_clearly_when_a_worker_dies(
        tiny_llama, ray_cluster, tmp_path):
    """Served with TP=2 over Ray: the openai client gets answers and vLLM's
    spec-decode counters move; then a Ray worker is killed while a request
    streams. The in-flight request fails (it does not hang) and the server
    shuts down: vLLM's Ray executor reports the dead worker, the engine is
    dead, and `vllm serve` exits."""
    from openai import OpenAI

    sys.path.insert(0, str(ROOT / "examples"))
    from client import spec_counters

    log_path = tmp_path / "serve.log"
    proc, base = _serve(tiny_llama, ray_cluster, log_path)
    try:
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="The capital of France is",
                                          max_tokens=32, temperature=0.0)
        assert reply.usage.completion_tokens > 0
        counters = spec_counters(base + "/v1")
        assert counters["vllm:spec_decode_num_drafts_total"] > 0
        assert counters["vllm:spec_decode_num_draft_tokens_total"] > 0

        outcome: dict = {"chunks": []}
        streaming = threading.Event()

        def stream():
            try:
                chunks = client.completions.create(
                    model=model, prompt="Once upon a time", max_tokens=1500, temperature=0.0,
                    stream=True, extra_body={"ignore_eos": True})
                for _ in chunks:
                    outcome["chunks"].append(time.time())
                    streaming.set()
                outcome["result"] = "completed"
            except Exception as e:  # the failure this test wants to see
                outcome["result"] = f"{type(e).__name__}: {e}"
                outcome["error"] = e
            outcome["end"] = time.time()
            streaming.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert streaming.wait(120), "no token streamed within 2 minutes"
        # Kill only once the stream is flowing (several chunks in), so slow
        # first steps on a slower machine cannot be mistaken for the failure.
        deadline = time.time() + 120
        while len(outcome["chunks"]) < 3 and "result" not in outcome and time.time() < deadline:
            time.sleep(0.2)
        assert len(outcome["chunks"]) >= 3, f"fewer than 3 chunks streamed in 2 minutes: {outcome}"
        assert "result" not in outcome, f"the stream ended before the kill: {outcome}"
        workers = [p for p in _ray_processes()
                   if "RayWorkerProc" in " ".join(p.cmdline() or [p.name()])]
        assert workers, "no Ray worker process found"
        killed = time.time()
        workers[0].send_signal(signal.SIGKILL)
        t.join(120)
        assert not t.is_alive(), "the in-flight request hung after a Ray worker died"
        assert outcome["result"] != "completed", outcome
        # Tokens arrived before the kill, and the stream broke after it: the
        # failure is the kill's, not an earlier one.
        before = [c for c in outcome["chunks"] if c < killed]
        assert len(before) >= 2, outcome["result"]
        assert outcome["end"] >= killed
        import httpx
        import openai

        # the server's error event, or the connection dropped as the server went down
        assert isinstance(outcome["error"], (openai.APIError, httpx.HTTPError)), \
            outcome["result"]
        try:
            code = proc.wait(180)
        except subprocess.TimeoutExpired:
            pytest.fail("vllm serve kept running for 3 minutes with a dead Ray worker")
        print(f"\n[ray worker killed: request failed after {outcome['end'] - killed:.1f} s "
              f"({outcome['result'][:200]}); vllm serve exited with {code} after "
              f"{time.time() - killed:.1f} s]")
        log = log_path.read_text()
        assert "EngineDeadError" in log or "Engine core" in log or "died" in log.lower(), \
            log[-4000:]
    finally:
        stop(proc)
