"""The settings table is the one definition: the README's table, the config
dataclass, from_dict and validation all follow it (no engine)."""

import re
from pathlib import Path

import pytest

from vllm_adadecode.config import ADADECODE_KEYS, AdaDecodeConfig
from vllm_adadecode.errors import AdaDecodeConfigError
from vllm_adadecode.settings import SETTINGS, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Settings"):]
    table = re.search(r"^\| key \|.*?(?=\n(?!\|))", section, re.S | re.M).group(0)
    assert table == markdown_table(), (
        "README's settings table differs from vllm_adadecode/settings.py; "
        "regenerate it with: python -m vllm_adadecode.settings")


def test_config_fields_and_defaults_come_from_the_table():
    cfg = AdaDecodeConfig(exit_layers=(2, 4))
    fields = list(cfg.to_dict())
    assert fields == [s.key for s in SETTINGS]
    for s in SETTINGS[1:]:
        assert getattr(cfg, s.key) == s.default, s.key
    assert set(ADADECODE_KEYS) == {s.key for s in SETTINGS} - {"num_speculative_tokens"}


def test_from_dict_round_trips_and_fills_defaults():
    cfg = AdaDecodeConfig(exit_layers=(3,), threshold=0.5, lookup=False,
                          disable_by_batch_size=None, lookup_max_tokens=2)
    assert AdaDecodeConfig.from_dict(cfg.to_dict()) == cfg
    assert AdaDecodeConfig.from_dict({"exit_layers": [3]}) == AdaDecodeConfig(exit_layers=(3,))


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.kind in ("bool", "int", "fraction")],
                         ids=lambda s: s.key)
def test_each_setting_validates_its_kind(setting):
    assert setting.validate(setting.default) == setting.default or setting.default is None
    bad = {"bool": "yes", "int": setting.low - 1, "fraction": 0}[setting.kind]
    with pytest.raises(AdaDecodeConfigError, match=rf"'{setting.key}' must be"):
        setting.validate(bad)
    if setting.kind != "bool":
        with pytest.raises(AdaDecodeConfigError, match=rf"'{setting.key}' must be"):
            setting.validate(True)  # a boolean is not a number here
