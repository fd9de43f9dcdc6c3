"""AdaBN on the device (issue 19 item 3): the runner's BatchNorm statistics vs torch's.

The oracle is torch itself (``edgetl.export.adabn.torch_running_stats``): every BN reset,
``momentum=None``, BN layers in train mode, windows in consecutive chunks of 256. The runner
must reproduce each running mean and variance within ``1e-4 * max(1, max|torch|)`` (the fp32
parity tolerance of both targets) and the features computed with them within the same bound.
The model has two conv blocks, so the second BN's statistics depend on the first's batch
normalisation; 300 windows make two chunks (256 + 44), so the chunk weighting counts.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import (
    CHANNELS,
    LABELS,
    ROOT,
    SHIFT,
    WINDOW,
    export_tiny,
    run_runner,
    write_device_npz,
)

sys.path.insert(0, str(ROOT / "device_runners"))
from edgerun import adabn as dev  # noqa: E402
from edgerun.bundle import Bundle  # noqa: E402

from edgetl.checkpoint import Checkpoint  # noqa: E402
from edgetl.config import HeadConfig, NetConfig, TrainConfig  # noqa: E402
from edgetl.data.synthetic import make_windows  # noqa: E402
from edgetl.export.adabn import bn_layers, torch_features_with, torch_running_stats  # noqa: E402
from edgetl.nets import build_model  # noqa: E402
from edgetl.train import Split, train_classifier  # noqa: E402

ATOL = 1e-4


def two_bn_checkpoint() -> Checkpoint:
    """Two conv blocks (conv, BN, ReLU; the first max-pooled) on (N, 32, 3) windows."""
    torch.manual_seed(0)
    net, head = NetConfig((8, 6), (5, 3), (2, 1), 0.2), HeadConfig(lr=0.1)
    model = build_model(3, 3, net, head)
    x, y = make_windows(300, window=WINDOW, seed=0)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    train_classifier(model, Split(((x - mean) / std).astype(np.float32), y), None,
                     TrainConfig(epochs=2, batch_size=32, lr=0.02), show=False)
    return Checkpoint(model, net, head, LABELS, CHANNELS, WINDOW, WINDOW // 2, 50.0,
                      mean, std, {"recipe": "tiny2bn"})


@pytest.fixture(scope="module")
def ck2():
    return two_bn_checkpoint()


@pytest.fixture(scope="module", params=["onnx", "tflite"])
def bn_bundle(request, ck2, tmp_path_factory):
    return request.param, export_tiny(ck2, tmp_path_factory.mktemp("bn") / request.param,
                                      request.param)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """300 shifted windows without labels (two chunks of the statistics pass)."""
    d = tmp_path_factory.mktemp("unl")
    write_device_npz(d / "lab.npz", 300, seed=11, **SHIFT)
    x = np.load(d / "lab.npz")["x"]
    np.savez(d / "unl.npz", x=x)
    return d / "unl.npz", d / "lab.npz", x


def _norm(ck: Checkpoint, x: np.ndarray) -> np.ndarray:
    return ck.normalize(x).astype(np.float32)


def test_runner_stats_match_torch(bn_bundle, ck2, unlabelled, tmp_path):
    target, bundle = bn_bundle
    unl, _, x = unlabelled
    p = run_runner("recalibrate", bundle, "--data", unl, "--out", tmp_path, "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["n_windows"] == 300 and rep["chunks"] == 2 and rep["layers"] == 2
    with np.load(tmp_path / "bn_stats.npz") as z:
        got = {k: z[k] for k in z.files}
    assert json.loads(str(got.pop("__meta__")))["backbone_sha256"] == json.loads(
        (bundle / "manifest.json").read_text())["files"]["backbone"]["sha256"]
    ref = torch_running_stats(ck2.model.backbone, _norm(ck2, x))
    assert len(ref) == len(bn_layers(ck2.model.backbone)) == 2
    for i, (mean, var) in enumerate(ref):
        for name, want in ((f"mean_{i}", mean), (f"var_{i}", var)):
            tol = ATOL * max(1.0, float(np.abs(want).max()))
            assert np.abs(got[name] - want).max() <= tol, (target, name)
    # the statistics really moved: the windows are shifted from the source data
    shipped = ck2.model.backbone.blocks[1].running_mean.numpy()
    assert np.abs(got["mean_0"] - shipped).max() > 10 * ATOL


def test_features_with_recalibrated_stats_match_torch(bn_bundle, ck2, unlabelled, tmp_path):
    target, bundle = bn_bundle
    unl, lab, x = unlabelled
    assert run_runner("recalibrate", bundle, "--data", unl, "--out", tmp_path,
                      "--quiet").returncode == 0
    b = Bundle(str(bundle))
    stats, _ = dev.load_stats(str(tmp_path / "bn_stats.npz"), b.manifest)
    xn = _norm(ck2, x[:40])
    got = dev.Graphs(b).features(xn, stats)
    pairs = [(stats[f"mean_{i}"], stats[f"var_{i}"]) for i in range(2)]
    want = torch_features_with(ck2.model.backbone, pairs, xn)
    assert np.abs(got - want).max() <= ATOL * max(1.0, float(np.abs(want).max())), target
    # infer and adapt use them; the feature cache never mixes statistics
    p = run_runner("infer", bundle, "--data", lab, "--bn-stats", tmp_path / "bn_stats.npz",
                   "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bn_stats"].endswith("bn_stats.npz")
    p = run_runner("adapt", bundle, "--data", lab, "--out", tmp_path, "--json", "--quiet",
                   "--epochs", "1")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["bn_stats"].endswith("bn_stats.npz") and not rep["features_cached"]
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "features", plain / "features")  # same data, no statistics
    p = run_runner("adapt", bundle, "--data", lab, "--out", plain, "--json", "--quiet",
                   "--epochs", "1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bn_stats"] is None
    assert not json.loads(p.stdout)["features_cached"]


def test_selftest_covers_adabn(bn_bundle):
    _, bundle = bn_bundle
    p = run_runner("selftest", bundle, "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["adabn_max_abs_err"] <= ATOL


def test_adapt_unlabelled_and_csv_without_labels(tiny_bundle, unlabelled, tmp_path):
    unl, lab, x = unlabelled
    p = run_runner("adapt", tiny_bundle, "--data", lab, "--unlabelled", unl, "--out",
                   tmp_path / "s", "--json", "--quiet", "--epochs", "1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bn_stats_gate"]["keep"]  # shifted: the statistics help
    assert (tmp_path / "s" / "bn_stats.npz").is_file()
    assert json.loads(p.stdout)["bn_stats"].endswith("bn_stats.npz")
    csv = tmp_path / "log.csv"
    rows = x[:20].reshape(-1, 3)
    csv.write_text("ax,ay,az\n" + "\n".join(",".join(f"{v:.5f}" for v in r) for r in rows))
    p = run_runner("recalibrate", tiny_bundle, "--data", csv, "--out", tmp_path / "c",
                   "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_windows"] > 2


def _refused(p, *words):
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_int8_refuses_with_reason(tiny_ck, tmp_path, unlabelled):
    b = export_tiny(tiny_ck, tmp_path / "b8", "onnx", "int8")
    m = json.loads((b / "manifest.json").read_text())
    assert "int8" in m["adabn"]["unsupported"] and "stats" not in m["adabn"]
    _refused(run_runner("recalibrate", b, "--data", unlabelled[0], "--out", tmp_path / "s"),
             "int8", "folded")
    assert not (tmp_path / "s" / "bn_stats.npz").exists()


def test_bundle_without_batchnorm(tiny_ck, tmp_path, unlabelled):
    ck = copy.copy(tiny_ck)
    ck.model = copy.deepcopy(tiny_ck.model)
    ck.model.backbone.blocks[1] = nn.Identity()  # the tiny model's only BN
    b = export_tiny(ck, tmp_path / "nobn", max_drop=100.0)
    m = json.loads((b / "manifest.json").read_text())
    assert m["adabn"]["layers"] == [] and "adabn_stats" not in m["files"]
    _refused(run_runner("recalibrate", b, "--data", unlabelled[0], "--out", tmp_path / "s"),
             "no BatchNorm layers")


def test_older_bundle_without_block(bundle, unlabelled, tmp_path):
    mpath = bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["adabn"]
    mpath.write_text(json.dumps(m))  # still a valid manifest (the block is optional)
    _refused(run_runner("recalibrate", bundle, "--data", unlabelled[0], "--out", tmp_path),
             "re-export")
    assert run_runner("selftest", bundle, "--quiet").returncode == 0


@pytest.mark.parametrize("damage,words", [
    ("nan", ["NaN or inf"]), ("shape", ["shape"]), ("negative", ["negative variance"]),
    ("backbone", ["another backbone"]), ("garbage", ["not a readable .npz"]),
])
def test_bad_stats_refused(tiny_bundle, unlabelled, tmp_path, damage, words):
    unl, lab, _ = unlabelled
    state = tmp_path / "s"
    assert run_runner("recalibrate", tiny_bundle, "--data", unl, "--out", state,
                      "--quiet").returncode == 0
    path = state / "bn_stats.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    if damage == "nan":
        arrays["mean_0"][0] = np.nan
    elif damage == "shape":
        arrays["var_0"] = arrays["var_0"][:-1]
    elif damage == "negative":
        arrays["var_0"][1] = -1.0
    elif damage == "backbone":
        meta["backbone_sha256"] = "0" * 64
    if damage == "garbage":
        path.write_bytes(b"not an npz")
    else:
        dev.save_stats(str(path), arrays, {k: v for k, v in meta.items() if k != "format"})
    _refused(run_runner("infer", tiny_bundle, "--data", lab, "--bn-stats", path), *words)
    if damage != "backbone":  # adapt ignores another backbone's statistics with a warning
        _refused(run_runner("adapt", tiny_bundle, "--data", lab, "--out", state), *words)
        assert not (state / "head.npz").exists()


def test_other_backbone_stats_ignored_by_adapt(tiny_bundle, unlabelled, tmp_path):
    unl, lab, _ = unlabelled
    assert run_runner("recalibrate", tiny_bundle, "--data", unl, "--out", tmp_path,
                      "--quiet").returncode == 0
    path = tmp_path / "bn_stats.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    meta.update(backbone_sha256="0" * 64)
    meta.pop("format")
    dev.save_stats(str(path), arrays, meta)
    p = run_runner("adapt", tiny_bundle, "--data", lab, "--out", tmp_path, "--json", "--quiet",
                   "--epochs", "1")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["bn_stats"] is None
    assert any("another backbone" in w for w in rep["warnings"])


def test_the_gate_judges_recalibrated_statistics_when_labels_exist(tiny_bundle, tmp_path):
    """With labels, adapt keeps recalibrated BN statistics only on evidence: a strong sensor
    shift (they fix 24 validation windows, break none) keeps them; data like the server's
    (2 fixed: noise) sets them aside as bn_stats.rejected.npz and trains on the bundle's."""
    for name, kw, keep in (("shift", SHIFT, True), ("plain", {}, False)):
        lab = write_device_npz(tmp_path / f"{name}.npz", 300, seed=11, **kw)
        np.savez(tmp_path / f"{name}-x.npz", x=np.load(lab)["x"])
        state = tmp_path / f"s-{name}"
        p = run_runner("adapt", tiny_bundle, "--data", lab, "--unlabelled",
                       tmp_path / f"{name}-x.npz", "--out", state, "--json", "--quiet",
                       "--epochs", "1")
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        g = rep["bn_stats_gate"]
        assert g["keep"] is keep and g["n"] > 0, g
        assert (state / "bn_stats.npz").is_file() is keep
        assert (state / "bn_stats.rejected.npz").is_file() is not keep
        assert (rep["bn_stats"] is not None) is keep
        if not keep:
            assert any("refused by the gate" in w for w in rep["warnings"])
