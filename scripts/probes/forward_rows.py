"""Rows per model forward and ms per step of one engine, its core in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), compiled SmolLM2: three copies of
one chat prompt, 128 tokens each (ignore_eos), one request at a time.

    eval "$(.venv/bin/python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/probes/forward_rows.py none
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/probes/forward_rows.py \\
        '{"method": "adadecode", "lookup": false, "self_draft": false}'

A probe: it wraps the runner's model to count input shapes (vLLM internals).
"""

import collections
import json
import os
import sys
import time

from vllm import LLM, SamplingParams

from vllm_adadecode.models import packaged_model_dir


def main() -> None:
    spec = None if sys.argv[1] == "none" else json.loads(sys.argv[1])
    llm = LLM(model=str(packaged_model_dir()), dtype="float32", max_model_len=2048,
              max_num_seqs=1, seed=0, speculative_config=spec)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner
    shapes, forward = collections.Counter(), runner.model.forward

    def counted(input_ids=None, positions=None, *args, **kwargs):
        shapes[tuple(positions.shape)] += 1
        return forward(input_ids, positions, *args, **kwargs)

    runner.model.forward = counted
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    t0 = time.time()
    llm.generate([text] * 3, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True),
                 use_tqdm=False)
    print(f"ms per step {1000 * (time.time() - t0) / 384:.1f}; forwards by rows "
          f"{dict(shapes.most_common(6))}")
    os._exit(0)


if __name__ == "__main__":
    main()
