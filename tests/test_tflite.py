"""TFLite bundles: built-in ops only, parity with torch, int8 I/O contract, device runner."""

import json

import numpy as np
import pytest
import torch

from edgetl.data.synthetic import make_windows
from edgetl.errors import BundleError
from edgetl.export import tflite
from edgetl.export.bundle import device_session
from edgetl.manifest import Manifest

from .conftest import LABELS, WINDOW, run_runner, write_device_npz
from .test_runner_errors import rehash

#: Ops a stock LiteRT build must run; CUSTOM would mean a Flex or custom kernel.
FLEX_FREE = {"CUSTOM", "DELEGATE"}


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_every_op_is_a_builtin(which, tiny_tflite_bundle, tiny_tflite_int8_bundle):
    b = tiny_tflite_bundle if which == "fp32" else tiny_tflite_int8_bundle
    m = Manifest.read(b)
    for role in ("backbone", "head"):
        ops = tflite.operator_codes(b / m.files[role].path)
        assert ops, role
        assert all(custom is None and name not in FLEX_FREE for name, custom in ops), ops
    head_ops = {n for n, _ in tflite.operator_codes(b / m.files["head"].path)}
    assert {"FULLY_CONNECTED", "EXP", "LOG"} <= head_ops  # the softmax-CE gradient is in-graph
    bb_ops = {n for n, _ in tflite.operator_codes(b / m.files["backbone"].path)}
    assert "CONV_2D" in bb_ops


@pytest.mark.unit
def test_a_custom_op_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(tflite, "operator_codes",
                        lambda p: [("ADD", None), ("CUSTOM", "FlexRestoreV2")])
    with pytest.raises(BundleError, match=r"non-built-in ops \['CUSTOM:FlexRestoreV2'\]"):
        tflite.check_builtin_only(tmp_path / "m.tflite")


def test_fp32_features_match_torch(tiny_ck, tiny_tflite_bundle):
    """Fresh windows through LiteRT vs torch: max abs diff <= 1e-4 of the feature scale."""
    m = Manifest.read(tiny_tflite_bundle)
    sess = device_session(tiny_tflite_bundle, m)  # the device runner's LiteRT backend
    x, _ = make_windows(40, window=WINDOW, seed=11)
    xn = tiny_ck.normalize(x)
    with torch.no_grad():
        want = tiny_ck.model.backbone(torch.from_numpy(xn)).numpy()
    got = sess.features(xn)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_manifest_states_fixed_batches_and_int8_io(tiny_tflite_bundle, tiny_tflite_int8_bundle):
    m = Manifest.read(tiny_tflite_bundle)
    assert m.target == "tflite" and set(m.files) == {"backbone", "head", "head_init",
                                                     "test_vectors", "adabn"}
    assert m.input["batch_size"] == 1 and m.train_step["batch_size"] == 16
    assert m.train_step["signature"] == "train" and m.infer["signature"] == "infer"
    assert m.train_step["dynamic_classes"] is False and m.quantization == {}
    assert "momentum.weight" in m.train_step["inputs"]  # dotted names survive conversion
    q = Manifest.read(tiny_tflite_int8_bundle).quantization
    assert q["input"]["dtype"] == "int8" and q["input"]["scale"] > 0
    assert q["output"]["dtype"] == "int8" and q["calibration_windows"] == 128


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_runner_adapts_a_tflite_bundle(which, tiny_tflite_bundle, tiny_tflite_int8_bundle,
                                       tmp_path):
    """Same command and report fields as ONNX; fixed batch is padded, not required."""
    b = tiny_tflite_bundle if which == "fp32" else tiny_tflite_int8_bundle
    data = write_device_npz(tmp_path / "d.npz", 90, seed=2, gain=1.3, offset=0.4)
    p = run_runner("adapt", b, "--data", data, "--out", tmp_path / "s", "--json", "--quiet",
                   "--epochs", "8", "--batch-size", "10")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["backend"] == "ai-edge-litert" and r["precision"] == which
    assert r["batch_size"] == 16 and any("fixed batch of 16" in w for w in r["warnings"])
    assert r["selftest_max_abs_err"] <= Manifest.read(b).test_vectors["atol"]
    assert np.isfinite(r["history"][-1]["loss"]) and (tmp_path / "s" / "head.npz").exists()


def test_runner_refuses_new_labels_on_a_fixed_class_head(tiny_tflite_bundle, tmp_path):
    data = write_device_npz(tmp_path / "d.npz", 60, seed=3,
                            labels=(LABELS[0], LABELS[1], "cycling"))
    p = run_runner("adapt", tiny_tflite_bundle, "--data", data, "--out", tmp_path / "s")
    assert p.returncode == 1
    assert "fixed number of class rows (3, 3 in use)" in p.stderr
    assert "class_capacity" in p.stderr and "onnx" in p.stderr
    assert not (tmp_path / "s" / "head.npz").exists()


def test_spare_class_rows_let_a_tflite_head_learn_new_labels(tiny_ck, tmp_path):
    """export.class_capacity: spare rows (bias -1e4) are filled by imprinting on the device."""
    from .conftest import export_tiny

    b = export_tiny(tiny_ck, tmp_path / "cap", "tflite", class_capacity=5)
    m = Manifest.read(b)
    assert m.head["capacity"] == 5 and m.head["params"][0]["shape"] == [5, 8]
    assert m.checks["train_step_max_abs_err"] < 1e-4  # parity holds with spare rows
    assert m.test_vectors["atol"] < 0.01  # spare logits (-1e4) do not loosen the self-test
    assert m.test_vectors["train_atol"] < 0.01  # nor the spare biases the train steps
    assert run_runner("selftest", b).returncode == 0
    # a train step off by 0.01 on a label in use fails the self-test; the spare rows (-1e4)
    # are compared relatively, so a float32 step there (0.001) would not
    tv = b / m.files["test_vectors"].path
    with np.load(tv) as z:
        good = {k: z[k] for k in z.files}
    for row, delta, ok in ((0, 0.01, False), (4, 0.001, True)):
        bad = {**good, "train_final.bias": good["train_final.bias"].copy()}
        bad["train_final.bias"][row] += delta
        np.savez(tv, **bad)
        rehash(b, "test_vectors")
        p = run_runner("selftest", b)
        assert (p.returncode == 0) is ok, (row, p.stderr)
    np.savez(tv, **good)
    rehash(b, "test_vectors")
    data = write_device_npz(tmp_path / "d.npz", 90, seed=3,
                            labels=(LABELS[0], LABELS[1], "cycling"))
    p = run_runner("adapt", b, "--data", data, "--out", tmp_path / "s", "--json", "--quiet",
                   "--epochs", "5")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["new_labels"] == ["cycling"] and r["labels"][-1] == "cycling"
    with np.load(tmp_path / "s" / "head.npz") as z:
        assert z["weight"].shape == (5, 8) and z["bias"][4] < -1e3  # one spare row left
    inf = json.loads(run_runner("infer", b, "--data", data, "--head", tmp_path / "s" /
                                "head.npz", "--json", "--quiet").stdout)
    assert set(inf["predictions"]) <= {LABELS[0], LABELS[1], LABELS[2], "cycling"}
    three = write_device_npz(tmp_path / "t.npz", 90, seed=3, labels=("a", "b", "c"))
    p = run_runner("adapt", b, "--data", three, "--out", tmp_path / "s3")
    assert p.returncode == 1 and "class rows (5, 3 in use)" in p.stderr


def test_int8_relu6_network_keeps_its_features(tmp_path):
    """conv -> BN -> ReLU6 (EfficientNet's block) quantised with PT2E stays close to fp32."""
    from torch import nn

    from edgetl.export.tflite import TFLiteExporter, _io_quant, _runner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32),
                        nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():  # BN statistics that make the pre-clip range much wider than [0, 6]
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(2.0, 6.0)
    net.eval()
    calib = np.random.default_rng(0).normal(size=(64, 3, 16, 16)).astype(np.float32)
    ex = TFLiteExporter()
    ex.export_backbone(net, torch.from_numpy(calib[:2]), tmp_path / "b.tflite", opset=17,
                       precision="int8", calib=calib)
    run = _runner(tmp_path / "b.tflite", None)
    (name, d_in), = run.get_input_details().items()
    qi, qo = _io_quant(d_in), _io_quant(next(iter(run.get_output_details().values())))
    x = np.random.default_rng(1).normal(size=(32, 3, 16, 16)).astype(np.float32)
    xq = np.clip(np.round(x / qi["scale"]) + qi["zero_point"], -128, 127).astype(np.int8)
    got = np.concatenate([(next(iter(run(**{name: xq[i : i + 1]}).values())).astype(np.float32)
                           - qo["zero_point"]) * qo["scale"] for i in range(len(x))])
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.mean() > 0.98, cos.mean()
