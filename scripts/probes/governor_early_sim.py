"""The back-off governor on a simulated clock, batch 1: drafting share and
tokens/s with the early verdict (4 pairs) against 12 pairs of learning, for
lookup-like drafts accepted 4 deep with probability P (else rejected; a
drafting step 15% slower than a 40 ms plain step). 300 seeds.

    python scripts/probes/governor_early_sim.py
"""
import statistics

from vllm_adadecode.drafts.governor import Governor, lookup_like_run


def run(early_pairs, seed, steps, p):
    rate, choices = lookup_like_run(Governor(explore_every=16, early_pairs=early_pairs), steps,
                                    p, seed)
    return rate, sum(choices)


for p in (0.0, 0.02):
    for steps in (100, 300, 1000, 1500):
        for early in (12, 4):
            r = [run(early, s, steps, p) for s in range(300)]
            print(f"P={p} steps={steps} early_pairs={early}: tokens/s "
                  f"{statistics.mean(x[0] for x in r):.3f} (plain 25), drafting share "
                  f"{sum(x[1] for x in r) / (300 * steps):.3f}")
