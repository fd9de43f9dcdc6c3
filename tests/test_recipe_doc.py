"""docs/recipe.md is generated from the config dataclasses and documents every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgetl import config
from edgetl.errors import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_md_is_what_the_generator_writes():
    want = config.recipe_markdown()
    got = (ROOT / "docs" / "recipe.md").read_text()
    assert got == want, "docs/recipe.md is stale: run `make docs`"


def test_every_key_of_every_section_is_on_the_page():
    md = config.recipe_markdown()
    classes = [config.Recipe, config.DataConfig, config.FilesData, *config.DATA_KINDS.values()]
    classes += [type(f.default_factory()) for f in dataclasses.fields(config.Recipe)
                if f.default_factory is not dataclasses.MISSING]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no description"
            if cls is config.Recipe and f.default_factory is not dataclasses.MISSING:
                assert f"## `[{f.name}]`" in md, f"section [{f.name}] missing from the page"
            elif f.name != "kind" or cls is config.DataConfig:  # kind: the variants' headings
                assert f"| `{f.name}` |" in md, f"{cls.__name__}.{f.name} missing from the page"
    for kind in config.DATA_KINDS:
        assert f'`kind = "{kind}"`' in md


def test_a_key_without_a_description_fails_the_generator():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        x: int = 1

    with pytest.raises(ConfigError, match="Bare.x has no description"):
        config._table(Bare)


def test_dead_keys_are_gone(tmp_path):
    p = tmp_path / "r.toml"
    for text in ('[transfer]\nmethod = "l2sp"\n', '[data]\ndevice_dataset = "digits"\n'):
        p.write_text(text)
        with pytest.raises(ConfigError, match="unknown key"):
            config.load_recipe(p)
