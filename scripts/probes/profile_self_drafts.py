"""cProfile of LLM.generate over 2 HumanEval prompts (64 tokens) on Qwen2.5-Coder-1.5B, engine
in-process. Argument: the adadecode speculative_config as JSON, e.g.
    python scripts/probes/profile_self_drafts.py '{"heads": "HEADS", "lookup": false, "adaptive": false}'"""
import os, sys, json, time, cProfile, pstats
from vllm_adadecode.cpu_env import runtime_env
os.environ.update(runtime_env(tensor_parallel_size=1)); os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'
from vllm import LLM, SamplingParams
from vllm_adadecode import prompts as P
Q = "/root/.cache/vllm_adadecode/models/Qwen2.5-Coder-1.5B-Instruct"
cfg = json.loads(sys.argv[1])
llm = LLM(Q, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=1,
          speculative_config={"method": "adadecode", **cfg})
tok = llm.get_tokenizer()
ps = [p.text for p in P.load("humaneval")[:3]]
texts = [tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True) for x in ps]
sp = SamplingParams(temperature=0, max_tokens=64)
llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
pr = cProfile.Profile(); t0 = time.perf_counter(); pr.enable()
for t in texts[1:]:
    llm.generate([t], sp, use_tqdm=False)
pr.disable(); print("elapsed", time.perf_counter() - t0)
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(45)
