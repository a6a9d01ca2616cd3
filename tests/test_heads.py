"""Heads folder format: save/load, safety, fingerprint (no engine)."""

import json

import pytest
import torch

from vllm_adadecode.config import AdaDecodeConfigError
from vllm_adadecode.heads import HEADS_FORMAT, WEIGHTS_FILE, ExitHeads, base_model_fingerprint


def _heads(d=8, layers=(1, 3)):
    g = torch.Generator().manual_seed(0)
    return ExitHeads(
        {x: torch.randn(d, d, generator=g) for x in layers},
        hidden_size=d,
        threshold=0.6,
        base_model_fingerprint="sha256:test",
    )


def test_save_load_bit_identical(tmp_path):
    h = _heads()
    h.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["format"] == HEADS_FORMAT
    assert cfg["exit_layers"] == [1, 3] and cfg["hidden_size"] == 8
    assert cfg["threshold"] == 0.6 and cfg["base_model_fingerprint"] == "sha256:test"
    back = ExitHeads.load(tmp_path)
    for x in (1, 3):
        assert torch.equal(back.transforms[x], h.transforms[x])


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    _heads().save(tmp_path)
    raw = (tmp_path / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "exit_heads.1.transform" in header
    assert not raw.startswith(b"\x80")  # no pickle protocol marker


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _rewrite(d, change):
    """Rewrite every transform of the weights file through ``change``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / WEIGHTS_FILE))
    save_file({k: change(v.clone()) if k.endswith(".transform") else v
               for k, v in tensors.items()}, str(d / WEIGHTS_FILE))


def _grow(path):
    """A file bigger than any heads folder of its shape can need (sparse:
    the size is checked before anything is read)."""
    from vllm_adadecode.heads import max_weights_bytes

    cfg = json.loads((path.parent / "config.json").read_text())
    with open(path, "r+b") as f:
        f.truncate(max_weights_bytes(cfg["hidden_size"], len(cfg["exit_layers"])) + 1)


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"format": "other"}'), "'format' must be"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"garbage" * 10), "corrupt"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), f"no {WEIGHTS_FILE}"),
        (lambda d: _truncate(d / WEIGHTS_FILE), "corrupt"),
        (lambda d: _rewrite(d, lambda t: t.fill_(float("nan"))), "NaN or Inf"),
        (lambda d: _rewrite(d, lambda t: t.fill_(float("inf"))), "NaN or Inf"),
        (lambda d: _rewrite(d, lambda t: t.to(torch.int32)), "dtype torch.int32"),
        (lambda d: _rewrite(d, lambda t: t.to(torch.float64)), "dtype torch.float64"),
        (lambda d: _rewrite(d, lambda t: t[:, :-1].contiguous()), "has shape"),
        (lambda d: _grow(d / WEIGHTS_FILE), "more than the"),
        (lambda d: _edit_config(d, hidden_size="8"), "'hidden_size' must be a positive integer"),
    ],
)
def test_damaged_folder_is_refused(tmp_path, damage, message):
    _heads().save(tmp_path)
    damage(tmp_path)
    with pytest.raises(AdaDecodeConfigError, match=message):
        ExitHeads.load(tmp_path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(AdaDecodeConfigError, match="does not exist"):
        ExitHeads.load(tmp_path / "nope")


def test_fingerprint_tracks_weights(tiny_llama, smollm2, tmp_path):
    a = base_model_fingerprint(tiny_llama)
    assert a == base_model_fingerprint(tiny_llama)
    assert a != base_model_fingerprint(smollm2)
    from tests.conftest import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", smollm2, seed=1)
    assert base_model_fingerprint(other) != a  # same architecture, other weights


def test_shortlist_round_trips_and_bad_shortlist_is_refused(tmp_path):
    h = _heads()
    h.shortlist = torch.tensor([3, 7, 11, 42])
    h.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["shortlist_size"] == 4
    back = ExitHeads.load(tmp_path)
    assert torch.equal(back.shortlist, h.shortlist) and back.shortlist.dtype == torch.int64
    bad = tmp_path / "bad"
    h.shortlist = None
    h.save(bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / WEIGHTS_FILE))
    tensors["exit_heads.shortlist"] = torch.rand(4)  # not token ids
    save_file(tensors, str(bad / WEIGHTS_FILE))
    with pytest.raises(AdaDecodeConfigError, match="1-D tensor of token ids"):
        ExitHeads.load(bad)


def test_heads_defaults_keeps_the_chosen_heads_and_sets_the_folders_defaults(tmp_path):
    """``heads-defaults`` rewrites a folder in place: only the chosen heads stay
    (same values, same storage dtype), the threshold and full_head_check become
    its defaults, the rest of its config is kept; a bad flag writes nothing."""
    from vllm_adadecode.cli import main

    h = _heads(layers=(1, 3, 5))
    h.shortlist = torch.tensor([3, 7, 11])
    h.metadata["training"] = {"tokens": 10}
    h.save(tmp_path, dtype=torch.float16)
    files = {p: p.read_bytes() for p in (tmp_path / WEIGHTS_FILE, tmp_path / "config.json")}
    with pytest.raises(SystemExit, match=r"--exit-layers must be a non-empty subset of the "
                                         r"folder's exit layers \[1, 3, 5\], got \[2\]"):
        main(["heads-defaults", "--heads", str(tmp_path), "--exit-layers", "2"])
    with pytest.raises(SystemExit, match=r"--threshold must be in \(0, 1\], got 1.5"):
        main(["heads-defaults", "--heads", str(tmp_path), "--exit-layers", "3",
              "--threshold", "1.5"])
    assert all(p.read_bytes() == b for p, b in files.items())

    main(["heads-defaults", "--heads", str(tmp_path), "--exit-layers", "3", "--threshold", "0.5",
          "--full-head-check", "false"])
    back = ExitHeads.load(tmp_path)
    assert back.exit_layers == [3] and back.threshold == 0.5
    assert back.transforms[3].dtype == torch.float16
    assert torch.equal(back.transforms[3], h.transforms[3].half())
    assert torch.equal(back.shortlist, h.shortlist)
    assert back.metadata["full_head_check"] is False and back.metadata["training"] == {"tokens": 10}
    assert back.metadata["defaults_command"].startswith("vllm-adadecode heads-defaults ")
    assert (tmp_path / WEIGHTS_FILE).stat().st_size < len(files[tmp_path / WEIGHTS_FILE]) / 2


def _design_heads(design, d=8, layers=(1, 3)):
    from vllm_adadecode.head_designs import DESIGNS

    g = torch.Generator().manual_seed(1)
    params = {x: {k: torch.randn(s, generator=g) for k, s in DESIGNS[design].shapes(d).items()}
              for x in layers}
    return ExitHeads({x: p.pop("transform") for x, p in params.items()}, hidden_size=d,
                     threshold=0.7, base_model_fingerprint="sha256:test", design=design,
                     extra=params)


@pytest.mark.parametrize("design", ["dxd", "mlp", "final_state", "attention"])
def test_every_design_saves_as_version_2_and_reloads_bit_identical(tmp_path, design):
    h = _design_heads(design)
    h.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["design"] == design
    back = ExitHeads.load(tmp_path)
    assert back.design == design
    for x in (1, 3):
        a, b = h.params(x), back.params(x)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_version_1_folder_loads_as_dxd(tmp_path):
    _heads().save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["format_version"] = 1
    del cfg["design"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = ExitHeads.load(tmp_path)
    assert back.design == "dxd" and back.exit_layers == [1, 3]
    assert all(torch.equal(back.transforms[x], _heads().transforms[x]) for x in (1, 3))


@pytest.mark.parametrize("edit, message", [
    ({"design": "medusa"}, r"'design' must be one of 'dxd', 'mlp', 'final_state', "
                           r"'attention', got 'medusa'"),
    ({"format_version": 3}, r"'format_version' must be one of 1, 2, got 3"),
])
def test_unknown_design_or_version_is_refused(tmp_path, edit, message):
    _heads().save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaDecodeConfigError, match=message):
        ExitHeads.load(tmp_path)


def test_design_tensors_missing_from_the_weights_are_refused(tmp_path):
    _heads().save(tmp_path)  # dxd tensors only
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["design"] = "mlp"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaDecodeConfigError, match=r"lacks tensor 'exit_heads.1.up'"):
        ExitHeads.load(tmp_path)


def test_design_that_is_not_a_name_is_refused(tmp_path):
    _heads().save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["design"] = ["dxd"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaDecodeConfigError, match=r"'design' must be one of .*got \['dxd'\]"):
        ExitHeads.load(tmp_path)


def test_frequency_shortlist_weighs_each_source_equally_and_keeps_ids():
    from vllm_adadecode.training.data import coverage, frequency_shortlist

    big = torch.tensor([5] * 1000 + [6] * 3)  # a long source
    small = torch.tensor([7, 7, 8])  # a short one counts as much
    assert frequency_shortlist([big, small], 2).tolist() == [5, 7]
    assert frequency_shortlist([big, small], 2, keep=torch.tensor([2])).tolist() == [2, 5, 7]
    assert frequency_shortlist([big, small], 99).tolist() == [5, 6, 7, 8]  # only ids seen
    assert coverage(torch.tensor([5, 6, 7, 9]), torch.tensor([5, 7])) == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        frequency_shortlist([torch.tensor([], dtype=torch.int64)], 4)
