"""``train-heads`` and ``eval-heads``: the whole self-distillation pipeline."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import AdaDecodeConfigError
from ..head_designs import DESIGNS, MAX_STALENESS
from ..heads import ExitHeads, base_model_fingerprint
from ..settings import BY_KEY
from . import data as D
from .evaluate import evaluate, exit_stats, write
from .select import CostModel, choose, cost_model_for, simulate
from .train import FrozenHead, train_heads


AGES = 3  # a final_state head is judged at final-state ages 1..AGES (later drafts: AGES)
assert AGES <= MAX_STALENESS


def judged_ages(design: str) -> range:
    """The ages of the final state a design's head is judged at (1: the newest)."""
    return range(1, (AGES if DESIGNS[design].context == "final_state" else 1) + 1)


def _model_config(model_dir: str) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("text_config", cfg)


def _cost_model(args) -> CostModel:
    """The model's measured cost model, with the command's --*-ms flags over it
    (cli._add_cost_model_args)."""
    return cost_model_for(args.model, **{f: getattr(args, f, None)
                                         for f in CostModel.__dataclass_fields__})


def _load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def sequences_for(model_dir: str, prompts, *, max_tokens: int, concurrency: int, seed: int,
                  cache_dir: Path, log_path: str | None):
    """The model's own greedy responses, cached by (model, prompts, max_tokens).

    Besides the file of the whole list, every response is kept by its prompt
    (``responses-<model>-<max_tokens>.jsonl``), so a longer prompt list, e.g. a
    larger corpus, generates only the prompts no earlier run answered."""
    fingerprint = base_model_fingerprint(model_dir)
    key = hashlib.sha256(json.dumps(
        [fingerprint, [p.text for p in prompts], max_tokens]).encode()).hexdigest()[:16]
    path = cache_dir / f"sequences-{key}.jsonl"
    if path.exists():
        print(f"[train-heads] reusing generated responses {path}")
        return D.load_sequences(str(path))
    store = cache_dir / f"responses-{fingerprint.split(':')[-1][:16]}-{max_tokens}.jsonl"
    known = D.load_responses(store)
    todo = [p for p in prompts if D.prompt_key(p.text) not in known]
    if todo:
        print(f"[train-heads] generating greedy responses to {len(todo)} prompts with vLLM "
              f"({len(prompts) - len(todo)} reused) ...", flush=True)
        seqs = D.generate(model_dir, todo, max_tokens=max_tokens, concurrency=concurrency,
                          seed=seed, log_path=log_path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        known.update(D.append_responses(store, [p.text for p in todo], seqs))
    seqs = [known[D.prompt_key(p.text)] for p in prompts]
    cache_dir.mkdir(parents=True, exist_ok=True)
    D.save_sequences(str(path), seqs)
    return seqs


def train_command(args) -> dict:
    t_start = time.time()
    torch.manual_seed(args.seed)
    model = args.model
    cfg = _model_config(model)
    L = cfg["num_hidden_layers"]
    prompts = D.load_prompts(args.data, args.num_prompts, args.seed)
    cache_dir = Path(args.work_dir)
    seqs = sequences_for(model, prompts, max_tokens=args.max_tokens, concurrency=args.concurrency,
                         seed=args.seed, cache_dir=cache_dir, log_path=args.log)
    t_gen = time.time() - t_start
    text = []
    if args.text_corpus:
        text = D.corpus_sequences(model, args.text_corpus, limit_tokens=args.text_tokens)
        print(f"[train-heads] {len(text)} answers of the corpus {args.text_corpus} "
              f"({sum(len(r) for _, r in text)} tokens), teacher-forced", flush=True)
        seqs = list(seqs) + text
    if not seqs:
        raise SystemExit("train-heads: no training sequences (--num-prompts 0 needs "
                         "--text-corpus)")

    auto = args.exit_layers == "auto"
    if auto:
        lo, hi = max(1, L // 5), L - 2
        step = max(1, (hi - lo) // 7)
        layers = list(range(lo, hi + 1, step))
    else:
        layers = [int(x) for x in args.exit_layers.split(",")]
    if any(not 1 <= x <= L - 2 for x in layers):
        raise SystemExit(f"--exit-layers must be in [1, {L - 2}] for training, got {layers}")

    hf = _load_hf(model)
    head = FrozenHead.from_hf(hf)
    feats = D.collect_features(hf, seqs, layers)
    del hf
    train, held = feats.split_by_sequence(args.held_out, args.seed)
    print(f"[train-heads] {len(train)} training tokens, {len(held)} held-out tokens", flush=True)

    selection = None
    threshold = args.threshold
    if auto:
        probe = train_heads(head, train, layers, epochs=args.probe_epochs, batch=args.batch,
                            lr=args.lr, seed=args.seed, desc="probing candidate layers")
        stats = exit_stats(head, held, probe)
        conf = torch.stack([stats[x]["conf"] for x in layers], 1)
        right = torch.stack([stats[x]["right"] for x in layers], 1)
        cost = _cost_model(args)
        selection = choose(conf, right, held.seq_ids, layers, num_layers=L,
                           max_draft=args.max_draft, cost=cost)
        best = selection["best"]
        chosen = best["exit_layers"]
        if threshold is None:
            threshold = best["threshold"]
        print(f"[train-heads] chose exit layers {chosen} threshold {best['threshold']} "
              f"(predicted {best['tokens_per_step']:.2f} tokens/step, "
              f"{best['speedup']:.2f}x predicted speedup)", flush=True)
        if best["speedup"] < 1.0:
            print("[train-heads] note: under this cost model no choice of exit layers beats "
                  "vanilla decoding; drafting costs more than the accepted tokens save",
                  flush=True)
        selection["candidates"] = {
            str(x): {"agreement": float(right[:, i].float().mean()),
                     "mean_confidence": float(conf[:, i].mean())}
            for i, x in enumerate(layers)
        }
        selection["table"] = selection["table"][:20]
    else:
        chosen = layers
    if threshold is None:
        threshold = 0.75
    cols = [layers.index(x) for x in chosen]
    train = D.Features(chosen, train.hidden[:, cols], train.final, train.seq_ids)
    held = D.Features(chosen, held.hidden[:, cols], held.final, held.seq_ids)
    vocab = None
    if args.train_vocab:
        vocab, _ = D.build_shortlist(seqs, torch.unique(train.seq_ids),
                                     torch.unique(held.seq_ids), args.train_vocab)
    transforms = train_heads(head, train, chosen, epochs=args.epochs, batch=args.batch,
                             lr=args.lr, seed=args.seed, vocab=vocab, negatives=args.negatives)
    shortlist, coverage = None, None
    if args.shortlist:
        shortlist, coverage = D.build_shortlist(seqs, torch.unique(train.seq_ids),
                                                torch.unique(held.seq_ids), args.shortlist)
    t_stats = exit_stats(head, held, transforms)
    i_stats = exit_stats(head, held, {x: None for x in chosen})
    kl_trained = {x: float(t_stats[x]["kl"].mean()) for x in chosen}
    kl_identity = {x: float(i_stats[x]["kl"].mean()) for x in chosen}
    report = evaluate(head, held, transforms, t_stats, i_stats)
    elapsed = time.time() - t_start
    meta = {
        "base_model": Path(model).name,
        "trained": True,
        "training": {
            "command": "vllm-adadecode " + " ".join(args.argv),
            "data": args.data,
            "num_prompts": len(prompts),
            "text_corpus": args.text_corpus,
            "text_tokens": args.text_tokens,
            "text_answers": len(text),
            "train_vocab": None if vocab is None else len(vocab),
            "negatives": None if vocab is None else args.negatives,
            "max_tokens": args.max_tokens,
            "tokens": {"train": len(train), "held_out": len(held)},
            "seed": args.seed,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch": args.batch,
            "seconds": round(elapsed, 1),
            "seconds_generating": round(t_gen, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "held_out_kl": {"identity": kl_identity, "trained": kl_trained},
            "held_out_agreement": {x: report["layers"][str(x)]["trained"]["agreement"]
                                   for x in chosen},
            "held_out_agreement_identity": {x: report["layers"][str(x)]["identity"]["agreement"]
                                            for x in chosen},
            "selection": selection,
            "shortlist_held_out_coverage": coverage,
        },
    }
    heads = ExitHeads(transforms, hidden_size=cfg["hidden_size"], threshold=threshold,
                      base_model_fingerprint=base_model_fingerprint(model), metadata=meta,
                      shortlist=shortlist)
    out = heads.save(args.out)
    write(report, str(out / "eval.json"), str(out / "eval.png"), f"{Path(model).name}: held-out")
    for x in chosen:
        print(f"[train-heads] layer {x}: held-out KL {kl_identity[x]:.3f} (identity) -> "
              f"{kl_trained[x]:.3f}; top-1 agreement "
              f"{meta['training']['held_out_agreement_identity'][x]:.3f} -> "
              f"{meta['training']['held_out_agreement'][x]:.3f}")
    print(f"[train-heads] wrote {out} in {elapsed:.0f} s")
    return meta


def shortlist_command(args) -> dict:
    """Add (or replace) the vocabulary shortlist of an existing heads folder,
    from the same responses its training used (cached in the work dir)."""
    heads = ExitHeads.load(args.heads)
    if getattr(args, "source", "responses") == "text":
        return _text_shortlist(args, heads)
    tr = heads.metadata.get("training")
    if not tr:
        raise SystemExit(f"{args.heads}: config.json has no 'training' record to rebuild "
                         "its training responses from; retrain with train-heads --shortlist")
    model = args.model
    prompts = D.load_prompts(tr["data"], tr["num_prompts"], tr["seed"])
    seqs = sequences_for(model, prompts, max_tokens=tr["max_tokens"], concurrency=args.concurrency,
                         seed=tr["seed"], cache_dir=Path(args.work_dir), log_path=args.log)
    if tr.get("text_corpus"):  # as train_command appends them
        seqs = list(seqs) + D.corpus_sequences(model, tr["text_corpus"],
                                               limit_tokens=tr.get("text_tokens"))
    usable = D.usable_sequence_ids(seqs)
    held = D.held_out_sequences(usable, args.held_out, tr["seed"])
    train = usable[~torch.isin(usable, held)]
    heads.shortlist, coverage = D.build_shortlist(seqs, train, held, args.size)
    heads.metadata["training"]["shortlist_held_out_coverage"] = coverage
    heads.metadata["training"]["shortlist_command"] = "vllm-adadecode " + " ".join(args.argv)
    if getattr(args, "draft_on_shortlist", False):
        heads.metadata["full_head_check"] = False
    heads.save(args.heads, dtype=_stored_dtype(heads))
    print(f"[shortlist] {args.heads}: {heads.shortlist.numel()} token ids, "
          f"covering {coverage:.3f} of held-out response tokens")
    return {"size": int(heads.shortlist.numel()), "held_out_coverage": coverage}


def _text_shortlist(args, heads: ExitHeads) -> dict:
    """``shortlist --source text``: the shortlist from token frequencies of text
    that ships, with no generation: ShareGPT's assistant replies (train split)
    and the draft corpus the heads' engine reads (the model family's own
    responses), each weighted equally; the folder's current shortlist ids are
    kept. A wider shortlist bounds a row's full-vocabulary confidence more
    tightly, so drafting on it with ``"full_head_check": false`` keeps the
    full check's precision (docs/performance/models.md). Coverage is measured
    on eval-split replies."""
    from transformers import AutoTokenizer

    from .. import prompts as P
    from ..config import _borrowed_corpus
    from ..drafts.corpus import load_corpus_tokens

    heads.check_base_model(args.model, hidden_size=heads.hidden_size)
    tok = AutoTokenizer.from_pretrained(args.model)

    def tokens(texts, what):
        out = []
        for s in tqdm(range(0, len(texts), 256), desc=f"[shortlist] tokenizing {what}",
                      unit="batch"):
            ids = tok(texts[s: s + 256], add_special_tokens=False)["input_ids"]
            out.extend(t for r in ids for t in r)
        return torch.tensor(out, dtype=torch.int64)

    texts = P.sharegpt_replies("train", args.text_replies)
    replies = tokens(texts, "ShareGPT replies")
    sources = [replies]
    folder = str(args.heads)
    if "corpus_from" in heads.metadata:
        folder = _borrowed_corpus(folder, heads.metadata["corpus_from"])
    corpus = load_corpus_tokens(folder)
    corpus_n = 0
    if corpus is not None:
        corpus = torch.from_numpy(corpus[corpus >= 0].astype("int64"))
        corpus_n = int(corpus.numel())
        sources.append(corpus)
    old = heads.shortlist
    heads.shortlist = D.frequency_shortlist(sources, args.size, keep=old)
    held = tokens(P.sharegpt_replies("eval", max(1, args.text_replies // 20)), "eval replies")
    cov_old = D.coverage(held, old) if old is not None else None
    cov = D.coverage(held, heads.shortlist)
    heads.metadata["shortlist_source"] = {
        "sharegpt_train_replies": len(texts),
        "sharegpt_reply_tokens": int(replies.numel()),
        "corpus": (None if corpus is None
                   else heads.metadata.get("corpus_from", "this folder's corpus")),
        "corpus_tokens": corpus_n,
        "kept_ids": None if old is None else int(old.numel()),
        "eval_reply_coverage": cov,
        "eval_reply_coverage_before": cov_old,
        "command": "vllm-adadecode " + " ".join(args.argv),
    }
    if getattr(args, "draft_on_shortlist", False):
        heads.metadata["full_head_check"] = False
    heads.save(args.heads, dtype=_stored_dtype(heads))
    print(f"[shortlist] {args.heads}: {heads.shortlist.numel()} token ids, covering "
          f"{cov:.3f} of eval-split ShareGPT reply tokens"
          + (f" (before: {old.numel()} ids, {cov_old:.3f})" if old is not None else ""))
    return {"size": int(heads.shortlist.numel()), "eval_reply_coverage": cov,
            "eval_reply_coverage_before": cov_old}


def defaults_command(args) -> dict:
    """Set the engine defaults a heads folder carries, in place: the exit layers
    the engine drafts at (the other layers' heads leave the folder), the exit
    threshold, and ``full_head_check``. A user's own setting still wins. The
    command is recorded in config.json (``defaults_command``)."""
    heads = ExitHeads.load(args.heads)
    dtype = _stored_dtype(heads)
    if args.exit_layers is not None:
        try:
            heads = heads.keep(args.exit_layers, name="--exit-layers")
        except AdaDecodeConfigError as e:
            raise SystemExit(f"{args.heads}: {e}") from None
    if args.threshold is not None:
        threshold = BY_KEY["threshold"]  # the engine setting's own check
        try:
            heads.threshold = threshold.validate(args.threshold)
        except AdaDecodeConfigError:
            raise SystemExit(f"{args.heads}: --threshold must be in {threshold.allowed()}, "
                             f"got {args.threshold}") from None
    if args.full_head_check is not None:
        heads.metadata["full_head_check"] = args.full_head_check == "true"
    heads.metadata["defaults_command"] = "vllm-adadecode " + " ".join(args.argv)
    heads.save(args.heads, dtype=dtype)
    out = {"exit_layers": heads.exit_layers, "threshold": heads.threshold,
           "full_head_check": heads.metadata.get("full_head_check", True)}
    print(f"[heads-defaults] {args.heads}: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


def _stored_dtype(heads: ExitHeads) -> torch.dtype:
    """The dtype a loaded heads folder stores its heads in (shipped heads: fp16);
    ``ExitHeads.load`` keeps it, so a rewrite keeps it too."""
    return next(iter(heads.transforms.values())).dtype


def corpus_command(args) -> dict:
    """Write a draft corpus into a heads folder: the model's own greedy
    responses to training prompts (drafts/corpus.py); the folder's heads are
    unchanged, its config.json records how the corpus was made."""
    from ..drafts.corpus import DraftCorpus, corpus_tokens, save_corpus

    t0 = time.time()
    heads = ExitHeads.load(args.heads)
    heads.check_base_model(args.model, hidden_size=heads.hidden_size)
    prompts = D.load_prompts(args.data, args.num_prompts, args.seed)
    seqs = sequences_for(args.model, prompts, max_tokens=args.max_tokens,
                         concurrency=args.concurrency, seed=args.seed,
                         cache_dir=Path(args.work_dir), log_path=args.log)
    tokens = corpus_tokens(r for _, r in seqs)
    path = save_corpus(args.heads, tokens)
    table = DraftCorpus(tokens)
    info = {"command": "vllm-adadecode " + " ".join(args.argv), "data": args.data,
            "num_prompts": len(prompts), "max_tokens": args.max_tokens, "seed": args.seed,
            "tokens": table.num_tokens, "contexts": len(table),
            "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}"}
    heads.metadata["corpus"] = info
    heads.save(args.heads, dtype=_stored_dtype(heads))
    print(f"[corpus] {path}: {table.num_tokens} tokens from {len(prompts)} responses, "
          f"{len(table)} contexts, in {info['seconds']:.0f} s")
    return info


def predict_speed(stats_by_age, feats, heads, dataset_of: list[str], num_layers: int,
                  args) -> dict:
    """Per dataset: the cost model's predicted batch-1 speedup for the heads'
    own exit layers and threshold, and for the best subset of them
    (``stats_by_age``: exit_stats of the heads on ``feats``, one per age of the
    final state a draft sees: one entry unless the design reads it)."""
    cost = _cost_model(args)
    layers = heads.exit_layers
    conf = torch.stack([torch.stack([s[x]["conf"] for x in layers], 1) for s in stats_by_age], -1)
    right = torch.stack([torch.stack([s[x]["right"] for x in layers], 1) for s in stats_by_age], -1)
    # collect_features numbers sequences by their index in the prompt list
    names = [dataset_of[i] for i in feats.seq_ids.tolist()]
    out = {}
    for name in sorted(set(names)) + (["all"] if len(set(names)) > 1 else []):
        m = torch.tensor([name in ("all", x) for x in names])
        sel = choose(conf[m], right[m], feats.seq_ids[m], layers, num_layers=num_layers,
                     max_draft=args.max_draft, cost=cost)
        own = simulate(conf[m], right[m], feats.seq_ids[m], layers, list(range(len(layers))),
                       heads.threshold, num_layers=num_layers, max_draft=args.max_draft,
                       cost=cost)
        out[name] = {"heads_config": {"exit_layers": layers, "threshold": heads.threshold, **own},
                     "best": sel["best"], "table": sel["table"][:10],
                     "cost_model": sel["cost_model"]}
    return out


def eval_command(args) -> dict:
    from .. import prompts as P

    heads = ExitHeads.load(args.heads)
    heads.check_base_model(args.model, hidden_size=_model_config(args.model)["hidden_size"])
    prompts, dataset_of = [], []
    for name in args.data.split(","):
        name = name.strip()
        got = P.from_jsonl(name) if name.endswith(".jsonl") else P.load(name, "eval")
        prompts.extend(got)
        dataset_of.extend([Path(name).stem] * len(got))
    if args.num_prompts:
        prompts, dataset_of = prompts[: args.num_prompts], dataset_of[: args.num_prompts]
    seqs = sequences_for(args.model, prompts, max_tokens=args.max_tokens,
                         concurrency=args.concurrency, seed=0, cache_dir=Path(args.work_dir),
                         log_path=args.log)
    hf = _load_hf(args.model)
    head = FrozenHead.from_hf(hf)
    feats = D.collect_features(hf, seqs, heads.exit_layers)
    by_age = [exit_stats(head, feats, heads.transforms, design=heads.design, extra=heads.extra,
                         staleness=a) for a in judged_ages(heads.design)]
    report = evaluate(head, feats, heads.transforms, by_age[0])
    report["predicted"] = predict_speed(by_age, feats, heads, dataset_of,
                                        _model_config(args.model)["num_hidden_layers"], args)
    report["design"] = heads.design
    report["heads"] = str(args.heads)
    report["data"] = args.data
    write(report, args.out_json, args.out_png, f"{Path(args.model).name}: {args.data} (eval split)")
    print(f"design {heads.design!r}")
    for x, r in report["layers"].items():
        topk = ", ".join(f"top-{k} {v:.3f}" for k, v in r["trained"]["top_k_agreement"].items())
        print(f"layer {x}: agreement {r['identity']['agreement']:.3f} (identity) -> "
              f"{r['trained']['agreement']:.3f} (trained; {topk})")
    for name, r in report["predicted"].items():
        own, best = r["heads_config"], r["best"]
        print(f"{name}: predicted batch-1 speedup {own['speedup']:.2f}x at "
              f"{own['tokens_per_step']:.2f} tokens/step with the heads' own exit layers "
              f"{heads.exit_layers} @ {heads.threshold}; best subset {best['exit_layers']} "
              f"@ {best['threshold']}: {best['speedup']:.2f}x, {best['tokens_per_step']:.2f} "
              "tokens/step")
    print(f"wrote {args.out_json}" + (f" and {args.out_png}" if args.out_png else ""))
    return report
