"""What a model costs on this machine, measured in vLLM's engine (CPU, fp32,
eager, batch 1, engine core in this process):

1. a forward over n new tokens (n = 1, 2, 4, 6, 8, 16): an n-token prompt
   generating 1 token, prefix caching off, median of --repeats runs, and its
   ratio to n = 1 (the cost of verifying n - 1 drafted rows beside one);
2. one decoder layer and the LM head over one row (timers on the model's own
   modules during greedy decoding), and a decoding step's split: the decoder
   layers, the LM head, and the rest (embedding, norm, sampler, scheduler).

    eval "$(.venv/bin/python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/model_costs.py \\
        --model Qwen2.5-Coder-0.5B-Instruct --out costs.json

``--model`` takes a packaged model's name or an HF folder. The AdaDecode cost
model's inputs (``training/select.py``: a layer, the LM head, rows) come from
these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--rows", default="1,2,4,6,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_adadecode.models import PACKAGED, packaged_model_dir

    model = str(packaged_model_dir(args.model)) if args.model in PACKAGED else args.model
    llm = LLM(model=model, dtype="float32", max_model_len=2048, max_num_seqs=1, seed=0,
              enforce_eager=True, enable_prefix_caching=False)
    one = SamplingParams(temperature=0, max_tokens=1)

    # 1. A forward over n new tokens.
    rows = [int(x) for x in args.rows.split(",")]
    base = 1000  # token ids of ordinary text; the values do not matter to the cost
    ms = {}
    for n in rows:
        prompt = TokensPrompt(prompt_token_ids=list(range(base, base + n)))
        llm.generate([prompt], one, use_tqdm=False)  # warm this shape
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            times.append(1000 * (time.perf_counter() - t0))
        ms[n] = statistics.median(times)
    print("forward over n new tokens (median ms; ratio to n=1):")
    for n in rows:
        print(f"  n={n:2d}  {ms[n]:7.1f} ms  {ms[n] / ms[rows[0]]:.2f}x")

    # 2. A layer, the LM head, and a step's split, while decoding.
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner
    net = runner.model
    acc, calls = defaultdict(float), defaultdict(int)

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            # One-row calls only (decoding); the prompt's prefill is left out.
            rows = a[0].shape[0] if a and hasattr(a[0], "shape") else 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if rows == 1:
                    acc[key] += time.perf_counter() - t0
                    calls[key] += 1

        setattr(obj, name, wrapper)

    layers = net.model.layers
    for layer in layers:
        timed(layer, "forward", "layers")
    timed(net, "compute_logits", "lm_head")
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate([text], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    acc.clear()
    calls.clear()
    t0 = time.perf_counter()
    llm.generate([text], params, use_tqdm=False)
    total = time.perf_counter() - t0
    steps = args.decode_tokens  # one prefill step, then one step per token
    decode_layer_calls = calls["layers"]
    layer_ms = 1000 * acc["layers"] / max(calls["layers"], 1)
    head_ms = 1000 * acc["lm_head"] / max(calls["lm_head"], 1)
    step_ms = 1000 * total / steps
    split = {"decoder layers": layer_ms * len(layers), "LM head": head_ms}
    split["rest (embedding, norm, sampler, scheduler)"] = step_ms - sum(split.values())
    print(f"\none decoding step: {step_ms:.1f} ms ({len(layers)} layers; "
          f"{decode_layer_calls // len(layers)} decode steps timed)")
    print(f"  one decoder layer, one row: {layer_ms:.2f} ms")
    print(f"  the LM head, one row: {head_ms:.2f} ms = {head_ms / layer_ms:.1f} layers")
    for k, v in split.items():
        print(f"  {k:45s} {v:7.1f} ms  {100 * v / step_ms:4.0f}%")
    out = {"model": Path(model).name, "rows_ms": ms, "rows_ratio":
           {n: ms[n] / ms[rows[0]] for n in rows}, "layer_ms": layer_ms, "lm_head_ms": head_ms,
           "num_layers": len(layers), "step_ms": step_ms, "step_split_ms": split,
           "command": "scripts/model_costs.py " + " ".join(os.sys.argv[1:])}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    os._exit(0)


if __name__ == "__main__":
    main()
