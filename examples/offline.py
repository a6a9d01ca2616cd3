"""Offline generation with AdaDecode through vllm.LLM.

    .venv/bin/python examples/offline.py [--model DIR] [--max-tokens 64]

AdaDecode is switched on by one argument: speculative_config={"method": "adadecode"}.
Set LD_PRELOAD to the venv's libiomp5.so and VLLM_CPU_OMP_THREADS_BIND=0-1,
VLLM_CPU_NUM_OF_RESERVED_CPU=0 for full CPU speed (this script re-executes
itself with them).
"""

import argparse
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_adadecode.models import packaged_model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder (default: packaged SmolLM2)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--speculative-config", default='{"method": "adadecode"}')
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()

    llm = LLM(
        model=args.model or str(packaged_model_dir()),
        dtype="float32",
        max_model_len=2048,
        speculative_config=json.loads(args.speculative_config),
        enforce_eager=args.enforce_eager,
        disable_log_stats=False,
    )
    messages = [
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        [{"role": "user", "content": "Name three primary colors."}],
    ]
    outs = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for o in outs:
        print("---\n" + o.outputs[0].text)
    counters = {m.name: m.value for m in llm.get_metrics() if "spec_decode_num" in m.name
                and hasattr(m, "value")}
    print("---\nspec decode counters:", json.dumps(counters))


if __name__ == "__main__":
    from vllm_adadecode.cpu_env import reexec_with_runtime_env

    reexec_with_runtime_env(sys.argv)
    main()
