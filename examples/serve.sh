#!/usr/bin/env bash
# Serve the packaged SmolLM2-135M-Instruct with AdaDecode on an OpenAI-compatible API.
#
#   examples/serve.sh                                  # --speculative-config form
#   examples/serve.sh --spec-model HEADS_DIR           # heads-folder form
#   PORT=8001 examples/serve.sh --enforce-eager        # any extra `vllm serve` flags
#
# Without a --speculative-config/--spec-model flag it adds
# --speculative-config '{"method": "adadecode"}'. MODEL overrides the model folder.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$here/.venv}"
PY="$VENV/bin/python"
MODEL="${MODEL:-$("$PY" -m vllm_adadecode.cli model-path)}"
# Intel OpenMP preloaded, both cores for decoding, small KV cache (CPU only).
eval "$("$PY" -m vllm_adadecode.cpu_env --print-env)"
spec=(--speculative-config '{"method": "adadecode"}')
for a in "$@"; do
  case "$a" in --speculative-config*|--spec-model*|-sc) spec=() ;; esac
done
exec "$VENV/bin/vllm" serve "$MODEL" --dtype float32 --max-model-len 2048 \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "${spec[@]}" "$@"
