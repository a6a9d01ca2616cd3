"""A draft corpus widened with text that ships (ShareGPT's train-split assistant
replies), measured offline before any engine run.

    # the 1.5B's greedy replies to the 40 MT-Bench eval prompts (one vanilla engine, ~3 min)
    python scripts/probes/text_corpus.py replies --out /tmp/mt_replies.json
    # a corpus folder: the 0.5B's shipped corpus + the first N ShareGPT reply tokens
    python scripts/probes/text_corpus.py build --tokens 6000000 --out /tmp/corpus6m
    # corpus-only drafting replayed on those replies: tokens per step, per corpus
    # and min_prob, linear and with the corpus's runners-up as first-token branches
    python scripts/probes/text_corpus.py replay /tmp/mt_replies.json --tokens 1500000,6000000

``build``'s folder goes to the engine through the ``corpus`` setting:
``--method 'adadecode={"corpus": "/tmp/corpus6m"}'``. The replay drafts up to 5
tokens per step from the corpus alone (no lookups, no exit heads), so it bounds
what a corpus adds, not what an engine step gains.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

MODEL = "Qwen2.5-Coder-1.5B-Instruct"
FAMILY_CORPUS = "Qwen2.5-Coder-0.5B-Instruct"  # the shipped corpus the 1.5B reads
K = 5


def replies(args):
    from vllm_adadecode.cpu_env import runtime_env

    os.environ.update(runtime_env(tensor_parallel_size=1))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from vllm_adadecode import prompts
    from vllm_adadecode.models import packaged_model_dir

    llm = LLM(str(packaged_model_dir(MODEL)), dtype="float32", enforce_eager=True,
              max_model_len=2048, max_num_seqs=48)
    tok = llm.get_tokenizer()
    ps = prompts.load(args.dataset, "eval")
    texts = [tok.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                     add_generation_prompt=True) for p in ps]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    Path(args.out).write_text(json.dumps(
        [{"id": p.id, "category": p.category, "prompt": list(o.prompt_token_ids),
          "out": list(o.outputs[0].token_ids)} for p, o in zip(ps, outs)]))
    print(f"wrote {args.out}: {len(ps)} replies")


def _text_tokens(limit: int) -> np.ndarray:
    """ShareGPT's train-split replies in the model's tokens, each followed by the
    separator: the first ``limit`` entries (tokens and separators), cut back to
    the end of the last whole reply."""
    from transformers import AutoTokenizer
    from tqdm import tqdm

    from vllm_adadecode import prompts
    from vllm_adadecode.drafts.corpus import SEPARATOR
    from vllm_adadecode.models import packaged_model_dir

    tok = AutoTokenizer.from_pretrained(str(packaged_model_dir(MODEL)))
    texts = prompts.sharegpt_replies("train")
    out, n = [], 0
    for s in tqdm(range(0, len(texts), 256), desc="tokenizing ShareGPT replies", unit="batch"):
        for ids in tok(texts[s: s + 256], add_special_tokens=False)["input_ids"]:
            out.append(np.array(ids + [SEPARATOR], dtype=np.int64))
            n += len(ids) + 1
        if n >= limit:
            break
    return _cut(np.concatenate(out), limit)


def _cut(text: np.ndarray, limit: int) -> np.ndarray:
    text = text[:limit]
    ends = np.flatnonzero(text < 0)
    return text[: ends[-1] + 1] if len(ends) else text[:0]


def _family_tokens() -> np.ndarray:
    from vllm_adadecode.drafts.corpus import load_corpus_tokens
    from vllm_adadecode.shipped_heads import __file__ as shipped

    return load_corpus_tokens(Path(shipped).parent / FAMILY_CORPUS).astype(np.int64)


def build(args):
    from vllm_adadecode.drafts.corpus import save_corpus

    family, text = _family_tokens(), _text_tokens(args.tokens)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = save_corpus(args.out, np.concatenate([family, text]).astype(np.int32))
    print(f"wrote {path}: {int((family >= 0).sum())} family tokens + "
          f"{int((text >= 0).sum())} ShareGPT reply tokens")
    from vllm_adadecode import prompts

    firsts = [p.text for p in prompts.sharegpt("train")]
    evals = prompts.mtbench("eval")
    seen = [m.id for m in evals if any(m.text[:80] in t for t in firsts)]
    print(f"MT-Bench eval prompts whose first 80 characters occur in a ShareGPT "
          f"train-split first turn: {len(seen)} of {len(evals)} {seen}")


def _replay(data, corpus, maxlen: int, branches: int = 0):
    """Corpus-only drafting on recorded greedy replies: (tokens per step,
    accepted, drafted nodes). ``branches``: the corpus's runners-up for the
    first token, each continued by the corpus, verified beside the main draft."""
    steps = accepted = drafted = total = 0
    for d in data:
        ctx, out = list(d["prompt"]), d["out"][:maxlen]
        total += len(out)
        pos = 0
        while pos < len(out):
            seen = ctx + out[:pos]
            main = corpus.propose(np.array(seen), K)
            cands = [main]
            if branches:
                first = main[0] if main else -1
                for alt in corpus.runners_up(seen, first, branches, min_share=0.05):
                    cands.append([alt] + corpus.propose(np.array(seen + [alt]), 2))
            best = 0
            for c in cands:
                m = 0
                while m < len(c) and pos + m < len(out) and c[m] == out[pos + m]:
                    m += 1
                best = max(best, m)
            drafted += sum(len(c) for c in cands)
            accepted += best
            steps += 1
            pos += best + 1
    return total / steps, accepted, drafted


def replay(args):
    from vllm_adadecode.drafts.corpus import DraftCorpus

    data = json.loads(Path(args.replies).read_text())
    family = _family_tokens()
    sizes = [int(x) for x in args.tokens.split(",")]
    text = _text_tokens(max(sizes))
    print(f"{len(data)} replies, first {args.max_tokens} tokens each; corpus-only drafts, "
          f"up to {K} per step")
    for size in [0] + sizes:
        cut = _cut(text, size)
        t0 = time.time()
        corpus = DraftCorpus(np.concatenate([family, cut]))
        built = time.time() - t0
        mb = (corpus.keys.nbytes + corpus.next.nbytes + corpus.prob.nbytes) / 1e6
        for mp in [float(x) for x in args.min_prob.split(",")]:
            corpus.min_prob = mp
            lin = _replay(data, corpus, args.max_tokens)
            tree = _replay(data, corpus, args.max_tokens, branches=2)
            print(f"family + {int((cut >= 0).sum()):>9} text tokens, min_prob {mp}: "
                  f"linear {lin[0]:.3f} tok/step ({lin[1]} of {lin[2]} drafted), "
                  f"+2 first-token branches {tree[0]:.3f} ({tree[2]} nodes); "
                  f"table: {len(corpus)} contexts, {mb:.0f} MB, built in {built:.1f} s",
                  flush=True)


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
sub = ap.add_subparsers(dest="cmd", required=True)
r = sub.add_parser("replies")
r.add_argument("--dataset", default="mtbench")
r.add_argument("--max-tokens", type=int, default=128)
r.add_argument("--out", required=True)
r.set_defaults(func=replies)
b = sub.add_parser("build")
b.add_argument("--tokens", type=int, default=6_000_000)
b.add_argument("--out", required=True)
b.set_defaults(func=build)
p = sub.add_parser("replay")
p.add_argument("replies")
p.add_argument("--tokens", default="1500000,6000000")
p.add_argument("--min-prob", default="0.4,0.1")
p.add_argument("--max-tokens", type=int, default=64)
p.set_defaults(func=replay)
args = ap.parse_args()
args.func(args)
