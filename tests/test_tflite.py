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
    assert m.target == "tflite" and set(m.files) == {"backbone", "head", "head_train_k",
                                                     "head_init", "test_vectors", "adabn"}
    assert m.input["batch_size"] == 1 and m.train_step["batch_size"] == 16
    assert m.train_step["signature"] == "train" and m.infer["signature"] == "infer"
    assert m.train_step["dynamic_classes"] is False and m.quantization == {}
    assert "momentum.weight" in m.train_step["inputs"]  # dotted names survive conversion
    q = Manifest.read(tiny_tflite_int8_bundle).quantization
    assert q["input"]["dtype"] == "int8" and q["input"]["scale"] > 0
    assert q["output"]["dtype"] == "int8" and q["calibration_windows"] == 128


@pytest.mark.parametrize("which", ["fp32", "int8", "int8f"])
def test_runner_adapts_a_tflite_bundle(which, tiny_tflite_bundle, tiny_tflite_int8_bundle,
                                       tiny_tflite_int8f_bundle, tmp_path):
    """Same command and report fields as ONNX; fixed batch is padded, not required."""
    b = {"fp32": tiny_tflite_bundle, "int8": tiny_tflite_int8_bundle,
         "int8f": tiny_tflite_int8f_bundle}[which]
    data = write_device_npz(tmp_path / "d.npz", 90, seed=2, gain=1.3, offset=0.4)
    p = run_runner("adapt", b, "--data", data, "--out", tmp_path / "s", "--json", "--quiet",
                   "--epochs", "8", "--batch-size", "10")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["backend"] == "ai-edge-litert" and r["precision"] == which[:4]
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


def _signature_io(path):
    """{signature: (input tensor indices, {output name: tensor index}, tensor types)}."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAs(path.read_bytes(), 0))
    out = {}
    for sd in m.signatureDefs:
        sg = m.subgraphs[sd.subgraphIndex]
        out[sd.signatureKey.decode()] = (
            {t.name.decode(): t.tensorIndex for t in sd.inputs},
            {t.name.decode(): t.tensorIndex for t in sd.outputs},
            {t.name.decode(): (sg.tensors[t.tensorIndex].type,
                               list(sg.tensors[t.tensorIndex].shape))
             for t in [*sd.inputs, *sd.outputs]})
    return out


@pytest.mark.parametrize("which", ["fp32", "int8", "int8f"])
def test_no_signature_output_is_an_input_tensor(which, tiny_tflite_bundle,
                                                tiny_tflite_int8_bundle,
                                                tiny_tflite_int8f_bundle):
    """LiteRT.js binds one buffer per signature tensor: an output aliased to an input (the
    linear head's ``embedding`` was its ``features``) left the logits reading garbage."""
    b = {"fp32": tiny_tflite_bundle, "int8": tiny_tflite_int8_bundle,
         "int8f": tiny_tflite_int8f_bundle}[which]
    m = Manifest.read(b)
    paths = {f.path for f in m.files.values() if f.path.endswith(".tflite")}
    assert {"backbone.tflite", "head.tflite"} <= paths
    for p in paths:
        for sig, (ins, outs, _) in _signature_io(b / p).items():
            shared = {o for o, i in outs.items() if i in set(ins.values())}
            assert not shared, f"{p} signature {sig}: outputs {shared} are input tensors"
    # the embedding a device imprints new labels with is still the linear head's features
    sess = device_session(b, m)
    f = np.random.default_rng(4).normal(size=(20, 8)).astype(np.float32)
    with np.load(b / m.files["head_init"].path) as z:
        out = sess.infer({"features": f, "weight": z["weight"], "bias": z["bias"]})
        np.testing.assert_array_equal(out["embedding"], f)
        np.testing.assert_allclose(out["logits"], f @ z["weight"].T + z["bias"], atol=1e-5)


def test_hparams_are_one_element_tensors_and_both_shapes_feed(tiny_tflite_bundle):
    """Scalars: the graph takes (1,) (manifest ``hparam_shape``); LiteRT.js wants exactly the
    graph's shape, ai-edge-litert on aarch64 must not resize to 0-d. The runner's 0-d values
    (reshaped to (1,)) and (1,) values give identical steps."""
    m = Manifest.read(tiny_tflite_bundle)
    assert m.train_step["hparam_shape"] == [1]
    _, _, types = _signature_io(tiny_tflite_bundle / "head.tflite")["train"]
    assert {k: types[k][1] for k in m.train_step["hparam_inputs"]} == {
        k: [1] for k in m.train_step["hparam_inputs"]}
    assert types["loss"][1] == []
    sess = device_session(tiny_tflite_bundle, m)
    rng = np.random.default_rng(5)
    with np.load(tiny_tflite_bundle / m.files["head_init"].path) as z:
        params = {k: z[k] for k in z.files}
    feeds = {"features": rng.normal(size=(16, 8)).astype(np.float32),
             "targets": np.eye(3, dtype=np.float32)[np.arange(16) % 3],
             "sample_weight": np.ones(16, np.float32), **params,
             **{f"momentum.{k}": np.zeros_like(v) for k, v in params.items()}}
    hp = m.optimizer["hparams"]
    a = sess.train_step({**feeds, **{k: np.float32(hp[k]) for k in m.train_step["hparam_inputs"]}})
    b = sess.train_step({**feeds, **{k: np.full(1, hp[k], np.float32)
                                     for k in m.train_step["hparam_inputs"]}})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_int8_backbone_with_float_io(tiny_tflite_int8_bundle, tiny_tflite_int8f_bundle,
                                     tmp_path):
    """export.int8_io = float32: the same int8 backbone, (de)quantised inside the graph."""
    m8, mf = Manifest.read(tiny_tflite_int8_bundle), Manifest.read(tiny_tflite_int8f_bundle)
    q = mf.quantization
    assert q["graph_io"] == "float32" and q["input"] is None and q["output"] is None
    assert q["in_graph"] == {"input": m8.quantization["input"],
                             "output": m8.quantization["output"]}
    assert mf.input["dtype"] == "float32"
    # the self-test tolerance still counts steps of the (in-graph) output scale
    assert mf.test_vectors["atol"] == m8.test_vectors["atol"]
    assert mf.checks["selftest_tolerance"] == m8.checks["selftest_tolerance"]
    (_, _, types), = _signature_io(tiny_tflite_int8f_bundle / "backbone.tflite").values()
    f32 = 0  # TensorType.FLOAT32
    assert {t for t, _ in types.values()} == {f32}
    ops = {n for n, _ in tflite.operator_codes(tiny_tflite_int8f_bundle / "backbone.tflite")}
    assert {"QUANTIZE", "DEQUANTIZE", "CONV_2D"} <= ops
    x, _ = make_windows(24, window=WINDOW, seed=12)
    x = x.astype(np.float32)
    got = device_session(tiny_tflite_int8f_bundle, mf).features(x)
    want = device_session(tiny_tflite_int8_bundle, m8).features(x)
    np.testing.assert_array_equal(got, want)  # the same arithmetic, moved into the graph
    assert run_runner("selftest", tiny_tflite_int8f_bundle).returncode == 0


@pytest.mark.unit
def test_int8_io_is_validated():
    from edgetl.config import ExportConfig

    with pytest.raises(ValueError, match=r"export.int8_io: expected one of \('int8', 'float32'\)"):
        ExportConfig(int8_io="fp16")


def test_pass_through_outputs_of_a_fixed_scale_cosine_head_are_distinct(tmp_path):
    """A frozen cosine ``scale`` is passed through the train step (``new.scale`` is the
    ``scale`` input, ``new.momentum.scale`` the momentum's): without the pass both outputs were
    input tensors; now they are copies with the same values."""
    from edgetl.export.tflite import TFLiteExporter, _runner
    from edgetl.export.tflite_passes import aliased_outputs
    from edgetl.head import HeadSpec

    TFLiteExporter().export_head(HeadSpec("cosine", 8, 3, learn_scale=False), "sgd", tmp_path,
                                 opset=17, batch=4)
    assert aliased_outputs(tmp_path / "head.tflite") == []
    for sig, (ins, outs, _) in _signature_io(tmp_path / "head.tflite").items():
        assert not set(outs.values()) & set(ins.values()), sig
    rng = np.random.default_rng(0)
    f32 = np.float32
    feeds = {"features": rng.normal(size=(4, 8)).astype(f32),
             "targets": np.eye(3, dtype=f32)[[0, 1, 2, 0]], "sample_weight": np.ones(4, f32),
             "lr": np.full(1, 0.1, f32), "momentum": np.full(1, 0.9, f32),
             "weight_decay": np.zeros(1, f32), "weight": rng.normal(size=(3, 8)).astype(f32),
             "bias": np.zeros(3, f32), "scale": np.full(1, 10.0, f32),
             "momentum.weight": np.zeros((3, 8), f32), "momentum.bias": np.zeros(3, f32),
             "momentum.scale": np.full(1, 0.5, f32)}
    out = _runner(tmp_path / "head.tflite", "train")(**feeds)
    assert out["new.scale"].tolist() == [10.0] and out["new.momentum.scale"].tolist() == [0.5]
