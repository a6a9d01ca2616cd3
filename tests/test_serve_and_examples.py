"""`vllm serve` with AdaDecode (both spellings), answered through the openai
client, and the offline example: the scripts in examples/ are what runs here."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .serving import ROOT, serve, stop

# Exit at the last layer: every draft is right, so the accepted counter must move.
LAST_LAYER = {"method": "adadecode", "exit_layers": [29], "threshold": 0.05}


@pytest.fixture(scope="module")
def heads_dir(smollm2, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("heads") / "smollm2-last-layer"
    subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "init-heads", "--model", smollm2,
         "--out", str(out), "--exit-layers", "29", "--threshold", "0.05"],
        check=True,
    )
    return str(out)


def test_both_serve_spellings_start_the_same_engine(smollm2, heads_dir):
    """`vllm serve --spec-model HEADS_DIR` and `--speculative-config` naming
    the same folder are parsed by `vllm serve`'s own argument parser into the
    same engine configuration, so one served engine (below) covers both."""
    from vllm import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    configs = []
    for flags in (["--spec-model", heads_dir],
                  ["--speculative-config", json.dumps({"method": "adadecode",
                                                       "heads": heads_dir})]):
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            ["--model", smollm2, "--dtype", "float32", *flags])
        cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
        configs.append((cfg.speculative_config.method, cfg.speculative_config.model,
                        cfg.speculative_config.num_speculative_tokens,
                        cfg.additional_config["adadecode"]))
    assert configs[0] == configs[1]
    assert configs[0][0] == "custom_class" and configs[0][3]["exit_layers"] == [29]
    assert configs[0][3]["heads"] == str(Path(heads_dir).resolve())


@pytest.mark.engine
def test_vllm_serve_answers_through_openai_client(heads_dir, tmp_path):
    """One `vllm serve` with the heads folder (`--spec-model`); the other
    spelling starts the same engine (test above)."""
    proc, base = serve(["--spec-model", heads_dir], tmp_path / "serve.log")
    try:
        res = subprocess.run(
            [sys.executable, str(ROOT / "examples/client.py"), "--base-url", base + "/v1"],
            capture_output=True, text=True, timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        *answer, last = res.stdout.strip().splitlines()
        stats = json.loads(last)
        assert "def" in "\n".join(answer)  # a Python function came back
        assert stats["usage"] > 10
        assert stats["vllm:spec_decode_num_drafts_total"] > 0
        assert stats["vllm:spec_decode_num_draft_tokens_total"] > 0
        assert stats["vllm:spec_decode_num_accepted_tokens_total"] > 0
        log = (tmp_path / "serve.log").read_text()
        assert "AdaDecode enabled" in log or "custom_class" in log
        _bad_requests_are_refused_and_serving_goes_on(base)
    finally:
        stop(proc)


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _bad_requests_are_refused_and_serving_goes_on(base: str) -> None:
    """An out-of-vocabulary token id, an empty prompt and a prompt longer than
    max_model_len (2048) each get vLLM's 400; the server keeps answering."""
    model = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=30).read())
    name = model["data"][0]["id"]
    cases = {
        "out-of-vocabulary token id": {"prompt": [1, 2, 10**7]},
        "empty prompt": {"prompt": ""},
        "prompt over max_model_len": {"prompt": [42] * 2100},
    }
    for case, body in cases.items():
        status, reply = _post(base, "/v1/completions", {"model": name, "max_tokens": 8, **body})
        assert status == 400, (case, status, reply)
        assert reply.get("error", {}).get("message"), (case, reply)
    status, reply = _post(base, "/v1/completions",
                          {"model": name, "prompt": "def add(a, b):", "max_tokens": 16,
                           "temperature": 0.0})
    assert status == 200 and reply["usage"]["completion_tokens"] > 0, reply


def test_malformed_speculative_config_json_is_refused_at_start(tmp_path):
    res = subprocess.run(
        [str(Path(sys.executable).parent / "vllm"), "serve", "unused-model",
         "--speculative-config", '{"method": "adadecode", "threshold": '],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 2  # argparse's usage error, before any engine starts
    err = res.stderr
    assert "argument --speculative-config" in err and "cannot be converted" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.engine
def test_offline_example(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples/offline.py"), "--enforce-eager",
         "--max-tokens", "48", "--speculative-config", json.dumps(LAST_LAYER)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("spec decode counters:")][0]
    counters = json.loads(line.split(":", 1)[1])
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0
    assert res.stdout.count("---") >= 3
