"""`vllm serve` through examples/serve.sh for tests: start it, wait until it
answers /health, stop it (its whole process group)."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args, log_path, env=None, timeout=420):
    """examples/serve.sh with ``args`` on a free port; returns (process, base URL)
    once /health answers, or fails with the end of the server's log."""
    port = free_port()
    env = dict(os.environ if env is None else env, PORT=str(port))
    log = open(log_path, "w")
    proc = subprocess.Popen(
        ["bash", str(ROOT / "examples/serve.sh"), "--enforce-eager", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited early:\n{Path(log_path).read_text()[-4000:]}")
        try:
            if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                return proc, base
        except OSError:
            time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"vllm serve did not become healthy in time:\n"
                         f"{Path(log_path).read_text()[-4000:]}")


def stop(proc) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
