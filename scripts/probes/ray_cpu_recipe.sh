#!/usr/bin/env bash
# The README's Ray-on-CPU recipe (docs/guides/serving.md) as printed, plus a
# readiness poll, one completion and the shutdown. Run it from an empty
# environment:  env -i HOME=$HOME PATH=/usr/local/bin:/usr/bin:/bin bash scripts/probes/ray_cpu_recipe.sh
cd "$(dirname "$0")/../.."
eval "$(.venv/bin/python -m vllm_adadecode.cpu_env --print-env)"
export ADADECODE_RAY_CPU=1 VLLM_CPU_OMP_THREADS_BIND='0|1' VLLM_HOST_IP=127.0.0.1
.venv/bin/ray start --head --node-ip-address=127.0.0.1 --port=6379 \
  --num-cpus=2 --num-gpus=2 --include-dashboard=false --disable-usage-stats
RAY_ADDRESS=127.0.0.1:6379 .venv/bin/vllm serve \
  "$(.venv/bin/vllm-adadecode model-path Qwen2.5-Coder-0.5B-Instruct)" \
  --dtype float32 --speculative-config '{"method": "adadecode"}' \
  --tensor-parallel-size 2 --distributed-executor-backend ray > /tmp/ray_serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 120); do
  if curl -s localhost:8000/v1/models > /tmp/models.json 2>/dev/null && grep -q Qwen /tmp/models.json; then echo "up after $((i*3)) s"; break; fi
  if ! kill -0 $SERVE 2>/dev/null; then echo "serve exited"; break; fi
  sleep 3
done
M=$(python3 -c "import json;print(json.load(open('/tmp/models.json'))['data'][0]['id'])" 2>/dev/null)
curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d "{\"model\": \"$M\", \"prompt\": \"def fib(n):\", \"max_tokens\": 24, \"temperature\": 0}" | head -c 600; echo
kill -INT $SERVE; sleep 10; kill -9 $SERVE 2>/dev/null
.venv/bin/ray stop
