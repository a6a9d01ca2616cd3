"""Token trees on the real vLLM engine (CPU): exact output, branches that win,
and the KV of rejected branches never seen again."""

import pytest

from vllm_adadecode.prompts import mixed

pytestmark = pytest.mark.engine

PROMPTS8 = [p.text for p in mixed(8)]
# Lookups only, every step drafts: trees grow from other occurrences of the suffix.
LOOKUP = {"method": "adadecode", "num_speculative_tokens": 6, "adaptive": False,
          "self_draft": False, "lookup_corpus": False, "lookup_cache": False}
TREE = {**LOOKUP, "tree": True}


def _run(engine, model, **kw):
    job = dict(model=model, prompts=PROMPTS8, max_tokens=96, concurrency=4)
    job.update(kw)
    return engine(**job)


def test_tree_smollm2_identical_and_branches_win(engine, smollm2):
    van = _run(engine, smollm2)
    lin = _run(engine, smollm2, speculative_config=LOOKUP)
    tree = _run(engine, smollm2, speculative_config=TREE)
    assert tree["token_ids"] == van["token_ids"]
    assert lin["token_ids"] == van["token_ids"]
    t = tree["drafter"]["tree"]
    assert t["steps"] > 0 and t["branch_nodes"] > 0
    # Some accepted paths left the main chain: their KV was moved into place,
    # and every later token still matches vanilla.
    assert t["branch_wins"] > 0 and t["branch_tokens"] >= t["branch_wins"]
    assert lin["drafter"]["tree"]["steps"] == 0
    print("tokens/step linear", lin["tokens_per_step"], "tree", tree["tokens_per_step"], t)
