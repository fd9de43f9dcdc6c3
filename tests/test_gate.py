"""The adaptation gate: an adapted head replaces the current one only on evidence.

Unit: the exact one-sided McNemar test and its decisions (ties and insignificant gains keep the
current head; a clear gain is kept). Integration: the runner refuses an adapted head that is
only as good as the shipped one and keeps one that is clearly better, saying why in
``report.json["gate"]``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LABELS, ROOT, SHIFT, adapt_json, write_device_npz

sys.path.insert(0, str(ROOT / "device_runners"))
from edgerun import gate  # noqa: E402


@pytest.mark.unit
@pytest.mark.parametrize("n", [0, 1, 5, 17, 60])
def test_binomial_tail_is_the_exact_sum(n):
    for k in range(-1, n + 2):
        exact = sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2**n
        assert gate.binomial_tail(k, n) == pytest.approx(exact, rel=1e-12, abs=1e-300)


@pytest.mark.unit
def test_ties_and_equal_heads_keep_the_current_head():
    ok = np.array([True] * 40 + [False] * 2)
    v = gate.decide(ok, ok, alpha=0.5)
    assert not v["keep"] and v["fixed"] == v["broke"] == 0 and "tie" in v["reason"]
    # as many fixed as broken: no better, whatever the level
    new = ok.copy()
    new[[0, 1, 40, 41]] = [False, False, True, True]
    v = gate.decide(ok, new, alpha=1.0)
    assert not v["keep"] and (v["fixed"], v["broke"]) == (2, 2) and "no better" in v["reason"]


@pytest.mark.unit
def test_a_small_gain_is_noise_and_a_clear_gain_is_kept():
    cur = np.array([True] * 30 + [False] * 10)
    small = cur.copy()
    small[30:32] = True  # 2 fixed, 0 broke: p = 0.25
    v = gate.decide(cur, small, alpha=0.05)
    assert not v["keep"] and v["p_value"] == pytest.approx(0.25) and "not significant" in v[
        "reason"]
    clear = cur.copy()
    clear[30:40] = True
    clear[0] = False  # 10 fixed, 1 broke: p = 12 / 2048
    v = gate.decide(cur, clear, alpha=0.05)
    assert v["keep"] and v["p_value"] == pytest.approx(12 / 2048) and "better" in v["reason"]
    assert gate.decide(cur, clear, alpha=0.001)["keep"] is False
    assert gate.decide(cur, cur, alpha=0.05, rule="none")["keep"] is True


@pytest.mark.unit
def test_mixing_interpolates_between_the_heads():
    a = {"w": np.zeros((2, 3), np.float32)}
    b = {"w": np.full((2, 3), 4.0, np.float32)}
    assert np.all(gate.mix(a, b, 0.25)["w"] == 1.0) and np.all(gate.mix(a, b, 1.0)["w"] == 4.0)
    with pytest.raises(ValueError, match="unknown gate rule"):
        gate.decide([True], [True], alpha=0.1, rule="better")


def test_the_runner_keeps_the_shipped_head_when_adaptation_buys_nothing(bundle, tmp_path):
    """An adapted head exactly as good as the shipped one (lr 0: a tie) is refused; so is a
    small gain at a strict level."""
    data = write_device_npz(tmp_path / "d.npz", 120, seed=3)
    p = adapt_json(bundle, data, tmp_path / "s", "--lr", "0")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    g = rep["gate"]
    assert rep["rolled_back"] and not g["keep"] and "tie" in g["reason"]
    assert g["alpha"] == 0.05 and g["rule"] == "mcnemar"  # the bundle's adapt.gate
    assert json.loads((tmp_path / "s" / "report.json").read_text())["gate"] == g
    # the shipped head was written (nothing on the device before), the refused one kept aside
    with np.load(tmp_path / "s" / "head.npz") as z, np.load(bundle / "head_init.npz") as h:
        assert np.array_equal(z["weight"], h["weight"])
    assert (tmp_path / "s" / "head.rejected.npz").exists()
    # the same gain (9 fixed, 0 broken: p = 0.002) is refused at a level below its p-value
    p = adapt_json(bundle, data, tmp_path / "t", "--gate-alpha", "0.001")
    g = json.loads(p.stdout)["gate"]
    assert g["fixed"] > g["broke"] and g["p_value"] > 0.001 and not g["keep"], g


def test_the_runner_keeps_a_clearly_better_head(bundle, tmp_path):
    """A strong device shift (gain and offset per channel): the adapted head wins by far."""
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, **SHIFT)
    p = adapt_json(bundle, data, tmp_path / "s")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    g = rep["gate"]
    assert g["keep"] and not rep["rolled_back"], g
    assert g["fixed"] > g["broke"] and g["p_value"] <= 0.05
    assert rep["accuracy_after"] > rep["accuracy_before"]
    assert 0 < g["mix_weight"] <= 1 and 1 <= g["best_epoch"] <= rep["epochs"]
    # --no-gate keeps the adapted head even on data where it buys nothing
    p = adapt_json(bundle, write_device_npz(tmp_path / "e.npz", 120, seed=3), tmp_path / "t",
                   "--no-gate")
    assert json.loads(p.stdout)["gate"]["keep"] is True


def _row(before, adapted, fixed, broke, p):
    return {"before_accuracy": before, "adapted_accuracy": adapted,
            "adapted_gain": adapted - before,
            "gate": {"fixed": fixed, "broke": broke, "p_value": p}}


@pytest.mark.unit
def test_the_level_is_the_largest_gain_that_hurts_no_device():
    from edgetl import gatelevel

    rows = [_row(0.90, 0.98, 8, 0, 0.004),     # a real gain, strong evidence
            _row(0.90, 0.95, 3, 0, 0.125),     # a gain, weak evidence
            _row(1.00, 0.85, 2, 0, 0.25),      # looks better on validation, hurts later
            _row(0.95, 0.97, 0, 0, 1.0),       # tie: never kept
            {"gate": [{"fixed": 1}]}]          # a stream row: not part of the sweep
    table = gatelevel.sweep(rows, levels=(0.01, 0.2, 0.5))
    by = {t["alpha"]: t for t in table}
    assert by[0.01]["kept"] == 1 and by[0.01]["users_hurt"] == 0
    assert by[0.2]["kept"] == 2 and by[0.2]["mean_gain"] == pytest.approx((0.08 + 0.05) / 4)
    assert by[0.5]["kept"] == 3 and by[0.5]["users_hurt"] == 1
    assert by[None]["kept"] == 4 and by[None]["n"] == 4
    assert gatelevel.choose(table) == 0.2
    assert "| no gate | 4/4 |" in gatelevel.markdown(table)


@pytest.mark.unit
def test_protocol_files_cut_a_user_as_documented(tmp_path):
    from edgetl.data import hapt
    from edgetl.kinds.timeseries import STREAM_CHUNKS, write_device_files

    n = 40
    session = np.repeat([1, 2], n // 2)
    y = np.tile(np.repeat([0, 1], n // 4), 2)
    w = hapt.Windows(np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 4, 2)),
                     y, np.full(n, 7), session, np.arange(n), ("a", "b"), ("c0", "c1"))
    load = lambda p: np.load(p)["x"][:, 0, 0].astype(int).tolist()  # noqa: E731
    ad, ev = write_device_files(w, 7, tmp_path / "s")
    assert load(ad) == list(range(20)) and load(ev) == list(range(20, 40))
    ad, ev = write_device_files(w, 7, tmp_path / "w", protocol="within", gap=1)
    # first session only: per label the first half adapts, one overlapping window dropped
    assert load(ad) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert load(ev) == [6, 7, 8, 9, 16, 17, 18, 19]
    chunks = write_device_files(w, 7, tmp_path / "c", protocol="stream", gap=1)
    assert len(chunks) == STREAM_CHUNKS
    assert load(chunks[0]) == list(range(10)) and load(chunks[1]) == list(range(11, 20))


def test_the_odd_protocol_turns_only_the_adaptation_session(tmp_path):
    """``odd``: the first session's 3-axis sensors rotated alike (lengths kept, a real
    rotation), the later sessions as recorded; data without 3-axis triplets is refused."""
    from edgetl.data import hapt
    from edgetl.errors import ConfigError
    from edgetl.kinds.timeseries import ODD_ANGLE, write_device_files

    rng = np.random.default_rng(0)
    n = 12
    x = rng.normal(size=(n, 5, 6)).astype(np.float32)
    w = hapt.Windows(x, np.tile([0, 1], n // 2), np.full(n, 7), np.repeat([1, 2], n // 2),
                     np.arange(n), ("a", "b"), hapt.CHANNELS)
    ad, ev = write_device_files(w, 7, tmp_path / "o", protocol="odd")
    with np.load(ad) as a, np.load(ev) as e:
        xa, xe = a["x"], e["x"]
    assert np.array_equal(xe, x[6:])  # the later sessions untouched
    for k in (0, 3):  # acc and gyro: the same rotation, lengths kept
        before, after = x[:6, :, k : k + 3].reshape(-1, 3), xa[:, :, k : k + 3].reshape(-1, 3)
        np.testing.assert_allclose(np.linalg.norm(after, axis=1),
                                   np.linalg.norm(before, axis=1), rtol=1e-5)
        r, *_ = np.linalg.lstsq(before, after, rcond=None)
        np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-5)
        angle = np.degrees(np.arccos((np.trace(r) - 1) / 2))
        assert abs(angle - ODD_ANGLE) < 1e-3
    w2 = hapt.Windows(x[:, :, :4], w.y, w.user, w.session, w.start, w.labels, w.channels[:4])
    with pytest.raises(ConfigError, match="rotates 3-axis sensors"):
        write_device_files(w2, 7, tmp_path / "p", protocol="odd")


def test_the_fleet_publishes_an_aggregated_head_only_on_evidence(bundle, tmp_path):
    """The fleet's publication gate is the device's rule on data no device trained on: the
    shipped head itself (a tie) is not published; a clearly better head is."""
    from edgetl.fleet import publish_gate

    judge = write_device_npz(tmp_path / "judge.npz", 150, seed=11, **SHIFT)
    with np.load(bundle / "head_init.npz") as z:
        shipped = {k: z[k] for k in ("weight", "bias")}
    v = publish_gate(bundle, shipped, judge, tmp_path / "g1")
    assert not v["keep"] and "tie" in v["reason"] and v["alpha"] == 0.05
    p = adapt_json(bundle, write_device_npz(tmp_path / "d.npz", 160, seed=4, **SHIFT),
                   tmp_path / "s", "--no-gate")
    with np.load(tmp_path / "s" / "head.npz") as z:
        better = {k: z[k] for k in ("weight", "bias")}
    v = publish_gate(bundle, better, judge, tmp_path / "g2")
    assert v["keep"] and v["aggregated_accuracy"] > v["shipped_accuracy"], v
    assert p.returncode == 0


def test_absent_labels_keep_their_rows_when_asked(bundle, tmp_path):
    """--freeze-absent: the class row of a label the local data lacks stays the shipped one,
    the others train; without it, that row moves too."""
    full = write_device_npz(tmp_path / "full.npz", 240, seed=4, **SHIFT)
    with np.load(full) as z:
        keep = z["y"] != "fast"
        np.savez(tmp_path / "d.npz", x=z["x"][keep], y=z["y"][keep])
    data = tmp_path / "d.npz"
    with np.load(bundle / "head_init.npz") as z:
        w0, b0 = z["weight"], z["bias"]
    for flag, frozen in (("--freeze-absent", True), ("--no-freeze-absent", False)):
        p = adapt_json(bundle, data, tmp_path / flag, flag, "--no-gate")
        rep = json.loads(p.stdout)
        assert rep["freeze_absent"] is frozen and rep["missing_labels"] == ["fast"]
        with np.load(tmp_path / flag / "head.npz") as z:
            fast = rep["labels"].index("fast")
            same = bool(np.array_equal(z["weight"][fast], w0[fast]) and z["bias"][fast] == b0[fast])
            assert same is frozen
            assert not np.array_equal(z["weight"][0], w0[0])  # present labels trained


def test_imprinting_never_sees_the_gates_validation_windows(bundle, tmp_path):
    """New labels: the gate's baseline head is imprinted from the training windows only (the
    validation windows must be new to both heads it compares); a head written without
    training (--epochs 0, or a refused adaptation on an empty folder) is imprinted from every
    window."""
    full = write_device_npz(tmp_path / "full.npz", 150, seed=7,
                            labels=("slow", "medium", "jumping"))
    zero = json.loads(adapt_json(bundle, full, tmp_path / "zero", "--epochs", "0").stdout)
    tie = json.loads(adapt_json(bundle, full, tmp_path / "tie", "--lr", "0").stdout)
    assert zero["new_labels"] == tie["new_labels"] == ["jumping"]
    assert tie["rolled_back"] and "tie" in tie["gate"]["reason"]
    row = zero["labels"].index("jumping")
    tie_dir = tmp_path / "tie"
    with np.load(tmp_path / "zero" / "head.npz") as a, np.load(tie_dir / "head.npz") as b, \
            np.load(tie_dir / "head.rejected.npz") as c:
        assert np.array_equal(a["weight"], b["weight"])  # both: every window
        # the refused proposal (lr 0: the gate's baseline itself) was imprinted differently
        assert not np.allclose(c["weight"][row], b["weight"][row])
        assert np.array_equal(c["weight"][:row], b["weight"][:row])  # known labels untouched


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["block", "random"])
def test_evidence_folds_validate_each_window_once(mode):
    """Fold 1 is the run's own split; folds never share a validation window; block folds
    keep the neighbours of a validation block out of training (overlapping windows)."""
    from edgerun.data import stratified_folds, stratified_split

    y = np.array([0] * 23 + [1] * 11 + [0] * 7 + [2] * 3 + [3])
    folds = stratified_folds(y, 0.2, 7, mode, 5)
    assert len(folds) == 5
    first = stratified_split(y, 0.2, 7, mode)
    assert all(np.array_equal(a, b) for a, b in zip(folds[0], first))
    seen = np.concatenate([va for _, va in folds])
    assert len(seen) == len(set(seen.tolist()))
    for tr, va in folds:
        assert not set(tr.tolist()) & set(va.tolist())
        assert set(y[tr].tolist()) == set(y.tolist())  # every label trains
        if mode == "block":
            for c in np.unique(y):
                idx = np.flatnonzero(y == c).tolist()
                pos = [idx.index(i) for i in va if y[i] == c]
                for q in pos:  # a window next to a validation block is in neither set
                    for nb in (q - 1, q + 1):
                        if 0 <= nb < len(idx) and nb not in pos:
                            assert idx[nb] not in tr
    # 5 blocks of 20 % (6 of label 0's 30 windows) cover it
    assert (y[seen] == 0).sum() == 30


def test_the_gate_pools_evidence_over_folds(bundle, tmp_path):
    """The same small gain that one split cannot show (p = 0.002) is shown by 5 folds, each
    from its own training run; a tie stays a tie however many folds judge it."""
    data = write_device_npz(tmp_path / "d.npz", 120, seed=3)
    one = json.loads(adapt_json(bundle, data, tmp_path / "s1").stdout)["gate"]
    p = adapt_json(bundle, data, tmp_path / "s5", "--gate-folds", "5", "--gate-alpha", "0.001")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    g = rep["gate"]
    # blocks of the bundle's val_fraction that leave training windows: fewer than asked here
    assert one["folds"] == 1 and 2 <= g["folds"] <= 5 and len(g["fold_counts"]) == g["folds"]
    assert g["fold_counts"][0] == [one["fixed"], one["broke"]]  # fold 1: the run's own split
    assert [g["fixed"], g["broke"]] == np.sum(g["fold_counts"], axis=0).tolist()
    assert g["n"] > one["n"] and g["p_value"] < one["p_value"]
    assert g["keep"] == (g["fixed"] > g["broke"] and g["p_value"] <= 0.001), g
    assert g["keep"] and not rep["rolled_back"]
    assert f"cross-validated over {g['folds']} folds" in g["reason"]
    # the head written is the run's own (fold 1), as without folds
    with np.load(tmp_path / "s5" / "head.npz") as a, np.load(tmp_path / "s1" / "head.npz") as b:
        assert np.array_equal(a["weight"], b["weight"])
    tie = json.loads(adapt_json(bundle, data, tmp_path / "t", "--gate-folds", "5", "--lr",
                                "0").stdout)["gate"]
    assert not tie["keep"] and tie["fixed"] == tie["broke"] == 0 and "tie" in tie["reason"]
    bad = adapt_json(bundle, data, tmp_path / "u", "--gate-folds", "0")
    assert bad.returncode == 1
    assert "--gate-folds must be a finite number >= 1 and <= 20" in bad.stderr


class _TwoUsers:
    """A stand-in input kind: two server-validation users on the tiny bundle's sensor data,
    one whose data is shifted (adaptation pays), one like the server's (it buys nothing)."""

    name, protocols = "timeseries", ("sessions",)

    def check_users(self, recipe, sd):
        return (7, 8)

    def devices(self, recipe, out, sd, *, users=None, protocol="sessions"):
        from edgetl.kinds import Device

        out = Path(out) / "devices"
        out.mkdir(parents=True, exist_ok=True)
        devs = []
        for u, shift in zip(users, (SHIFT, {})):
            a = write_device_npz(out / f"{u}-adapt.npz", 160, seed=u, **shift)
            e = write_device_npz(out / f"{u}-eval.npz", 160, seed=100 + u, **shift)
            devs.append(Device(f"user_{u}", a, e, 160, 160, tuple(LABELS), user=u))
        return devs


def test_edgetl_run_calibrates_the_gate_on_server_validation_users(bundle, tmp_path):
    """With [adapt] calibrate_gate, the pair chosen on the validation users goes into the
    bundle's manifest (the runner reads it back) and into the recipe the devices run."""
    import dataclasses

    from edgetl.config import AdaptConfig, Recipe
    from edgetl.manifest import Manifest
    from edgetl.pipeline import bundle_row, calibrate_gate

    recipe = Recipe(adapt=AdaptConfig(epochs=10, calibrate_gate=True, gate_alpha=0.5))
    row = bundle_row(bundle, Manifest.read(bundle))
    assert calibrate_gate(dataclasses.replace(recipe, adapt=AdaptConfig(epochs=10)),
                          _TwoUsers(), None, [row], tmp_path, show=False) is None  # not asked
    new, info = calibrate_gate(recipe, _TwoUsers(), None, [row], tmp_path, show=False)
    assert info["users"] == [7, 8] and info["max_forget"] is None  # no replay set: no bound
    assert new.adapt.gate_alpha == info["alpha"] != 0.5
    kept = [t for t in info["levels"] if t["alpha"] == info["alpha"]][0]
    assert kept["users_hurt"] == 0 and kept["n"] == 2
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["adapt"]["gate"]["alpha"] == info["alpha"]
    assert "server-validation users 7, 8" in m["adapt"]["gate"]["chosen_on"]
    p = adapt_json(bundle, write_device_npz(tmp_path / "d.npz", 120, seed=3), tmp_path / "s")
    assert p.returncode == 0, p.stderr  # the runner accepts the rewritten manifest, hashes too
    assert json.loads(p.stdout)["gate"]["alpha"] == info["alpha"]


@pytest.mark.unit
def test_softmax_xent_is_the_mean_formula_bit_for_bit():
    """The per-epoch validation loss skips ``np.mean``'s call overhead, not its arithmetic:
    early stopping, the best epoch and the mixing weight compare these values exactly."""

    def reference(logits, y):  # the formula before (np.mean)
        z = logits - logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    rng = np.random.default_rng(0)
    for i in range(2000):
        n, k = int(rng.integers(1, 300)), int(rng.integers(2, 20))
        dtype = np.float32 if i % 4 else np.float64
        wide = rng.standard_normal((n, k + 3)) * rng.uniform(0.1, 30)
        logits = wide.astype(dtype)[:, :k]  # a strided view, as the runner's label columns
        y = rng.integers(0, k, n)
        assert gate.softmax_xent(logits, y) == reference(logits, y)


@pytest.mark.unit
def test_softmax_xent_epochs_gives_each_epochs_softmax_xent_bit_for_bit():
    """The whole-run path scores every epoch in one pass: the same floats as one call each."""
    from edgerun.gate import softmax_xent, softmax_xent_epochs

    for i in range(200):
        r = np.random.default_rng(i)
        e, n, k = int(r.integers(1, 25)), int(r.integers(1, 300)), int(r.integers(2, 12))
        cols = int(r.integers(2, k + 1))  # a view of the label rows, as the runner slices
        lg = (r.standard_normal((e, n, k)) * r.uniform(0.1, 30)).astype(np.float32)[..., :cols]
        y = r.integers(0, cols, n)
        assert softmax_xent_epochs(lg, y) == [softmax_xent(lg[j], y) for j in range(e)]
