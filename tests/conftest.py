"""Fixtures: a tiny model trained in a second on synthetic windows, and its bundles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetl.checkpoint import Checkpoint
from edgetl.config import ExportConfig, HeadConfig, NetConfig, TrainConfig
from edgetl.data.synthetic import make_windows
from edgetl.nets import build_model
from edgetl.train import Split, train_classifier

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "device_runners" / "run.py"
LABELS = ("slow", "medium", "fast")
CHANNELS = ("ax", "ay", "az")
WINDOW = 32

torch.set_num_threads(1)

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
                     show=False)
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
                       class_capacity=kw.pop("class_capacity", 0))
    export_bundle(ck, out, cfg, reference_x=x, calib_x=calib, eval_set=ev, **kw)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ck, tmp_path_factory) -> Path:
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="session")
def tiny_tflite_bundle(tiny_ck, tmp_path_factory) -> Path:
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfl") / "bundle", "tflite")


@pytest.fixture(scope="session")
def tiny_tflite_int8_bundle(tiny_ck, tmp_path_factory) -> Path:
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfl8") / "bundle", "tflite", "int8")


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
