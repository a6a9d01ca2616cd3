"""Engine start times, cold (empty compile caches) and warm (second start on
the same caches), for a plain and an AdaDecode engine, under vLLM's compile
settings given as environment variants.

    python scripts/start_times.py [--variants default,VLLM_USE_MEGA_AOT_ARTIFACT=0] [--warm-repeats 3]

Each engine is `vllm.LLM` on the packaged SmolLM2-135M-Instruct (fp32,
compiled: vLLM's default), started in its own child process with the CPU
runtime environment, one at a time, with private cache folders
(VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR) so that "cold" is really cold. For
each start it reports the seconds to a ready engine and whether vLLM's log says
it loaded compiled artifacts or compiled again after a load failure.
docs/RELIABILITY.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

LOAD_FAILURE = "Compiling model again due to a load failure"


def start(model: str, spec: dict | None, env: dict[str, str], log: Path) -> dict:
    from vllm_adadecode.bench.worker import run_job

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        log.write_text("")
        res = run_job(dict(model=model, prompts=["Say hello."], max_tokens=8, warmup=False,
                           progress=False, speculative_config=spec, dtype="float32"),
                      log_path=str(log))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = log.read_text(errors="replace")
    return {"startup_s": round(res["startup_s"], 1),
            "load_failure": LOAD_FAILURE in text,
            "aot_loaded": len(re.findall(r"Directly load AOT compilation", text)),
            "cache_loaded": len(re.findall(r"Directly load the compiled graph", text))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default",
                    help="comma-separated: 'default' or NAME=VALUE[+NAME=VALUE]")
    ap.add_argument("--warm-repeats", type=int, default=1,
                    help="warm starts per engine, alternating between the engines")
    ap.add_argument("--out")
    args = ap.parse_args()
    from vllm_adadecode.models import packaged_model_dir

    model = str(packaged_model_dir())
    results = {}
    for variant in args.variants.split(","):
        extra = {} if variant == "default" else dict(kv.split("=", 1) for kv in variant.split("+"))
        engines = (("vanilla", None), ("adadecode", {"method": "adadecode"}))
        roots, envs, runs = {}, {}, {}
        for label, spec in engines:
            root = roots[label] = Path(tempfile.mkdtemp(prefix="start-times-"))
            envs[label] = {"VLLM_CACHE_ROOT": str(root / "vllm"), "VLLM_LOGGING_LEVEL": "INFO",
                           "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), **extra}
            runs[label] = {"cold": start(model, spec, envs[label], root / "cold.log"), "warm": []}
        # Warm starts alternate between the engines, so drift hits both alike.
        for i in range(args.warm_repeats):
            for label, spec in engines:
                runs[label]["warm"].append(
                    start(model, spec, envs[label], roots[label] / f"warm{i}.log"))
        for label, _ in engines:
            cold, warm = runs[label]["cold"], runs[label]["warm"]
            times = sorted(w["startup_s"] for w in warm)
            runs[label]["warm_median_s"] = times[len(times) // 2]
            results[f"{variant} {label}"] = runs[label]
            warm_s = " / ".join(f"{w['startup_s']:.1f}" for w in warm)
            print(f"{variant:<36} {label:<10} cold {cold['startup_s']:>6.1f} s   warm {warm_s} s "
                  f"(median {runs[label]['warm_median_s']:.1f})   warm load failure: "
                  f"{any(w['load_failure'] for w in warm)}", flush=True)
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
