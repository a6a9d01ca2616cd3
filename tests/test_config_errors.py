"""Bad AdaDecode input stops engine start with a message naming the field.

Each case goes through the real ``vllm.LLM`` constructor: the settings are
validated while vLLM builds its config, before any engine process starts.
"""

import json

import pytest
import torch

from vllm_adadecode.config import AdaDecodeConfigError
from vllm_adadecode.heads import ExitHeads, base_model_fingerprint


def _start(model, spec, **kw):
    from vllm import LLM

    return LLM(model=model, dtype="float32", enforce_eager=True, speculative_config=spec, **kw)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"exit_layer": [2]}, r"unknown adadecode setting\(s\) \['exit_layer'\].*allowed keys"),
        ({"threshold": 0}, r"'threshold' must be a number in \(0, 1\]"),
        ({"threshold": 1.5}, r"'threshold' must be a number in \(0, 1\]"),
        ({"threshold": "high"}, r"'threshold' must be a number in \(0, 1\]"),
        ({"exit_layers": [0, 3]}, r"'exit_layers' entry 0 is out of range.*\[1, 5\]"),
        ({"exit_layers": [2, 6]}, r"'exit_layers' entry 6 is out of range.*6 layers"),
        ({"exit_layers": [3, 2]}, r"'exit_layers' must be strictly increasing"),
        ({"exit_layers": [2, 2]}, r"'exit_layers' must be strictly increasing"),
        ({"num_speculative_tokens": 0}, r"'num_speculative_tokens' must be an integer >= 1"),
        ({"adaptive": "yes"}, r"'adaptive' must be true or false"),
        ({"deferred": "no"}, r"'deferred' must be true or false"),
        ({"deferred": 1}, r"'deferred' must be true or false"),
        ({"shortlist": 1}, r"'shortlist' must be true or false"),
        ({"lookup": "on"}, r"'lookup' must be true or false"),
        ({"lookup_cache": None}, r"'lookup_cache' must be true or false"),
        ({"self_draft": 0}, r"'self_draft' must be true or false"),
        ({"sampled_drafts": "yes"}, r"'sampled_drafts' must be true or false"),
        ({"lookup_min_match": 0}, r"'lookup_min_match' must be an integer >= 1"),
        ({"lookup_max_match": 2.5}, r"'lookup_max_match' must be an integer >= 1"),
        ({"lookup_min_match": 4, "lookup_max_match": 3},
         r"'lookup_max_match' \(3\) must be >= 'lookup_min_match' \(4\)"),
        ({"lookup_max_tokens": 9}, r"'lookup_max_tokens' \(9\) must be <= "
                                   r"'num_speculative_tokens' \(5\)"),
        ({"lookup_cache_tokens": 8}, r"'lookup_cache_tokens' must be an integer >= 16"),
        ({"lookup_corpus": "yes"}, r"'lookup_corpus' must be true or false"),
        ({"disable_by_batch_size": 0}, r"'disable_by_batch_size' must be an integer >= 1"),
        ({"corpus_min_prob": 0}, r"'corpus_min_prob' must be a number in \(0, 1\]"),
        ({"corpus_min_prob": "x"}, r"'corpus_min_prob' must be a number in \(0, 1\]"),
        ({"tree": "yes"}, r"'tree' must be true or false"),
        ({"tree": True, "tree_branches": 0}, r"'tree_branches' must be an integer >= 1"),
        ({"tree": True, "tree_nodes": 1.5}, r"'tree_nodes' must be an integer >= 1"),
        ({"tree": True, "lookup": False, "self_draft": False},
         r"'tree' grows branches from lookups and .* 'self_draft': true"),
        ({"tree": True, "tree_prune_top_k": 0}, r"'tree_prune_top_k' must be an integer >= 1"),
        ({"tree_prune_top_k": 4}, r"'tree_prune_top_k' prunes .* needs 'tree': true"),
        ({"tree": True, "deferred": False, "tree_prune_top_k": 4},
         r"'tree_prune_top_k' .* 'deferred': true"),
    ],
)
def test_bad_setting_fails_at_engine_start(tiny_llama, spec, message):
    with pytest.raises(AdaDecodeConfigError, match=message):
        _start(tiny_llama, {"method": "adadecode", **spec})


def test_bad_setting_in_additional_config(tiny_llama):
    from vllm import LLM

    with pytest.raises(AdaDecodeConfigError, match=r"additional_config\['adadecode'\]"):
        LLM(model=tiny_llama, speculative_config={"method": "adadecode"},
            additional_config={"adadecode": {"threshhold": 0.5}})


def test_missing_heads_folder(tiny_llama, tmp_path):
    with pytest.raises(AdaDecodeConfigError, match="does not exist"):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path / "missing")})


def test_corrupt_heads_folder(tiny_llama, tmp_path):
    ExitHeads.identity([2], 256, base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(
        tmp_path
    )
    (tmp_path / "exit_heads.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(AdaDecodeConfigError, match="corrupt"):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path)})


def test_corrupt_corpus_in_heads_folder(tiny_llama, tmp_path):
    from vllm_adadecode.drafts.corpus import CORPUS_FILE, corpus_tokens, save_corpus

    ExitHeads.identity([2], 256, base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(
        tmp_path
    )
    save_corpus(tmp_path, corpus_tokens([[1, 2, 10**6]]))  # an id beyond the vocabulary
    with pytest.raises(AdaDecodeConfigError, match=r"'heads'.*corpus.safetensors.*token ids"):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path)})
    # the check is the corpus's: turned off, the same folder is accepted
    from vllm_adadecode.config import resolve

    cfg = resolve({"method": "adadecode", "model": str(tmp_path), "lookup_corpus": False}, None,
                  model_dir=tiny_llama, num_hidden_layers=6, hidden_size=256)
    assert not cfg.lookup_corpus and (tmp_path / CORPUS_FILE).is_file()


def test_heads_of_another_model_fingerprint(tiny_llama, smollm2, tmp_path):
    # right hidden size, wrong weights
    ExitHeads.identity([2], 256, base_model_fingerprint=base_model_fingerprint(smollm2)).save(
        tmp_path
    )
    with pytest.raises(AdaDecodeConfigError, match="fingerprint.*another model"):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path)})


def test_heads_of_another_model_hidden_size(tiny_llama, smollm2, tmp_path):
    ExitHeads.identity([2], 576, base_model_fingerprint=base_model_fingerprint(smollm2)).save(
        tmp_path
    )
    with pytest.raises(AdaDecodeConfigError, match="hidden size 576.*hidden size 256"):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path)})


def test_exit_layer_without_a_head(tiny_llama, tmp_path):
    ExitHeads.identity([2], 256, base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(
        tmp_path
    )
    with pytest.raises(AdaDecodeConfigError, match=r"no head for layer\(s\) \[4\]"):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path), "exit_layers": [2, 4]})


def test_unsupported_vllm_version_is_refused():
    from vllm_adadecode.engine.install import check_vllm_version
    from vllm_adadecode.errors import UnsupportedVLLMVersion

    check_vllm_version("0.32.0")
    check_vllm_version("0.32.0+cpu")
    with pytest.raises(UnsupportedVLLMVersion, match=r"written for vLLM 0\.32\.0 exactly.*0\.33\.0"):
        check_vllm_version("0.33.0")


def test_register_is_idempotent_and_passive():
    """register() twice installs each hook once; without AdaDecode vLLM's own
    speculative config comes through unchanged."""
    import vllm_adadecode
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    vllm_adadecode.register()
    hook = EngineArgs.create_speculative_config
    prop = VllmConfig.__dict__["num_lookahead_tokens"]
    vllm_adadecode.register()
    import vllm_adadecode.engine.install as p

    p.install_engine_hooks()
    assert EngineArgs.create_speculative_config is hook
    assert VllmConfig.__dict__["num_lookahead_tokens"] is prop
    assert getattr(hook, "_adadecode", False)


def test_ngram_config_passes_through_untouched(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_llama, speculative_config={"method": "ngram",
                      "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    cfg = args.create_engine_config()
    assert cfg.speculative_config.method == "ngram"
    assert "adadecode" not in (cfg.additional_config or {})
    assert cfg.num_lookahead_tokens == 0


def test_adadecode_resolves_into_vllm_config(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_llama, speculative_config={"method": "adadecode",
                      "exit_layers": [1, 3], "threshold": 0.5, "num_speculative_tokens": 4})
    cfg = args.create_engine_config()
    assert cfg.speculative_config.method == "custom_class"
    assert cfg.additional_config["adadecode"] == {
        "exit_layers": [1, 3], "threshold": 0.5, "num_speculative_tokens": 4, "heads": None,
        "adaptive": True, "deferred": True, "gemm_padding": True, "gemm_pad_rows": None,
        "shortlist": True, "full_head_check": True,
        "lookup": True, "lookup_min_match": 2, "lookup_max_match": 5,
        "lookup_max_tokens": None, "lookup_cache": True, "lookup_cache_tokens": 16384,
        "lookup_corpus": True, "corpus": None, "corpus_min_prob": 0.4, "self_draft": True,
        "disable_by_batch_size": 16, "tree": False, "tree_branches": 3, "tree_nodes": 4,
        "tree_prune_top_k": None, "sampled_drafts": True}
    assert cfg.num_lookahead_tokens == 4  # KV slots for drafted positions


def test_tree_nodes_ride_as_extra_draft_rows(tiny_llama):
    """With trees on, vLLM schedules (and reserves KV slots for) the main draft's
    tokens plus the tree's extra nodes per request."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_llama, speculative_config={
        "method": "adadecode", "num_speculative_tokens": 4, "tree": True, "tree_nodes": 3})
    cfg = args.create_engine_config()
    assert cfg.speculative_config.num_speculative_tokens == 7
    assert cfg.num_lookahead_tokens == 7
    assert cfg.additional_config["adadecode"]["num_speculative_tokens"] == 4


def test_spec_model_heads_folder_means_adadecode(tiny_llama, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    ExitHeads.identity([2, 4], 256, threshold=0.3,
                       base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(tmp_path)
    cfg = EngineArgs(model=tiny_llama, spec_model=str(tmp_path)).create_engine_config()
    ada = cfg.additional_config["adadecode"]
    assert ada["exit_layers"] == [2, 4] and ada["threshold"] == 0.3
    assert ada["heads"] == str(tmp_path.resolve())
    assert json.loads((tmp_path / "config.json").read_text())["exit_layers"] == [2, 4]


@pytest.mark.parametrize("design, message", [
    ("mlp", r"'design' is 'mlp', which the drafter does not run; the engine runs: 'dxd'"),
    ("medusa", r"'design' must be one of 'dxd', 'mlp', 'final_state', 'attention', "
               r"got 'medusa'"),
])
def test_heads_design_the_engine_does_not_run_is_refused(tiny_llama, tmp_path, design, message):
    ExitHeads.identity([2], 256, base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(
        tmp_path
    )
    if design == "mlp":  # a well-formed mlp folder
        import torch

        from vllm_adadecode.head_designs import DESIGNS

        extra = {2: {k: torch.zeros(s) for k, s in DESIGNS["mlp"].shapes(256).items()
                     if k != "transform"}}
        ExitHeads({2: torch.eye(256)}, hidden_size=256, design="mlp", extra=extra,
                  base_model_fingerprint=base_model_fingerprint(tiny_llama)).save(tmp_path)
    else:
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["design"] = design
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaDecodeConfigError, match=message):
        _start(tiny_llama, {"method": "adadecode", "model": str(tmp_path)})


def _resolved(model, spec, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, speculative_config=spec, **kw) \
        .create_engine_config().additional_config["adadecode"]


def test_speculative_config_wins_over_additional_config(tiny_llama):
    """A key given in both places takes the speculative config's value; keys
    only in additional_config['adadecode'] are kept."""
    ada = _resolved(tiny_llama, {"method": "adadecode", "threshold": 0.3},
                    additional_config={"adadecode": {"threshold": 0.7, "lookup": False}})
    assert ada["threshold"] == 0.3
    assert ada["lookup"] is False
    assert _resolved(tiny_llama, {"method": "adadecode"},
                     additional_config={"adadecode": {"threshold": 0.7}})["threshold"] == 0.7


def test_disable_by_batch_size_null_means_never_and_shortlist_false_is_kept(tiny_llama):
    ada = _resolved(tiny_llama, {"method": "adadecode", "disable_by_batch_size": None,
                                 "shortlist": False})
    assert ada["disable_by_batch_size"] is None
    assert ada["shortlist"] is False
    assert _resolved(tiny_llama, {"method": "adadecode"})["disable_by_batch_size"] == 16


def test_heads_folder_sets_full_head_check_unless_the_user_does(tiny_llama, tmp_path):
    """A heads folder's config.json 'full_head_check' (shortlist
    --draft-on-shortlist) is the default for engines using it; the user's
    setting wins; a value that is not a boolean is refused at start, naming
    the file's key."""
    heads = ExitHeads.identity([2], 256,
                               base_model_fingerprint=base_model_fingerprint(tiny_llama))
    heads.metadata["full_head_check"] = False
    heads.save(tmp_path / "wide")
    spec = {"method": "adadecode", "heads": str(tmp_path / "wide")}
    assert _resolved(tiny_llama, spec)["full_head_check"] is False
    assert _resolved(tiny_llama, {**spec, "full_head_check": True})["full_head_check"] is True
    assert _resolved(tiny_llama, {"method": "adadecode"})["full_head_check"] is True
    heads.metadata["full_head_check"] = "no"
    heads.save(tmp_path / "bad")
    with pytest.raises(Exception, match=r"config.json 'full_head_check' must be true or false, "
                                        r"got 'no'"):
        _resolved(tiny_llama, {"method": "adadecode", "heads": str(tmp_path / "bad")})


def test_ray_cpu_platform_plugin_is_off_without_its_variable(monkeypatch):
    from vllm_adadecode import raycpu

    monkeypatch.delenv(raycpu.ENV, raising=False)
    assert raycpu.platform_plugin() is None
    monkeypatch.setenv(raycpu.ENV, "0")
    assert raycpu.platform_plugin() is None
    monkeypatch.setenv(raycpu.ENV, "1")
    assert raycpu.platform_plugin() == raycpu.PLATFORM  # this is a CPU build


def test_corpus_from_another_folder_or_a_shipped_name(tiny_llama, tmp_path):
    """``corpus`` takes another folder's corpus file, or a shipped heads folder
    by name; a folder without one, a wrong type, or ids outside the model's
    vocabulary are refused at engine start, naming the setting."""
    from vllm_adadecode.config import resolve
    from vllm_adadecode.drafts.corpus import corpus_tokens, save_corpus
    from vllm_adadecode.heads import SHIPPED_DIR

    def cfg(**kw):
        return resolve({"method": "adadecode", **kw}, None, model_dir=tiny_llama,
                       num_hidden_layers=6, hidden_size=256)

    assert cfg().corpus is None  # identity heads, no corpus
    # by name (its ids are SmolLM2's, beyond this tiny model's vocabulary: not loaded)
    assert cfg(corpus="SmolLM2-135M-Instruct", lookup_corpus=False).corpus == str(
        (SHIPPED_DIR / "SmolLM2-135M-Instruct").resolve())
    with pytest.raises(AdaDecodeConfigError, match=r"'corpus': .* has no corpus\.safetensors"):
        cfg(corpus=str(tmp_path))
    with pytest.raises(AdaDecodeConfigError, match=r"'corpus' must be a folder holding"):
        cfg(corpus=3)
    save_corpus(tmp_path, corpus_tokens([[5, 6, 7, 8]]))
    assert cfg(corpus=str(tmp_path)).corpus == str(tmp_path.resolve())
    save_corpus(tmp_path, corpus_tokens([[5, 6, 10**6]]))  # beyond the vocabulary
    with pytest.raises(AdaDecodeConfigError, match=r"adadecode 'corpus': .*token ids"):
        cfg(corpus=str(tmp_path))


def test_heads_folder_names_its_corpus_with_corpus_from(tiny_llama, tmp_path):
    """A heads folder without a corpus of its own may name one in its
    config.json ("corpus_from"), as the shipped Qwen2.5-Coder-1.5B heads name
    the 0.5B's; the ``corpus`` setting still wins, and a name that holds no
    corpus is refused at engine start. Heads stored in fp16 load as such."""
    from vllm_adadecode.config import resolve
    from vllm_adadecode.drafts.corpus import corpus_tokens, save_corpus
    from vllm_adadecode.heads import ExitHeads, base_model_fingerprint

    def cfg(**kw):
        return resolve({"method": "adadecode", **kw}, None, model_dir=tiny_llama,
                       num_hidden_layers=6, hidden_size=256)

    other, elsewhere = tmp_path / "other", tmp_path / "elsewhere"
    other.mkdir(), elsewhere.mkdir()
    save_corpus(other, corpus_tokens([[5, 6, 7, 8]]))
    heads_dir = tmp_path / "heads"
    g = torch.Generator().manual_seed(0)
    heads = ExitHeads({2: torch.eye(256) + 0.01 * torch.randn(256, 256, generator=g)},
                      hidden_size=256, base_model_fingerprint=base_model_fingerprint(tiny_llama),
                      metadata={"corpus_from": str(other)})
    heads.save(heads_dir, dtype=torch.float16)
    loaded = ExitHeads.load(heads_dir)
    assert loaded.transforms[2].dtype == torch.float16
    assert torch.allclose(loaded.transforms[2].float(), heads.transforms[2], atol=1e-3)
    assert cfg(heads=str(heads_dir)).corpus == str(other.resolve())
    save_corpus(elsewhere, corpus_tokens([[9, 10, 11]]))
    assert cfg(heads=str(heads_dir), corpus=str(elsewhere)).corpus == str(elsewhere.resolve())
    save_corpus(heads_dir, corpus_tokens([[12, 13, 14]]))  # its own corpus comes first
    assert cfg(heads=str(heads_dir)).corpus == str(heads_dir.resolve())
    (heads_dir / "corpus.safetensors").unlink()
    ExitHeads(loaded.transforms, hidden_size=256, base_model_fingerprint=loaded.base_model_fingerprint,
              metadata={"corpus_from": "no-such-shipped-folder"}).save(heads_dir)
    with pytest.raises(AdaDecodeConfigError, match=r"'corpus_from' \('no-such-shipped-folder'\)"):
        cfg(heads=str(heads_dir))
