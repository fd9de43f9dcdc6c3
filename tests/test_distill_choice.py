"""Distillation that never hurts: the student that ships is the better of the distilled one
and its from-scratch twin on the server-validation data, and the run says which and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgetl import kinds
from edgetl.checkpoint import load_checkpoint
from edgetl.config import load_recipe
from edgetl.kinds import base
from edgetl.train import TrainResult

from .test_own_data import write_log

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    write_log(tmp / "log.csv")
    text = (ROOT / "models/own-csv/recipe.toml").read_text()
    text = text.replace('path = "my-data/log.csv"', f'path = "{tmp / "log.csv"}"')
    text = text.replace("epochs = 10", "epochs = 2")
    (tmp / "r.toml").write_text(text)
    recipe = load_recipe(tmp / "r.toml")
    kind = kinds.of(recipe)
    sd = kind.load(recipe)
    teacher = kind.pretrain(recipe, tmp, sd, show=False)
    return recipe, kind, sd, teacher.path, tmp


def test_the_distilled_student_ships_when_it_is_not_worse(own, tmp_path, monkeypatch):
    recipe, kind, sd, teacher, _ = own
    res = kind.distill(recipe, teacher, tmp_path, sd, show=False)
    s, twin = res["student"], res["student_scratch"]
    if s.extra["shipped"] == "distilled":
        assert s.val_accuracy >= twin.val_accuracy and "distilled" in s.extra["why"]
        assert load_checkpoint(tmp_path / "student.pt").meta.get("distilled") is True
    else:  # the twin won here: then it must be the one in student.pt
        assert twin.val_accuracy > res["student_distilled"].val_accuracy


def test_a_distilled_student_worse_than_its_twin_is_not_shipped(own, tmp_path, monkeypatch):
    """A distillation that learned nothing (stubbed: the untrained student, val 0) loses."""
    recipe, kind, sd, teacher, _ = own

    def no_distill(teacher, student, train, val, cfg, kd, **kw):
        return TrainResult(student, [], 0.0, 0.0)

    monkeypatch.setattr(base, "distill", no_distill)
    res = kind.distill(recipe, teacher, tmp_path, sd, show=False)
    s = res["student"]
    assert s.extra["shipped"] == "from scratch" and "distillation would have hurt" in s.extra[
        "why"]
    assert res["student_distilled"].path == tmp_path / "student_distilled.pt"
    shipped = load_checkpoint(tmp_path / "student.pt")
    twin = load_checkpoint(tmp_path / "student_scratch.pt")
    assert shipped.meta["distilled"] is False and shipped.meta["shipped_over"] == "distilled"
    for k, v in twin.model.state_dict().items():
        assert torch.equal(v, shipped.model.state_dict()[k])
    assert (tmp_path / "student_distilled.pt").exists()
