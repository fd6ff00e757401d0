"""Typed configs: YAML + --set overrides; unknown or bad fields are errors that name them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from odyssey.config import apply_overrides, from_dict, load_config, to_dict
from odyssey.data.corpus import CorpusConfig
from odyssey.errors import ConfigError
from odyssey.model import ModelConfig, tiny
from train.config import DataConfig


@dataclass
class Inner:
    width: int = 4
    ratio: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    mode: Literal["fast", "safe"] = "safe"
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=list)
    limit: int | None = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  width: 8\nsizes: [1, 2]\n")
    cfg = load_config(Outer, path, ["inner.ratio=3e-4", "mode=fast", "limit=null"])
    assert cfg == Outer(name="run", mode="fast", inner=Inner(8, 3e-4), sizes=[1, 2], limit=None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.widht=3"], r"unknown field 'inner.widht'; did you mean 'inner.width'\?"),
        (["inner.width=four"], r"inner.width: expected an integer, got 'four'"),
        (["inner.width=4.5"], r"inner.width: expected an integer, got 4.5"),
        (["mode=quick"], r"mode: 'quick' .* is not one of 'fast', 'safe'"),
        (["sizes=[1, x]"], r"sizes\[1\]: expected an integer"),
        (["limit=true"], r"limit: expected an integer"),
        (["name"], r"not of the form key=value"),
        (["name.sub=1"], r"name: expected a string"),
    ],
)
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, tmp_path / "broken.yaml")


@dataclass
class WithPresets:
    model: ModelConfig = field(default_factory=tiny)
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig.from_preset("tiny"))


def test_presets_with_partial_overrides():
    cfg = from_dict(
        WithPresets, apply_overrides({"model": "small"}, ["model.n_layer=3", "corpus.max_docs.legal=5"])
    )
    assert cfg.model == ModelConfig.from_preset("small", n_layer=3)
    assert (
        cfg.corpus.max_docs["legal"] == 5 and cfg.corpus.max_docs["debian"] == 150
    )  # the rest of the preset stays
    with pytest.raises(ConfigError, match=r"model.preset: unknown model preset 'huge'"):
        from_dict(WithPresets, {"model": {"preset": "huge"}})
    with pytest.raises(ConfigError, match=r"model: d_model=130 is not divisible by n_head=4"):
        from_dict(WithPresets, {"model": {"d_model": 130}})
    with pytest.raises(ConfigError, match=r"model: head_dim = d_model / n_head = 25 must be even"):
        from_dict(WithPresets, {"model": {"d_model": 100}})
    with pytest.raises(ConfigError, match=r"mixture: unknown task 'translate'"):
        from_dict(DataConfig, {"mixture": {"translate": 1.0}})


@dataclass
class Start:
    from_: str | None = None  # a Python keyword: the field has a trailing underscore, configs spell it `from`


@dataclass
class WithKeyword:
    init: Start = field(default_factory=Start)


def test_a_keyword_field_is_spelled_without_its_underscore():
    cfg = load_config(WithKeyword, None, ["init.from=/ckpt"])
    assert cfg.init.from_ == "/ckpt" and to_dict(cfg) == {"init": {"from": "/ckpt"}}
    assert from_dict(WithKeyword, to_dict(cfg)) == cfg  # what workers rebuild from a resolved config
    with pytest.raises(ConfigError, match=r"init.from: expected a string, got 3"):
        load_config(WithKeyword, None, ["init.from=3"])
    with pytest.raises(ConfigError, match=r"unknown field 'init.from_'.*fields of Start: from\)"):
        load_config(WithKeyword, None, ["init.from_=/ckpt"])
