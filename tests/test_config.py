"""The typed config loader: every error names the source, the key and what was expected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from polar_scaling.config import (
    ConfigError,
    check,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)


@dataclass
class Inner:
    lr: float = field(default=1e-3, metadata={"gt": 0})
    layers: int = field(default=2, metadata={"ge": 1, "le": 8})


@dataclass
class Outer:
    name: str = "run"
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    scale: float | None = None

    def __post_init__(self):
        check(self.name != "bad", "name", "must not be 'bad'")


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = write(tmp_path, "inner:\n  lr: 0.01\n  layers: 3\nsizes: [4]\n")
    cfg = load_config(Outer, path, ["inner.layers=5", "scale=2"], defaults={"name": "base"})
    assert cfg == Outer(name="base", inner=Inner(lr=0.01, layers=5), sizes=[4], scale=2.0)
    assert to_dict(cfg)["inner"] == {"lr": 0.01, "layers": 5}
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert "layers: 5" in dump_yaml(cfg)


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    # PyYAML reads 1e-3 as a string; the loader must still give a float.
    assert load_config(Outer, write(tmp_path, "inner:\n  lr: 1e-3\n")).inner.lr == 1e-3


def test_unknown_key_names_file_key_and_known_keys(tmp_path):
    path = write(tmp_path, "inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, path)
    msg = str(e.value)
    assert str(path) in msg and "inner.lrr" in msg and "unknown key" in msg and "lr" in msg


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, "inner:\n  layers: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, path)
    assert e.value.source == str(path) and e.value.key == "inner.layers"
    assert "expected an integer" in str(e.value) and "'two'" in str(e.value)
    with pytest.raises(ConfigError, match=r"sizes\[1\]: expected an integer"):
        load_config(Outer, write(tmp_path, "sizes: [1, x]\n"))
    with pytest.raises(ConfigError, match=r"mode: expected one of \['a', 'b'\], got 'c'"):
        load_config(Outer, write(tmp_path, "mode: c\n"))


def test_out_of_range_names_the_bound(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, write(tmp_path, "inner:\n  layers: 9\n"))
    assert e.value.key == "inner.layers" and "expected a value <= 8, got 9" in str(e.value)
    with pytest.raises(ConfigError, match=r"inner.lr: expected a value > 0, got 0.0"):
        load_config(Outer, None, ["inner.lr=0"])


def test_cross_field_check_names_file_and_key(tmp_path):
    path = write(tmp_path, "name: bad\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, path)
    assert str(e.value) == f"{path}: name: must not be 'bad'"


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, ["inner.layers=0"])
    assert e.value.source == "<override>" and e.value.key == "inner.layers"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Outer, None, ["inner.layers"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Outer, None, ["nope=1"])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "inner: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, path)
    assert str(path) in str(e.value) and "malformed YAML" in str(e.value)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: file not found"):
        load_config(Outer, missing)
    with pytest.raises(ConfigError, match="expected a mapping at top level, got list"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"))


def test_missing_required_key():
    @dataclass
    class Needs:
        path: str

    with pytest.raises(ConfigError, match="<config>: path: required key is missing"):
        from_dict(Needs, {})


@dataclass
class WithOptional:
    inner: Inner | None = None


def test_a_bad_key_inside_an_optional_section_is_named():
    assert from_dict(WithOptional, {"inner": None}).inner is None
    assert from_dict(WithOptional, {"inner": {"layers": 3}}).inner.layers == 3
    with pytest.raises(ConfigError, match=r"inner\.layers: expected a value <= 8"):
        from_dict(WithOptional, {"inner": {"layers": 9}})
    with pytest.raises(ConfigError, match=r"inner\.depth: unknown key"):
        from_dict(WithOptional, {"inner": {"depth": 9}})
    with pytest.raises(ConfigError, match=r"<config>: inner: expected a mapping, got str"):
        from_dict(WithOptional, {"inner": "x"})
