"""``edgetl check`` (the release gate) and ``edgetl quantize`` on tiny bundles."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgetl.check import accuracy, check_bundle, failures
from edgetl.checkpoint import save_checkpoint
from edgetl.data.synthetic import make_windows
from edgetl.errors import ConfigError, ToleranceError
from edgetl.manifest import Manifest
from edgetl.quantize import quantize_bundle

from .conftest import LABELS, WINDOW, tiny_checkpoint


@pytest.fixture(scope="module")
def ck_path(tiny_ck, tmp_path_factory):
    return save_checkpoint(tiny_ck, tmp_path_factory.mktemp("ck") / "student.pt")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetl.cli", "check", *map(str, args)],
                          capture_output=True, text=True)


def test_a_good_bundle_passes_every_check(tiny_bundle, ck_path):
    p = _cli(tiny_bundle, "--checkpoint", ck_path, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert res["ok"] and [c["name"] for c in res["checks"]] == [
        "integrity", "selftest", "smoke", "parity"]
    parity = res["checks"][3]
    assert parity["value"] <= parity["limit"] == 1e-4 and "20 train steps" in parity["detail"]


def test_tampered_or_escaping_bundle_fails_integrity_and_stops(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    with open(b / "head_init.npz", "ab") as f:
        f.write(b"\0")
    p = _cli(b, "--json")
    res = json.loads(p.stdout)
    assert p.returncode == 1 and not res["ok"]
    assert [c["name"] for c in res["checks"]] == ["integrity"]  # nothing else is trusted
    assert "modified" in res["checks"][0]["detail"]

    shutil.rmtree(b)
    shutil.copytree(tiny_bundle, b)
    raw = json.loads((b / "manifest.json").read_text())
    raw["files"]["head_init"]["path"] = "../head_init.npz"
    (b / "manifest.json").write_text(json.dumps(raw))
    (c,) = check_bundle(b)
    assert not c.ok and "outside the bundle" in c.detail


def test_parity_fails_against_another_model(tiny_bundle, tmp_path):
    other = save_checkpoint(tiny_checkpoint(epochs=1), tmp_path / "other.pt")
    p = _cli(tiny_bundle, "--checkpoint", other)
    assert p.returncode == 1
    assert "FAIL" in p.stdout and "parity" in p.stderr and "differs from PyTorch" in p.stdout


def test_accuracy_check_measures_the_drop_through_the_runner(tiny_bundle, ck_path, tmp_path):
    m = Manifest.read(tiny_bundle)
    x, y = make_windows(200, window=WINDOW, seed=7)
    names = np.array([LABELS[i] for i in y])
    c = accuracy(tiny_bundle, m, x, names, tmp_path, max_drop=1.0, checkpoint=ck_path,
                 reference_bundle=None)
    assert c.ok and abs(c.value) < 1e-9  # fp32: the same predictions as torch
    # a reference that is always right makes the same bundle fail by its error rate
    wrong = accuracy(tiny_bundle, m, x, names, tmp_path, max_drop=1.0, checkpoint=None,
                     reference_bundle=None)
    assert wrong.ok and "no fp32 reference" in wrong.detail
    m8 = Manifest(**{**m.__dict__, "precision": "int8"})
    refused = accuracy(tiny_bundle, m8, x, names, tmp_path, max_drop=1.0, checkpoint=None,
                       reference_bundle=None)
    assert not refused.ok and "needs a reference" in refused.detail


def test_quantize_an_fp32_onnx_bundle(tiny_bundle, tmp_path):
    x, _ = make_windows(128, window=WINDOW, seed=5)
    ev = make_windows(300, window=WINDOW, seed=6)
    out = tmp_path / "int8"
    m = quantize_bundle(tiny_bundle, out, calib_x=x, eval_set=ev, max_drop=5.0)
    assert m.precision == "int8" and m.quantization["per_channel"] is True
    assert m.quantization["calibration_windows"] == 128
    assert m.quantization["checked_with"].startswith("onnxruntime ")
    assert m.provenance["quantized_from"]["backbone_sha256"] == Manifest.read(
        tiny_bundle).files["backbone"].sha256
    import onnx

    g = onnx.load(str(out / "backbone.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in g.node}
    scales = {i.name: i for i in g.initializer}
    per_channel = [n for n in g.node if n.op_type == "DequantizeLinear"
                   and n.input[1] in scales and len(scales[n.input[1]].dims) == 1
                   and scales[n.input[1]].dims[0] > 1]
    assert per_channel  # conv weights carry one scale per output channel
    res = check_bundle(out, reference_bundle=tiny_bundle)
    assert not failures(res), res

    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ToleranceError):  # a failing gate leaves the existing bundle alone
        quantize_bundle(tiny_bundle, out, calib_x=x * 50, eval_set=ev, max_drop=0.0)
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(ConfigError, match="must differ"):
        quantize_bundle(tiny_bundle, tiny_bundle, calib_x=x, eval_set=ev)


def test_quantize_refuses_tflite_bundles(tiny_tflite_bundle, tmp_path):
    x, _ = make_windows(16, window=WINDOW, seed=5)
    with pytest.raises(ConfigError, match="takes an fp32 ONNX bundle"):
        quantize_bundle(tiny_tflite_bundle, tmp_path / "q", calib_x=x,
                        eval_set=make_windows(20, window=WINDOW, seed=6))


def test_check_verifies_the_signature_with_trust_key(tiny_bundle, tmp_path):
    """A garbage signature or one added space: exit 1 with --trust-key, as a device refuses."""
    import shutil
    import subprocess
    import sys

    def check(b, *extra):
        p = subprocess.run([sys.executable, "-m", "edgetl.cli", "check", str(b), "--json",
                            *map(str, extra)], capture_output=True, text=True)
        return p.returncode, json.loads(p.stdout)["checks"][0] if p.stdout else p.stderr

    keys = tmp_path / "keys"
    p = subprocess.run([sys.executable, "-m", "edgetl.cli", "keygen", "--out", str(keys)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    rc, first = check(b)
    assert rc == 0 and "unsigned" in first["detail"]
    p = subprocess.run([sys.executable, "-m", "edgetl.cli", "sign", str(b), "--key",
                        str(keys / "edgetl.key")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rc, first = check(b)
    assert rc == 0 and "NOT verified: pass --trust-key" in first["detail"]
    rc, first = check(b, "--trust-key", keys / "edgetl.pub")
    assert rc == 0 and "signature verified" in first["detail"]
    body = (b / "manifest.json").read_bytes()
    (b / "manifest.json").write_bytes(body.replace(b"{", b"{ ", 1))  # one added space
    rc, first = check(b, "--trust-key", keys / "edgetl.pub")
    assert rc == 1 and "does not verify" in first["detail"]
    (b / "manifest.json").write_bytes(body)
    (b / "manifest.sig").write_bytes(b"garbage")
    rc, first = check(b, "--trust-key", keys / "edgetl.pub")
    assert rc == 1 and "does not verify" in first["detail"]
