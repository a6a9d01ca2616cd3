"""The Ray-on-CPU recipe of docs/guides/serving.md, run from an empty
environment exactly as the page prints it: its code block is read from the
page, not copied here, so the page and the test cannot drift apart. The test
only waits for the server, asks it one question, and stops `vllm serve` (the
recipe's last line, `ray stop`, then runs as printed). Long tier: the 0.5B
compiled over two Ray workers takes about five minutes to come up."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from .serving import ROOT
from .test_ray import _ray_processes

GUIDE = ROOT / "docs" / "guides" / "serving.md"


def recipe() -> str:
    """The bash block under the guide's "Ray on CPU" heading."""
    text = GUIDE.read_text()
    section = text.split("### Ray on CPU", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under 'Ray on CPU' in {GUIDE}"
    return block.group(1)


def test_the_recipe_names_the_settings_a_user_needs():
    script = recipe()
    for needed in ("VLLM_HOST_IP=127.0.0.1", "ADADECODE_RAY_CPU=1", "--num-gpus=2",
                   "--distributed-executor-backend ray", "--tensor-parallel-size 2",
                   "Qwen2.5-Coder-0.5B-Instruct", "ray stop"):
        assert needed in script, needed


def _get(url: str, body: dict | None = None, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.engine
@pytest.mark.full
def test_ray_cpu_recipe_as_printed_from_an_empty_environment(tmp_path):
    assert not _ray_processes(), "a Ray cluster is already running on this machine"
    script = tmp_path / "recipe.sh"
    script.write_text("set -x\n" + recipe())
    log = tmp_path / "recipe.log"
    # A fresh shell: nothing of this test's environment, only HOME and a plain PATH.
    env = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin"}
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(script)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start, models = time.time(), None
        while time.time() - start < 900 and proc.poll() is None:
            try:
                models = _get("http://127.0.0.1:8000/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(3)
        assert models, f"the server never came up:\n{log.read_text()[-4000:]}"
        up = time.time() - start
        model = models["data"][0]["id"]
        assert "Qwen2.5-Coder-0.5B-Instruct" in model
        reply = _get("http://127.0.0.1:8000/v1/completions",
                     {"model": model, "prompt": "def fib(n):", "max_tokens": 24,
                      "temperature": 0})
        text = reply["choices"][0]["text"]
        assert reply["usage"]["completion_tokens"] == 24
        assert "fib" in text or "return" in text, text
        # Stop `vllm serve` as a user would (Ctrl-C); the recipe's `ray stop` follows.
        serve = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "serve" in " ".join(p.cmdline())]
        assert serve, "no `vllm serve` process under the recipe"
        serve[0].send_signal(signal.SIGINT)
        assert proc.wait(300) == 0, log.read_text()[-4000:]
        print(f"\n[ray recipe: up after {up:.0f} s; answered {text!r}]")
        deadline = time.time() + 60
        while _ray_processes() and time.time() < deadline:
            time.sleep(2)
        assert not _ray_processes(), "Ray processes left after the recipe's `ray stop`"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["bash", "-c", ".venv/bin/ray stop --force"], cwd=ROOT,
                           capture_output=True)
