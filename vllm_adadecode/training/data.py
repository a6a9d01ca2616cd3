"""Self-distillation data: the model's own greedy responses and its hidden states.

1. ``generate``: the target model writes greedy responses to training prompts
   with vLLM (one engine, in a child process).
2. ``collect_features``: a Hugging Face forward pass over prompt + response keeps,
   for every response position, the residual-stream state after each candidate
   exit layer and the final (normed) hidden state. Vocab-sized distributions are
   never stored: training recomputes them per minibatch from the final state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..prompts import Prompt


@dataclass
class Features:
    layers: list[int]  # 0-based exit layers, in the order of hidden's dim 1
    hidden: torch.Tensor  # [N, len(layers), d] residual stream after each layer
    final: torch.Tensor  # [N, d] final-norm output (the LM head's input)
    seq_ids: torch.Tensor  # [N] which sequence each row came from

    def __len__(self) -> int:
        return self.final.shape[0]

    def select(self, rows: torch.Tensor) -> "Features":
        return Features(self.layers, self.hidden[rows], self.final[rows], self.seq_ids[rows])

    def split_by_sequence(self, held_out_fraction: float, seed: int):
        """Train/held-out split by whole sequences (no leakage between them)."""
        held_ids = held_out_sequences(torch.unique(self.seq_ids), held_out_fraction, seed)
        held = torch.isin(self.seq_ids, held_ids)
        return self.select(~held), self.select(held)


def held_out_sequences(seq_ids: torch.Tensor, held_out_fraction: float, seed: int):
    """The held-out subset of sorted sequence ids (seeded; whole sequences)."""
    g = torch.Generator().manual_seed(seed)
    perm = seq_ids[torch.randperm(len(seq_ids), generator=g)]
    return perm[: max(1, int(round(len(seq_ids) * held_out_fraction)))]


def usable_sequence_ids(sequences) -> torch.Tensor:
    """Ids of the sequences ``collect_features`` keeps (responses of 2+ tokens)."""
    return torch.tensor([k for k, (_, r) in enumerate(sequences) if len(r) >= 2],
                        dtype=torch.int32)


def build_shortlist(sequences, train_ids, held_ids, size: int):
    """The ``size`` token ids most frequent in the training responses, and the
    fraction of held-out response tokens they cover."""
    def tokens(ids):
        return torch.tensor([t for k in ids for t in sequences[int(k)][1]], dtype=torch.int64)

    ids = frequency_shortlist([tokens(train_ids)], size)
    return ids, coverage(tokens(held_ids), ids)


def frequency_shortlist(sources: list[torch.Tensor], size: int,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """The ``size`` token ids of highest summed relative frequency over
    ``sources`` (1-D token-id tensors, each weighted equally whatever its
    length), together with the ids in ``keep``; sorted."""
    sources = [t.to(torch.int64) for t in sources if t.numel()]
    if not sources:
        raise ValueError("a frequency shortlist needs at least one non-empty token source")
    vocab = max(int(t.max()) for t in sources) + 1
    freq = torch.zeros(vocab, dtype=torch.float64)
    for t in sources:
        counts = torch.bincount(t, minlength=vocab).double()
        freq += counts / counts.sum()
    order = torch.argsort(freq, descending=True, stable=True)
    ids = order[: min(size, int((freq > 0).sum()))]
    if keep is not None:
        ids = torch.unique(torch.cat([ids, keep.to(torch.int64)]))
    return torch.sort(ids).values


def coverage(tokens: torch.Tensor, ids: torch.Tensor) -> float:
    """The fraction of ``tokens`` whose id is in ``ids``."""
    return float(torch.isin(tokens, ids).float().mean()) if tokens.numel() else 0.0


def load_prompts(spec: str, limit: int | None, seed: int) -> list[Prompt]:
    """``spec``: comma-separated packaged sets (sharegpt, humaneval, mtbench; the
    train split) and/or JSONL files. ``limit`` caps the total, sampling ShareGPT
    last so the smaller domain sets are used whole."""
    from .. import prompts as P

    out: list[Prompt] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        if part.endswith(".jsonl") or Path(part).is_file():
            out.extend(P.from_jsonl(part))
        else:
            out.extend(P.load(part, split="train"))
    if limit is not None and len(out) > limit:
        g = torch.Generator().manual_seed(seed)
        fixed = [p for p in out if p.category != "sharegpt"]
        pool = [p for p in out if p.category == "sharegpt"]
        take = max(0, limit - len(fixed))
        idx = torch.randperm(len(pool), generator=g)[:take].tolist()
        out = (fixed + [pool[i] for i in sorted(idx)])[:limit]
    return out


def generate(model_dir: str, prompts: list[Prompt], *, max_tokens: int, concurrency: int,
             seed: int, log_path: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, greedy response token ids) per prompt, from vLLM."""
    from ..bench.worker import run_job

    res = run_job(
        dict(model=model_dir, prompts=[p.text for p in prompts], max_tokens=max_tokens,
             concurrency=concurrency, seed=seed, dtype="float32", return_prompt_ids=True,
             warmup=False, in_process=True),  # one engine: its core needs no process
        log_path=log_path,
    )
    return list(zip(res["prompt_token_ids"], res["token_ids"]))


def save_sequences(path: str, seqs) -> None:
    with open(path, "w") as f:
        for p, r in seqs:
            f.write(json.dumps({"prompt_ids": p, "response_ids": r}) + "\n")


def load_sequences(path: str):
    return [(d["prompt_ids"], d["response_ids"])
            for d in map(json.loads, Path(path).read_text().splitlines())]


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_responses(path: Path) -> dict[str, tuple[list[int], list[int]]]:
    """Responses kept by prompt (``append_responses``); a line cut short by an
    interrupted run is skipped."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[d["key"]] = (d["prompt_ids"], d["response_ids"])
    return out


def append_responses(path: Path, texts: list[str], seqs) -> dict:
    new = {prompt_key(t): s for t, s in zip(texts, seqs)}
    with open(path, "ab+") as f:
        if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
            f.write(b"\n")  # an earlier run cut short mid-line: end that line first
        for k, (p, r) in new.items():
            f.write((json.dumps({"key": k, "prompt_ids": p, "response_ids": r}) + "\n").encode())
    return new


@torch.inference_mode()
def collect_features(hf_model, sequences, layers: list[int], *, desc="hidden states") -> Features:
    """Forward each prompt+response through the HF model; keep response positions."""
    hidden, final, seq_ids = [], [], []
    for k, (prompt, response) in enumerate(tqdm(sequences, desc=desc, unit="seq")):
        if len(response) < 2:
            continue
        ids = torch.tensor([prompt + response])
        out = hf_model(ids, output_hidden_states=True)
        hs = out.hidden_states  # [0] embeddings, [i + 1] after layer i, [-1] normed final
        # positions whose next token is a response token (the ones drafting predicts)
        start, stop = len(prompt) - 1, len(prompt) + len(response) - 1
        hidden.append(torch.stack([hs[x + 1][0, start:stop] for x in layers], dim=1))
        final.append(hs[-1][0, start:stop])
        seq_ids.append(torch.full((stop - start,), k, dtype=torch.int32))
    return Features(list(layers), torch.cat(hidden).float(), torch.cat(final).float(),
                    torch.cat(seq_ids))


def corpus_sequences(model_dir: str, corpus: str, *, max_tokens: int | None = None,
                     limit_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, response token ids) of a draft corpus's answers, for
    teacher-forced training with no generation.

    ``corpus``: a heads folder (or a shipped heads folder's name) holding a
    corpus file and the ``corpus`` record its ``vllm-adadecode corpus`` run
    wrote in config.json. That record's prompts are loaded again in the same
    order and paired with the corpus's answers (one per separator), each
    prompt in ``model_dir``'s chat template, so the corpus must come from a
    model with the same tokenizer. Refused when the counts differ. Answers are cut at
    ``max_tokens``; sequences stop once ``limit_tokens`` answer tokens are kept."""
    from transformers import AutoTokenizer

    from ..config import _corpus_folder
    from ..drafts.corpus import SEPARATOR, load_corpus_tokens
    from ..errors import AdaDecodeConfigError

    try:
        folder = Path(_corpus_folder(corpus))
    except AdaDecodeConfigError as e:
        raise SystemExit(f"--text-corpus: {e}") from None
    meta = json.loads((folder / "config.json").read_text()) \
        if (folder / "config.json").is_file() else {}
    rec = meta.get("corpus")
    if not rec or not {"data", "num_prompts", "seed"} <= rec.keys():
        raise SystemExit(f"--text-corpus {folder}: config.json has no 'corpus' record "
                         "(data, num_prompts, seed) to recover the corpus's prompts from")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = load_corpus_tokens(folder, len(tok))
    cuts = [i for i, t in enumerate(tokens.tolist()) if t == SEPARATOR]
    answers = [tokens[a + 1: b].tolist() for a, b in zip([-1] + cuts[:-1], cuts)]
    prompts = load_prompts(rec["data"], rec["num_prompts"], rec["seed"])
    if len(prompts) != len(answers):
        raise SystemExit(f"--text-corpus {folder}: {len(answers)} answers in the corpus but "
                         f"{len(prompts)} prompts in its record; the corpus was not written "
                         "by that record's command")
    out, kept = [], 0
    for p, a in zip(prompts, answers):
        a = a[:max_tokens] if max_tokens else a
        if limit_tokens is not None and kept + len(a) > limit_tokens:
            break
        chat = tok.apply_chat_template([{"role": "user", "content": p.text}],
                                       add_generation_prompt=True, tokenize=False)
        out.append((tok.encode(chat), a))  # as vLLM tokenizes a text prompt
        kept += len(a)
    return out
