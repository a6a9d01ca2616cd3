"""Packaged models from part packages: the parts are checked before they are
joined, a missing or damaged part is an error naming its package, and a build
that fails leaves nothing behind (no engine; part packages built here)."""

from __future__ import annotations

import sys

import pytest

from vllm_adadecode import models as M

PART = 4096


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Three part packages ``adadecode_test_part1..3`` on sys.path, and a
    packaged model made of them."""
    root = tmp_path / "site"
    payload = M.GGUF_MAGIC + (3).to_bytes(4, "little") + bytes(range(256)) * 40

    def write(i: int, data: bytes) -> None:
        pkg = root / f"adadecode_test_part{i}"
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)

    chunks = [payload[:PART], payload[PART:2 * PART], payload[2 * PART:]]
    for i, c in enumerate(chunks, start=1):
        write(i, c)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setitem(M.PACKAGED, "Test-Model", M.Packaged(
        "adadecode_test_part", "pip install adadecode-test-parts", parts=3,
        total_bytes=len(payload)))
    monkeypatch.setenv("ADADECODE_CACHE", str(tmp_path / "cache"))
    yield root, payload, write
    for i in range(1, 4):
        sys.modules.pop(f"adadecode_test_part{i}", None)


def test_parts_are_found_in_order_and_join_to_the_gguf(parts, tmp_path):
    _, payload, _ = parts
    files = M.model_parts("Test-Model")
    assert [f.name for f in files] == ["part01.bin", "part02.bin", "part03.bin"]
    out = tmp_path / "joined.gguf"
    M._join(files, out, quiet=True)
    assert out.read_bytes() == payload


def test_a_missing_part_names_its_package_and_how_to_install_it(parts):
    root, _, _ = parts
    import shutil

    shutil.rmtree(root / "adadecode_test_part2")
    with pytest.raises(M.PackagedModelError,
                       match=r"'adadecode-test-part2', which is not installed: pip install"):
        M.model_parts("Test-Model")


@pytest.mark.parametrize("damage, message", [
    ("short", r"part 2 of 'Test-Model' \(adadecode-test-part2\) holds 100 bytes"),
    ("total", r"hold [\d,]+ bytes, not [\d,]+: a part package is damaged"),
    ("header", r"part 1 of 'Test-Model' \(adadecode-test-part1\) does not start with a GGUF"),
])
def test_a_damaged_part_is_refused_before_joining(parts, damage, message):
    root, payload, write = parts
    if damage == "short":
        write(2, payload[PART:PART + 100])
    elif damage == "total":
        write(3, payload[2 * PART:] + b"x")
    else:
        write(1, b"NOPE" + payload[4:PART])
    with pytest.raises(M.PackagedModelError, match=message):
        M.model_parts("Test-Model")


def test_a_failed_build_leaves_no_folder(parts, tmp_path):
    """Parts that pass the checks but do not hold a model: the conversion
    fails, and neither the model folder nor a temporary one remains."""
    with pytest.raises(Exception):
        M.packaged_model_dir("Test-Model", quiet=True)
    models = tmp_path / "cache" / "models"
    assert not (models / "Test-Model").exists()
    assert list(models.iterdir()) == []


def test_unknown_model_lists_the_packaged_ones():
    with pytest.raises(ValueError, match=r"unknown packaged model 'Nope'.*Qwen2.5-Coder-0.5B"):
        M.packaged_model_dir("Nope")
