"""Latent replay (``edgerun.replay``): the server's features train beside the device's windows.

The export ships the backbone's features of a class-stratified sample of server-training
windows; the runner mixes them into head training at the bundle's weight. Tested: the shipped
features are the runtime's own features of those windows, weight 0 is exactly the run without
replay, replay keeps a head right on the server's distribution where plain adaptation forgets
it, and a damaged replay file or a weight without a set is one clear error.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetl import gatelevel
from edgetl.check import per_class
from tests.conftest import (
    LABELS,
    PER_CLASS,
    ROOT,
    SHIFT,
    adapt_json,
    refused,
    run_runner,
    write_device_npz,
)
from tests.test_runner_errors import rehash

sys.path.insert(0, str(ROOT / "device_runners"))
from edgerun.backends import make_backend  # noqa: E402
from edgerun.bundle import Bundle  # noqa: E402
from edgerun.data import preprocess  # noqa: E402


@pytest.mark.unit
def test_per_class_picks_are_nested_and_stratified():
    y = np.repeat([0, 1, 2], [10, 3, 7])
    a, b = per_class(y, 2), per_class(y, 5)
    assert np.bincount(y[b]).tolist() == [5, 3, 5]
    # the first 2 of each class are the same pick for every k (a bundle takes a prefix)
    for c in range(3):
        assert list(a[y[a] == c]) == list(b[y[b] == c])[:2]


def test_the_replay_set_is_the_runtime_features_of_server_windows(replay_bundle):
    path, (x, y) = replay_bundle
    m = json.loads((path / "manifest.json").read_text())
    block = m["adapt"]["replay"]
    assert block["count"] == 3 * PER_CLASS and block["weight"] == 1.0
    assert block["per_class"] == block["min_per_class"] == PER_CLASS
    with np.load(path / m["files"]["replay"]["path"]) as z:
        feats, ids = z["features"], z["labels"]
    assert np.bincount(ids).tolist() == [PER_CLASS] * 3
    # the first PER_CLASS windows of each class, through the bundle's own backbone
    pick = np.concatenate([np.flatnonzero(y == c)[:PER_CLASS] for c in range(3)])
    assert np.array_equal(ids, y[pick])
    b = Bundle(str(path))
    want = make_backend(b).features(preprocess(x[pick].astype(np.float32), m))
    assert np.abs(feats - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_weight_zero_is_the_run_without_replay(replay_bundle, tiny_bundle, tmp_path):
    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, **SHIFT)
    off = json.loads(adapt_json(path, data, tmp_path / "a", "--replay-weight", "0",
                                "--no-gate").stdout)
    plain = json.loads(adapt_json(tiny_bundle, data, tmp_path / "b", "--no-gate").stdout)
    assert off["replay"]["weight"] == 0 and off["history"] == plain["history"]
    with np.load(tmp_path / "a" / "head.npz") as a, np.load(tmp_path / "b" / "head.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("weight", "bias"))


def test_replay_keeps_the_head_right_on_the_server_distribution(replay_bundle, tmp_path):
    """A strongly shifted device, trained without the gate at a high learning rate: the head
    trained with replay stays better on server-like windows than the one trained without, and
    both learn the device."""
    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, **SHIFT)
    server = write_device_npz(tmp_path / "s.npz", 300, seed=21)
    acc = {}
    for name, w in (("replay", "1"), ("plain", "0")):
        rep = json.loads(adapt_json(path, data, tmp_path / name, "--replay-weight", w,
                                    "--no-gate", "--lr", "0.5", "--mix", "1").stdout)
        out = run_runner("infer", path, "--data", server, "--head", tmp_path / name / "head.npz",
                         "--json", "--quiet")
        assert out.returncode == 0, out.stderr
        acc[name] = json.loads(out.stdout)["accuracy"]
        assert rep["accuracy_after"] >= 0.8, rep["accuracy_after"]
    assert acc["replay"] > acc["plain"] + 0.05, acc


#: Damaged replay files (name, arrays of replay.npz, the error they give).
BAD_REPLAY = (
    ("shape", {"features": np.zeros((5, 3), np.float32), "labels": np.zeros(5, int)},
     r"expected features \(R, 8\) and labels \(R,\), found \(5, 3\) and \(5,\)"),
    ("ids", {"features": np.zeros((5, 8), np.float32), "labels": np.full(5, 7)},
     r"label ids must be integers in \[0, 3\), found int64 in \[7, 7\]"),
    ("nan", {"features": np.full((5, 8), np.nan, np.float32),
             "labels": np.zeros(5, int)}, r"NaN or infinity"))


def damaged_replay(src: Path, dst: Path, arrays: dict) -> Path:
    """A copy of the bundle ``src`` at ``dst`` whose replay.npz holds ``arrays`` (rehashed)."""
    shutil.copytree(src, dst)
    np.savez(dst / "replay.npz", **arrays)
    rehash(dst, "replay")
    return dst


def test_bad_replay_files_and_flags_are_refused(replay_bundle, tiny_bundle, tmp_path):
    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 120, seed=3)
    refused(adapt_json(tiny_bundle, data, tmp_path / "a", "--replay-weight", "1"),
            r"needs a bundle that ships a replay set")
    refused(adapt_json(path, data, tmp_path / "a", "--replay-weight", "-1"),
            r"--replay-weight must be a finite number >= 0")
    for name, arrays, match in BAD_REPLAY:
        b = damaged_replay(path, tmp_path / name, arrays)
        err = refused(adapt_json(b, data, tmp_path / f"s-{name}"), match)
        assert "--replay-weight 0" in err
        assert not (tmp_path / f"s-{name}" / "head.npz").exists()  # nothing was written


def test_the_gate_refuses_a_head_that_forgets_the_server_data(replay_bundle, tmp_path):
    """A device whose labels mean something else than the server's (two swapped): the
    proposal wins locally by far but loses accuracy on the replay windows; at a bound below
    that loss the gate refuses it, saying why; without the check (negative bound) it is kept."""
    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, labels=LABELS[::-1])
    args = ("--mix", "1")
    free = json.loads(adapt_json(path, data, tmp_path / "a", *args, "--max-forget",
                                 "-1").stdout)
    g = free["gate"]
    assert g["keep"] and g["max_forget"] is None
    drop = 100 * (g["replay_before"] - g["replay_after"])
    assert drop > 1, g  # this adaptation forgets the server's windows
    assert free["replay"]["scored"] == 3 * PER_CLASS
    p = adapt_json(path, data, tmp_path / "b", *args, "--max-forget", f"{drop / 2:g}")
    g = json.loads(p.stdout)["gate"]
    assert not g["keep"] and "forgets the server's data" in g["reason"], g
    assert (tmp_path / "b" / "head.rejected.npz").exists()


@pytest.mark.unit
def test_the_level_and_replay_bound_are_chosen_together():
    def row(gain, p, before, after):
        return {"adapted_gain": gain, "gate": {"fixed": 5, "broke": 0, "p_value": p,
                                               "replay_before": before, "replay_after": after}}

    rows = [row(0.08, 0.004, 0.95, 0.93),   # helps, forgets 2 pt
            row(-0.19, 0.001, 0.95, 0.80),  # hurts, forgets 15 pt
            row(-0.03, 0.002, 0.95, 0.90)]  # hurts, forgets 5 pt
    assert gatelevel.choose_pair(rows) == (0.01, 2.0)
    assert gatelevel.kept(rows[1], 0.01) and not gatelevel.kept(rows[1], 0.01, 10.0)
    # no replay evidence: the bound is None and the level alone decides
    plain = [{"adapted_gain": 0.05, "gate": {"fixed": 5, "broke": 0, "p_value": 0.03}}]
    assert gatelevel.choose_pair(plain) == (0.05, None)


@pytest.mark.unit
def test_quantize_says_the_replay_features_stay_fp32():
    """``edgetl quantize`` copies replay.npz (features, not windows): the manifest says so."""
    from edgetl.quantize import _fp32_replay

    block = {"epochs": 3, "replay": {"weight": 0.0, "count": 6, "source": "server windows"}}
    out = _fp32_replay(block)
    assert out["replay"]["source"].endswith("the fp32 backbone's features")
    assert block["replay"]["source"] == "server windows" and _fp32_replay({"epochs": 3}) == {
        "epochs": 3}


def test_recalibrated_statistics_that_forget_the_server_data_are_refused(replay_bundle,
                                                                          tmp_path):
    """AdaBN bundles ship the replay windows themselves (float16, preprocessed): a device
    with a strong sensor shift gains by recalibrating, and the same statistics cost the
    server's windows; the gate keeps them without the check and refuses them, saying why,
    at a bound below that cost (bn_stats.rejected.npz; training uses the bundle's)."""
    path, (x, y) = replay_bundle
    m = json.loads((path / "manifest.json").read_text())
    assert m["adapt"]["replay"]["inputs"] == 3 * PER_CLASS
    with np.load(path / m["files"]["replay"]["path"]) as z:
        xs, ids = z["inputs"], z["input_labels"]
    pick = np.concatenate([np.flatnonzero(y == c)[:PER_CLASS] for c in range(3)])
    assert xs.dtype == np.float16 and np.array_equal(ids, y[pick])
    want = preprocess(x[pick].astype(np.float32), m)
    assert np.abs(xs.astype(np.float32) - want).max() <= 1e-3 * np.abs(want).max()

    lab = write_device_npz(tmp_path / "shift.npz", 300, seed=11, **SHIFT)
    np.savez(tmp_path / "x.npz", x=np.load(lab)["x"])

    def bn_gate(state, bound):
        p = run_runner("adapt", path, "--data", lab, "--unlabelled", tmp_path / "x.npz",
                       "--out", tmp_path / state, "--json", "--quiet", "--epochs", "1",
                       "--max-forget", bound)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["bn_stats_gate"]

    free = bn_gate("a", "-1")
    assert free["keep"] and free["max_forget"] is None, free
    drop = 100 * (free["replay_before"] - free["replay_after"])
    assert drop > 1, free  # statistics of the shifted sensor cost the server's windows
    g = bn_gate("b", f"{drop / 2:g}")
    assert not g["keep"] and "forgets the server's data" in g["reason"], g
    assert (tmp_path / "b" / "bn_stats.rejected.npz").is_file()
    assert not (tmp_path / "b" / "bn_stats.npz").exists()
