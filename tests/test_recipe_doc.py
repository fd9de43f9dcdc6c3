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


def test_a_recipe_that_is_not_a_regular_text_file_is_a_clear_error(tmp_path):
    """`--recipe /dev/zero` and a FIFO used to hang (issue 21, item 13); big or binary files."""
    import os

    from edgetl.config import MAX_RECIPE_BYTES, load_recipe

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_recipe(path)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_RECIPE_BYTES + 1))
    with pytest.raises(ConfigError, match="above the 1 MiB limit"):
        load_recipe(big)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_recipe(binary)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbfname = "with-bom"\n')
    assert load_recipe(bom).name == "with-bom"


def test_a_recipe_can_be_a_variant_of_another(tmp_path):
    """``base = "..."``: the base's values, this recipe's keys replacing them table by table;
    a loop, a missing base or a non-path base is a clear error."""
    from edgetl.config import load_recipe

    v = load_recipe(ROOT / "models" / "vision" / "trainable.toml")
    b = load_recipe(ROOT / "models" / "vision" / "recipe.toml")
    assert (v.export.trainable, v.export.backbone_lr_scale, v.head.lr, v.adapt.epochs) == (
        "last:1", 0.1, 0.1, 100)
    # everything the variant does not set is the base's, inside the tables it edits too
    assert (v.data, v.student, v.export.targets, v.head.momentum, v.adapt.val_fraction) == (
        b.data, b.student, b.export.targets, b.head.momentum, b.adapt.val_fraction)
    (tmp_path / "a.toml").write_text('base = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"loop .*\(a\.toml -> b\.toml -> a\.toml\)"):
        load_recipe(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="nowhere.toml does not exist"):
        load_recipe(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("base = 3\n")
    with pytest.raises(ConfigError, match="base must be a recipe path"):
        load_recipe(tmp_path / "d.toml")
    (tmp_path / "e.toml").write_text(f'base = "{ROOT}/models/har/recipe.toml"\n[head]\nlr = 0.2\n')
    e = load_recipe(tmp_path / "e.toml")
    assert e.head.lr == 0.2 and e.name == "har"


def test_the_recipes_on_device_optimizer_applies_at_export(tiny_ck, caplog):
    """``[head]`` optimizer settings are read at export (the server never trains with them):
    a variant's ``head.lr`` reaches a bundle exported from an existing checkpoint; the head's
    architecture stays the checkpoint's, with a warning when the recipe asks for another."""
    import copy
    import logging

    from edgetl.config import load_recipe
    from edgetl.stages import with_device_optimizer

    v = load_recipe(ROOT / "models" / "vision" / "trainable.toml")
    v = dataclasses.replace(v, head=dataclasses.replace(v.head, lr=0.25))
    ck = copy.copy(tiny_ck)
    with caplog.at_level(logging.INFO, logger="edgetl.stages"):
        got = with_device_optimizer(ck, v).head
    assert (got.lr, got.momentum, got.optimizer) == (v.head.lr, v.head.momentum, "sgd")
    assert "head.lr = 0.25" in caplog.text and "asks for a head" not in caplog.text
    other = dataclasses.replace(v, head=dataclasses.replace(v.head, kind="mlp", optimizer="adam"))
    got = with_device_optimizer(copy.copy(tiny_ck), other).head
    assert (got.kind, got.optimizer) == (tiny_ck.head.kind, "adam")
    assert "kind = mlp" in caplog.text and "retrain the student" in caplog.text
    assert tiny_ck.head.lr == 0.1  # the fixture itself is untouched
