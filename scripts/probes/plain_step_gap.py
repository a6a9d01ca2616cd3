"""Milliseconds per verification step of plain engines through the demo's job
runner (a fresh engine process per job, the packaged SmolLM2, 8 prompts, 128
tokens, concurrency 1, compiled), alternating the order every round.

    python scripts/probes/plain_step_gap.py --engines vanilla,vanilla_async_off,ada_nodrafts \\
        --rounds 2

Engines: vanilla; vanilla_async_off (async_scheduling=False; vLLM's CPU
platform turns it off anyway); ada_nodrafts (AdaDecode with lookups and
self-drafts off: no drafts at all); ada (defaults); ada_tree (defaults with
``"tree": true``); vanilla_timed (vanilla with
the bench's step timers wrapped around the runner's methods); and each with
_malloc (glibc's allocator with fixed thresholds). Add --in-process to run each
engine's core in its job's process; --eager, --concurrency and --num-prompts
for other jobs (for example the bench's c=16 cells:
``--in-process --eager --concurrency 16 --num-prompts 40 --max-tokens 64``).

Each line also gives, per output token, the CPU milliseconds (user, system) and
minor page faults of every process: the frontend, vLLM's EngineCore and its
Worker (docs/performance/baselines.md).
"""

import argparse
import json

from vllm_adadecode.bench.worker import run_job
from vllm_adadecode.models import packaged_model_dir
from vllm_adadecode.prompts import load, mixed

ENGINES = {
    "vanilla": {},
    "vanilla_async_off": {"async_scheduling": False},
    "ada_nodrafts": {"speculative_config": {"method": "adadecode", "lookup": False,
                                            "self_draft": False}},
    "ada": {"speculative_config": {"method": "adadecode"}},
    "ada_tree": {"speculative_config": {"method": "adadecode", "tree": True}},
    # vanilla with the bench's step timers wrapped around the runner's methods:
    # the same work, a few more Python frames on the worker's stack
    "vanilla_timed": {"step_timers": True},
}
# glibc's allocator with fixed thresholds: freed memory stays in the heap
# instead of going back to the kernel and faulting in again on the next step.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
for _name in list(ENGINES):
    ENGINES[_name + "_malloc"] = {**ENGINES[_name], "env": MALLOC}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="vanilla,vanilla_async_off,ada_nodrafts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--dataset", default="mixed",
                    help="mixed, or one packaged eval set (humaneval, mtbench, sharegpt)")
    ap.add_argument("--log", default="plain_step_gap.log")
    args = ap.parse_args()
    prompts = (mixed(args.num_prompts) if args.dataset == "mixed"
               else load(args.dataset, "eval")[: args.num_prompts])
    base = dict(model=str(packaged_model_dir()), prompts=[p.text for p in prompts],
                max_tokens=args.max_tokens, concurrency=args.concurrency, dtype="float32",
                enforce_eager=args.eager, seed=0,
                progress=False, in_process=args.in_process)
    order = args.engines.split(",")
    outputs: dict[str, list] = {}
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            out = run_job({**base, **ENGINES[name]}, log_path=args.log)
            decoded = sum(max(0, len(t) - 1) for t in out["token_ids"])
            steps = decoded - out["spec"].get("num_accepted_tokens", 0)
            print(json.dumps({"engine": name, "round": r, "tok_s": round(out["tokens_per_s"], 2),
                              "ms_per_step": round(1000 * out["elapsed_s"] / max(1, steps), 2),
                              "tokens_per_step": round(out["tokens_per_step"], 3),
                              "per_token": {k: {"user_ms": round(1000 * v["user"] / n, 1),
                                                "sys_ms": round(1000 * v["system"] / n, 1),
                                                "faults": round(v["minor_faults"] / n)}
                                            for k, v in out["cpu_s"].items()
                                            if (n := max(1, out["output_tokens"]))}}),
                  flush=True)
            outputs.setdefault(name, []).append(out["token_ids"])
    first = outputs[order[0]][0]
    print("identical to", order[0], {k: all(x == first for x in v) for k, v in outputs.items()})


if __name__ == "__main__":
    main()
