"""Generate 64 tokens for 3 HumanEval eval prompts on Qwen2.5-Coder-1.5B at batch 1, one
engine in-process, printing each request's seconds (``--dataset mtbench``: MT-Bench). Argument: the adadecode
speculative_config as JSON, or ``vanilla`` for an engine without speculation.

    python scripts/probes/generate_he3.py '{"lookup": false, "self_draft": false}'
    python scripts/probes/generate_he3.py --profile '{"heads": "HEADS", "lookup": false, "adaptive": false}'

``--profile``: cProfile around the generate calls of the last 2 prompts (after a short
warm-up on the first), printed by cumulative time. With scripts/probes/governor_log.patch
applied and GOV_LOG=FILE set, the back-off logs every step (seconds, tokens, drafted or
not); governor_log_summary.py FILE... summarises them.
"""
import argparse
import cProfile
import json
import os
import pstats
import time

from vllm_adadecode.cpu_env import runtime_env

os.environ.update(runtime_env(tensor_parallel_size=1))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_adadecode import prompts  # noqa: E402
from vllm_adadecode.models import packaged_model_dir  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--profile", action="store_true")
ap.add_argument("--dataset", default="humaneval", help="a packaged set (eval split)")
ap.add_argument("--stats", help="write the cProfile stats here (pstats format)")
args = ap.parse_args()

llm = LLM(str(packaged_model_dir("Qwen2.5-Coder-1.5B-Instruct")), dtype="float32",
          enforce_eager=True, max_model_len=2048, max_num_seqs=1,
          **({} if args.config == "vanilla" else
             {"speculative_config": {"method": "adadecode", **json.loads(args.config)}}))
tok = llm.get_tokenizer()
texts = [tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                 add_generation_prompt=True)
         for p in prompts.load(args.dataset)[:3]]
params = SamplingParams(temperature=0, max_tokens=64)
prof = None
if args.profile:
    llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    texts, prof = texts[1:], cProfile.Profile()
    prof.enable()
for t in texts:
    t0 = time.perf_counter()
    llm.generate([t], params, use_tqdm=False)
    print("req", time.perf_counter() - t0, flush=True)
if prof is not None:
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    if args.stats:
        prof.dump_stats(args.stats)
