"""The step-cost fit's samples on Qwen2.5-Coder-1.5B at batch 1: one engine
in-process generates 64 tokens for 3 HumanEval prompts, then the drafter's
``adapt.cost`` samples (seconds without the self-drafting pass, batch, drafted
rows, off-chain rows) are read through ``collective_rpc`` and summarised by
drafted rows, with the least-squares row cost the fit would find.

    python scripts/probes/step_cost_samples.py '{"self_draft": false}'
"""
import json
import os
import sys

import numpy as np

from vllm_adadecode.cpu_env import runtime_env

os.environ.update(runtime_env(tensor_parallel_size=1))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_adadecode import prompts  # noqa: E402
from vllm_adadecode.models import packaged_model_dir  # noqa: E402


def samples(worker):
    from vllm_adadecode.engine.drafter import drafter_of

    cost = drafter_of(worker.model_runner).adapt.cost
    return {k: [list(s) for s in v] for k, v in cost.samples.items()}, sorted(cost.fits)


llm = LLM(str(packaged_model_dir("Qwen2.5-Coder-1.5B-Instruct")), dtype="float32",
          enforce_eager=True, max_model_len=2048, max_num_seqs=1,
          speculative_config={"method": "adadecode", **json.loads(sys.argv[1])})
tok = llm.get_tokenizer()
for p in prompts.load("humaneval")[:3]:
    text = tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                   add_generation_prompt=True)
    llm.generate([text], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
by_bucket, fitted = llm.collective_rpc(samples)[0]
print("fitted buckets:", fitted)
for bucket, rows in by_bucket.items():
    a = np.array(rows)
    print(f"bucket {bucket}: {len(a)} steps")
    for r in sorted(set(a[:, 2])):
        s = a[a[:, 2] == r, 0]
        print(f"  {int(r)} drafted rows: {len(s)} steps, median {1e3 * np.median(s):.1f} ms")
    x = np.column_stack([np.ones(len(a)), a[:, 2]])
    base, row = np.linalg.lstsq(x, a[:, 0], rcond=None)[0] * 1e3
    print(f"  least squares: {base:.1f} ms + {row:.2f} ms per drafted row")
