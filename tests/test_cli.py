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


def test_demo_rows_and_speedup_over_the_faster_plain_engine():
    from vllm_adadecode.cli import demo_rows, demo_summary

    rows = demo_rows([{"method": "adadecode", "threshold": 0.5}])
    assert rows == [("vanilla", None),
                    ("drafting off", {"method": "adadecode", "threshold": 0.5,
                                      "lookup": False, "self_draft": False}),
                    ("adadecode", {"method": "adadecode", "threshold": 0.5})]
    assert [n for n, _ in demo_rows([{}, {}])] == ["vanilla", "drafting off", "adadecode#1",
                                                   "adadecode#2"]

    def out(tps, tok_step=1.0):
        return {"tokens_per_s": tps, "tokens_per_step": tok_step, "acceptance_rate": 0.0}

    s = demo_summary({"vanilla": [out(20), out(22)], "drafting off": [out(26), out(28)],
                      "adadecode": [out(40, 1.6), out(41, 1.6)]})
    assert s["adadecode"]["baseline"] == "drafting off"
    assert s["adadecode"]["speedup"] == pytest.approx(40.5 / 27)
    assert s["vanilla"]["speedup"] == pytest.approx(21 / 27)
    assert s["adadecode"]["rounds"] == [40, 41]
    s = demo_summary({"vanilla": [out(30)], "drafting off": [out(26)], "adadecode": [out(39)]})
    assert s["adadecode"]["baseline"] == "vanilla" and s["adadecode"]["speedup"] == 1.3


@pytest.mark.engine
def test_demo_runs_end_to_end(tiny_llama, tmp_path):
    out = tmp_path / "demo.json"
    res = subprocess.run(
        [*CLI, "demo", "--model", tiny_llama, "--num-prompts", "2", "--max-tokens", "16",
         "--rounds", "2", "--one-process", "--speculative-config",
         '{"exit_layers": [1, 3, 5], "threshold": 0.005, "adaptive": false}',
         "--out", str(out), "--log", str(tmp_path / "demo.log")],
        capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "identical to vanilla: 2/2" in res.stdout
    assert "the AdaDecode engine with drafting off runs" in res.stdout
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == ["vanilla", "drafting off", "adadecode"]
    ada, off = doc["results"]["adadecode"][0], doc["results"]["drafting off"][0]
    assert ada["spec"]["num_draft_tokens"] > 0
    assert off["spec"].get("num_draft_tokens", 0) == 0  # drafting off proposes nothing
    assert ada["token_ids"] == off["token_ids"] == doc["results"]["vanilla"][0]["token_ids"]
    assert doc["summary"]["adadecode"]["baseline"] in ("vanilla", "drafting off")
    started = [x.split("] ", 1)[1].split(":")[0] for x in res.stdout.splitlines()
               if x.startswith("[round")]
    assert started == ["vanilla", "drafting off", "adadecode",
                       "adadecode", "drafting off", "vanilla"]  # two rounds, alternating
    assert all(o["token_ids"] == ada["token_ids"] for rs in doc["results"].values() for o in rs)
    assert len(doc["summary"]["adadecode"]["rounds"]) == 2


def test_demo_refuses_one_process_with_compile_and_zero_rounds():
    for flags, message in ((["--one-process", "--compile"], "--one-process runs eager"),
                           (["--rounds", "0"], "--rounds must be >= 1")):
        res = subprocess.run([*CLI, "demo", *flags], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
