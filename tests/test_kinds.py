"""The recipe-kind registry and the one device loop's bookkeeping (no data, no runner)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from edgetl import inputs, kinds
from edgetl.errors import ConfigError
from edgetl.kinds import Device
from edgetl.pipeline import can_learn, device_totals

pytestmark = pytest.mark.unit


def test_every_bundle_input_kind_but_tensor_has_a_recipe_kind():
    # tensor: a user's own model (edgetl export MODEL) has no recipe data to load
    assert set(kinds.KINDS) == set(inputs.INPUT_KINDS) - {"tensor"}
    for name in kinds.KINDS:
        k = kinds.of(SimpleNamespace(data=SimpleNamespace(kind=name)))
        assert k.name == name and isinstance(k, kinds.RecipeKind)


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"'audio' is not a recipe input kind.*'image'"):
        kinds.of(SimpleNamespace(data=SimpleNamespace(kind="audio")))


def _bundle(labels, dynamic, rows):
    return {"labels": list(labels), "n_labels": len(labels), "dynamic_classes": dynamic,
            "class_rows": rows}


def test_a_bundle_holds_new_labels_only_where_its_head_has_room():
    dev = Device("cam 1/a", Path("a"), Path("e"), 10, 5, ("a", "x", "y"))
    assert can_learn(_bundle("ab", True, 2), dev) == (True, ["x", "y"])     # ONNX: grows
    assert can_learn(_bundle("ab", False, 4), dev) == (True, ["x", "y"])    # 2 spare rows
    assert can_learn(_bundle("ab", False, 3), dev) == (False, ["x", "y"])   # 1 spare row
    assert can_learn(_bundle("axy", False, 3), dev) == (True, [])           # nothing new
    assert dev.folder == "cam_1_a"


def _row(before, after, start="shipped", rb=False):
    return {"start": start, "before_accuracy": before, "after_accuracy": after,
            "gain": after - before, "adapted_accuracy": after, "adapted_gain": after - before,
            "rolled_back": rb, "feature_seconds": 1.0,
            "train_seconds": 0.5, "adapt_seconds": 1.5, "peak_rss_mb": 80.0}


def test_device_totals_count_better_worse_and_rolled_back_devices():
    t = device_totals([_row(0.8, 0.9), _row(0.9, 0.85), _row(0.7, 0.7, rb=True)])
    assert t["users_improved"] == 1 and t["users_worse"] == 1 and t["rolled_back"] == 1
    assert t["mean_gain"] == pytest.approx((0.1 - 0.05) / 3) and t["start"] == "shipped"
    assert device_totals([_row(0.5, 0.6), _row(0.5, 0.6, "imprinted")])["start"] == "mixed"


def test_the_oracle_keeps_the_better_head_per_device_and_never_loses():
    # a device the adapted head helps (0.8 -> 0.9), one it hurts (0.9 -> 0.6), one the gate
    # wrongly kept (after 0.6 = adapted): the oracle takes 0.9 and 0.9 and 0.9
    rows = [_row(0.8, 0.9), {**_row(0.9, 0.9), "adapted_accuracy": 0.6, "adapted_gain": -0.3},
            _row(0.9, 0.6)]
    t = device_totals(rows)
    assert t["oracle_mean_gain"] == pytest.approx(0.1 / 3)
    # error cut on the three devices below 95 %: 50 %, 0 %, 0 %
    assert t["oracle_error_cut_below_95"] == pytest.approx(0.5 / 3)
    assert t["error_cut_below_95"] == pytest.approx((0.5 + 0 - 3) / 3)
