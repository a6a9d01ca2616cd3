#!/usr/bin/env bash
# Where a plain engine's worker takes its page faults, and how many mmap/munmap
# calls it makes, while it decodes (docs/performance/baselines.md).
#   bash scripts/probes/stack_chunk_faults.sh vanilla
#   bash scripts/probes/stack_chunk_faults.sh ada_nodrafts
# Runs scripts/probes/plain_step_gap.py for one engine (256 tokens per prompt),
# waits for the decode, then samples the VLLM::Worker process: perf (page
# faults by function) for 5 s, then strace (syscall counts) for 5 s.
set -euo pipefail
engine=${1:?engine name from plain_step_gap.py}
wait_s=${WAIT_S:-50}
out=${OUT:-/tmp/stack_chunk_$engine}
mkdir -p "$out"
.venv/bin/python scripts/probes/plain_step_gap.py --engines "$engine" --rounds 1 \
    --max-tokens 256 --log "$out/engine.log" > "$out/job.json" 2>&1 &
job=$!
for _ in $(seq 1 120); do pid=$(pgrep -f "VLLM::Worker" | head -1 || true); [ -n "$pid" ] && break; sleep 1; done
sleep "$wait_s"
perf record -q -e page-faults -g -p "$pid" -o "$out/perf.data" -- sleep 5 >/dev/null 2>&1
perf report -i "$out/perf.data" --stdio --no-children --sort sym 2>/dev/null \
    | grep -E "^ +[0-9.]+%|Event count" | head -6
timeout -s INT 5 strace -f -c -p "$pid" -o "$out/strace.txt" >/dev/null 2>&1 || true
grep -E "calls|mmap|munmap|madvise|total" "$out/strace.txt" || true
wait "$job"
cat "$out/job.json"
