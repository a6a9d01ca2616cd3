"""Time a model's decoder layers at 1-8 rows, with vLLM's oneDNN matmuls as
they are and with the row padding AdaDecode measures at engine start
(``gemm_padding``, vllm_adadecode/engine/gemm.py). Attention is skipped (no
attention metadata, as in vLLM's warm-up): this times the matmuls and the
rest of each layer.

    eval "$(.venv/bin/python -m vllm_adadecode.cpu_env --print-env)"
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/probes/gemm_rows.py \\
        --model Qwen2.5-Coder-1.5B-Instruct

Prints the engine-start measurement (one decoder layer's matmuls at 1-16
rows, ms) and the padding it plans, ``--calibrations`` times; then per round
the ms of layers 4 to the last at 1-8 rows, unpadded and padded with the last
plan. A probe: it reaches into the engine's model.
"""

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=8)
    ap.add_argument("--calibrations", type=int, default=3)
    args = ap.parse_args()

    from vllm import LLM
    from vllm.forward_context import set_forward_context

    from vllm_adadecode.engine import gemm
    from vllm_adadecode.models import packaged_model_dir

    llm = LLM(model=str(packaged_model_dir(args.model)), dtype="float32", max_model_len=512,
              max_num_seqs=1, enforce_eager=True, seed=0)
    runner = (llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
              .model_runner)
    model, cfg = runner.model, runner.vllm_config
    layers = model.model.layers[4:]
    hidden = model.config.hidden_size
    sample = [m for n, m in model.named_modules()
              if ".layers.0." in n and gemm._onednn_handler(m) is not None]
    handlers = [gemm._onednn_handler(m) for m in sample]
    with torch.inference_mode():
        for _ in range(args.calibrations):  # what install measures, and its plan
            costs = [0.0] + [gemm._time_rows(handlers, r, 5)
                             for r in range(1, gemm.MAX_ROWS + 1)]
            print("matmul ms at 1-16 rows:", " ".join(f"{c * 1e3:.2f}" for c in costs[1:]))
            print("  padding planned from these alone:", {m: r for m, r in enumerate(gemm.plan(costs)) if r != m})
    padded, _ = gemm.install(model)
    print("padding installed:", padded)
    plan, plain = gemm._PAD_TO, list(range(gemm.MAX_ROWS + 1))

    def run(rows: int) -> float:
        with set_forward_context(None, cfg, num_tokens=rows, slot_mapping={}):
            pos = torch.arange(rows)
            h, r = torch.randn(rows, hidden), torch.randn(rows, hidden)
            for layer in layers[:2]:
                layer(pos, h, r)
            t = time.perf_counter()
            for _ in range(3):
                hh, rr = h, r
                for layer in layers:
                    hh, rr = layer(pos, hh, rr)
            return (time.perf_counter() - t) / 3 * 1e3

    with torch.inference_mode():
        for i in range(args.rounds):
            for name, table in (("unpadded", plain), ("padded", plan)):
                gemm._PAD_TO = table
                cells = " ".join(f"{m}:{run(m):.0f}" for m in range(1, args.max_rows + 1))
                print(f"round {i + 1} {name:8s} ms for {len(layers)} layers by rows: {cells}",
                      flush=True)


if __name__ == "__main__":
    main()
