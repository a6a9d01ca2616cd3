"""Token trees on the real vLLM engine (CPU): exact output, branches that win,
early pruning, and the KV of rejected branches never seen again."""

import pytest

from vllm_adadecode.prompts import humaneval, mixed

pytestmark = pytest.mark.engine

PROMPTS8 = [p.text for p in mixed(8)]
# Lookups only, every step drafts: trees grow from other occurrences of the suffix.
LOOKUP = {"method": "adadecode", "num_speculative_tokens": 6, "adaptive": False,
          "self_draft": False, "lookup_corpus": False, "lookup_cache": False}
TREE = {**LOOKUP, "tree": True}
PRUNED = {**TREE, "tree_prune_top_k": 2}
# Four long answers, twice (the second round from the prefix cache), blocks of 32.
TREE_JOB = dict(max_tokens=160, prompts=PROMPTS8[:4], block_size=32, second_round=True,
                enable_prefix_caching=True)


def _run(engine, model, **kw):
    job = dict(model=model, prompts=PROMPTS8, max_tokens=96, concurrency=4)
    job.update(kw)
    return engine(**job)


def test_tree_smollm2_identical_branches_win_pruning_and_prefix_cache(engine, smollm2):
    """Four long answers, twice (the second round reads the first's blocks from
    the prefix cache), blocks of 32 tokens that accepted paths cross: linear
    drafts, trees, and trees pruned after the first exit layer all give
    vanilla's tokens (trees sized while serving: the long tier's test below).
    Some accepted paths left the main draft (their KV was moved into place,
    and every later token still matches), and pruning dropped nodes."""
    job = dict(TREE_JOB)
    van = _run(engine, smollm2, **job)
    lin = _run(engine, smollm2, speculative_config=LOOKUP, **job)
    tree = _run(engine, smollm2, speculative_config=TREE, **job)
    pruned = _run(engine, smollm2, speculative_config=PRUNED, **job)
    for run in (lin, tree, pruned):
        assert run["token_ids"] == van["token_ids"]
        assert run["second_round"]["token_ids"] == van["second_round"]["token_ids"]
        assert run["second_round"]["prefix_cache_hit_tokens"] > 0
    t = tree["drafter"]["tree"]
    assert t["steps"] > 50 and t["branch_nodes"] > 0
    assert t["branch_wins"] > 0 and t["branch_tokens"] >= t["branch_wins"]
    assert t["diverged"] > 0  # some paths went through a sibling branch
    assert 0 < t["off_nodes"] <= t["branch_nodes"]  # off the main chain, of those past the draft
    assert t["gain_lookup"] == t["branch_tokens"]  # the only branch source here
    assert lin["drafter"]["tree"]["steps"] == 0
    assert tree["tokens_per_step"] >= lin["tokens_per_step"]
    p = pruned["drafter"]["tree"]
    assert p["pruned"] > 0 and t["pruned"] == 0
    assert p["pruned_lost"] <= p["steps"]


@pytest.mark.full
def test_tree_sized_while_serving_identical(engine, smollm2):
    """Long tier: the same job with pruned trees sized by the measured gains
    and row costs (trees cut to what pays, the rest probes): vanilla's tokens."""
    van = _run(engine, smollm2, **TREE_JOB)
    sized = _run(engine, smollm2, speculative_config={**PRUNED, "adaptive": True}, **TREE_JOB)
    assert sized["token_ids"] == van["token_ids"]
    assert sized["second_round"]["token_ids"] == van["second_round"]["token_ids"]
    assert sized["drafter"]["tree"]["steps"] > 0


def test_tree_corpus_runner_up_wins_where_the_main_draft_is_wrong(engine, smollm2, tmp_path):
    """A corpus built from vanilla's own answers, with a wrong token every 12
    positions in four copies, another wrong token there in three and the right
    one in two: the main draft follows the first wrong copies, and the corpus's
    runners-up (the other wrong token, then the right one) are sibling
    branches. Verification takes the right sibling and its continuation (the
    accepted path leaves the main chain, its KV is moved into place), and every
    token equals vanilla's, also past the many moves. Pruned to the exit
    head's top 1, branches drop out of the forward between others that stay,
    and the tokens still equal vanilla's."""
    import shutil

    from vllm_adadecode.drafts.corpus import CORPUS_FILE, corpus_tokens, save_corpus
    from vllm_adadecode.heads import SHIPPED_DIR

    job = dict(TREE_JOB)
    van = _run(engine, smollm2, **job)  # the same job as the test above: run once
    right, wrong1, wrong2 = [], [], []
    for out in van["token_ids"]:
        bad1, bad2 = list(out), list(out)
        for c in range(8, len(out) - 4, 12):
            bad1[c], bad2[c] = [t for t in range(out[c] + 1, out[c] + 4) if t != out[c + 1]][:2]
        right.append(list(out))
        wrong1.append(bad1)
        wrong2.append(bad2)
    heads = tmp_path / "heads"
    shutil.copytree(SHIPPED_DIR / "SmolLM2-135M-Instruct", heads)
    (heads / CORPUS_FILE).unlink()
    save_corpus(heads, corpus_tokens(wrong1 * 4 + wrong2 * 3 + right * 2))
    spec = {**TREE, "lookup": True, "lookup_corpus": True, "heads": str(heads), "tree_nodes": 6}
    tree = _run(engine, smollm2, **{**job, "second_round": False}, speculative_config=spec)
    assert tree["token_ids"] == van["token_ids"]
    t = tree["drafter"]["tree"]
    corrupted = sum(len(range(8, len(o) - 4, 12)) for o in van["token_ids"])
    # most wrong tokens were passed through their right sibling
    assert t["diverged"] >= corrupted // 2, (t, corrupted)
    assert t["gain_corpus"] > 0
    pruned = _run(engine, smollm2, **{**job, "second_round": False},
                  speculative_config={**spec, "tree_prune_top_k": 1})
    assert pruned["token_ids"] == van["token_ids"]
    assert pruned["drafter"]["tree"]["pruned"] > 0
    assert tree["drafter"]["accepted_by_source"].get("corpus", 0) > 0


def test_tree_with_self_drafts_and_sampled_requests_identical(engine, smollm2):
    """Trees beside early-exit self-drafts (the deferred forward runs the tree
    rows) in a batch that mixes greedy and sampled requests, both with trees:
    every request gives the same tokens with trees on and off (a sampled
    request's node is drawn with the key of its own depth's position, so
    neither speculation nor the tree moves its tokens; greedy ones equal
    vanilla's, as the test above shows)."""
    sampling = [{"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": 7 + i}
                for i in range(8)]
    spec = {**LOOKUP, "self_draft": True}
    lin = _run(engine, smollm2, sampling=sampling, speculative_config=spec)
    tree = _run(engine, smollm2, sampling=sampling, speculative_config={**spec, "tree": True})
    assert tree["token_ids"] == lin["token_ids"]
    d = tree["drafter"]
    assert d["tree"]["steps"] > d["tree"]["sampled"] > 0 and d["verify_layers_skipped"] > 0
    assert d["tree"]["diverged"] > 0
    assert d["tree"]["gain_exit"] > 0  # the exit heads' other tokens won some steps
    assert d["drafted_by_sampling"].get("sampled", 0) > 0


def test_tree_from_exit_heads_alone_identical(engine, smollm2):
    """Self-drafts only (no lookups): the exit heads' likely tokens are the
    tree's only branches, from the vocabulary shortlist where the full LM head
    did not run (an attempt that was not confident drafts nothing but still
    offers its likeliest tokens). Greedy and sampled requests give the same
    tokens as without trees, and branches won steps."""
    sampling = [{"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": 7 + i}
                for i in range(8)]
    spec = {**LOOKUP, "lookup": False, "self_draft": True, "exit_layers": [6]}
    lin = _run(engine, smollm2, sampling=sampling, speculative_config=spec)
    tree = _run(engine, smollm2, sampling=sampling, speculative_config={**spec, "tree": True})
    assert tree["token_ids"] == lin["token_ids"]
    t = tree["drafter"]["tree"]
    assert t["steps"] > t["sampled"] > 0
    assert t["gain_exit"] > 0 and t["gain_lookup"] == 0
    assert tree["tokens_per_step"] > lin["tokens_per_step"]


@pytest.mark.full
def test_tree_preemption_under_kv_pressure(engine, smollm2):
    """Code prompts prefilled in 64-token chunks, 24 KV blocks of 32 tokens for
    8 requests: the scheduler preempts requests that hold tree rows, and the
    tokens equal vanilla's under the same pressure."""
    prompts = [p.text[:900] for p in humaneval()[:8]]
    job = dict(model=smollm2, prompts=prompts, raw_prompts=True, max_tokens=128,
               sampling=[{"temperature": 0.0, "ignore_eos": True}] * 8,
               concurrency=8, max_num_batched_tokens=64, block_size=32,
               num_gpu_blocks_override=24, max_model_len=512)
    van = engine(**job)
    tree = engine(**job, speculative_config=PRUNED)
    assert tree["token_ids"] == van["token_ids"]
    assert van["spec"]["preemptions"] > 0 and tree["spec"]["preemptions"] > 0
    assert tree["drafter"]["tree"]["branch_wins"] > 0


@pytest.mark.full
def test_tree_tensor_parallel_2_same_tokens(engine, qwen05b):
    """TP=2 on the real Qwen 0.5B (14 query heads, 2 KV heads): trees, pruned
    and not, give the same tokens as vanilla and the same trees as one rank."""
    prompts = [p.text for p in humaneval()[:4]]
    job = dict(model=qwen05b, prompts=prompts, max_tokens=96, concurrency=2)
    van = engine(**job)
    one = engine(**job, speculative_config=PRUNED)
    two = engine(**job, speculative_config=PRUNED, tensor_parallel_size=2)
    assert one["token_ids"] == van["token_ids"]
    assert two["token_ids"] == van["token_ids"]
    assert two["drafter"]["tree"] == one["drafter"]["tree"]
    assert one["drafter"]["tree"]["steps"] > 0
