"""Exit-head training on the tiny model: the CLI end to end (one vLLM engine
generates the data), then the pieces on its cached data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_adadecode.heads import ExitHeads, base_model_fingerprint

pytestmark = pytest.mark.engine  # the trained fixture generates its data with vLLM


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    out, work = root / "heads", root / "work"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "train-heads", "--model", tiny_llama,
         "--out", str(out), "--work-dir", str(work), "--data", "humaneval,mtbench",
         "--num-prompts", "40", "--max-tokens", "48", "--exit-layers", "auto",
         "--epochs", "3", "--probe-epochs", "1", "--batch", "128", "--held-out", "0.2",
         "--log", str(root / "engine.log")],
        capture_output=True, text=True, timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, work, res.stdout


def test_cli_writes_a_loadable_heads_folder(trained, tiny_llama):
    out, _, stdout = trained
    heads = ExitHeads.load(out)
    cfg = json.loads((out / "config.json").read_text())
    assert heads.base_model_fingerprint == base_model_fingerprint(tiny_llama)
    assert 1 <= len(heads.exit_layers) <= 3 and all(1 <= x <= 4 for x in heads.exit_layers)
    sel = cfg["training"]["selection"]
    assert sel["best"]["exit_layers"] == heads.exit_layers
    assert heads.threshold == sel["best"]["threshold"]
    assert (out / "eval.json").exists() and (out / "eval.png").stat().st_size > 10_000
    assert "chose exit layers" in stdout


def test_training_reduces_held_out_kl_versus_identity(trained):
    out, _, _ = trained
    kl = json.loads((out / "config.json").read_text())["training"]["held_out_kl"]
    for layer, identity in kl["identity"].items():
        assert kl["trained"][layer] < 0.98 * identity, (layer, kl)


def _features(work, tiny_llama, layers):
    from transformers import AutoModelForCausalLM

    from vllm_adadecode.training.data import collect_features, load_sequences

    seqs = load_sequences(str(next(Path(work).glob("sequences-*.jsonl"))))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return hf, collect_features(hf, seqs, layers)


def test_same_seed_same_heads_and_bit_identical_reload(trained, tiny_llama, tmp_path):
    from vllm_adadecode.training.train import FrozenHead, train_heads

    _, work, _ = trained
    hf, feats = _features(work, tiny_llama, [2, 4])
    head = FrozenHead.from_hf(hf)
    a = train_heads(head, feats, [2, 4], epochs=1, batch=128, seed=7)
    b = train_heads(head, feats, [2, 4], epochs=1, batch=128, seed=7)
    c = train_heads(head, feats, [2, 4], epochs=1, batch=128, seed=8)
    assert all(torch.equal(a[x], b[x]) for x in (2, 4))
    assert not torch.equal(a[2], c[2])
    ExitHeads(a, hidden_size=256, base_model_fingerprint="fp").save(tmp_path)
    back = ExitHeads.load(tmp_path)
    assert all(torch.equal(back.transforms[x], a[x]) for x in (2, 4))


def test_feature_extraction_matches_the_models_own_logits(trained, tiny_llama):
    from vllm_adadecode.training.train import FrozenHead

    _, work, _ = trained
    hf, feats = _features(work, tiny_llama, [4])
    head = FrozenHead.from_hf(hf)
    # the frozen head on the final state reproduces the model's distribution
    seqs_first = feats.select(feats.seq_ids == feats.seq_ids[0])
    from vllm_adadecode.training.data import load_sequences

    prompt, response = load_sequences(str(next(Path(work).glob("sequences-*.jsonl"))))[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    assert torch.allclose(head.final_logits(seqs_first.final), logits, atol=1e-4)
    # and its greedy choices are the response vLLM generated (fp32 HF vs vLLM)
    agree = (logits.argmax(-1) == torch.tensor(response)).float().mean().item()
    # Measured 1.000: fp32 Hugging Face and fp32 vLLM pick the same token at
    # every position of this response. 0.9 allows a few near-ties to flip (a
    # different matmul order) while any real mismatch of features fails.
    assert agree > 0.9, agree


def test_shortlist_covers_held_out_tokens_and_rebuilds_identically(trained, tiny_llama):
    """train-heads stores the most frequent response tokens; the shortlist
    command rebuilds the same list from the cached responses (no engine)."""
    out, work, _ = trained
    heads = ExitHeads.load(out)
    ids = heads.shortlist
    assert ids is not None and 0 < ids.numel() <= 4096
    assert torch.equal(ids, torch.unique(ids))  # sorted, no repeats
    cfg = json.loads((out / "config.json").read_text())
    coverage = cfg["training"]["shortlist_held_out_coverage"]
    # (the tiny random model's responses are near-uniform: coverage is low here;
    # test_shipped_heads checks it on SmolLM2)
    assert 0.0 < coverage <= 1.0, coverage
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "shortlist", "--model", tiny_llama,
         "--heads", str(out), "--work-dir", str(work), "--held-out", "0.2"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "reusing generated responses" in res.stdout
    again = ExitHeads.load(out)
    assert torch.equal(again.shortlist, ids)
    assert all(torch.equal(again.transforms[x], heads.transforms[x]) for x in heads.exit_layers)
    cfg2 = json.loads((out / "config.json").read_text())
    assert cfg2["training"]["shortlist_held_out_coverage"] == coverage


def test_shortlist_from_shipped_text_widens_and_keeps_the_old_ids(trained, tiny_llama, tmp_path):
    """``shortlist --source text`` counts ShareGPT's train-split replies (no
    generation), keeps the folder's current ids, leaves the heads alone and
    records how the list was made; it covers more eval-split reply tokens."""
    import shutil

    out, _, _ = trained
    folder = tmp_path / "heads"
    shutil.copytree(out, folder)
    before = ExitHeads.load(folder)
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "shortlist", "--model", tiny_llama,
         "--heads", str(folder), "--source", "text", "--size", "1024", "--text-replies", "400"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    after = ExitHeads.load(folder)
    assert torch.isin(before.shortlist, after.shortlist).all()
    assert torch.equal(after.shortlist, torch.unique(after.shortlist))
    assert before.shortlist.numel() < after.shortlist.numel() <= before.shortlist.numel() + 1024
    assert all(torch.equal(after.transforms[x], before.transforms[x])
               for x in before.exit_layers)
    src = json.loads((folder / "config.json").read_text())["shortlist_source"]
    assert src["sharegpt_train_replies"] == 400 and src["sharegpt_reply_tokens"] > 10_000
    assert src["kept_ids"] == before.shortlist.numel() and src["corpus"] is None
    assert src["eval_reply_coverage"] > src["eval_reply_coverage_before"] + 0.1, src
    assert "--source text" in src["command"]


def test_responses_are_reused_per_prompt_for_another_prompt_list(trained, tiny_llama, capsys):
    """Every response is also kept by its prompt: a different list of already
    answered prompts (here reordered and cut) is assembled without generating,
    and a line cut short by an interrupted run is skipped."""
    from vllm_adadecode.training import data as D
    from vllm_adadecode.training.pipeline import sequences_for

    _, work, _ = trained
    prompts = D.load_prompts("humaneval,mtbench", 40, 0)
    first = D.load_sequences(str(next(Path(work).glob("sequences-*.jsonl"))))
    assert len(first) == len(prompts)
    store = next(Path(work).glob("responses-*.jsonl"))
    with open(store, "a") as f:
        f.write('{"key": "cut sh')  # an interrupted append
    subset = prompts[::-1][:25]
    capsys.readouterr()
    seqs = sequences_for(tiny_llama, subset, max_tokens=48, concurrency=4, seed=0,
                         cache_dir=Path(work), log_path=None)
    printed = capsys.readouterr().out
    assert "generating" not in printed, printed
    assert seqs == first[::-1][:25]
    assert len(list(Path(work).glob("sequences-*.jsonl"))) == 2  # the new list's file


def test_eval_heads_writes_agreement_calibration_and_predicted_speed(trained, tiny_llama,
                                                                       tmp_path):
    out, work, _ = trained
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "eval-heads", "--model", tiny_llama,
         "--heads", str(out), "--data", "humaneval,mtbench", "--num-prompts", "8",
         "--max-tokens", "24", "--work-dir", str(work), "--out-json", str(js),
         "--out-png", str(png), "--log", str(tmp_path / "engine.log")],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(js.read_text())
    heads = ExitHeads.load(out)
    assert set(report["layers"]) == {str(x) for x in heads.exit_layers}
    for r in report["layers"].values():
        for kind in ("identity", "trained"):
            assert 0.0 <= r[kind]["agreement"] <= 1.0
    assert png.stat().st_size > 10_000
    # --num-prompts 8 takes the first 8 of the list: all HumanEval
    pred = report["predicted"]
    assert set(pred) == {"humaneval"}
    own = pred["humaneval"]["heads_config"]
    assert own["exit_layers"] == heads.exit_layers and own["tokens_per_step"] >= 1.0
    assert pred["humaneval"]["best"]["speedup"] >= own["speedup"] - 1e-9
    assert "humaneval: predicted batch-1 speedup" in res.stdout


@pytest.fixture(scope="module")
def design_feats(trained, tiny_llama):
    _, work, _ = trained
    hf, feats = _features(work, tiny_llama, [2])
    from vllm_adadecode.training.train import FrozenHead

    train, held = feats.split_by_sequence(0.25, seed=0)
    return FrozenHead.from_hf(hf), train, held


@pytest.mark.parametrize("design", ["dxd", "mlp", "final_state", "attention"])
def test_each_design_lowers_held_out_kl_and_reloads_bit_identical(design_feats, tiny_llama,
                                                                  tmp_path, design):
    from vllm_adadecode.head_designs import DESIGNS
    from vllm_adadecode.training.evaluate import exit_stats
    from vllm_adadecode.training.train import train_design

    head, train, held = design_feats
    # 2 epochs (CI size, seeded: the same every run): each design's held-out KL
    # measured 0.927-0.937 of identity's, under the 0.98 bound
    p = train_design(head, train, 2, DESIGNS[design], epochs=2, batch=128, lr=2e-3, seed=3)
    again = train_design(head, train, 2, DESIGNS[design], epochs=2, batch=128, lr=2e-3, seed=3)
    assert all(torch.equal(p[k], again[k]) for k in p)  # seeded
    transform = p.pop("transform")
    identity = exit_stats(head, held, {2: None})[2]["kl"].mean()
    trained_kl = exit_stats(head, held, {2: transform}, design=design, extra={2: p})[2]["kl"]
    assert trained_kl.mean() < 0.98 * identity, (design, float(trained_kl.mean()), float(identity))
    heads = ExitHeads({2: transform}, hidden_size=256, design=design, extra={2: p},
                      base_model_fingerprint=base_model_fingerprint(tiny_llama))
    heads.save(tmp_path)
    back = ExitHeads.load(tmp_path)
    assert back.design == design
    assert all(torch.equal(back.params(2)[k], heads.params(2)[k]) for k in heads.params(2))
    again_kl = exit_stats(head, held, {2: back.transforms[2]}, design=design,
                          extra=back.extra)[2]["kl"]
    assert torch.equal(again_kl, trained_kl)


def test_compare_heads_judges_every_design_and_applies_the_gate(trained, tiny_llama, tmp_path):
    out, work, _ = trained
    js, png = tmp_path / "designs.json", tmp_path / "designs.png"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "compare-heads", "--model", tiny_llama,
         "--heads", str(out), "--depths", "0,2", "--data", "humaneval,mtbench",
         "--num-prompts", "40", "--max-tokens", "48", "--eval-data", "humaneval,mtbench",
         "--eval-num-prompts", "8", "--eval-max-tokens", "24", "--epochs", "1",
         "--batch", "128", "--train-vocab", "0", "--work-dir", str(work),
         "--out-json", str(js), "--out-png", str(png), "--log", str(tmp_path / "engine.log")],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(js.read_text())
    rows = {(r["design"], r["depth"]): r for r in report["rows"]}
    shipped = ExitHeads.load(out)
    assert {("shipped", x + 1) for x in shipped.exit_layers} <= set(rows)
    for design in ("identity", "dxd", "mlp", "final_state", "attention"):
        for depth in (0, 2):
            r = rows[(design, depth)]
            assert 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["calibration_error"] <= 1.0
            assert r["predicted"]["humaneval"]["speedup"] > 0
            if design != "identity" and depth == 2:
                assert r["kl"] < rows[("identity", 2)]["kl"], (design, r["kl"])
    assert len(rows[("final_state", 2)]["agreement_by_age"]) == 3
    gate = report["gate"]
    assert gate["shipped"]["humaneval"] == max(
        rows[("shipped", x + 1)]["predicted"]["humaneval"]["speedup"] for x in shipped.exit_layers)
    assert set(gate["passed"]) <= {"dxd", "mlp", "final_state", "attention"}
    assert "| design | depth |" in res.stdout and gate["finding"] in res.stdout
    assert png.stat().st_size > 10_000


def test_eval_heads_reports_a_version_2_design(design_feats, trained, tiny_llama, tmp_path):
    from vllm_adadecode.head_designs import DESIGNS
    from vllm_adadecode.training.train import train_design

    head, train, _ = design_feats
    _, work, _ = trained
    p = train_design(head, train, 2, DESIGNS["final_state"], epochs=2, batch=128, seed=0)
    folder = tmp_path / "heads"
    ExitHeads({2: p.pop("transform")}, hidden_size=256, design="final_state", extra={2: p},
              threshold=0.5, base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(folder)
    js = tmp_path / "eval.json"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "eval-heads", "--model", tiny_llama,
         "--heads", str(folder), "--data", "humaneval,mtbench", "--num-prompts", "8",
         "--max-tokens", "24", "--work-dir", str(work), "--out-json", str(js),
         "--out-png", str(tmp_path / "eval.png"), "--log", str(tmp_path / "engine.log")],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(js.read_text())
    assert report["design"] == "final_state" and set(report["layers"]) == {"2"}
    assert "design 'final_state'" in res.stdout
    assert report["predicted"]["humaneval"]["heads_config"]["speedup"] > 0


@pytest.fixture(scope="module")
def with_corpus(trained, tiny_llama, tmp_path_factory):
    """A copy of the trained heads folder, given a corpus by `vllm-adadecode
    corpus` from the training prompts' cached responses."""
    import shutil

    out, work, _ = trained
    root = tmp_path_factory.mktemp("corpus")
    heads = root / "heads"
    shutil.copytree(out, heads)
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "corpus", "--model", tiny_llama,
         "--heads", str(heads), "--data", "humaneval,mtbench", "--num-prompts", "40",
         "--max-tokens", "48", "--work-dir", str(work), "--log", str(root / "engine.log")],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return heads, res.stdout


def test_corpus_command_writes_a_corpus_from_cached_responses(trained, with_corpus, tiny_llama):
    """`vllm-adadecode corpus` end to end at CI size: the training prompts'
    responses are already cached, so no engine starts; the heads folder gains
    a corpus whose tokens are those responses, and its config records how."""
    from vllm_adadecode.drafts.corpus import DraftCorpus, load_corpus_tokens
    from vllm_adadecode.training.data import load_sequences

    out, work, _ = trained
    heads, stdout = with_corpus
    assert "generating" not in stdout
    seqs = load_sequences(str(next(Path(work).glob("sequences-*.jsonl"))))
    tokens = load_corpus_tokens(heads)
    assert DraftCorpus(tokens).num_tokens == sum(len(r) for _, r in seqs)
    info = json.loads((heads / "config.json").read_text())["corpus"]
    assert info["num_prompts"] == 40 and info["tokens"] == sum(len(r) for _, r in seqs)
    assert ExitHeads.load(heads).exit_layers == ExitHeads.load(out).exit_layers  # heads kept


def test_corpus_answers_pair_with_their_prompts_as_vllm_tokenized_them(trained, with_corpus,
                                                                        tiny_llama):
    """`train-heads --text-corpus` reads a corpus back as (prompt, answer)
    pairs: the corpus record's prompts in the model's chat template, tokenized
    as vLLM tokenized them when it wrote the answers; a token cap stops early."""
    from vllm_adadecode.training.data import corpus_sequences, load_sequences

    _, work, _ = trained
    heads, _ = with_corpus
    generated = load_sequences(str(next(Path(work).glob("sequences-*.jsonl"))))
    pairs = corpus_sequences(tiny_llama, str(heads))
    kept = [(p, r) for p, r in generated if r]
    assert len(pairs) == len(kept) == 40
    assert pairs == [(list(p), list(r)) for p, r in kept]
    capped = corpus_sequences(tiny_llama, str(heads), limit_tokens=100)
    assert 0 < sum(len(r) for _, r in capped) <= 100 and capped == pairs[:len(capped)]


def test_train_heads_on_a_corpus_alone_with_a_sampled_softmax(with_corpus, tiny_llama, tmp_path):
    """`train-heads --num-prompts 0 --text-corpus`: no generation, the
    corpus's answers teacher-forced, trained over a sampled vocabulary; the
    heads lower held-out KL and the config records the data and the softmax."""
    heads, _ = with_corpus
    out = tmp_path / "text_heads"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "train-heads", "--model", tiny_llama,
         "--out", str(out), "--work-dir", str(tmp_path / "work"), "--num-prompts", "0",
         "--text-corpus", str(heads), "--exit-layers", "2", "--epochs", "3", "--batch", "128",
         "--held-out", "0.2", "--train-vocab", "1024", "--negatives", "512"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "generating" not in res.stdout and "teacher-forced" in res.stdout
    tr = json.loads((out / "config.json").read_text())["training"]
    assert tr["text_answers"] == 40 and tr["train_vocab"] == 1024 and tr["negatives"] == 512
    assert tr["held_out_kl"]["trained"]["2"] < 0.98 * tr["held_out_kl"]["identity"]["2"]
    assert ExitHeads.load(out).exit_layers == [2]


@pytest.mark.full
def test_full_size_training_on_smollm2(smollm2, tmp_path):
    """Long tier: `train-heads` with its default sizes (480 prompts of 128
    tokens from humaneval, mtbench and sharegpt, exit layers chosen by
    predicted speed, 2 epochs) on the packaged SmolLM2, from an empty work
    folder: the recipe of the shipped heads, end to end. Takes about 20 minutes
    (20 min 9 s on 2026-12-05: 5 min generating, the rest features and training)."""
    out, work = tmp_path / "heads", tmp_path / "work"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_adadecode.cli", "train-heads", "--model", smollm2,
         "--out", str(out), "--work-dir", str(work), "--log", str(tmp_path / "engine.log")],
        capture_output=True, text=True, timeout=3600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    heads = ExitHeads.load(out)
    assert heads.base_model_fingerprint == base_model_fingerprint(smollm2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["selection"]["best"]["exit_layers"] == heads.exit_layers
    kl = cfg["training"]["held_out_kl"]
    for layer, identity in kl["identity"].items():
        assert kl["trained"][layer] < identity, (layer, kl)
    seqs = next(work.glob("sequences-*.jsonl")).read_text().splitlines()
    assert len(seqs) >= 400  # the default 480 prompts, less any that failed to decode
