"""Where a whole engine step's time goes, in-process, at a given concurrency.

    eval "$(.venv/bin/python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/time_engine_step.py none 16 32
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/time_engine_step.py '{"method": "adadecode"}' 16 32

Arguments: the speculative config as JSON ('none' for vanilla), the number of
requests kept in flight, the number of MT-Bench eval prompts (``--dataset
humaneval`` for HumanEval). Greedy, 128 new tokens, the packaged SmolLM2 in
fp32, requests kept in flight as ``vllm-adadecode bench`` keeps them.

Prints "RESULT ... ms/step", then milliseconds per engine step in each timed
piece: vLLM's scheduler (schedule, update_from_output, update_draft_token_ids),
the executor (execute_model, sample_tokens, take_draft_token_ids), the model
runner's parts (input preparation, forward, sampling, drafting, bookkeeping),
output processing and stats; for AdaDecode also the drafter's counters, its
back-offs per batch-size bucket and the drafter's call time by batch size and
whether it proposed drafts. docs/performance/load.md and docs/performance/backoff.md
quote it.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

# The timers of scripts/time_step.py (this folder is on sys.path when run as a script).
from time_step import N, T, _timed

PROPOSE: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])


RUNNER = ("_update_states", "_prepare_inputs", "_build_attention_metadata",
          "_calc_spec_decode_metadata", "_preprocess", "_model_forward", "_sample",
          "_bookkeeping_sync", "propose_draft_token_ids", "take_draft_token_ids")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="speculative config as JSON, or 'none' for vanilla")
    ap.add_argument("concurrency", type=int)
    ap.add_argument("num_prompts", type=int)
    ap.add_argument("--dataset", default="mtbench", choices=["mtbench", "humaneval"])
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_adadecode import prompts as data
    from vllm_adadecode import proposer as P
    from vllm_adadecode.bench.worker import _chat, _generate_inflight
    from vllm_adadecode.models import packaged_model_dir
    from vllm_adadecode.engine.rpc import STATS_RPC

    spec = None if args.spec == "none" else json.loads(args.spec)
    llm = LLM(model=str(packaged_model_dir()), dtype="float32", max_model_len=2048,
              max_num_seqs=args.concurrency, speculative_config=spec, seed=0,
              disable_log_stats=False)
    for name in ("schedule", "update_from_output", "update_draft_token_ids"):
        _timed(Scheduler, name, f"scheduler.{name}")
    for name in ("execute_model", "sample_tokens", "take_draft_token_ids"):
        _timed(UniProcExecutor, name, f"executor.{name}")
    for name in RUNNER:
        _timed(GPUModelRunner, name, f"runner.{name}")
    _timed(OutputProcessor, "process_outputs", "output_processor.process_outputs")

    propose = P.AdaDecodeProposer._propose

    def timed_propose(self, runner, sampled):
        t = time.perf_counter()
        out = propose(self, runner, sampled)
        key = f"batch {sum(1 for s in sampled if s):2d}, drafts {any(out)!s:5}"
        PROPOSE[key][0] += 1
        PROPOSE[key][1] += time.perf_counter() - t
        return out

    P.AdaDecodeProposer._propose = timed_propose

    tok = llm.get_tokenizer()
    texts = _chat(tok, [p.text for p in getattr(data, args.dataset)()[: args.num_prompts]])
    llm.generate(texts[:2], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    llm.collective_rpc(STATS_RPC)  # reset the drafter's counters
    T.clear()
    N.clear()
    PROPOSE.clear()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, seed=0)
    tokens, _, elapsed, _ = _generate_inflight(llm, texts, params, args.concurrency, "r", None)
    n = sum(len(t) for t in tokens)
    steps = N["executor.execute_model"]
    print(f"RESULT {args.spec} concurrency {args.concurrency}: {n} tokens {elapsed:.2f} s "
          f"{n / elapsed:.1f} tok/s, {steps} steps, {1e3 * elapsed / steps:.2f} ms/step")
    for k in sorted(T):
        print(f"  {k:44s} calls {N[k]:6d}  ms/step {1e3 * T[k] / steps:7.3f}")
    stats = [s for s in llm.collective_rpc(STATS_RPC) if s]
    if stats:
        s = stats[0]
        print(f"drafter: {1e3 * s['draft_seconds'] / steps:.3f} ms/step, lookups "
              f"{1e3 * s['lookup_seconds'] / steps:.3f} ms/step, "
              f"draft layer evals {s['draft_layer_evals']}")
        print(f"drafted {s['drafted_by_source']} accepted {s['accepted_by_source']}")
        print(f"back-off {json.dumps(s['backoff'])}")
        print(f"self-draft back-off {json.dumps(s['backoff_self_draft'])}")
        for k in sorted(PROPOSE):
            calls, secs = PROPOSE[k]
            print(f"  drafter call at {k}: {calls:4d} calls, {1e3 * secs / calls:.3f} ms each")


if __name__ == "__main__":
    main()
