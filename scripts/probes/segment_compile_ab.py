"""Two ways of compiling the drafter's layer segments, timed in one engine.

    eval "$(python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/probes/segment_compile_ab.py [--swap]

Every layer segment is built twice: as LayerSegments builds it (static shapes
except the token dimension) and with ``torch.compile(dynamic=True)`` (every
input dimension symbolic, the build before 60bad38). Successive calls of each
segment alternate between the two, on the same inputs and in the same forward
context, so host drift hits both alike; ``--swap`` flips which build takes the
odd calls. Decodes 4 HumanEval eval prompts x 128 tokens at batch 1 with the
shipped heads, drafting on every step, and prints the median time per call by
build, layer range and rows. docs/performance/segments.md (static shapes except
the token dimension) quotes it.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swap", action="store_true", help="the dynamic build takes the even calls")
    ap.add_argument("--num-prompts", type=int, default=4)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_adadecode.engine import segments as patches
    from vllm_adadecode import prompts as data
    from vllm_adadecode.models import packaged_model_dir

    times: dict[tuple, list[float]] = collections.defaultdict(list)
    calls: collections.Counter = collections.Counter()
    shipped_build = patches.LayerSegments._build

    def dynamic_build(segs, start, end):
        return torch.compile(patches.layer_run(segs.layers[start:end],
                                               f"dynamic_layers_{start}_{end}"), dynamic=True)

    def alternating_build(segs, start, end):
        builds = [("static (shipped)", shipped_build(segs, start, end)),
                  ("dynamic=True", dynamic_build(segs, start, end))]
        if args.swap:
            builds.reverse()

        def call(positions, hidden, residual):
            key = (start, end, min(len(positions), 3))
            calls[key] += 1
            name, fn = builds[calls[key] % 2]
            t = time.perf_counter()
            out = fn(positions, hidden, residual)
            if calls[key] > 8:  # past both builds' compiles
                times[(start, end, min(len(positions), 3), name)].append(time.perf_counter() - t)
            return out

        return call

    patches.LayerSegments._build = alternating_build
    llm = LLM(model=str(packaged_model_dir()), dtype="float32", max_model_len=2048,
              max_num_seqs=1, seed=0,
              speculative_config={"method": "adadecode", "adaptive": False})
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p.text}],
                                     add_generation_prompt=True, tokenize=False)
             for p in data.humaneval()[: args.num_prompts]]
    llm.generate(texts, SamplingParams(temperature=0, max_tokens=128), use_tqdm=False)
    for key in sorted(times):
        start, end, rows, name = key
        v = times[key]
        print(f"layers {start}-{end - 1} rows={rows}{'+' if rows == 3 else ''}  {name:17s} "
              f"calls {len(v):4d}  median {1000 * statistics.median(v):6.2f} ms")


if __name__ == "__main__":
    main()
