"""The `vllm-adadecode` commands a user runs first, end to end at CI size:
`model-path` and `demo` (the soak, corpus, bench and training commands have
tests beside their features)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "vllm_adadecode.cli"]


def test_model_path_prints_the_packaged_models_folder(smollm2):
    res = subprocess.run([*CLI, "model-path"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == Path(smollm2)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert (path / "model.safetensors").stat().st_size > 400 * 2**20  # fp32


def test_model_path_refuses_an_unknown_model():
    res = subprocess.run([*CLI, "model-path", "--name", "NoSuchModel-1B"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0
    assert "NoSuchModel-1B" in res.stderr


@pytest.mark.engine
def test_demo_runs_end_to_end(tiny_llama, tmp_path):
    out = tmp_path / "demo.json"
    res = subprocess.run(
        [*CLI, "demo", "--model", tiny_llama, "--num-prompts", "2", "--max-tokens", "16",
         "--enforce-eager", "--speculative-config",
         '{"exit_layers": [1, 3, 5], "threshold": 0.005, "adaptive": false}',
         "--out", str(out), "--log", str(tmp_path / "demo.log")],
        capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "identical to vanilla: 2/2" in res.stdout
    doc = json.loads(out.read_text())
    ada = doc["results"]["adadecode"]
    assert ada["spec"]["num_draft_tokens"] > 0
    assert ada["token_ids"] == doc["results"]["vanilla"]["token_ids"]
