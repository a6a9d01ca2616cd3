"""``vllm-adadecode bench``: speculative methods side by side, Spec-Bench style.

Every method runs on the same model, prompts and settings, one engine at a
time (each in its own child process), and the whole list of methods is run
``repeats`` times, forward in odd repeats and backward in even ones (A B C,
C B A, ...), so each method's ratio to vanilla is measured against the vanilla
run of the same repeat, a drift that runs through a repeat does not always
favour the same place in the order, and drift between repeats shows as a
spread. One engine per method serves every dataset and concurrency of
the sweep (its prefix cache is reset between runs).

The JSON written by ``--out`` is documented in docs/BENCHMARKS.md.

(Near 600 lines, one module on purpose: the run order, the tables, the JSON
and the plot all read the same per-run records; split, each part would import
the others.)
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

SCHEMA = "vllm-adadecode-bench/1"
METHODS = ("vanilla", "adadecode", "ngram", "draft_model")
NGRAM_DEFAULTS = {"num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
DRAFT_MODEL_DEFAULTS = {"num_speculative_tokens": 5}


class BenchError(ValueError):
    pass


# Engine arguments a method may set beside its speculative config.
ENGINE_KEYS = ("async_scheduling",)


@dataclass
class Method:
    label: str
    kind: str  # one of METHODS
    speculative_config: dict | None
    engine_args: dict | None = None


def parse_method(text: str, draft_model: str | None = None) -> Method:
    """``NAME`` or ``NAME=JSON`` where NAME is one of METHODS and JSON holds
    speculative-config fields, e.g. ``adadecode={"threshold": 0.6}``; a
    ``label`` field names the method in the tables (``vanilla={"label":
    "vanilla-last"}``: a second plain engine, a control for run-order drift)."""
    name, _, extra_text = text.partition("=")
    name = name.strip()
    if name not in METHODS:
        raise BenchError(f"--method: unknown method {name!r}; choose from {', '.join(METHODS)}")
    try:
        extra = json.loads(extra_text) if extra_text.strip() else {}
    except json.JSONDecodeError as e:
        raise BenchError(f"--method {name}: settings must be a JSON object ({e})") from None
    if not isinstance(extra, dict):
        raise BenchError(f"--method {name}: settings must be a JSON object, got {extra_text!r}")
    extra.pop("method", None)
    label = extra.pop("label", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise BenchError(f"--method {name}: label must be a non-empty string, got {label!r}")
    if label is None:
        label = name
        if extra:
            label += "[" + ",".join(f"{k}={_short(v)}" for k, v in extra.items()) + "]"
    engine = {k: extra.pop(k) for k in ENGINE_KEYS if k in extra} or None
    if name == "vanilla":
        if extra:
            raise BenchError(f"--method vanilla takes only engine settings "
                             f"{list(ENGINE_KEYS)}, got {sorted(extra)}")
        return Method(label, name, None, engine)
    if name == "adadecode":
        return Method(label, name, {"method": "adadecode", **extra}, engine)
    if name == "ngram":
        return Method(label, name, {"method": "ngram", **NGRAM_DEFAULTS, **extra}, engine)
    model = extra.pop("model", None) or draft_model
    if not model:
        raise BenchError('--method draft_model needs a draft model: --draft-model PATH or '
                         'draft_model={"model": PATH}')
    return Method(label, name, {"method": "draft_model", **DRAFT_MODEL_DEFAULTS, **extra,
                                "model": model}, engine)


def is_plain(m: Method) -> bool:
    """No speculation: vanilla, or an AdaDecode engine with drafting off."""
    from ..config import drafting_off

    return m.kind == "vanilla" or (m.kind == "adadecode" and drafting_off(m.speculative_config))


def with_baselines(methods: list[Method]) -> list[Method]:
    """vanilla first; and when AdaDecode runs, the AdaDecode engine with
    drafting off too (unless given), so that no speedup counts what the
    engine does without drafting."""
    from ..config import DRAFTING_OFF

    out = [Method("vanilla", "vanilla", None)] + [m for m in methods if m.label != "vanilla"]
    if any(m.kind == "adadecode" for m in out) and not any(
            m.kind == "adadecode" and is_plain(m) for m in out):
        out.append(Method("adadecode[drafting off]", "adadecode",
                          {"method": "adadecode", **DRAFTING_OFF}))
    return out


def _short(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")).strip('"')


def parse_concurrency(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not out or any(c < 1 for c in out):
        raise BenchError(f"--concurrency values must be >= 1, got {text!r}")
    return out


def spread(prompts: list, n: int | None) -> list:
    """The first ``n`` prompts, taken round-robin over categories."""
    by_cat: dict[str, list] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p)
    out = []
    groups = list(by_cat.values())
    i = 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out if n is None else out[:n]


def load_datasets(names: list[str], prompts_file: str | None, n: int | None) -> dict[str, list]:
    from .. import prompts as P

    sets: dict[str, list] = {}
    for name in names:
        if name not in P.DATASETS:
            raise BenchError(f"--dataset: unknown dataset {name!r}; choose from "
                             f"{', '.join(sorted(P.DATASETS))}")
        sets[name] = spread(P.load(name, "eval"), n)
    if prompts_file:
        sets[os.path.basename(prompts_file)] = spread(P.from_jsonl(prompts_file), n)
    if not sets:
        raise BenchError("give --dataset and/or --prompts")
    for name, ps in sets.items():
        if not ps:
            raise BenchError(f"prompt set {name!r} is empty")
    return sets


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------
def run(*, model: str, methods: list[Method], datasets: dict[str, list],
        concurrency: list[int], max_tokens: int, dtype: str, seed: int, repeats: int,
        max_model_len: int | None = None, temperature: float = 0.0,
        enforce_eager: bool = False, log_path: str | None = None,
        progress: bool = True, in_process: bool = False,
        one_process: bool = False) -> dict[str, Any]:
    """Run every method ``repeats`` times; return the results document.

    ``in_process``: each engine's core runs in its benchmark process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of vLLM's separate engine
    process; on two cores the separate front-end process competes with the
    two OpenMP threads (docs/BENCHMARKS.md, "Engine process")."""
    from tqdm import tqdm

    from .worker import job_runner

    methods = with_baselines(methods)
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise BenchError(f"two methods share a label: {labels}")
    plan = [(d, c) for d in datasets for c in concurrency]
    raw: list[dict[str, dict]] = []
    t_start = time.time()
    bar = tqdm(total=repeats * len(methods), desc="bench", unit="engine", disable=not progress)
    with job_runner(one_process=one_process, log_path=log_path) as run_one:
        for r in range(repeats):
            raw.append({})
            for m in run_order(methods, r):
                bar.set_postfix_str(f"repeat {r + 1}/{repeats}: {m.label}")
                job = dict(
                    model=model, dtype=dtype, seed=seed, max_tokens=max_tokens,
                    temperature=temperature,
                    max_model_len=max_model_len or default_max_model_len(datasets),
                    enforce_eager=enforce_eager, speculative_config=m.speculative_config,
                    in_process=in_process, **(m.engine_args or {}),
                    runs=[dict(prompts=[p.text for p in datasets[d]], concurrency=c,
                               progress=f"{m.label} {d} c={c}") for d, c in plan],
                )
                raw[r][m.label] = run_one(job)
                bar.update(1)
    bar.close()
    doc = {
        "schema": SCHEMA,
        "machine": machine_info(),
        "settings": dict(model=model, datasets={d: len(ps) for d, ps in datasets.items()},
                         concurrency=concurrency, max_tokens=max_tokens, dtype=dtype, seed=seed,
                         temperature=temperature,
                         max_model_len=max_model_len or default_max_model_len(datasets),
                         repeats=repeats, enforce_eager=enforce_eager, in_process=in_process,
                         one_process=one_process,
                         engine_core_client=raw[0][methods[0].label].get("engine_core_client"),
                         wall_s=round(time.time() - t_start, 1)),
        "methods": [asdict(m) for m in methods],
        "results": [],
    }
    peaks = {m.label: max(raw[r][m.label]["peak_rss_mb"] for r in range(repeats))
             for m in methods}
    num_layers = _num_layers(model)
    for i, (d, c) in enumerate(plan):
        runs = [{m.label: raw[r][m.label]["runs"][i] for m in methods} for r in range(repeats)]
        doc["results"].extend(summarise(d, c, datasets[d], methods, runs, peaks,
                                        num_layers=num_layers))
    return doc


def _offsets(fit: dict) -> str:
    """A step-cost fit's measured offsets by drafted rows, as printed."""
    offs = fit.get("row_offsets_ms") or {}
    if not offs:
        return ""
    return " (measured offset by rows: " + ", ".join(
        f"{rows}: {ms:+.1f}" for rows, ms in sorted(offs.items(), key=lambda kv: int(kv[0]))) + ")"


def run_order(methods: list, repeat: int) -> list:
    """The engines of repeat ``repeat`` (0-based) in the order they run:
    forward, then backward, alternately, so that with an even number of
    repeats every method has sat on both sides of every other."""
    return list(methods) if repeat % 2 == 0 else list(methods)[::-1]


def default_max_model_len(datasets: dict[str, list]) -> int:
    """2048, or 4096 when a prompt set carries documents (up to 5,500 characters)."""
    return 4096 if "documents" in datasets else 2048


def _num_layers(model: str) -> int | None:
    try:
        cfg = json.loads(open(os.path.join(model, "config.json")).read())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg).get("num_hidden_layers")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1)
    except (OSError, ValueError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("vllm", "torch", "vllm-adadecode"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _layer_evals(run: dict, kind: str, L: int | None) -> dict[str, float] | None:
    """Target decoder-layer token evaluations per decoded token (prefill excluded).

    vanilla: L. ``measured``: what ran. With speculation the verification pass
    runs every layer for each request's newest token and for each draft, minus
    the layers deferred verification skipped; AdaDecode's drafter adds the
    layers it ran. For AdaDecode, ``recompute`` is that cost when verification
    recomputes every layer and ``deferred`` the prediction, from the drafted
    depths, when each draft runs only the layers after its depth.
    draft_model's own model is not counted (None).
    """
    decoded = sum(max(0, len(t) - 1) for t in run["token_ids"])
    dr = run.get("drafter")
    L = dr["num_layers"] if dr else L
    if not decoded or not L or kind == "draft_model":
        return None
    if kind == "vanilla":
        return {"vanilla": float(L)}
    steps = decoded - run["spec"].get("num_accepted_tokens", 0)
    drafts = run["spec"].get("num_draft_tokens", 0)
    if not dr:  # ngram: drafting runs no layers
        return {"measured": L * (steps + drafts) / decoded}
    draft = dr["draft_layer_evals"]
    return {
        "measured": (draft + L * (steps + drafts) - dr.get("verify_layers_skipped", 0)
                     - dr.get("attempt_layers_reused", 0)) / decoded,
        "recompute": (draft + L * (steps + drafts)) / decoded,
        "deferred": (draft + L * steps + dr["deferred_layer_evals"]) / decoded,
    }


def summarise(dataset: str, concurrency: int, prompts: list, methods: list[Method],
              runs: list[dict[str, dict]], peaks: dict[str, float],
              num_layers: int | None = None) -> list[dict]:
    """One record per method for this (dataset, concurrency).

    Speedups divide by the baseline of the same repeat: the fastest of the
    plain (no speculation) configurations that ran, so a gain measured for a
    speculative method is not a gain of its engine setup (docs/BENCHMARKS.md).
    Identity is checked against vLLM's default plain engine ("vanilla")."""
    out = []
    cats = sorted({p.category for p in prompts})
    plain = [m.label for m in methods if is_plain(m)]
    for m in methods:
        reps = []
        for by_label in runs:
            run, van = by_label[m.label], by_label["vanilla"]
            base = baseline_of(by_label, plain)
            reps.append({
                "tokens_per_s": run["tokens_per_s"],
                "elapsed_s": run["elapsed_s"],
                "output_tokens": run["output_tokens"],
                "speedup": run["tokens_per_s"] / by_label[base]["tokens_per_s"],
                "baseline": base,
                "identical_to_vanilla": _identical(run["token_ids"], van["token_ids"]),
            })
        speedups = [x["speedup"] for x in reps]
        evals = [e for e in (_layer_evals(by[m.label], m.kind, num_layers) for by in runs) if e]
        out.append({
            "dataset": dataset,
            "concurrency": concurrency,
            "method": m.label,
            "kind": m.kind,
            "plain": is_plain(m),
            "num_prompts": len(prompts),
            "repeats": reps,
            "output_tokens": _mean([x["output_tokens"] for x in reps]),
            "tokens_per_s": _mean([x["tokens_per_s"] for x in reps]),
            "speedup": _mean(speedups),
            "speedup_min": min(speedups),
            "speedup_max": max(speedups),
            "identical_to_vanilla": min(x["identical_to_vanilla"] for x in reps),
            # Seeded sampling: the same tokens in every repeat, whatever drafting did.
            "identical_across_repeats": min(_identical(by[m.label]["token_ids"],
                                                       runs[0][m.label]["token_ids"])
                                            for by in runs),
            "tokens_per_step": _mean([by[m.label]["tokens_per_step"] for by in runs]),
            "acceptance_rate": (None if m.kind == "vanilla" else
                                _mean([by[m.label]["acceptance_rate"] for by in runs])),
            "peak_rss_mb": peaks[m.label],
            "layer_evals_per_token": ({k: _mean([e[k] for e in evals]) for k in evals[0]}
                                      if evals else None),
            "exit_histogram": _exit_histogram([by[m.label].get("drafter") for by in runs]),
            "sources": _sources([by[m.label] for by in runs]),
            "tree": _tree([by[m.label] for by in runs]),
            "step_ms": _step_ms([by[m.label] for by in runs]),
            "step_cost": [(by[m.label].get("drafter") or {}).get("step_cost") for by in runs],
            "backoff": [(by[m.label].get("drafter") or {}).get("backoff") for by in runs]
            if m.kind == "adadecode" else None,
            "backoff_self_draft": [(by[m.label].get("drafter") or {}).get("backoff_self_draft")
                                   for by in runs] if m.kind == "adadecode" else None,
            "self_pauses": [(by[m.label].get("drafter") or {}).get("self_pauses")
                            for by in runs] if m.kind == "adadecode" else None,
            # matmul row counts padded (engine/gemm.py), last repeat's engine
            "gemm_padding": ((runs[-1][m.label].get("drafter") or {}).get("gemm_padding")
                             if m.kind == "adadecode" else None),
            "categories": {c: _category(runs, m, prompts, c, plain) for c in cats},
        })
    return out


def _sources(runs: list[dict]) -> dict | None:
    """Per draft source (lookup, cache, corpus, exit): drafted and accepted tokens, and
    the accepted tokens it adds per verification step (the target's own token
    adds 1.0 to every step)."""
    drafters = [r.get("drafter") for r in runs]
    if not all(d and "drafted_by_source" in d for d in drafters):
        return None
    out: dict[str, dict] = {}
    steps = sum(sum(max(0, len(t) - 1) for t in r["token_ids"])
                - r["spec"].get("num_accepted_tokens", 0) for r in runs)
    for d in drafters:
        for src, n in d["drafted_by_source"].items():
            rec = out.setdefault(src, {"drafted": 0, "accepted": 0})
            rec["drafted"] += n
            rec["accepted"] += d["accepted_by_source"].get(src, 0)
    for rec in out.values():
        rec["per_step"] = rec["accepted"] / steps if steps > 0 else 0.0
    mixes: dict[str, int] = defaultdict(int)
    for d in drafters:
        for k, v in (d.get("steps_by_sources") or {}).items():
            mixes[k] += v
    return {"by_source": out, "request_steps_by_sources": dict(mixes),
            "lookup_ms": 1e3 * sum(d.get("lookup_seconds", 0.0) for d in drafters) / len(runs)}


def _tree(runs: list[dict]) -> dict | None:
    """Token trees over all repeats: request-steps verified as a tree, nodes
    per such step, the share of them on branches beside the main draft, and how
    often (and by how many tokens) the accepted path left the main draft."""
    recs = [(r.get("drafter") or {}).get("tree") for r in runs]
    recs = [t for t in recs if t and t.get("steps")]
    if not recs:
        return None
    tot = {k: sum(t[k] for t in recs) for k in recs[0]}
    return {**tot, "nodes_per_step": tot["nodes"] / tot["steps"],
            "branch_share": tot["branch_nodes"] / max(1, tot["nodes"])}


def _step_ms(runs: list[dict]) -> dict | None:
    """Mean milliseconds per engine step: the drafter, the model forward, the
    rest of the worker's step (sampling, verification, bookkeeping, input
    preparation) and everything outside the worker (scheduler, IPC, output
    processing), from the runner's timers and the run's wall time."""
    recs = []
    for r in runs:
        t = r.get("step_times")
        if not t or not t.get("steps"):
            return None
        n = t["steps"]
        worker = t["execute"] + t["sample_and_draft"]
        recs.append({"steps": n, "drafting": t["drafting"] / n, "forward": t["forward"] / n,
                     "worker_other": (worker - t["forward"] - t["drafting"]) / n,
                     "outside_worker": (r["elapsed_s"] - worker) / n,
                     "total": r["elapsed_s"] / n})
    out = {k: 1e3 * _mean([x[k] for x in recs]) for k in recs[0]}
    out["steps"] = _mean([x["steps"] for x in recs])
    return out


def _identical(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def _exit_histogram(drafters: list[dict | None]) -> dict[str, dict[str, int]] | None:
    drafters = [d for d in drafters if d]
    if not drafters:
        return None
    acc: dict[str, int] = defaultdict(int)
    rej: dict[str, int] = defaultdict(int)
    for d in drafters:
        for k, v in d["accepted_by_exit"].items():
            acc[k] += v
        for k, v in d["rejected_by_exit"].items():
            rej[k] += v
    layers = sorted(set(acc) | set(rej), key=int)
    return {"accepted": {k: acc[k] for k in layers}, "rejected": {k: rej[k] for k in layers}}


def baseline_of(by_label: dict[str, dict], plain: list[str]) -> str:
    """The fastest plain configuration's label in one repeat."""
    return max(plain, key=lambda label: by_label[label]["tokens_per_s"])


def _category(runs: list[dict[str, dict]], m: Method, prompts: list, cat: str,
              plain: list[str] | None = None) -> dict:
    idx = [i for i, p in enumerate(prompts) if p.category == cat]
    rates, speedups, same, tps = [], [], [], []
    for by in runs:
        run, van = by[m.label], by["vanilla"]
        base = by[baseline_of(by, plain or ["vanilla"])]
        rate = _rate(run, idx)
        rates.append(rate)
        speedups.append(rate / _rate(base, idx) if _rate(base, idx) else None)
        same.append(_identical([run["token_ids"][i] for i in idx],
                               [van["token_ids"][i] for i in idx]))
        dr = run.get("drafter")
        if m.kind == "vanilla":
            tps.append(1.0)
        elif dr and dr.get("per_prompt"):
            tps.append(_tokens_per_step([dr["per_prompt"][i] for i in idx],
                                        [run["token_ids"][i] for i in idx]))
    return {"num_prompts": len(idx), "tokens_per_s": _mean(rates), "speedup": _mean(speedups),
            "tokens_per_step": _mean(tps), "identical_to_vanilla": min(same)}


def _rate(run: dict, idx: list[int]) -> float:
    """Output tokens per second of request latency (equals throughput at concurrency 1)."""
    toks = sum(len(run["token_ids"][i]) for i in idx)
    secs = sum(run["latency_s"][i] for i in idx)
    return toks / secs if secs > 0 else 0.0


def _tokens_per_step(per_prompt: list[list[int] | None],
                     token_ids: list[list[int]]) -> float | None:
    """Decoded tokens per decode step, from the drafter's [steps, accepted] per
    request (the first step of a request is its prefill) and the output: its
    accepted count includes drafts accepted past ``max_tokens``, which the
    output drops (``worker.acceptance_stats``)."""
    pairs = [(s, t) for s, t in zip(per_prompt, token_ids) if s]
    steps = sum(max(0, s[0] - 1) for s, _ in pairs)
    decoded = sum(max(0, len(t) - 1) for _, t in pairs)
    return decoded / steps if steps else None


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(doc: dict) -> str:
    """The results as plain-text tables: one block per dataset and concurrency."""
    lines = []
    reps = doc["settings"]["repeats"]
    head = (f"{'method':<34} {'tok/s':>7} {'speedup':>8} {'range':>11} {'tok/step':>8} "
            f"{'accept':>6} {'identical':>9} {'layers/tok':>10} {'peak MB':>8}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in doc["results"]:
        groups[(rec["dataset"], rec["concurrency"])].append(rec)
    for (dataset, conc), recs in groups.items():
        lines.append(f"\n== {dataset}, concurrency {conc}, {recs[0]['num_prompts']} prompts, "
                     f"{reps} repeat(s) ==")
        plain = [r["method"] for r in recs if r.get("plain", r["kind"] == "vanilla")]
        if len(plain) > 1:
            base = [x["baseline"] for x in recs[0]["repeats"]]
            lines.append(f"speedup over the faster plain engine of each repeat "
                         f"({', '.join(plain)}): {', '.join(base)}")
        lines.append(head)
        for r in recs:
            le = r["layer_evals_per_token"] or {}
            layers = le.get("vanilla") or le.get("measured")
            rng = (f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if reps > 1 else "")
            lines.append(
                f"{r['method'][:34]:<34} {r['tokens_per_s']:>7.2f} {r['speedup']:>7.2f}x "
                f"{rng:>11} {r['tokens_per_step']:>8.2f} {_fmt(r['acceptance_rate'], '.2f'):>6} "
                f"{r['identical_to_vanilla'] * 100:>8.0f}% {_fmt(layers, '.1f'):>10} "
                f"{r['peak_rss_mb']:>8.0f}")
        if doc["settings"].get("temperature"):
            lines.append(f"temperature {doc['settings']['temperature']}, seed of prompt i = "
                         f"seed + i; same tokens in every repeat: " + ", ".join(
                             f"{r['method']} {r['identical_across_repeats'] * 100:.0f}%"
                             for r in recs))
        for r in recs:
            h = r["exit_histogram"]
            if h and (h["accepted"] or h["rejected"]):
                parts = [f"L{k}: {h['accepted'][k]}/{h['accepted'][k] + h['rejected'][k]}"
                         for k in h["accepted"]]
                lines.append(f"  {r['method']} exits (accepted/drafted): {', '.join(parts)}")
            src = r.get("sources")
            if src and src["by_source"]:
                parts = " + ".join(f"{k} {v['per_step']:.2f} ({v['accepted']}/{v['drafted']})"
                                   for k, v in sorted(src["by_source"].items()))
                lines.append(f"  {r['method']} tokens/step by source: target 1.00 + {parts} "
                             f"(accepted/drafted)")
            tr = r.get("tree")
            if tr:
                lines.append(f"  {r['method']} trees: {tr['steps']} request-steps, "
                             f"{tr['nodes_per_step']:.2f} nodes verified per step "
                             f"({tr['branch_share'] * 100:.0f}% on branches); the accepted "
                             f"path went past the main draft's agreeing prefix "
                             f"{tr['branch_wins']} times (+{tr['branch_tokens']} tokens; "
                             f"{tr.get('diverged', 0)} of them through a sibling branch, "
                             f"the rest past its end; by branch source: lookup "
                             f"{tr.get('gain_lookup', 0)}, exit {tr.get('gain_exit', 0)}, "
                             f"corpus {tr.get('gain_corpus', 0)}); pruned "
                             f"{tr.get('pruned', 0)} nodes, "
                             f"{tr.get('pruned_lost', 0)} steps lost an acceptable node; "
                             f"{tr.get('cut', 0)} trees cut to the shape that pays, "
                             f"{tr.get('chain_only', 0)} steps a main chain only, "
                             f"{tr.get('off_nodes', 0)} nodes off the main chain")
                last = (r.get("step_cost") or [None])[-1] or {}
                fits = [f"{bkt}: {f['step_ms']:.1f} + {f['row_ms']:.2f}/row + "
                        f"{f.get('off_row_ms', 0.0):.2f}/off-chain row" + _offsets(f)
                        + (f", self-draft attempt {f['self_attempt_ms']:.1f}"
                           if f.get("self_attempt_ms") else "")
                        for bkt, f in sorted(last.items())]
                if fits:
                    lines.append(f"  {r['method']} step cost fit (last repeat, ms, by batch "
                                 f"size): {'; '.join(fits)}")
            pauses = [p for p in r.get("self_pauses") or [] if p]
            if pauses:
                rates = "; ".join(f"{cls} {v['tok_per_s']} ({v['steps']:.0f} steps)"
                                  for cls, v in (pauses[-1].get("rates") or {}).items())
                lines.append(f"  {r['method']} self-draft pauses (per repeat): request-steps "
                             f"paused {[p.get('paused', 0) for p in pauses]}, pauses lifted "
                             f"because attempts pay {[p.get('lifted', 0) for p in pauses]}; "
                             f"batch-1 tokens/s by rejected attempts before (last repeat, "
                             f"decayed): {rates or '-'}")
            if r.get("gemm_padding"):
                lines.append(f"  {r['method']} matmul rows padded (rows: padded rows): "
                             + ", ".join(f"{k}: {v}" for k, v in r["gemm_padding"].items()))
            st = r.get("step_ms")
            if st:
                lines.append(f"  {r['method']} ms per step: drafting {st['drafting']:.2f}, "
                             f"forward {st['forward']:.2f}, rest of worker (LM head, "
                             f"sampling, verification) {st['worker_other']:.2f}, outside worker "
                             f"{st['outside_worker']:.2f} (total {st['total']:.2f})")
            le = r["layer_evals_per_token"] or {}
            if le.get("deferred") is not None:
                lines.append(f"  {r['method']} layer evals per token: {le['measured']:.1f} "
                             f"measured; predicted {le['recompute']:.1f} with recomputation, "
                             f"{le['deferred']:.1f} with deferred verification")
        cats = list(recs[0]["categories"])
        if len(cats) > 1:
            lines.append("  speedup by category (request latency):")
            lines.append("  " + f"{'method':<32}" + "".join(f"{c[:10]:>11}" for c in cats))
            for r in recs[1:]:
                lines.append("  " + f"{r['method'][:32]:<32}" + "".join(
                    f"{_fmt(r['categories'][c]['speedup'], '.2f'):>10}x" for c in cats))
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """Speedup and accepted tokens per step, per method and category, one column
    per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = doc["settings"]["concurrency"]
    methods = [m["label"] for m in doc["methods"]]
    legend_in = 0.18 * len(methods) + 0.15  # the legend goes below the panels
    width_in = max(5.5 * len(concs), 1.0 + 0.055 * max(map(len, methods)))
    fig, axes = plt.subplots(2, len(concs), figsize=(width_in, 7 + legend_in), squeeze=False)
    for j, conc in enumerate(concs):
        recs = [r for r in doc["results"] if r["concurrency"] == conc]
        groups: list[tuple[str, dict[str, dict]]] = []
        for dataset in doc["settings"]["datasets"]:
            by_m = {r["method"]: r for r in recs if r["dataset"] == dataset}
            if not by_m:
                continue
            groups.append((dataset, {m: by_m[m] for m in methods}))
            cats = list(next(iter(by_m.values()))["categories"])
            if len(cats) > 1:
                for c in cats:
                    groups.append((f"{dataset}/{c}",
                                   {m: {**by_m[m]["categories"][c]} for m in methods}))
        width = 0.8 / max(1, len(methods))
        for row, key, title in ((0, "speedup", "speedup over the faster plain engine (tokens/s)"),
                                (1, "tokens_per_step", "accepted tokens per step")):
            ax = axes[row][j]
            for k, m in enumerate(methods):
                vals = [g[m].get(key) or 0.0 for _, g in groups]
                ax.bar([i + k * width for i in range(len(groups))], vals, width, label=m)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(groups))])
            ax.set_xticklabels([g for g, _ in groups], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{title}, concurrency {conc}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.01, 0.005), ncol=1,
               fontsize=7, frameon=False)
    fig.suptitle(f"{os.path.basename(doc['settings']['model'])}, {doc['settings']['dtype']}, "
                 f"{doc['settings']['max_tokens']} new tokens", fontsize=10)
    fig.tight_layout(rect=(0, legend_in / (7 + legend_in), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
