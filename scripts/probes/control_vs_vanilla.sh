#!/usr/bin/env bash
# Vanilla and the AdaDecode engine with drafting off, alternated three times on
# the 1.5B (3 HumanEval prompts x 64 tokens each, one engine at a time), so the
# machine's drift falls on both alike. Prints each request's seconds.
set -euo pipefail
here=$(dirname "$0")
for i in 1 2 3; do
  for c in vanilla '{"lookup": false, "self_draft": false}'; do
    echo "== round $i: $c"
    python "$here/generate_he3.py" "$c" 2>/dev/null | grep '^req'
  done
done
