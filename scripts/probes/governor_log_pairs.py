"""From GOV_LOG files (scripts/probes/governor_log.patch): the drafting/plain
throughput ratio over all steps, over pairs formed as (drafting step, the plain
step after it) and as (plain step, the drafting step after it), and the tokens
of drafting steps by whether a plain step follows them."""
import json
import sys


def ratio(pairs):
    td = sum(d["tok"] for d, _ in pairs); sd = sum(d["dt"] for d, _ in pairs)
    tp = sum(p["tok"] for _, p in pairs); sp = sum(p["dt"] for _, p in pairs)
    return len(pairs), round(td / len(pairs), 2), round((td / sd) / (tp / sp), 3)


def pairs(rows, plain_first):
    out, prev = [], None
    for r in rows:
        if prev is not None and prev["size"] == r["size"] and prev["drafted"] != r["drafted"] \
                and (not plain_first or r["drafted"]):
            out.append((r, prev) if r["drafted"] else (prev, r))
            prev = None
            continue
        prev = r
    return out


for f in sys.argv[1:]:
    rows = [r for r in map(json.loads, open(f)) if 0 < r["dt"] < 5 and r["tok"] > 0]
    D = [r for r in rows if r["drafted"]]; P = [r for r in rows if not r["drafted"]]
    agg = (sum(r["tok"] for r in D) / sum(r["dt"] for r in D)) / \
        (sum(r["tok"] for r in P) / sum(r["dt"] for r in P))
    print(f, "all steps", round(agg, 3), "| pairs (n, drafting tok, ratio): drafting-then-plain",
          ratio(pairs(rows, False)), "plain-then-drafting", ratio(pairs(rows, True)))
    before = [r["tok"] for r, n in zip(rows, rows[1:]) if r["drafted"] and not n["drafted"]]
    inside = [r["tok"] for r, n in zip(rows, rows[1:]) if r["drafted"] and n["drafted"]]
    print(f, "drafting steps before a plain step", len(before), round(sum(before) / len(before), 2),
          "| before a drafting step", len(inside), round(sum(inside) / len(inside), 2))
