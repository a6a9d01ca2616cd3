"""The ``vllm-adadecode`` command.

    vllm-adadecode demo        vanilla vLLM vs AdaDecode on packaged prompts
    vllm-adadecode model-path  print (and build once) a packaged model's folder
    vllm-adadecode init-heads  write an identity (untrained) exit-heads folder
    vllm-adadecode train-heads self-distil exit heads on the model's own outputs
    vllm-adadecode eval-heads  agreement / exits vs threshold / calibration, JSON + PNG
    vllm-adadecode compare-heads  every head design at every depth: agreement, predicted speed
    vllm-adadecode bench       speculative methods side by side (Spec-Bench style)
    vllm-adadecode soak        vllm serve with AdaDecode vs plain under a mix of abuse

(Over 500 lines: one argparse parser and one short function per subcommand;
the work itself lives in the modules each calls.)
"""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _non_negative(s: str) -> int:
    import argparse

    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {s!r}")
    return v


def cmd_model_path(args) -> int:
    from .models import packaged_model_dir

    try:
        print(packaged_model_dir(args.model or args.name or "SmolLM2-135M-Instruct"))
    except (ValueError, RuntimeError) as e:  # unknown name, package not installed
        print(f"vllm-adadecode model-path: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_init_heads(args) -> int:
    from .heads import ExitHeads, base_model_fingerprint
    from .models import packaged_model_dir

    model = args.model or str(packaged_model_dir())
    cfg = json.loads(open(f"{model}/config.json").read())
    cfg = cfg.get("text_config", cfg)
    from .config import default_exit_layers, validate_exit_layers

    layers = (
        validate_exit_layers(args.exit_layers, cfg["num_hidden_layers"])
        if args.exit_layers
        else default_exit_layers(cfg["num_hidden_layers"])
    )
    heads = ExitHeads.identity(
        layers,
        cfg["hidden_size"],
        threshold=args.threshold,
        base_model_fingerprint=base_model_fingerprint(model),
        metadata={"base_model": str(model), "trained": False},
    )
    print(heads.save(args.out))
    return 0


def demo_rows(specs: list[dict]) -> list[tuple[str, dict | None]]:
    """The demo's engines: vanilla vLLM, the AdaDecode engine with drafting
    off (the first configuration with lookups and self-drafts off: it
    proposes nothing), and AdaDecode with each configuration given."""
    ada = [("adadecode" if len(specs) == 1 else f"adadecode#{i + 1}", s)
           for i, s in enumerate(specs)]
    from .config import DRAFTING_OFF

    return [("vanilla", None), ("drafting off", {**specs[0], **DRAFTING_OFF}), *ada]


def demo_summary(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row: mean tokens/s over the rounds, each round's tokens/s, and the
    speedup over the faster plain engine (vanilla or drafting off)."""
    mean = {n: sum(r["tokens_per_s"] for r in rs) / len(rs) for n, rs in results.items()}
    plain = max(("vanilla", "drafting off"), key=lambda n: mean[n])
    return {n: {"tokens_per_s": mean[n],
                "rounds": [r["tokens_per_s"] for r in rs],
                "speedup": mean[n] / mean[plain],
                "baseline": plain,
                "tokens_per_step": sum(r["tokens_per_step"] for r in rs) / len(rs),
                "acceptance_rate": sum(r["acceptance_rate"] for r in rs) / len(rs)}
            for n, rs in results.items()}


def cmd_demo(args) -> int:
    from .bench.harness import run_order
    from .bench.worker import job_runner
    from .models import packaged_model_dir
    from .prompts import mixed

    if args.rounds < 1:
        print("vllm-adadecode demo: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.one_process and not args.enforce_eager:
        print("vllm-adadecode demo: error: --one-process runs eager engines only; "
              "drop --compile", file=sys.stderr)
        return 2
    model = args.model or str(packaged_model_dir())
    prompts = mixed(args.num_prompts)
    specs = []
    for text in args.speculative_config or ['{"method": "adadecode"}']:
        spec = json.loads(text)
        spec.setdefault("method", "adadecode")
        specs.append(spec)
    base = dict(
        model=model,
        prompts=[p.text for p in prompts],
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        seed=0,
        in_process=args.one_process,
    )
    print(f"model: {model}")
    print(f"prompts: {len(prompts)} ({', '.join(p.id for p in prompts)})")
    print(f"max_tokens={args.max_tokens} concurrency={args.concurrency} dtype={args.dtype} "
          f"rounds={args.rounds} {'eager' if args.enforce_eager else 'compiled'} "
          "(engines alternate; each run is a fresh engine)")
    print(f"engine logs: {args.log}\n")
    rows = demo_rows(specs)
    results: dict[str, list[dict]] = {name: [] for name, _ in rows}
    with job_runner(one_process=args.one_process, log_path=args.log) as run:
        for r in range(args.rounds):
            for name, sc in run_order(rows, r):
                print(f"[round {r + 1}/{args.rounds}] {name}: "
                      f"speculative_config={json.dumps(sc)}", flush=True)
                out = run({**base, "speculative_config": sc})
                results[name].append(out)
                print(f"    {out['output_tokens']} tokens in {out['elapsed_s']:.2f} s "
                      f"({out['tokens_per_s']:.2f} tok/s)", flush=True)
    summary = demo_summary(results)
    reference = results["vanilla"][0]["token_ids"]
    print()
    print(f"{'engine':<14} {'tok/s':>8} {'per round':>16} {'speedup':>8} {'tokens/step':>12} "
          f"{'accept rate':>12} {'identical':>10}")
    all_same = True
    for name, _ in rows:
        row = summary[name]
        same = min(sum(a == b for a, b in zip(o["token_ids"], reference))
                   for o in results[name])
        all_same &= same == len(prompts)
        per_round = " ".join(f"{x:.1f}" for x in row["rounds"])
        print(f"{name:<14} {row['tokens_per_s']:>8.2f} {per_round:>16} {row['speedup']:>7.2f}x "
              f"{row['tokens_per_step']:>12.2f} {row['acceptance_rate']:>12.2f} "
              f"{same:>6}/{len(prompts)}")
    plain = summary["vanilla"]["baseline"]
    engine = summary["drafting off"]["tokens_per_s"] / summary["vanilla"]["tokens_per_s"]
    print(f"\nspeedup = tokens/s over the faster plain engine ({plain}), "
          f"mean of {args.rounds} round(s)")
    print(f"the AdaDecode engine with drafting off runs {engine:.2f}x vanilla: "
          "the engine alone, not counted as speedup")
    for name, sc in rows[2:]:
        row = summary[name]
        drafting = row["tokens_per_s"] / summary["drafting off"]["tokens_per_s"]
        print(f"\n{name}: {json.dumps(sc)}")
        print(f"  speedup over {plain}: {row['speedup']:.2f}x "
              f"(drafting: {drafting:.2f}x the same engine with drafting off)")
        print(f"  mean accepted tokens per verification step: {row['tokens_per_step']:.2f}")
        same = min(sum(a == b for a, b in zip(o["token_ids"], reference)) for o in results[name])
        print(f"  outputs token-for-token identical to vanilla: {same}/{len(prompts)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"specs": specs, "rows": [{"name": n, "speculative_config": sc}
                                                for n, sc in rows],
                       "summary": summary, "results": results}, f, indent=1)
    return 0 if all_same else 1


def cmd_bench(args) -> int:
    from .bench import harness as H

    try:
        methods = [H.parse_method(t, args.draft_model)
                   for t in (args.method or ["vanilla", "adadecode", "ngram"])]
        if args.draft_model and not any(m.kind == "draft_model" for m in methods):
            methods.append(H.parse_method("draft_model", args.draft_model))
        concurrency = H.parse_concurrency(args.concurrency)
        names = [d.strip() for d in (args.dataset or "").split(",") if d.strip()]
        if not names and not args.prompts:
            names = ["humaneval"]
        datasets = H.load_datasets(names, args.prompts, args.num_prompts)
        if args.repeats < 1:
            raise H.BenchError("--repeats must be >= 1")
        if args.temperature < 0:
            raise H.BenchError("--temperature must be >= 0")
        if args.one_process and not args.enforce_eager:
            raise H.BenchError("--one-process runs eager engines only: add --enforce-eager")
    except H.BenchError as e:
        print(f"vllm-adadecode bench: error: {e}", file=sys.stderr)
        return 2
    model = args.model or _packaged()
    print(f"model: {model}")
    print("prompts: " + ", ".join(f"{d} ({len(ps)})" for d, ps in datasets.items()))
    print(f"methods: {', '.join(m.label for m in methods)}")
    print(f"concurrency {concurrency}, max_tokens {args.max_tokens}, dtype {args.dtype}, "
          f"seed {args.seed}, repeats {args.repeats}; engine logs: {args.log}", flush=True)
    doc = H.run(model=model, methods=methods, datasets=datasets, concurrency=concurrency,
                max_tokens=args.max_tokens, dtype=args.dtype, seed=args.seed,
                max_model_len=args.max_model_len, temperature=args.temperature,
                repeats=args.repeats, enforce_eager=args.enforce_eager, log_path=args.log,
                in_process=args.in_process or args.one_process, one_process=args.one_process)
    doc["settings"]["command"] = "vllm-adadecode bench " + " ".join(
        a if " " not in a and "{" not in a else repr(a) for a in args.argv[1:])
    print(H.format_table(doc))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.out}")
    if args.plot:
        H.plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _default_log(name: str) -> str:
    from .models import cache_root

    (cache_root() / "logs").mkdir(parents=True, exist_ok=True)
    return str(cache_root() / "logs" / name)


def _default_work_dir() -> str:
    from .models import cache_root

    return str(cache_root() / "training")


def cmd_train_heads(args) -> int:
    from .training.pipeline import train_command

    args.model = args.model or _packaged()
    train_command(args)
    return 0


def cmd_shortlist(args) -> int:
    from .training.pipeline import shortlist_command

    args.model = args.model or _packaged()
    shortlist_command(args)
    return 0


def cmd_heads_defaults(args) -> int:
    from .training.pipeline import defaults_command

    defaults_command(args)
    return 0


def cmd_compare_heads(args) -> int:
    from .training.compare import compare_command

    from pathlib import Path

    args.model = args.model or _packaged()
    if args.heads is None:
        from .heads import SHIPPED_DIR

        shipped = SHIPPED_DIR / Path(args.model).name
        args.heads = str(shipped) if shipped.is_dir() else None
    compare_command(args)
    return 0


def cmd_corpus(args) -> int:
    from .training.pipeline import corpus_command

    args.model = args.model or _packaged()
    corpus_command(args)
    return 0


def cmd_soak(args) -> int:
    from pathlib import Path

    from . import prompts as P
    from .soak import format_report, run_soak

    texts = [p.text for name in ("humaneval", "mtbench", "sharegpt")
             for p in P.load(name, "eval")]
    spec = json.loads(args.speculative_config) if args.speculative_config else None
    rep = run_soak(model=args.model or _packaged(), requests=args.requests,
                   inflight=args.inflight, seed=args.seed, kv_blocks=args.kv_blocks,
                   prefix_caching=args.prefix_caching, speculative_config=spec,
                   log_dir=Path(args.log_dir), texts=texts, enforce_eager=args.enforce_eager,
                   chunked_prefill=args.chunked_prefill, control=args.control)
    rep["settings"]["command"] = "vllm-adadecode " + " ".join(
        a if " " not in a and "{" not in a else repr(a) for a in args.argv)
    print(format_report(rep))
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
        print(f"wrote {args.out}")
    s = rep["servers"]
    ok = (rep["greedy_identical"] == rep["greedy_compared"]
          and all(x["failed"] == 0 and x["server_errors"] == 0 and x["alive_at_end"]
                  for x in s.values()))
    return 0 if ok else 1


def cmd_eval_heads(args) -> int:
    from .training.pipeline import eval_command

    args.model = args.model or _packaged()
    eval_command(args)
    return 0


def _packaged() -> str:
    from .models import packaged_model_dir

    return str(packaged_model_dir())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-adadecode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="vanilla vLLM vs AdaDecode on packaged prompts")
    d.add_argument("--model", help="HF model folder (default: packaged SmolLM2-135M-Instruct)")
    d.add_argument("--num-prompts", type=int, default=6)
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--concurrency", type=int, default=1)
    d.add_argument("--dtype", default="float32")
    d.add_argument("--enforce-eager", action="store_true", default=True,
                   help="eager engines, no torch.compile (the default: six engine starts "
                        "then fit in a few minutes)")
    d.add_argument("--compile", dest="enforce_eager", action="store_false",
                   help="torch.compile every engine (each start takes 40 s to 3 min)")
    d.add_argument("--speculative-config", action="append",
                   help="JSON; method defaults to adadecode; repeat to compare several")
    d.add_argument("--one-process", action="store_true",
                   help="run every engine in one long-lived process, its engine core "
                        "in-process (eager only): quick checks, not the path vllm.LLM takes")
    d.add_argument("--rounds", type=int, default=2,
                   help="run every engine this many times, alternating the order "
                        "(default: %(default)s)")
    d.add_argument("--out", help="write all results as JSON")
    d.add_argument("--log", default=_default_log("demo.log"),
                   help="append engine logs here (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("model-path", help="print (and build once) a packaged model's local "
                       "HF folder")
    m.add_argument("model", nargs="?", metavar="NAME",
                   help="SmolLM2-135M-Instruct (default), Qwen2.5-Coder-0.5B-Instruct or "
                        "Qwen2.5-Coder-1.5B-Instruct")
    m.add_argument("--name", help=argparse.SUPPRESS)  # the older spelling
    m.set_defaults(func=cmd_model_path)

    h = sub.add_parser("init-heads", help="write identity (untrained) exit heads")
    h.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    h.add_argument("--out", required=True)
    h.add_argument("--exit-layers", type=_int_list)
    h.add_argument("--threshold", type=float, default=0.75)
    h.set_defaults(func=cmd_init_heads)

    t = sub.add_parser("train-heads", help="train exit heads by self-distillation")
    t.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    t.add_argument("--out", required=True, help="heads folder to write")
    t.add_argument("--exit-layers", default="auto",
                   help="'auto' (choose by predicted speed) or comma-separated 0-based layers")
    t.add_argument("--data", default="humaneval,mtbench,sharegpt",
                   help="packaged sets (train split) and/or JSONL files, comma-separated")
    t.add_argument("--num-prompts", type=int, default=480)
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--concurrency", type=int, default=32, help="vLLM batch for generation")
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--probe-epochs", type=float, default=0.5,
                   help="training of candidate heads when --exit-layers auto")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=512)
    t.add_argument("--threshold", type=float, default=None,
                   help="default threshold stored with the heads (auto: chosen with the layers)")
    t.add_argument("--max-draft", type=int, default=5)
    _add_cost_model_args(t, "for --exit-layers auto")
    t.add_argument("--held-out", type=float, default=0.1)
    t.add_argument("--shortlist", type=_non_negative, default=4096,
                   help="vocabulary shortlist size for screening exit checks: the most "
                        "frequent tokens of the training responses (0: none)")
    t.add_argument("--text-corpus", default=None,
                   help="also train on a draft corpus's answers, teacher-forced (no "
                        "generation): a heads folder holding a corpus, or a shipped heads "
                        "folder's name, of a model with the same tokenizer")
    t.add_argument("--text-tokens", type=_non_negative, default=None,
                   help="at most this many answer tokens from --text-corpus (default: all)")
    t.add_argument("--train-vocab", type=_non_negative, default=0,
                   help="train over the N most frequent training tokens plus --negatives "
                        "others drawn each step (a sampled softmax; 0: the whole vocabulary)")
    t.add_argument("--negatives", type=_non_negative, default=4096,
                   help="tokens drawn each step besides --train-vocab's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--work-dir", default=_default_work_dir(), help="cache of generated responses")
    t.add_argument("--log", help="append engine logs here")
    t.set_defaults(func=cmd_train_heads)

    s = sub.add_parser("shortlist", help="add a vocabulary shortlist to a trained heads folder")
    s.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    s.add_argument("--heads", required=True, help="heads folder written by train-heads")
    s.add_argument("--size", type=_non_negative, default=4096)
    s.add_argument("--source", choices=("responses", "text"), default="responses",
                   help="token frequencies from: the model's own training responses (as "
                        "train-heads counts them; regenerated unless cached in --work-dir), "
                        "or text that ships (ShareGPT's train-split replies and the heads' "
                        "draft corpus), keeping the current shortlist's ids; no generation")
    s.add_argument("--text-replies", type=int, default=20000,
                   help="--source text: ShareGPT train-split replies to count")
    s.add_argument("--draft-on-shortlist", action="store_true",
                   help="also write \"full_head_check\": false into the folder's config.json: "
                        "with these heads the engine drafts on the shortlist's top-1 unless "
                        "the user sets full_head_check")
    s.add_argument("--held-out", type=float, default=0.1, help="as given to train-heads")
    s.add_argument("--concurrency", type=int, default=32)
    s.add_argument("--work-dir", default=_default_work_dir(), help="cache of generated responses")
    s.add_argument("--log", help="append engine logs here")
    s.set_defaults(func=cmd_shortlist)

    f = sub.add_parser("heads-defaults",
                       help="set the engine defaults a heads folder carries (in place)")
    f.add_argument("--heads", required=True, help="heads folder")
    f.add_argument("--exit-layers", type=_int_list,
                   help="keep only the heads at these layers (a subset of the folder's): "
                        "the engine drafts there by default")
    f.add_argument("--threshold", type=float, help="the folder's default exit threshold")
    f.add_argument("--full-head-check", choices=("true", "false"),
                   help="the folder's default full_head_check")
    f.set_defaults(func=cmd_heads_defaults)

    c = sub.add_parser("corpus", help="add a draft corpus (the model's own responses to "
                                      "training prompts) to a heads folder")
    c.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    c.add_argument("--heads", required=True, help="heads folder for this model")
    c.add_argument("--data", default="humaneval,mtbench,sharegpt",
                   help="packaged sets (train split) and/or JSONL files, comma-separated")
    c.add_argument("--num-prompts", type=int, default=1500)
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--concurrency", type=int, default=32, help="vLLM batch for generation")
    c.add_argument("--work-dir", default=_default_work_dir(), help="cache of generated responses")
    c.add_argument("--log", help="append engine logs here")
    c.set_defaults(func=cmd_corpus)

    e = sub.add_parser("eval-heads", help="evaluate exit heads against the identity head")
    e.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    e.add_argument("--heads", required=True)
    e.add_argument("--data", default="humaneval,mtbench", help="packaged sets (eval split) or JSONL")
    e.add_argument("--num-prompts", type=int, default=None)
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--concurrency", type=int, default=32)
    e.add_argument("--max-draft", type=int, default=5)
    _add_cost_model_args(e, "for the predicted speedup")
    e.add_argument("--out-json", default="heads_eval.json")
    e.add_argument("--out-png", default="heads_eval.png")
    e.add_argument("--work-dir", default=_default_work_dir())
    e.add_argument("--log", help="append engine logs here")
    e.set_defaults(func=cmd_eval_heads)

    m = sub.add_parser("compare-heads", help="every exit-head design at every depth: agreement, "
                                             "calibration, predicted speed (docs/HEADS.md)")
    m.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    m.add_argument("--heads", help="heads to compare against (default: the model's shipped heads)")
    m.add_argument("--designs", default="dxd,mlp,final_state,attention")
    m.add_argument("--depths", default="0,1,2,4,6,8,12,16,20,24",
                   help="layers run before the head, comma-separated (0: the embeddings)")
    m.add_argument("--data", default="humaneval,mtbench,sharegpt",
                   help="training prompts: packaged sets (train split) and/or JSONL files")
    m.add_argument("--num-prompts", type=int, default=480)
    m.add_argument("--eval-data", default="humaneval,mtbench",
                   help="packaged sets whose eval split judges the heads")
    m.add_argument("--eval-num-prompts", type=int, default=None, help="default: all of them")
    m.add_argument("--eval-max-tokens", type=int, default=None, help="default: --max-tokens")
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--concurrency", type=int, default=32, help="vLLM batch for generation")
    m.add_argument("--epochs", type=float, default=1.0)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--batch", type=int, default=512)
    m.add_argument("--train-vocab", type=_non_negative, default=8192,
                   help="training KL over this many most frequent response tokens, plus "
                        "--negatives others drawn each step (0: the whole vocabulary)")
    m.add_argument("--negatives", type=_non_negative, default=4096)
    m.add_argument("--max-draft", type=int, default=5)
    m.add_argument("--gate", type=float, default=0.10,
                   help="a design passes if its predicted speedup beats the shipped heads' "
                        "by this fraction on some dataset")
    _add_cost_model_args(m, "for the predicted speedup")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out-json", default="heads_designs.json")
    m.add_argument("--out-png", default="heads_designs.png")
    m.add_argument("--work-dir", default=_default_work_dir(), help="cache of generated responses")
    m.add_argument("--log", help="append engine logs here")
    m.set_defaults(func=cmd_compare_heads)

    b = sub.add_parser("bench", help="speculative methods side by side (Spec-Bench style)")
    b.add_argument("--model", help="HF model folder (default: packaged SmolLM2-135M-Instruct)")
    b.add_argument("--method", action="append", metavar="NAME[=JSON]",
                   help="vanilla, adadecode, ngram or draft_model, with optional speculative-"
                        "config fields as JSON, e.g. 'adadecode={\"threshold\": 0.6}'; "
                        "repeat for several (default: vanilla, adadecode, ngram; vanilla "
                        "always runs)")
    b.add_argument("--draft-model", help="draft model folder for the draft_model method")
    b.add_argument("--dataset", help="humaneval, mtbench, sharegpt and/or documents, "
                                     "comma-separated (evaluation split; default humaneval)")
    b.add_argument("--prompts", help='JSONL: one {"prompt": ...} or {"turns": [...]} per line, '
                                     'optional "category"')
    b.add_argument("--num-prompts", type=int, default=16,
                   help="prompts per dataset, taken round-robin over categories")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--concurrency", default="1", help="requests in flight; a list sweeps, "
                                                      "e.g. 1,4,16")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--max-model-len", type=int,
                   help="engine max_model_len (default 2048; 4096 with --dataset documents)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (0: greedy); prompt i is seeded "
                        "with seed + i for every method")
    b.add_argument("--repeats", type=int, default=2,
                   help="run the whole method list this many times (drift shows as a range)")
    b.add_argument("--enforce-eager", action="store_true")
    b.add_argument("--in-process", action="store_true",
                   help="run each engine's core in its benchmark process "
                        "(VLLM_ENABLE_V1_MULTIPROCESSING=0), not in vLLM's separate engine "
                        "process: steadier on two cores (docs/BENCHMARKS.md)")
    b.add_argument("--one-process", action="store_true",
                   help="with --enforce-eager: every engine in one long-lived process, its "
                        "core in-process (vLLM's cleanup between engines); starts take "
                        "seconds; for quick checks, not timings")
    b.add_argument("--out", help="results JSON (schema in docs/BENCHMARKS.md)")
    b.add_argument("--plot", help="PNG: speedup and accepted tokens per step")
    b.add_argument("--log", default=_default_log("bench.log"),
                   help="append engine logs here (default: %(default)s)")
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("soak", help="vllm serve with AdaDecode and plain, under a seeded mix")
    k.add_argument("--model", help="HF model folder (default: packaged SmolLM2)")
    k.add_argument("--requests", type=int, default=200)
    k.add_argument("--inflight", type=int, default=32, help="requests open at once")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--kv-blocks", type=int, help="KV-cache blocks (small: the scheduler "
                                                 "preempts; vLLM's --num-gpu-blocks-override)")
    k.add_argument("--prefix-caching", action="store_true")
    k.add_argument("--speculative-config", help="AdaDecode settings as JSON "
                                                "(default {\"method\": \"adadecode\"})")
    k.add_argument("--enforce-eager", action="store_true")
    k.add_argument("--chunked-prefill", action="store_true",
                   help="leave vLLM's chunked prefill on (vLLM 0.32 on CPU then dies on a "
                        "seeded request whose prompt is split; AdaDecode does not)")
    k.add_argument("--control", action="store_true",
                   help="a second plain server instead of AdaDecode (what two identical "
                        "servers differ by under the same mix)")
    k.add_argument("--log-dir", default=_default_log("soak"), help="server logs")
    k.add_argument("--out", help="report JSON")
    k.set_defaults(func=cmd_soak)
    return p


def _add_cost_model_args(parser, purpose: str) -> None:
    from .training.select import CostModel

    for f, default in vars(CostModel()).items():
        parser.add_argument(f"--{f.replace('_', '-')}", type=float, default=None,
                            help=f"cost model {purpose} (default: measured for the packaged "
                                 f"model, training/select.py MEASURED_COSTS; else {default})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    if args.command in ("demo", "train-heads", "eval-heads", "compare-heads", "bench",
                        "shortlist", "corpus"):
        from .cpu_env import reexec_with_runtime_env

        reexec_with_runtime_env(["-m", "vllm_adadecode.cli", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
