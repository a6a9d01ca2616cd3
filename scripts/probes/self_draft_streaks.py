"""From ADADECODE_STEP_LOG files of batch-1 runs with lookups off (one request
at a time): self-draft attempts by how many rejected attempts came right before
them, with the tokens each class gained, and the step times by drafted tokens.

    ADADECODE_STEP_LOG=F python scripts/probes/generate_he3.py '{"lookup": false, "adaptive": false}'
    python scripts/probes/self_draft_streaks.py F

A line's ``exit`` is the tokens self-drafted for the next step; the next line's
``emitted`` is that step's tokens (1 + the drafts accepted). A request's first
line follows its prefill (``joined``); its streak starts at 0 there.
"""
import json
import sys
from collections import defaultdict

for f in sys.argv[1:]:
    rows = [json.loads(x) for x in open(f)]
    by_streak = defaultdict(lambda: [0, 0, 0])  # attempts with drafts, drafted, accepted
    times = defaultdict(list)  # drafted tokens -> step seconds
    streak = 0
    for r, n in zip(rows, rows[1:]):
        if r["batch"] != 1 or n["batch"] != 1:
            continue
        if r["joined"]:
            streak = 0
        if n["joined"]:
            continue  # the next line follows another request's prefill
        drafted, accepted = r["exit"], n["emitted"] - 1
        times[drafted].append(n["t"] - r["t"])
        if drafted == 0:
            continue  # no confident exit: not an attempt that can fail
        s = by_streak[min(streak, 4)]
        s[0] += 1; s[1] += drafted; s[2] += accepted
        streak = 0 if accepted else streak + 1
    print(f)
    for k in sorted(by_streak):
        a, d, acc = by_streak[k]
        first = "4+" if k == 4 else k
        print(f"  after {first} rejected: {a} attempts, {acc / a:.2f} tokens gained per attempt,"
              f" {acc}/{d} drafts accepted")
    for k in sorted(times):
        v = sorted(times[k])
        print(f"  {k} drafted: {len(v)} steps, median {1e3 * v[len(v) // 2]:.0f} ms")
