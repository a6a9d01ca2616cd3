"""Per label (drafting / plain steps): steps, tokens/s, mean and median seconds, from GOV_LOG files."""
import json, statistics, sys
for f in sys.argv[1:]:
    rows = [json.loads(l) for l in open(f)]
    for lab in (True, False):
        xs = [r for r in rows if r['drafted'] == lab and 0 < r['dt'] < 5]
        if not xs: continue
        tok = sum(r['tok'] for r in xs); dt = sum(r['dt'] for r in xs)
        one = [r['dt'] for r in xs if r['tok'] == 1]
        print(f, 'draft' if lab else 'plain', len(xs), 'tok/s', round(tok/dt, 3), 'mean dt', round(dt/len(xs), 4),
              'median dt', round(statistics.median(r['dt'] for r in xs), 4),
              '1-token steps median dt', round(statistics.median(one), 4) if one else None)
