"""``--trainer ort-training``: ONNX Runtime training artifacts vs the stateless train step.

The artifacts are made and run in the separate ORT-training environment (``make venv-ort``;
``make test`` points ``EDGETL_ORT_TRAINING_PYTHON`` at it), as on a device that has only
``onnxruntime-training-cpu``.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgetl.config import HeadConfig
from edgetl.errors import MissingBackendError
from edgetl.export.ort_training import ort_python
from edgetl.manifest import Manifest

from .conftest import RUNNER, export_tiny, run_runner, tiny_checkpoint, write_device_npz

try:
    ORT_PY, NO_ENV = ort_python(), ""
except MissingBackendError as e:  # only outside `make test`, which creates the environment
    ORT_PY, NO_ENV = None, f"no ORT-training environment: {e}"

# A skip per test, not per module: `-m unit` then deselects these quietly.
pytestmark = [pytest.mark.env_ort, pytest.mark.skipif(ORT_PY is None, reason=NO_ENV)]


def _ort_runner(*args):
    return subprocess.run([ORT_PY, str(RUNNER), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ""})


@pytest.fixture(scope="module", params=["ort-sgd", "momentum"])
def ort_bundle(request, tmp_path_factory):
    """ORT's own SGD optimizer (momentum 0), or momentum/weight decay on ORT gradients."""
    head = (HeadConfig(lr=0.1, momentum=0.0, weight_decay=0.0) if request.param == "ort-sgd"
            else HeadConfig(lr=0.1, momentum=0.9, weight_decay=1e-3))
    ck = tiny_checkpoint(head=head)
    return export_tiny(ck, tmp_path_factory.mktemp("ort") / "bundle", trainer="ort-training")


def test_bundle_lists_the_artifacts_and_passes_the_ort_self_test(ort_bundle):
    m = Manifest.read(ort_bundle)
    m.verify(ort_bundle)
    ot = m.train_step["ort_training"]
    assert m.train_step["trainer"] == "ort-training"
    for role in ("training_model", "eval_model", "optimizer_model", "checkpoint"):
        assert (ort_bundle / m.files[ot[role]].path).is_file()
    assert "head_train" in m.files  # the stateless graph still ships
    assert m.checks["ort_training_train_max_abs_err"] < 1e-4  # replayed at export, in ORT
    assert m.checks["ort_training_runtime"] == "onnxruntime-training 1.19.2"


def test_same_loss_curve_as_the_stateless_path(ort_bundle, tmp_path):
    data = write_device_npz(tmp_path / "d.npz", 120, seed=2, gain=1.5, offset=0.5)
    common = ["--data", data, "--epochs", "12", "--json", "--quiet"]
    p = _ort_runner("adapt", ort_bundle, "--out", tmp_path / "ort", *common)
    assert p.returncode == 0, p.stderr
    ort = json.loads(p.stdout)
    ref = run_runner("adapt", ort_bundle, "--out", tmp_path / "sl", "--trainer", "stateless",
                     *common)
    assert ref.returncode == 0, ref.stderr
    sl = json.loads(ref.stdout)
    assert ort["trainer"] == "ort-training" and sl["trainer"] == "stateless"
    a = np.array([h["loss"] for h in ort["history"]])
    b = np.array([h["loss"] for h in sl["history"]])
    assert a[-1] < a[0]  # it learns
    np.testing.assert_allclose(a, b, atol=1e-4)
    with np.load(tmp_path / "ort" / "head.npz") as x, np.load(tmp_path / "sl" / "head.npz") as y:
        for k in ("weight", "bias"):
            np.testing.assert_allclose(x[k], y[k], atol=1e-4)


def test_ort_runner_process_stays_torch_free(ort_bundle, tmp_path):
    """(onnxruntime-training itself imports onnx; torch only via a package __init__ we skip.)"""
    data = write_device_npz(tmp_path / "d.npz", 60, seed=1)
    code = ("import sys, json; sys.path.insert(0, %r); import run; "
            "rc = run.main(['adapt', %r, '--data', %r, '--out', %r, '--quiet', '--epochs', '2']);"
            " print(json.dumps({'rc': rc, 'mods': sorted({m.split('.')[0] for m in sys.modules}"
            " & {'torch', 'edgetl'})}))") % (str(RUNNER.parent), str(ort_bundle),
                                                     str(data), str(tmp_path / "s"))
    p = subprocess.run([ORT_PY, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 0, "mods": []}


def test_plain_onnxruntime_says_what_to_install(ort_bundle, tmp_path):
    data = write_device_npz(tmp_path / "d.npz", 60, seed=1)
    p = run_runner("adapt", ort_bundle, "--data", data, "--out", tmp_path / "s")
    assert p.returncode == 1
    assert "pip install onnxruntime-training-cpu==1.19.2" in p.stderr
    assert "--trainer stateless" in p.stderr and not (tmp_path / "s" / "head.npz").exists()


def test_export_without_the_environment_explains_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGETL_ORT_TRAINING_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(MissingBackendError, match="make venv-ort"):
        export_tiny(tiny_checkpoint(epochs=1), tmp_path / "b", trainer="ort-training")
    assert not Path(tmp_path / "b").exists()
