"""Time (and cProfile) vLLM decoding of 3 MT-Bench eval prompts at batch 1.

    eval "$(python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/probes/profile_step.py vanilla   # in-process: cProfile sees the forward
    VLLM_ENABLE_V1_MULTIPROCESSING=1 python scripts/probes/profile_step.py ngram     # vLLM's default multiprocess engine

Prints "RESULT <method>: <tokens> tokens <s> <tok/s>" and the cProfile tables
(tottime, cumtime) of the timed generate call. Engines are eager unless
--compiled. docs/performance/step-time.md quotes it. To sample the worker
process instead, run it in the background and attach py-spy:
    py-spy record -p $(pgrep -f VLLM::Worker | head -1) -d 10 -r 200 -f raw -o worker.txt
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

SPECS = {
    "vanilla": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
              "prompt_lookup_max": 5},
    "adadecode": {"method": "adadecode"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=sorted(SPECS))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--compiled", action="store_true", help="torch.compile (vLLM's default)")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_adadecode.models import packaged_model_dir
    from vllm_adadecode.prompts import mtbench

    llm = LLM(model=str(packaged_model_dir()), dtype="float32", max_model_len=2048,
              max_num_seqs=1, enforce_eager=not args.compiled,
              speculative_config=SPECS[args.method], seed=0)
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p.text}],
                                     add_generation_prompt=True, tokenize=False)
             for p in mtbench()[:3]]
    llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    t = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=args.max_tokens),
                        use_tqdm=False)
    prof.disable()
    elapsed = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"RESULT {args.method}: {n} tokens {elapsed:.2f}s {n / elapsed:.2f} tok/s")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumtime").print_stats(45)


if __name__ == "__main__":
    main()
