"""Corpus drafts (drafts/corpus.py) without an engine: the table's answers
against a brute-force count, chaining and its stop rule, response boundaries,
and the file format's checks."""

from collections import Counter

import numpy as np
import pytest

from vllm_adadecode.drafts.corpus import (CORPUS_FILE, CORPUS_KEY, CorpusError, DraftCorpus,
                                          corpus_tokens, load_corpus_tokens, save_corpus)


def _c(responses, **kw):
    return DraftCorpus(corpus_tokens(responses), **kw)


def test_most_frequent_continuation_of_the_longest_known_context():
    c = _c([[1, 2, 3], [1, 2, 3], [1, 2, 4], [5, 1, 2, 9]], min_prob=0.1)
    assert c.propose(np.array([7, 1, 2]), 1) == [3]  # after (1, 2): 3 twice, 4 and 9 once
    assert c.propose(np.array([5, 1, 2]), 1) == [9]  # (5, 1, 2) is longer and says 9
    # below the frequency floor: (1, 2) -> 3 has share 2/4
    assert _c([[1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 2, 8]], min_prob=0.6).propose(
        np.array([1, 2]), 1) == []


def test_chains_while_the_product_of_frequencies_holds():
    seqs = [[1, 2, 3, 4, 5, 6]] * 3 + [[9, 4, 7]]
    c = _c(seqs, min_prob=0.5)
    assert c.propose(np.array([1, 2]), 8) == [3, 4, 5, 6]  # stops at the response's end
    assert c.propose(np.array([1, 2]), 2) == [3, 4]  # and at k
    # after a lone 4 (no longer context): 5 with share 3/4, then certain
    assert c.propose(np.array([8, 4]), 3) == [5, 6]
    assert _c(seqs, min_prob=0.8).propose(np.array([8, 4]), 3) == []


def test_runners_up_are_the_next_most_frequent_tokens_of_the_longest_context():
    c = _c([[1, 2, 3]] * 3 + [[1, 2, 4]] * 2 + [[1, 2, 8], [6, 2, 5]], min_prob=0.1)
    # after (1, 2): 3 (3 times), 4 (twice), 8 (once); the main draft's 3 is left out
    assert c.runners_up(np.array([1, 2]), exclude=3, limit=3) == [4, 8]
    assert c.runners_up(np.array([1, 2]), exclude=3, limit=1) == [4]
    assert c.runners_up(np.array([1, 2]), exclude=4, limit=3) == [3, 8]
    # a share floor: 8 is 1 of 6 continuations
    assert c.runners_up(np.array([1, 2]), exclude=3, limit=3, min_share=0.2) == [4]
    # (6, 2) knows only 5: no runner-up (a shorter context does not answer)
    assert c.runners_up(np.array([6, 2]), exclude=5, limit=2) == []
    assert c.runners_up(np.array([6, 2]), exclude=3, limit=2) == [5]
    assert c.runners_up(np.array([7]), exclude=1, limit=2) == []  # unknown context


def test_no_context_or_continuation_crosses_a_response_boundary():
    c = _c([[1, 2], [3, 4]], min_prob=0.1)
    assert c.propose(np.array([1, 2]), 3) == []  # 2 ended a response
    assert c.propose(np.array([2, 3]), 3) == [4]  # only the context (3,) is known


def test_answers_match_a_brute_force_count():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 6, size=int(rng.integers(3, 40)))) for _ in range(200)]
    c = _c(seqs, min_n=1, max_n=4, min_prob=1e-9)
    counts = Counter()
    for s in seqs:
        for j in range(1, len(s)):
            for n in range(1, min(4, j) + 1):
                counts[(tuple(s[j - n:j]), s[j])] += 1
    for _ in range(300):
        ctx = list(rng.integers(0, 6, size=6))
        want = None
        for n in range(4, 0, -1):
            nexts = {t: v for (k, t), v in counts.items() if k == tuple(ctx[-n:])}
            if nexts:
                best = max(nexts.values())
                want = min(t for t, v in nexts.items() if v == best)  # ties: smallest id
                break
        got = c.propose(np.array(ctx), 1)
        assert got == ([] if want is None else [want]), ctx
        # runners-up: the longest known context's top 3, the excluded token left out
        want_ru = []
        for n in range(4, 0, -1):
            nexts = {t: v for (k, t), v in counts.items() if k == tuple(ctx[-n:])}
            if nexts:
                top3 = sorted(nexts, key=lambda t: (-nexts[t], t))[:3]
                want_ru = [t for t in top3 if t != want][:2]
                break
        assert c.runners_up(np.array(ctx), exclude=want, limit=2, min_share=0.0) == want_ru


def test_file_round_trips_and_bad_files_are_refused(tmp_path):
    from safetensors.numpy import save_file

    tokens = corpus_tokens([[1, 2, 3], [4, 5]])
    save_corpus(tmp_path, tokens)
    assert np.array_equal(load_corpus_tokens(tmp_path, vocab_size=6), tokens)
    assert load_corpus_tokens(tmp_path / "nowhere") is None
    with pytest.raises(CorpusError, match=r"token ids must lie in \[0, 5\)"):
        load_corpus_tokens(tmp_path, vocab_size=5)
    path = tmp_path / CORPUS_FILE
    for tensors, message in (
            ({CORPUS_KEY: tokens.astype(np.int64)}, "1-D int32"),
            ({CORPUS_KEY: tokens.reshape(1, -1)}, "1-D int32"),
            ({CORPUS_KEY: tokens, "other": tokens}, "exactly one tensor"),
            ({CORPUS_KEY: np.array([1, -7], dtype=np.int32)}, "token ids must lie")):
        save_file(tensors, str(path))
        with pytest.raises(CorpusError, match=message):
            load_corpus_tokens(tmp_path)
    path.write_bytes(b"\0" * 64)
    with pytest.raises(CorpusError, match="not a readable safetensors file"):
        load_corpus_tokens(tmp_path)


def test_a_corpus_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    """MAX_CORPUS_TOKENS int32 tokens (plus a header allowance) is the cap: a
    larger file is refused by its size alone (a sparse file: nothing is read)."""
    from vllm_adadecode.drafts.corpus import MAX_CORPUS_TOKENS

    limit = MAX_CORPUS_TOKENS * 4 + 1024 * 1024
    path = tmp_path / CORPUS_FILE
    with open(path, "wb") as f:
        f.truncate(limit + 1)
    with pytest.raises(CorpusError, match=f"over the {limit}-byte limit"):
        load_corpus_tokens(tmp_path)
    with open(path, "wb") as f:  # at the cap: read, and refused for its content instead
        f.truncate(limit)
    with pytest.raises(CorpusError, match="not a readable safetensors file"):
        load_corpus_tokens(tmp_path)
