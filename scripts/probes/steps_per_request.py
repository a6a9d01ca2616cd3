"""Tokens each engine step adds to one request at a time (batch 1), for the
first N prompts of a packaged eval set, one engine in-process. Compare two
methods' step counts request by request (for example vLLM's ngram against
AdaDecode's lookups) to see where one takes more steps.

    python scripts/probes/steps_per_request.py --model Qwen2.5-Coder-1.5B-Instruct \\
        --dataset humaneval --num-prompts 5 --max-tokens 64 --out a.json CONFIG

CONFIG: a speculative_config as JSON (``{"method": "ngram", ...}`` or
``{"method": "adadecode", ...}``), or ``vanilla``.
"""
import argparse
import json
import os

from vllm_adadecode.cpu_env import runtime_env

os.environ.update(runtime_env(tensor_parallel_size=1))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_adadecode import prompts  # noqa: E402
from vllm_adadecode.models import packaged_model_dir  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("config")
ap.add_argument("--model", default="SmolLM2-135M-Instruct")
ap.add_argument("--dataset", default="humaneval")
ap.add_argument("--num-prompts", type=int, default=5)
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--out")
args = ap.parse_args()

spec = None if args.config == "vanilla" else json.loads(args.config)
llm = LLM(str(packaged_model_dir(args.model)), dtype="float32", enforce_eager=True,
          max_model_len=2048, max_num_seqs=1,
          **({} if spec is None else {"speculative_config": spec}))
tok = llm.get_tokenizer()
engine = llm.llm_engine
params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
result = []
for i, p in enumerate(prompts.load(args.dataset)[:args.num_prompts]):
    text = tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                   add_generation_prompt=True)
    engine.add_request(str(i), text, params)
    seen, per_step, out = 0, [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            n = len(o.outputs[0].token_ids)
            per_step.append(n - seen)
            seen, out = n, o.outputs[0].token_ids
    result.append({"prompt": i, "steps": len(per_step), "tokens_per_step": per_step,
                   "token_ids": list(out)})
    print(i, len(per_step), per_step, flush=True)
print("steps", sum(r["steps"] for r in result))
if args.out:
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "requests": result}, f)
