"""Generate 64 tokens for 3 HumanEval eval prompts on Qwen2.5-Coder-1.5B at batch 1, one
engine, printing each request's seconds. Argument: the adadecode speculative_config as JSON.
    python scripts/probes/generate_he3.py '{"lookup": false, "self_draft": false}'
With scripts/probes/governor_log.patch applied and GOV_LOG=FILE set, the back-off logs every
step (seconds, tokens, drafted or not); governor_log_summary.py FILE... summarises them."""
import os, sys, json, time
from vllm_adadecode.cpu_env import runtime_env
os.environ.update(runtime_env(tensor_parallel_size=1)); os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'
from vllm import LLM, SamplingParams
from vllm_adadecode import prompts as P
Q = "/root/.cache/vllm_adadecode/models/Qwen2.5-Coder-1.5B-Instruct"
cfg = json.loads(sys.argv[1])
llm = LLM(Q, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=1,
          speculative_config={"method": "adadecode", **cfg})
tok = llm.get_tokenizer()
ps = [p.text if hasattr(p, "text") else p for p in P.load("humaneval")[:3]]
texts = [tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True) for x in ps]
sp = SamplingParams(temperature=0, max_tokens=64)
for t in texts:
    t0 = time.perf_counter(); llm.generate([t], sp, use_tqdm=False); print("req", time.perf_counter() - t0, flush=True)
