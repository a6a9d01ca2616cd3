"""`vllm-adadecode bench` on the tiny model: a real short run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_adadecode.bench import harness as H

from .conftest import build_tiny_llama


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_llama, smollm2):
    d = tmp_path_factory.mktemp("bench")
    draft = build_tiny_llama(d / "draft-llama", smollm2, seed=1)
    prompts = d / "prompts.jsonl"
    lines = [
        {"prompt": "Write a haiku about the sea.", "category": "writing"},
        {"turns": ["List three prime numbers.", "And three more?"], "category": "math"},
        {"prompt": "Tell me a story about a robot.", "category": "writing"},
        {"turns": ["What is 12 times 12?"], "category": "math"},
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out, png = d / "results.json", d / "results.png"
    cmd = [sys.executable, "-m", "vllm_adadecode.cli", "bench", "--model", tiny_llama,
           "--prompts", str(prompts), "--max-tokens", "16", "--concurrency", "1,2",
           "--repeats", "1", "--enforce-eager", "--one-process", "--draft-model", str(draft),
           # drafting on every step (no back-off) at a low threshold: kept and rejected drafts
           "--method", 'adadecode={"exit_layers": [1, 3, 5], "threshold": 0.005, "adaptive": false}',
           "--method", "ngram", "--out", str(out), "--plot", str(png),
           "--log", str(d / "engines.log")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:] + (d / "engines.log").read_text()[-3000:]
    return json.loads(out.read_text()), proc.stdout, png


@pytest.mark.engine
def test_bench_json_has_every_field(bench_run):
    doc, stdout, png = bench_run
    assert doc["schema"] == H.SCHEMA
    labels = [m["label"] for m in doc["methods"]]
    low_label = "adadecode[exit_layers=[1,3,5],threshold=0.005,adaptive=false]"
    # the AdaDecode engine with drafting off joins as a second plain baseline
    assert labels == ["vanilla", low_label, "ngram", "draft_model", "adadecode[drafting off]"]
    assert doc["settings"]["concurrency"] == [1, 2] and doc["settings"]["max_tokens"] == 16
    # --one-process: every engine in one job host, with vLLM's in-process
    # engine-core client, not its engine process
    assert doc["settings"]["in_process"] is True and doc["settings"]["one_process"] is True
    assert doc["settings"]["engine_core_client"] == "InprocClient"
    res = doc["results"]
    assert len(res) == len(labels) * 2  # every method at both concurrencies
    for r in res:
        for key in ("tokens_per_s", "speedup", "speedup_min", "speedup_max", "tokens_per_step",
                    "identical_to_vanilla", "peak_rss_mb", "output_tokens", "categories"):
            assert r[key] is not None, (r["method"], key)
        assert set(r["categories"]) == {"math", "writing"}
        assert r["output_tokens"] > 0 and r["peak_rss_mb"] > 100
    van = [r for r in res if r["method"] == "vanilla"]
    assert all(r["speedup"] <= 1.0 and r["tokens_per_step"] == 1.0 for r in van)
    off = [r for r in res if r["method"] == "adadecode[drafting off]"]
    assert all(r["plain"] and r["tokens_per_step"] == 1.0 and r["speedup"] <= 1.0 for r in off)
    for r in res:  # each repeat divides by the faster plain engine
        for rep in r["repeats"]:
            assert rep["baseline"] in ("vanilla", "adadecode[drafting off]")
    assert all(max(a["speedup"], b["speedup"]) == 1.0 for a, b in zip(van, off))
    assert all(r["layer_evals_per_token"] == {"vanilla": 6.0} for r in van)
    for r in res:  # greedy speculation is lossless: every method matches vanilla
        assert r["identical_to_vanilla"] == 1.0, r["method"]
    ada = [r for r in res if r["kind"] == "adadecode"]
    assert all(r["exit_histogram"] is not None for r in ada)
    # the low threshold drafts, and some drafts are rejected on the random model
    low = [r for r in ada if r["method"] == low_label]
    assert sum(sum(r["exit_histogram"]["rejected"].values()) for r in low) > 0
    assert sum(r["acceptance_rate"] for r in low) > 0
    for r in low:
        le = r["layer_evals_per_token"]
        assert le["deferred"] < le["recompute"]
    assert "== prompts.jsonl, concurrency 2" in stdout and "draft_model" in stdout
    assert png.stat().st_size > 10_000


@pytest.mark.engine
def test_draft_sources_match_vllm_draft_counters(bench_run):
    doc, stdout, _ = bench_run
    for r in doc["results"]:
        src = r["sources"]
        if not src:
            continue
        by = src["by_source"]
        drafted = sum(v["drafted"] for v in by.values())
        accepted = sum(v["accepted"] for v in by.values())
        # the drafter's own accounting (lookups and exits) agrees with vLLM's counters
        assert drafted > 0 or r["acceptance_rate"] == 0
        if drafted:
            assert abs(accepted / drafted - r["acceptance_rate"]) < 1e-9
        h = r["exit_histogram"]
        if h:  # exits are the "exit" source
            assert sum(h["accepted"].values()) == by.get("exit", {}).get("accepted", 0)
    for r in doc["results"]:  # every method's step is split into its parts
        st = r["step_ms"]
        assert st and st["forward"] > 0 and st["total"] > st["forward"] + st["drafting"]
        if r["kind"] == "vanilla":
            assert st["drafting"] == 0
    assert "ms per step: drafting" in stdout


def test_parity_is_measured_against_vanilla():
    """A method whose outputs differ from vanilla's is reported as such."""
    from vllm_adadecode.prompts import Prompt

    ps = [Prompt("a", "a", "c1"), Prompt("b", "b", "c2")]
    methods = [H.Method("vanilla", "vanilla", None), H.Method("ngram", "ngram", {})]

    def run(tokens, tps):
        return {"tokens_per_s": tps, "elapsed_s": 1.0, "output_tokens": 6, "token_ids": tokens,
                "latency_s": [1.0, 1.0], "spec": {"num_accepted_tokens": 0,
                                                  "num_draft_tokens": 0},
                "tokens_per_step": 1.0, "acceptance_rate": 0.0, "drafter": None}

    runs = [{"vanilla": run([[1, 2, 3], [4, 5, 6]], 10.0),
             "ngram": run([[1, 2, 3], [4, 5, 7]], 15.0)}]
    recs = H.summarise("d", 1, ps, methods, runs, {"vanilla": 1.0, "ngram": 1.0}, num_layers=6)
    ngram = recs[1]
    assert ngram["identical_to_vanilla"] == 0.5 and ngram["speedup"] == 1.5
    assert ngram["categories"]["c1"]["identical_to_vanilla"] == 1.0
    assert ngram["categories"]["c2"]["identical_to_vanilla"] == 0.0


def test_repeats_alternate_the_run_order():
    methods = ["vanilla", "adadecode", "ngram"]
    orders = [H.run_order(methods, r) for r in range(4)]
    assert orders[0] == orders[2] == methods
    assert orders[1] == orders[3] == methods[::-1]
    assert methods == ["vanilla", "adadecode", "ngram"]  # not reordered in place


def test_speedup_divides_by_the_faster_plain_configuration():
    from vllm_adadecode.prompts import Prompt

    ps = [Prompt("a", "a", "c1")]
    methods = [H.Method("vanilla", "vanilla", None),
               H.Method("vanilla[async_scheduling=false]", "vanilla", None,
                        {"async_scheduling": False}),
               H.Method("ngram", "ngram", {})]

    def run(tps):
        return {"tokens_per_s": tps, "elapsed_s": 1.0, "output_tokens": 3, "token_ids": [[1, 2]],
                "latency_s": [1.0], "spec": {"num_accepted_tokens": 0, "num_draft_tokens": 0},
                "tokens_per_step": 1.0, "acceptance_rate": 0.0, "drafter": None}

    runs = [{"vanilla": run(10.0), "vanilla[async_scheduling=false]": run(12.0),
             "ngram": run(15.0)},
            {"vanilla": run(10.0), "vanilla[async_scheduling=false]": run(8.0),
             "ngram": run(15.0)}]
    recs = H.summarise("d", 1, ps, methods, runs, dict.fromkeys(runs[0], 1.0), num_layers=6)
    ngram = recs[2]
    assert [x["speedup"] for x in ngram["repeats"]] == [1.25, 1.5]
    assert [x["baseline"] for x in ngram["repeats"]] == ["vanilla[async_scheduling=false]",
                                                         "vanilla"]
    assert recs[0]["repeats"][0]["speedup"] == pytest.approx(10 / 12)
    m = H.parse_method("adadecode")  # bare: the default settings
    assert (m.label, m.kind) == ("adadecode", "adadecode")
    m = H.parse_method('vanilla={"async_scheduling": false}')
    assert m.kind == "vanilla" and m.engine_args == {"async_scheduling": False}
    m = H.parse_method('vanilla={"label": "vanilla-last"}')
    assert (m.label, m.kind, m.engine_args) == ("vanilla-last", "vanilla", None)


def test_adadecode_with_drafting_off_is_a_plain_baseline():
    """When AdaDecode runs, the bench adds the AdaDecode engine with drafting
    off, and a speedup divides by the faster of it and vanilla."""
    from vllm_adadecode.prompts import Prompt

    methods = H.with_baselines([H.parse_method("adadecode"), H.parse_method("ngram")])
    assert [m.label for m in methods] == ["vanilla", "adadecode", "ngram",
                                          "adadecode[drafting off]"]
    assert [H.is_plain(m) for m in methods] == [True, False, False, True]
    given = H.parse_method('adadecode={"lookup": false, "self_draft": false, "label": "off"}')
    assert H.with_baselines([given]) == [methods[0], given]  # not added twice
    assert [m.label for m in H.with_baselines([H.parse_method("ngram")])] == ["vanilla", "ngram"]

    def run(tps):
        return {"tokens_per_s": tps, "elapsed_s": 1.0, "output_tokens": 3, "token_ids": [[1, 2]],
                "latency_s": [3 / tps], "spec": {"num_accepted_tokens": 0, "num_draft_tokens": 0},
                "tokens_per_step": 1.0, "acceptance_rate": 0.0, "drafter": None}

    runs = [{"vanilla": run(10.0), "adadecode": run(18.0), "ngram": run(11.0),
             "adadecode[drafting off]": run(12.0)}]
    recs = H.summarise("d", 1, [Prompt("a", "a", "c1")], methods, runs,
                       dict.fromkeys(runs[0], 1.0), num_layers=6)
    ada = recs[1]
    assert ada["speedup"] == 1.5 and ada["repeats"][0]["baseline"] == "adadecode[drafting off]"
    assert ada["categories"]["c1"]["speedup"] == 1.5
    assert [r["plain"] for r in recs] == [True, False, False, True]
    assert "speedup over the faster plain engine of each repeat (vanilla, adadecode[drafting " \
        "off]): adadecode[drafting off]" in H.format_table(
            {"settings": {"repeats": 1}, "results": recs})


@pytest.mark.parametrize("bad, field", [
    ("medusa", "--method"), ('adadecode={"threshold": ', "--method"), ("draft_model", "draft"),
    ('vanilla={"a": 1}', "vanilla"), ('vanilla={"label": 3}', "label"),
])
def test_bad_methods_name_the_flag(bad, field):
    with pytest.raises(H.BenchError, match=field):
        H.parse_method(bad)


def test_bad_concurrency_and_dataset_are_refused():
    with pytest.raises(H.BenchError, match="--concurrency"):
        H.parse_concurrency("1,0")
    with pytest.raises(H.BenchError, match="--dataset"):
        H.load_datasets(["gsm8k"], None, 4)


def test_tokens_per_step_counts_the_drafters_steps_not_drafts_past_max_tokens():
    """Two requests of 9 tokens (8 decoded each): the drafter saw 3 steps each
    (a prefill, then 2 decode steps), while vLLM's counter also holds drafts
    accepted past ``max_tokens`` (14 here, 12 emitted), which would give 8.0
    tokens per step. The drafter's steps give the true 4.0; without them the
    counters decide."""
    from vllm_adadecode.bench.worker import acceptance_stats

    tokens = [list(range(9)), list(range(9))]
    counters = {"num_accepted_tokens": 14, "num_draft_tokens": 16}
    stats = acceptance_stats(counters, tokens, [[3, 7], [3, 7]])
    assert stats["tokens_per_step"] == 4.0
    assert acceptance_stats(counters, tokens)["tokens_per_step"] == 8.0
    # a request the drafter did not count: the counters decide
    assert acceptance_stats(counters, tokens, [[3, 7], None])["tokens_per_step"] == 8.0


def test_category_tokens_per_step_counts_the_output_not_drafts_past_max_tokens():
    """The per-category column: a request of 9 tokens decoded in 2 steps whose
    drafter count holds 9 accepted drafts (1 past ``max_tokens``) makes 4.0
    tokens per step, not 5.5; a request the drafter did not count is left out."""
    assert H._tokens_per_step([[3, 9], None], [list(range(9)), list(range(5))]) == 4.0
    assert H._tokens_per_step([None], [list(range(5))]) is None
