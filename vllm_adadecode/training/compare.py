"""``compare-heads``: every head design at every depth, trained the same way,
judged on the eval split by agreement, calibration and predicted speed.

1. The model's greedy responses to the train split (as ``train-heads``) and to
   the eval split's HumanEval and MT-Bench prompts (as ``eval-heads``); both
   cached in the work dir.
2. Residual-stream states after 0 (the embeddings), 1, 2, ... layers, and the
   final state, from one Hugging Face forward per sequence.
3. Per depth and design (``head_designs.DESIGNS``), one head trained by
   self-distillation (KL to the full model's distribution, over the
   ``--train-vocab`` tokens most frequent in the training responses plus
   ``--negatives`` others drawn each step, to keep training minutes short),
   seeded.
4. On the eval split, over the full vocabulary: top-1 agreement with the full
   model, held-out KL, calibration error, and per dataset the predicted batch-1
   speedup of AdaDecode drafting with that head alone (``select.simulate``,
   best threshold; a ``final_state`` head is judged at the age of the final
   state each draft of a step would really see).
5. The shipped heads, evaluated the same way, are the bar: the gate passes a
   design only if it beats them by ``--gate`` (10%) on some dataset.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import prompts as P
from ..head_designs import DESIGNS, WINDOW
from ..heads import ExitHeads
from . import data as D
from .evaluate import exit_stats, summarize
from .pipeline import _cost_model, _load_hf, _model_config, judged_ages, sequences_for
from .select import choose
from .train import FrozenHead, train_design

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def head_extra_ms(design_name: str, d: int, repeats: int = 200) -> dict[str, float]:
    """Milliseconds one exit check spends in a design's matmuls at one row
    beyond dxd's, with torch's GEMM and with vLLM's own CPU GEMM (oneDNN,
    prepacked weights); "cost" is the cheaper, which a drafter would use. In
    the engine an attention head would also project its newest state's key and
    value once per verified token; that is not counted here."""
    from ..engine.model import cpu_linear

    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, d)
    ctx = {"final_state": torch.randn(1, d), "window": torch.randn(1, WINDOW, d),
           "mask": torch.ones(1, WINDOW, dtype=torch.bool)}

    def timed(ds, onednn):
        p = ds.init(d, g)
        if onednn:
            packed = {id(w): cpu_linear(w) for w in p.values() if w.dim() == 2}
            linear = lambda x, w: packed[id(w)](x)  # noqa: E731
        else:
            linear = torch.nn.functional.linear
        for _ in range(20):
            ds.apply(p, h, ctx, linear)
        t = time.perf_counter()
        for _ in range(repeats):
            ds.apply(p, h, ctx, linear)
        return (time.perf_counter() - t) / repeats * 1e3

    with torch.no_grad():
        out = {kind: max(0.0, timed(DESIGNS[design_name], onednn) - timed(DESIGNS["dxd"], onednn))
               for kind, onednn in (("torch", False), ("onednn", True))}
    out["cost"] = min(out.values())
    return out


def _predict(stats_by_age, seq_ids, names, num_layers, exit_layer, cost, max_draft):
    """Per dataset: best-threshold simulate() result for one head at ``exit_layer``."""
    conf = torch.stack([s["conf"] for s in stats_by_age], -1)[:, None, :]
    right = torch.stack([s["right"] for s in stats_by_age], -1)[:, None, :]
    out = {}
    for name in sorted(set(names)):
        m = torch.tensor([n == name for n in names])
        best = choose(conf[m], right[m], seq_ids[m], [exit_layer], num_layers=num_layers,
                      max_draft=max_draft, cost=cost, thresholds=THRESHOLDS, max_layers=1)["best"]
        out[name] = {k: best[k] for k in ("threshold", "tokens_per_step", "speedup")}
    return out


def compare_command(args) -> dict:
    t0 = time.time()
    torch.manual_seed(args.seed)
    cfg = _model_config(args.model)
    L, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    depths = [int(x) for x in args.depths.split(",")]
    designs = [x.strip() for x in args.designs.split(",")]
    bad = [x for x in designs if x not in DESIGNS]
    if bad or any(not 0 <= x <= L - 1 for x in depths):
        raise SystemExit(f"--designs must be among {list(DESIGNS)} and --depths in [0, {L - 1}]; "
                         f"got {designs} and {depths}")
    shipped = ExitHeads.load(args.heads) if args.heads else None
    if shipped is not None:
        shipped.check_base_model(args.model, hidden_size=d)
        depths_all = sorted(set(depths) | {x + 1 for x in shipped.exit_layers})
    else:
        depths_all = depths
    work = Path(args.work_dir)
    train_prompts = D.load_prompts(args.data, args.num_prompts, args.seed)
    eval_prompts, names = [], []
    for name in args.eval_data.split(","):
        got = P.load(name.strip(), "eval")
        eval_prompts += got
        names += [name.strip()] * len(got)
    if args.eval_num_prompts:
        eval_prompts, names = eval_prompts[:args.eval_num_prompts], names[:args.eval_num_prompts]
    train_seqs = sequences_for(args.model, train_prompts, max_tokens=args.max_tokens,
                               concurrency=args.concurrency, seed=args.seed, cache_dir=work,
                               log_path=args.log)
    eval_seqs = sequences_for(args.model, eval_prompts,
                              max_tokens=args.eval_max_tokens or args.max_tokens,
                              concurrency=args.concurrency, seed=0, cache_dir=work,
                              log_path=args.log)
    hf = _load_hf(args.model)
    head = FrozenHead.from_hf(hf)
    exit_layers = [x - 1 for x in depths_all]  # depth 0: the embeddings (exit layer -1)
    train = D.collect_features(hf, train_seqs, exit_layers, desc="hidden states (train)")
    held = D.collect_features(hf, eval_seqs, exit_layers, desc="hidden states (eval)")
    del hf
    seq_names = [names[i] for i in held.seq_ids.tolist()]
    vocab, coverage = D.build_shortlist(train_seqs, torch.unique(train.seq_ids),
                                        torch.unique(train.seq_ids), args.train_vocab)
    train_vocab = vocab if args.train_vocab else None
    print(f"[compare-heads] {len(train)} training tokens, {len(held)} eval tokens; training KL "
          + (f"over the {len(vocab)} most frequent response tokens ({coverage:.3f} of training "
             f"response tokens) and {args.negatives} others drawn each step"
             if train_vocab is not None else "over the whole vocabulary"), flush=True)
    base_cost = _cost_model(args)
    extra_ms = {x: head_extra_ms(x, d) for x in designs}
    rows = []

    def judge(design, depth, transforms, extra, label):
        e = depth - 1
        sub = D.Features([e], held.hidden[:, [exit_layers.index(e)]], held.final, held.seq_ids)
        by_age = [exit_stats(head, sub, {e: transforms}, design=design,
                             extra={e: extra} if extra else None, staleness=a)[e]
                  for a in judged_ages(design)]
        cost = replace(base_cost, check_ms=base_cost.check_ms
                       + extra_ms.get(design, {}).get("cost", 0.0))
        summ = summarize(by_age[0])
        row = {"design": label, "depth": depth, "exit_layer": e,
               "agreement": summ["agreement"], "kl": float(by_age[0]["kl"].mean()),
               "calibration_error": summ["calibration_error"],
               "mean_confidence": summ["mean_confidence"],
               "agreement_by_age": [float(s["right"].float().mean()) for s in by_age],
               "calibration": summ["calibration"], "by_threshold": summ["by_threshold"],
               "check_extra_ms": cost.check_ms - base_cost.check_ms,
               "predicted": _predict(by_age, held.seq_ids, seq_names, L, e, cost, args.max_draft)}
        rows.append(row)
        pr = ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in row["predicted"].items())
        tqdm.write(f"[compare-heads] {label:>12} depth {depth:>2}: agreement "
                   f"{row['agreement']:.3f}, KL {row['kl']:.2f}, ECE "
                   f"{row['calibration_error']:.3f}; predicted {pr}")
        return row

    if shipped is not None:
        for x in shipped.exit_layers:
            judge(shipped.design, x + 1, shipped.transforms[x], shipped.extra[x], "shipped")
    train_seconds = {}
    for depth in tqdm(depths, desc="depths", unit="depth"):
        e = depth - 1
        col = [exit_layers.index(e)]
        tr = D.Features([e], train.hidden[:, col], train.final, train.seq_ids)
        judge("dxd", depth, None, None, "identity")
        for name in designs:
            t = time.time()
            p = train_design(head, tr, e, DESIGNS[name], epochs=args.epochs,
                             batch=args.batch, lr=args.lr, seed=args.seed, vocab=train_vocab,
                             negatives=args.negatives,
                             desc=f"{name} head, depth {depth}")
            train_seconds.setdefault(name, []).append(time.time() - t)
            transform = p.pop("transform")
            judge(name, depth, transform, p, name)
    report = _gate(rows, args.gate)
    report.update({
        "command": "vllm-adadecode " + " ".join(args.argv),
        "model": Path(args.model).name, "heads": args.heads, "data": args.data,
        "eval_data": args.eval_data, "tokens": {"train": len(train), "eval": len(held)},
        "train_vocab": len(vocab) if train_vocab is not None else None,
        "train_vocab_coverage": coverage, "negatives": args.negatives,
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "cost_model": base_cost.__dict__, "check_extra_ms": extra_ms,
        "train_seconds_per_head": {k: sum(v) / len(v) for k, v in train_seconds.items()},
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    })
    Path(args.out_json).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown_table(report))
    print(report["gate"]["finding"])
    if args.out_png:
        plot(report, args.out_png)
    also = f" and {args.out_png}" if args.out_png else ""
    print(f"[compare-heads] wrote {args.out_json}{also} in {report['seconds']:.0f} s")
    return report


def _gate(rows, margin: float) -> dict:
    """Each design's best predicted speedup per dataset against the shipped heads'."""
    datasets = sorted({k for r in rows for k in r["predicted"]})
    bar = {k: max([r["predicted"][k]["speedup"] for r in rows if r["design"] == "shipped"],
                  default=None) for k in datasets}
    best = {}
    for r in rows:
        if r["design"] in ("shipped", "identity"):
            continue
        for k in datasets:
            cur = best.setdefault(r["design"], {}).get(k)
            if cur is None or r["predicted"][k]["speedup"] > cur["speedup"]:
                best[r["design"]][k] = {"depth": r["depth"], **r["predicted"][k]}
    passed = sorted({name for name, per in best.items() for k in datasets
                     if bar[k] is not None and per[k]["speedup"] >= bar[k] * (1 + margin)})
    if not any(v is not None for v in bar.values()):
        finding = "no shipped heads to compare with: gate not applied"
    elif passed:
        finding = (f"gate: {', '.join(passed)} beat the shipped heads' predicted speedup by "
                   f"{margin:.0%} or more on at least one dataset")
    else:
        finding = (f"gate: no design beats the shipped heads' predicted speedup by {margin:.0%} "
                   "on any dataset")
    return {"gate": {"margin": margin, "shipped": bar, "best": best, "passed": passed,
                     "finding": finding}}


def markdown_table(report: dict) -> str:
    rows = report["rows"]
    datasets = sorted({k for r in rows for k in r["predicted"]})
    head = ("| design | depth | top-1 agreement | KL | calibration error | "
            + " | ".join(f"{k}: predicted (threshold, tokens/step)" for k in datasets) + " |")
    lines = [head, "|" + "---|" * (5 + len(datasets))]
    for r in sorted(rows, key=lambda r: (r["design"] != "shipped", r["depth"],
                                         list(DESIGNS).index(r["design"])
                                         if r["design"] in DESIGNS else -1)):
        pred = " | ".join(f"{r['predicted'][k]['speedup']:.2f}x ({r['predicted'][k]['threshold']}, "
                          f"{r['predicted'][k]['tokens_per_step']:.2f})" for k in datasets)
        ages = r["agreement_by_age"]
        agree = f"{r['agreement']:.3f}" + (
            f" (ages 2, 3: {', '.join(f'{a:.3f}' for a in ages[1:])})" if len(ages) > 1 else "")
        lines.append(f"| {r['design']} | {r['depth']} | {agree} | {r['kl']:.2f} | "
                     f"{r['calibration_error']:.3f} | {pred} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    datasets = sorted({k for r in rows for k in r["predicted"]})
    fig, ax = plt.subplots(1, 1 + len(datasets), figsize=(5 * (1 + len(datasets)), 4.2))
    names = [n for n in ["identity", *DESIGNS] if any(r["design"] == n for r in rows)]
    for n in names:
        rs = sorted([r for r in rows if r["design"] == n], key=lambda r: r["depth"])
        (line,) = ax[0].plot([r["depth"] for r in rs], [r["agreement"] for r in rs], "o-",
                             label=n, ms=3)
        for i, k in enumerate(datasets):
            ax[i + 1].plot([r["depth"] for r in rs], [r["predicted"][k]["speedup"] for r in rs],
                           "o-", color=line.get_color(), label=n, ms=3)
    shipped = sorted([r for r in rows if r["design"] == "shipped"], key=lambda r: r["depth"])
    if shipped:  # one marker per exit layer, one legend entry
        depths = [r["depth"] for r in shipped]
        ax[0].plot(depths, [r["agreement"] for r in shipped], "k*", ms=10, label="shipped")
        for i, k in enumerate(datasets):
            ax[i + 1].plot(depths, [r["predicted"][k]["speedup"] for r in shipped], "k*",
                           ms=10, label="shipped")
    ax[0].set_title("top-1 agreement with the full model (eval split)")
    ax[0].set_xlabel("layers run before the exit head")
    for i, k in enumerate(datasets):
        ax[i + 1].axhline(1.0, color="k", lw=0.7, ls=":")
        ax[i + 1].set_title(f"{k}: predicted batch-1 speedup (best threshold)")
        ax[i + 1].set_xlabel("layers run before the exit head")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
