"""Plot the cost of a forward over n new tokens, relative to one, for the
models measured by scripts/model_costs.py.

    .venv/bin/python scripts/plot_model_costs.py docs/results/models/costs_*.json \\
        --out docs/results/models/rows_cost.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in args.files:
        d = json.load(open(f))
        rows = sorted(int(n) for n in d["rows_ratio"])
        ax.plot(rows, [d["rows_ratio"][str(n)] for n in rows], marker="o",
                label=f"{d['model']} ({d['step_ms']:.0f} ms/step)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("new tokens in one forward (1 + drafted rows)")
    ax.set_ylabel("time relative to one token")
    ax.set_title("Cost of verifying drafted rows (vLLM, CPU, fp32, batch 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
