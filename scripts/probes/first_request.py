"""Engine start time, then the wall time of each of the first requests, and the
torch.compile graphs built so far (in-process, one request at a time).

    eval "$(python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/probes/first_request.py '{"method": "adadecode", "adaptive": false}'

Uses the packaged SmolLM2 (fp32, compiled) and the first 4 HumanEval eval
prompts x 128 tokens, greedy. A graph count that grows after "START" means a
request waited for a compilation. docs/performance/segments.md ("Compiling the
layer segments at engine start") quotes it.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from torch._dynamo.utils import counters
    from vllm import LLM, SamplingParams

    from vllm_adadecode import prompts as data
    from vllm_adadecode.models import packaged_model_dir

    spec = None if sys.argv[1:] in ([], ["none"]) else json.loads(sys.argv[1])
    t = time.perf_counter()
    llm = LLM(model=str(packaged_model_dir()), dtype="float32", max_model_len=1024,
              speculative_config=spec, seed=0)
    print(f"START {time.perf_counter() - t:.1f} s, graphs {counters['stats']['unique_graphs']}",
          flush=True)
    tok = llm.get_tokenizer()
    for p in data.humaneval()[:4]:
        text = tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                       add_generation_prompt=True)
        t = time.perf_counter()
        out = llm.generate([text], SamplingParams(max_tokens=128, temperature=0), use_tqdm=False)
        print(f"REQUEST {p.id}: {time.perf_counter() - t:.2f} s, "
              f"{len(out[0].outputs[0].token_ids)} tokens, "
              f"graphs {counters['stats']['unique_graphs']}", flush=True)


if __name__ == "__main__":
    main()
