"""Fixtures: a tiny model trained in a second on synthetic windows, and its bundles.

Also the test tiers (markers registered in ``pyproject.toml``): every test is in exactly one
of ``unit`` (``make test-quick``) and ``integration``; a test not marked ``unit`` is put in
``integration`` at collection. ``data``, ``env_ort``, ``env_fleet`` and ``slow`` say what a
test needs besides; a ``unit`` test needs none of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl.checkpoint import Checkpoint
from edgetl.config import ExportConfig, HeadConfig, NetConfig, TrainConfig
from edgetl.data.synthetic import make_windows
from edgetl.kinds.timeseries import augment
from edgetl.nets import build_model
from edgetl.train import Split, train_classifier

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "device_runners" / "run.py"
LABELS = ("slow", "medium", "fast")
CHANNELS = ("ax", "ay", "az")
WINDOW = 32

torch.set_num_threads(1)

#: The tiers; a test is in exactly one.
TIERS = ("unit", "integration")
#: What a test can need beyond the tier (a dataset, another virtualenv, a long run).
NEEDS = ("data", "env_ort", "env_fleet", "slow")


def tier_of(markers: set[str]) -> str:
    """The tier of a test carrying the markers named ``markers``: ``unit`` or ``integration``.

    A test marked with neither tier is ``integration``. Raises ``ValueError`` for a test marked
    with both tiers, or marked ``unit`` while needing a dataset, another environment or a long
    run.
    """
    tiers = sorted(markers & set(TIERS))
    if len(tiers) > 1:
        raise ValueError(f"marked with both tiers {tiers}; keep one")
    needs = sorted(markers & set(NEEDS))
    if tiers == ["unit"] and needs:
        raise ValueError(f"marked unit but needs {needs}; a unit test needs no dataset, other "
                         "environment or long run: drop the unit marker")
    return tiers[0] if tiers else "integration"


@pytest.hookimpl(tryfirst=True)  # before -m selects on the tier markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = {m.name for m in item.iter_markers()}
        try:
            tier = tier_of(names)
        except ValueError as e:
            raise pytest.UsageError(f"{item.nodeid}: {e}") from None
        if tier not in names:
            item.add_marker(tier)

#: An easy device shift of the synthetic windows (per-channel gain and offset).
SHIFT = {"gain": np.array([2.0, 0.5, 1.5]), "offset": np.array([1.0, -1.0, 0.5])}


def tiny_checkpoint(head: HeadConfig | None = None, epochs: int = 4) -> Checkpoint:
    """Conv 3->8 (k5), BN, ReLU, pool, linear 8->3 on (N, 32, 3) windows."""
    torch.manual_seed(0)
    head = head or HeadConfig(lr=0.1)
    net = NetConfig((8,), (5,), (1,), 0.0)
    model = build_model(3, 3, net, head)
    x, y = make_windows(300, window=WINDOW, seed=0)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    split = Split(((x - mean) / std).astype(np.float32), y)
    train_classifier(model, split, None, TrainConfig(epochs=epochs, batch_size=32, lr=0.02),
                     show=False, augment=augment)
    return Checkpoint(model, net, head, LABELS, CHANNELS, WINDOW, WINDOW // 2, 50.0,
                      mean, std, {"recipe": "tiny"})


@pytest.fixture(scope="session")
def tiny_ck() -> Checkpoint:
    return tiny_checkpoint()


def export_tiny(ck: Checkpoint, out: Path, target: str = "onnx", precision: str = "fp32",
                **kw) -> Path:
    """Export ``ck`` with synthetic reference, calibration and evaluation windows."""
    from edgetl.export import export_bundle

    x, _ = make_windows(64, window=WINDOW, seed=1)
    calib, _ = make_windows(128, window=WINDOW, seed=5)
    ev = make_windows(300, window=WINDOW, seed=6)
    cfg = ExportConfig(target=target, precision=precision, n_test_vectors=4, train_batch=16,
                       calibration_windows=128, max_accuracy_drop=kw.pop("max_drop", 5.0),
                       trainer=kw.pop("trainer", "stateless"),
                       class_capacity=kw.pop("class_capacity", 0),
                       trainable=kw.pop("trainable", "head"),
                       backbone_lr_scale=kw.pop("backbone_lr_scale", 1.0),
                       int8_io=kw.pop("int8_io", "int8"))  # the default is float32;
    # tests that edit quantization.input/output need the int8-I/O graph
    export_bundle(ck, out, cfg, reference_x=x, calib_x=calib, eval_set=ev, **kw)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ck, tmp_path_factory) -> Path:
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="session")
def int8_bundle(tiny_ck, tmp_path_factory) -> Path:
    """The tiny model's int8 ONNX bundle."""
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("int8") / "bundle", precision="int8")


#: Replay windows per class of :func:`replay_bundle`.
PER_CLASS = 24


@pytest.fixture(scope="session")
def replay_bundle(tiny_ck, tmp_path_factory) -> tuple[Path, tuple]:
    """The tiny model's bundle with a replay set (``PER_CLASS`` server windows per class,
    weight 1), and the server windows ``(x, y)`` it was picked from."""
    from edgetl.check import per_class
    from edgetl.config import AdaptConfig

    x, y = make_windows(400, window=WINDOW, seed=11)
    pick = per_class(y, 64)
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("replay") / "bundle",
                       adapt=AdaptConfig(replay_per_class=PER_CLASS, replay_weight=1.0),
                       replay=(x[pick], y[pick])), (x[pick], y[pick])


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    """A writable copy of :func:`tiny_bundle`, for tests that damage or sign it."""
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    return b


def refused(p: subprocess.CompletedProcess, match: str) -> str:
    """Assert exit 1 with exactly one ``error:`` line matching ``match``; return it."""
    import re

    assert p.returncode == 1, (p.returncode, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert re.search(match, err[0]), err[0]
    return err[0]


def adapt_json(bundle, data, out, *extra) -> subprocess.CompletedProcess:
    """``run.py adapt BUNDLE --data DATA --out OUT --json --quiet EXTRA`` (not checked)."""
    return run_runner("adapt", bundle, "--data", data, "--out", out, "--json", "--quiet",
                      *extra)


@pytest.fixture(scope="session")
def tiny_tflite_bundle(tiny_ck, tmp_path_factory) -> Path:
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfl") / "bundle", "tflite")


@pytest.fixture(scope="session")
def tiny_tflite_int8_bundle(tiny_ck, tmp_path_factory) -> Path:
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfl8") / "bundle", "tflite", "int8")


@pytest.fixture(scope="session")
def tiny_tflite_int8f_bundle(tiny_ck, tmp_path_factory) -> Path:
    """int8 TFLite backbone with float32 graph I/O (export.int8_io's default)."""
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfl8f") / "bundle", "tflite", "int8",
                       int8_io="float32")


def write_device_npz(path: Path, n: int, seed: int, gain=1.0, offset=0.0, labels=LABELS):
    x, y = make_windows(n, window=WINDOW, seed=seed, gain=gain, offset=offset)
    np.savez(path, x=x, y=np.array([labels[i] for i in y], dtype=str))
    return path


def run_runner(*args, check=False) -> subprocess.CompletedProcess:
    """Run the device runner in a subprocess, as a device would."""
    env = {**os.environ, "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True,
                       text=True, env=env, check=False)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def device_imports(statement: str, watched: set[str]) -> list[str]:
    """Top-level packages of ``watched`` loaded after running ``statement``.

    In a fresh process with ``device_runners`` on the path, as a device runs it.
    """
    import json

    code = ("import sys, json; sys.path.insert(0, %r); %s; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & %r)))"
            ) % (str(ROOT / "device_runners"), statement, set(watched))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def run_snippet(snippet: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a docs snippet in ``cwd`` with ``python`` and ``edgetl`` resolved to this venv."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir()
    for name, cmd in (("python", f'exec "{sys.executable}" "$@"'),
                      ("edgetl", f'exec "{sys.executable}" -m edgetl.cli "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{cmd}\n")
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "EDGETL_REPO": str(ROOT),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", "-e", "-c", snippet], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def node() -> str:
    """``node`` with the TypeScript runner (``device_runners/js``) installed and compiled."""
    from tests.jsrunner import build_js

    return build_js()


@pytest.fixture(scope="session")
def onnx_image_bundle(tmp_path_factory) -> Path:
    """The tiny ONNX image bundle of ``tests/test_vision.py`` (16x16 RGB, bilinear, 12x12 gray
    reference images), for the TypeScript runner's and the web page's tests."""
    from tests.test_vision import image_bundle_at

    return image_bundle_at(tmp_path_factory.mktemp("img-onnx") / "bundle", "onnx")
