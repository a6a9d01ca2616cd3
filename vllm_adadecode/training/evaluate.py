"""Evaluate exit heads on held-out tokens: agreement, exits vs threshold, calibration.

For each exit layer and for both the trained head and the identity head (the
model's own norm + LM head on that layer, the "logit lens"):

* agreement: top-1 of the exit head equals the full model's top-1;
* top-k agreement: the full model's top-1 is among the exit head's k likeliest
  tokens (a token tree's sibling branches from that head can catch it);
* per threshold: the fraction of tokens that would exit (top-1 prob >= threshold)
  and, among those, the fraction the verifier would accept (precision);
* calibration: confidence bins against the actual agreement in each bin.
"""

from __future__ import annotations

import json

import torch

from ..head_designs import DESIGNS, context_rows
from .data import Features
from .train import FrozenHead

THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 21)]
BINS = 10
TOP_K = (2, 4, 8)


@torch.no_grad()
def exit_stats(head: FrozenHead, feats: Features, transforms: dict[int, torch.Tensor | None],
               batch: int = 1024, *, design: str = "dxd",
               extra: dict[int, dict[str, torch.Tensor]] | None = None,
               staleness: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: confidence [N] and correctness [N] of the exit head's top-1, and
    the per-row KL(p_final || p_exit) [N]. ``transforms[x]`` None is the identity
    head; other designs' tensors come in ``extra``; a ``final_state`` head reads
    the final state ``staleness`` positions back."""
    des = DESIGNS[design]
    # judged in the features' dtype (fp32), whatever the heads are stored in (shipped: fp16)
    params_of = {x: {k: v.to(feats.hidden.dtype)
                     for k, v in {"transform": t, **(extra or {}).get(x, {})}.items()}
                 for x, t in transforms.items() if t is not None}
    out = {x: {"conf": [], "right": [], "kl": [], "rank": []} for x in transforms}
    for s in range(0, len(feats), batch):
        rows = torch.arange(s, min(s + batch, len(feats)))
        final_logits = head.final_logits(feats.final[rows])
        target = final_logits.argmax(-1)
        for j, x in enumerate(feats.layers):
            if x not in transforms:
                continue
            h = feats.hidden[rows, j]
            if transforms[x] is None:
                logits = head.logits(h)
            else:
                ctx = context_rows(des, feats.hidden[:, j], feats.final, feats.seq_ids, rows,
                                   staleness=staleness)
                logits = head.logits(des.apply(params_of[x], h, ctx))
            logq = logits.float().log_softmax(-1)
            c, tok = logq.max(-1)
            logp = final_logits.float().log_softmax(-1)
            out[x]["conf"].append(c.exp())
            out[x]["right"].append(tok == target)
            out[x]["kl"].append((logp.exp() * (logp - logq)).sum(-1))
            # 0-based rank of the full model's token in the exit head's distribution.
            own = logq.gather(-1, target[:, None])
            out[x]["rank"].append((logq > own).sum(-1))
    return {x: {k: torch.cat(v) for k, v in r.items()} for x, r in out.items()}


def summarize(stats: dict[str, torch.Tensor]) -> dict:
    conf, right = stats["conf"], stats["right"].float()
    by_threshold = []
    for g in THRESHOLDS:
        m = conf >= g
        n = int(m.sum())
        by_threshold.append({
            "threshold": g,
            "exit_fraction": n / len(conf),
            "precision": float(right[m].mean()) if n else None,
        })
    calib = []
    edges = torch.linspace(0, 1, BINS + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf >= lo) & ((conf < hi) | (hi == 1))
        n = int(m.sum())
        calib.append({"lo": float(lo), "hi": float(hi), "count": n,
                      "confidence": float(conf[m].mean()) if n else None,
                      "agreement": float(right[m].mean()) if n else None})
    ece = sum(c["count"] * abs(c["confidence"] - c["agreement"]) for c in calib if c["count"])
    topk = ({str(k): float((stats["rank"] < k).float().mean()) for k in TOP_K}
            if "rank" in stats else {})
    return {"agreement": float(right.mean()), "top_k_agreement": topk,
            "mean_confidence": float(conf.mean()),
            "calibration_error": ece / max(1, len(conf)),
            "by_threshold": by_threshold, "calibration": calib}


def evaluate(head: FrozenHead, feats: Features, trained: dict[int, torch.Tensor],
             t_stats: dict | None = None, i_stats: dict | None = None) -> dict:
    """Trained heads against identity heads, per layer. ``t_stats`` / ``i_stats``:
    the trained and identity heads' exit_stats when the caller has them already."""
    layers = [x for x in feats.layers if x in trained]
    out = {"tokens": len(feats), "layers": {}}
    if t_stats is None:
        t_stats = exit_stats(head, feats, {x: trained[x] for x in layers})
    if i_stats is None:
        i_stats = exit_stats(head, feats, {x: None for x in layers})
    for x in layers:
        out["layers"][str(x)] = {"trained": summarize(t_stats[x]),
                                 "identity": summarize(i_stats[x])}
    return out


def plot(report: dict, path: str, title: str = "exit heads") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report["layers"])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    xs = range(len(layers))
    tr = [report["layers"][x]["trained"]["agreement"] for x in layers]
    idn = [report["layers"][x]["identity"]["agreement"] for x in layers]
    ax[0].bar([i - 0.2 for i in xs], idn, 0.4, label="identity head (logit lens)")
    ax[0].bar([i + 0.2 for i in xs], tr, 0.4, label="trained head")
    ax[0].set_xticks(list(xs), [f"layer {x}" for x in layers])
    ax[0].set_ylabel("top-1 agreement with final layer")
    ax[0].set_ylim(0, 1)
    ax[0].legend()
    for x in layers:
        rows = report["layers"][x]["trained"]["by_threshold"]
        g = [r["threshold"] for r in rows]
        (line,) = ax[1].plot(g, [r["exit_fraction"] for r in rows], label=f"L{x} exits")
        ax[1].plot(g, [r["precision"] if r["precision"] is not None else float("nan")
                       for r in rows], "--", color=line.get_color(), label=f"L{x} accepted")
        cal = [c for c in report["layers"][x]["trained"]["calibration"] if c["count"]]
        ax[2].plot([c["confidence"] for c in cal], [c["agreement"] for c in cal], "o-",
                   color=line.get_color(), label=f"L{x}")
    ax[1].set_xlabel("threshold")
    ax[1].set_ylabel("fraction (solid: exit, dashed: accepted among exits)")
    ax[1].legend(fontsize=7)
    ax[2].plot([0, 1], [0, 1], "k:", lw=1)
    ax[2].set_xlabel("exit-head confidence (bin mean)")
    ax[2].set_ylabel("actual agreement")
    ax[2].set_title("calibration (trained)")
    ax[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, json_path: str, png_path: str | None, title: str) -> None:
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    if png_path:
        plot(report, png_path, title)
