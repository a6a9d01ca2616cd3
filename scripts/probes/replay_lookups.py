"""Offline replay of lookup and corpus drafts on the model's own greedy answers.

    .venv/bin/python scripts/probes/replay_lookups.py [--dataset mtbench,humaneval] \
        [--num-prompts 40] [--max-tokens 128] [--min-prob 0.1,0.4,0.7] \
        [--heads DIR] [--fractions 1]

Generates vanilla greedy answers to eval-split prompts with vLLM (one engine,
in a child process), then replays drafting at batch 1 without an engine: at
each step the request's own tokens are searched first (vLLM's n-gram matcher,
2-5 tokens, up to 5 drafts), and when they hold no match the heads folder's
corpus (drafts/corpus.py) drafts. Every draft is checked against the answer,
as exact-match verification would. Prints tokens per step and the step-cost
ratio under the batch-1 costs of drafts/adapt.VERIFY_COST (drafts always at
full length, no back-off, no fixed costs: an upper bound on what the engine
sees). ``--fractions 0.125,0.25,0.5,1`` replays against the first part of the
corpus's answers as well (how much a larger corpus buys). docs/performance/drafts.md
(corpus drafts, and a corpus three times larger) quotes it.
"""

from __future__ import annotations

import argparse

import numpy as np

from vllm_adadecode import prompts as P
from vllm_adadecode.bench.worker import run_job
from vllm_adadecode.drafts.adapt import VERIFY_COST
from vllm_adadecode.drafts.corpus import SEPARATOR, DraftCorpus, load_corpus_tokens
from vllm_adadecode.drafts.lookup import SequenceLookup
from vllm_adadecode.heads import SHIPPED_DIR
from vllm_adadecode.models import packaged_model_dir

K = 5


def replay(answers, lookup: SequenceLookup, corpus: DraftCorpus | None) -> dict:
    steps = tokens = 0
    cost = 0.0
    by = {"lookup": [0, 0], "corpus": [0, 0]}
    for prompt, out in answers:
        i = 1  # the first answer token comes from the prefill
        while i < len(out):
            ctx = np.array(prompt + out[:i], dtype=np.int32)
            draft, src = lookup.propose(ctx, K).tolist(), "lookup"
            if not draft and corpus is not None:
                draft, src = corpus.propose(ctx, K), "corpus"
            a = 0
            while a < len(draft) and i + a < len(out) and draft[a] == out[i + a]:
                a += 1
            if draft:
                by[src][0] += len(draft)
                by[src][1] += a
            steps += 1
            cost += VERIFY_COST[1 + len(draft)]
            i += a + 1
        tokens += len(out) - 1
    return {"tokens_per_step": tokens / steps, "cost_ratio": tokens / cost,
            "drafted_accepted": by}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mtbench,humaneval")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--heads", default=str(SHIPPED_DIR / "SmolLM2-135M-Instruct"))
    ap.add_argument("--min-prob", default="0.1,0.4,0.7")
    ap.add_argument("--fractions", default="1",
                    help="replay against the first fraction(s) of the corpus's answers too")
    args = ap.parse_args()
    model = str(packaged_model_dir())
    tokens = load_corpus_tokens(args.heads)
    if tokens is None:
        raise SystemExit(f"{args.heads} has no corpus.safetensors")
    lookup = SequenceLookup(2, 5, 1 << 20)
    for name in args.dataset.split(","):
        ps = P.load(name, split="eval")[:args.num_prompts]
        res = run_job(dict(model=model, prompts=[p.text for p in ps], max_tokens=args.max_tokens,
                           concurrency=16, dtype="float32", return_prompt_ids=True,
                           warmup=False))
        answers = list(zip(res["prompt_token_ids"], res["token_ids"]))
        print(f"{name} ({len(answers)} answers), lookups only: "
              f"{replay(answers, lookup, None)}")
        ends = np.flatnonzero(tokens == SEPARATOR) + 1  # each answer's end
        for frac in (float(x) for x in args.fractions.split(",")):
            part = tokens[:ends[max(1, int(len(ends) * frac)) - 1]]
            for mp in (float(x) for x in args.min_prob.split(",")):
                r = replay(answers, lookup, DraftCorpus(part, min_prob=mp))
                print(f"{name}, lookups then corpus ({int((part >= 0).sum())} tokens, "
                      f"min_prob {mp}): {r}", flush=True)


if __name__ == "__main__":
    main()
