"""Wall time of the pieces of a decoding step, in-process, at batch 1.

    eval "$(python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/time_step.py none
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/time_step.py '{"method": "adadecode", "adaptive": false}'

Decodes 3 MT-Bench eval prompts (``--dataset humaneval`` for HumanEval) x 128
tokens greedily with the packaged SmolLM2 (fp32, compiled unless
--enforce-eager) and prints "RESULT <tokens> tokens <s> <tok/s>", then per timed
piece its calls, total and mean milliseconds: the runner's execute_model and
model forward (split into steps run by the deferred forward and by vLLM's own
compiled forward), the drafter (propose), its layer segments (by layer range,
rows and whether a residual came in), exit checks, and attention-metadata
builds. ``--out FILE`` writes the generated token ids (to
compare runs). docs/performance/step-time.md, docs/performance/segments.md and
docs/HEADS.md ("The cost model, re-measured") quote it.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

T: dict[str, float] = collections.defaultdict(float)
N: collections.Counter = collections.Counter()


def _timed(obj, name: str, key: str) -> None:
    orig = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            T[key] += time.perf_counter() - t
            N[key] += 1

    setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="speculative config as JSON, or 'none' for vanilla")
    ap.add_argument("--dataset", default="mtbench", choices=["mtbench", "humaneval"])
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", help="write the generated token ids here (JSON)")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_adadecode import proposer as P
    from vllm_adadecode.drafts.early_exit import EarlyExitDrafter
    from vllm_adadecode.engine.rpc import STATS_RPC
    from vllm_adadecode.engine.runner import RunnerBatch
    from vllm_adadecode.engine.segments import LayerSegments
    from vllm_adadecode.engine.verify import DeferredVerification
    from vllm_adadecode import prompts as data
    from vllm_adadecode.models import packaged_model_dir

    # The model forward, split by who ran it: the deferred forward (a step that
    # resumes drafted states) or vLLM's own compiled forward (every other step;
    # with the back-off on, both kinds occur in one run). The drafter binds the
    # deferred forward when it loads the model: wrap it before.
    resumed = [False]
    deferred = DeferredVerification.forward

    def deferred_forward(self, *a, **k):
        out = deferred(self, *a, **k)
        resumed[0] = out is not None
        return out

    DeferredVerification.forward = deferred_forward

    spec = None if args.spec == "none" else json.loads(args.spec)
    llm = LLM(model=str(packaged_model_dir()), dtype="float32", max_model_len=2048,
              max_num_seqs=1, enforce_eager=args.enforce_eager, speculative_config=spec,
              seed=0)
    _timed(GPUModelRunner, "execute_model", "execute_model")
    _timed(P.AdaDecodeProposer, "propose_for_runner", "drafter (propose)")
    _timed(EarlyExitDrafter, "_exit_top1", "exit check")
    forward = GPUModelRunner._model_forward

    def model_forward(self, *a, **k):
        resumed[0] = False
        t = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            key = "model forward: deferred" if resumed[0] else "model forward: vLLM's own"
            T[key] += time.perf_counter() - t
            N[key] += 1

    GPUModelRunner._model_forward = model_forward
    _timed(RunnerBatch, "attention", "attention metadata")
    segments = LayerSegments.__call__

    def segment(self, start, end):
        fn = segments(self, start, end)

        def timed(pos, h, r):
            t = time.perf_counter()
            out = fn(pos, h, r)
            key = (f"layers {start}-{end - 1} rows={min(len(pos), 3)}"
                   f"{'+' if len(pos) >= 3 else ''} residual={r is not None}")
            T[key] += time.perf_counter() - t
            N[key] += 1
            return out

        return timed

    LayerSegments.__call__ = segment

    tok = llm.get_tokenizer()
    ps = getattr(data, args.dataset)()[: args.num_prompts]
    texts = [tok.apply_chat_template([{"role": "user", "content": p.text}],
                                     add_generation_prompt=True, tokenize=False) for p in ps]
    llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    T.clear()
    N.clear()
    t = time.perf_counter()
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=args.max_tokens),
                        use_tqdm=False)
    elapsed = time.perf_counter() - t
    ids = [list(o.outputs[0].token_ids) for o in outs]
    n = sum(map(len, ids))
    print(f"RESULT {n} tokens {elapsed:.2f}s {n / elapsed:.2f} tok/s")
    for k in sorted(T, key=lambda k: -T[k]):
        print(f"  {k:38s} calls {N[k]:5d}  total {T[k]:7.2f} s  mean {1000 * T[k] / N[k]:7.2f} ms")
    stats = llm.collective_rpc(STATS_RPC)[0]
    if stats:
        print("drafter:", json.dumps({k: v for k, v in stats.items() if k != "requests"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(ids, f)


if __name__ == "__main__":
    main()
