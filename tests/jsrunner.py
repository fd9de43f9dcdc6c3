"""Helpers shared by the TypeScript runner's tests (``test_js_runner.py``, ``test_web.py``).

``build_js()`` installs ``device_runners/js`` (``npm ci`` when the lock file changed,
``ONNXRUNTIME_NODE_INSTALL=skip``) and compiles it; ``compare_*`` assert that a TypeScript
run (Node or the browser) agrees with the Python runner's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LABELS, ROOT, run_runner

JS = ROOT / "device_runners" / "js"
CLI = JS / "dist" / "cli.js"
HEAD_ATOL = 1e-5
LOSS_ATOL = 1e-5


def js_tools() -> tuple[str, str]:
    """``node`` and ``npm``, or skip saying they are missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the TypeScript runner's tests (Node >= 20: "
                    "apt-get install nodejs npm); not found on PATH")
    return node, npm


def build_js() -> str:
    """``node``, after ``npm ci`` (when the lock file changed) and ``tsc``."""
    node, npm = js_tools()
    lock = (JS / "package-lock.json").read_bytes()
    stamp = JS / "node_modules" / ".edgetl-lock-sha256"
    want = hashlib.sha256(lock).hexdigest()
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    if not stamp.is_file() or stamp.read_text() != want:
        p = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, env=env,
                           capture_output=True, text=True)
        assert p.returncode == 0, f"npm ci failed in {JS}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        stamp.write_text(want)
    tsc = str(JS / "node_modules" / "typescript" / "bin" / "tsc")
    for config in ("tsconfig.json", "tsconfig.examples.json"):  # the package; README's API
        p = subprocess.run([node, tsc, "-p", str(JS / config)], capture_output=True, text=True)
        assert p.returncode == 0, f"tsc --strict ({config}) failed:\n{p.stdout[-4000:]}"
    return node


def run_js(node: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([node, str(CLI), *map(str, args)], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, f"edgerun-js {args[0]} failed:\n{p.stderr[-3000:]}"
    return p


def node_eval(node: str, code: str) -> object:
    """Run an ES module snippet with the built package importable as ``E``; its JSON output."""
    src = f"import * as E from {json.dumps((JS / 'dist' / 'index.js').as_uri())};\n{code}"
    p = subprocess.run([node, "--input-type=module", "-e", src], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def csv_log(path: Path, seed: int, gain=1.0, offset=0.0, runs: int = 60) -> Path:
    """A sensor log: ``runs`` runs of 50 samples, three labels in two sessions (``gain``/``offset``:
    a device's sensor shift)."""
    from edgetl.data.synthetic import make_windows

    x, y = make_windows(runs, window=50, seed=seed, gain=gain, offset=offset)
    rows = ["ax,ay,az,label,session"]
    for i in range(len(x)):
        for s in x[i]:
            rows.append(",".join(f"{v:.5f}" for v in s) + f",{LABELS[y[i]]},s{i % 2}")
    path.write_text("\n".join(rows) + "\n")
    return path


def adapt_both(node, bundle, data, tmp: Path, flags: list, js_flags=()) -> tuple[Path, Path]:
    """``adapt`` with the same bundle, data and flags in the Python runner (into ``tmp/py``)
    and the TypeScript runner (``tmp/js``, plus ``js_flags``); both must succeed."""
    py, js = tmp / "py", tmp / "js"
    p = run_runner("adapt", bundle, "--data", data, "--out", py, "--quiet", *flags)
    assert p.returncode == 0, p.stderr
    run_js(node, "adapt", bundle, "--data", data, "--out", js, "--quiet", *js_flags, *flags)
    return py, js


def same_text(a, b) -> bool:
    """Equal, except 4-decimal losses (the runners' validation losses differ by ~1e-7: float32
    reductions in numpy, float64 in the TypeScript runner), which may differ by 1e-4."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_text(x, y) for x, y in zip(a, b))
    if not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    pat = r"\d+\.\d{4}(?!\d)"
    na, nb = re.findall(pat, a), re.findall(pat, b)
    return (re.sub(pat, "#", a) == re.sub(pat, "#", b) and len(na) == len(nb)
            and all(abs(float(x) - float(y)) <= 1.01e-4 for x, y in zip(na, nb)))


def compare_reports(P: dict, J: dict) -> float:
    """Assert two ``report.json`` agree (counts, labels, gate, history); the history's max
    abs difference."""
    for k in ("n_windows", "n_train", "n_val", "epochs", "batch_size", "steps", "steps_fused",
              "epochs_run",
              "rolled_back", "checkpoint_written", "labels", "new_labels", "missing_labels",
              "hparams", "class_balanced", "stopped_early", "accuracy_before",
              "accuracy_after", "replay"):
        assert P[k] == J[k], f"report[{k!r}]: python {P[k]!r}, js {J[k]!r}"
    for k in ("early_stop", "warnings"):  # they print a validation loss to 4 decimals
        assert same_text(P[k], J[k]), f"report[{k!r}]: python {P[k]!r}, js {J[k]!r}"
    gp, gj = P["gate"], J["gate"]
    assert set(gp) == set(gj), (sorted(gp), sorted(gj))
    for k in gp:
        if k in ("p_value", "val_loss_before", "val_loss_after"):
            assert abs(gp[k] - gj[k]) <= LOSS_ATOL, (k, gp[k], gj[k])
        elif k == "early_stop":
            assert same_text(gp[k], gj[k]), (gp[k], gj[k])
        else:
            assert gp[k] == gj[k], f"gate[{k!r}]: python {gp[k]!r}, js {gj[k]!r}"
    loss_err = 0.0
    for hp, hj in zip(P["history"], J["history"], strict=True):
        assert hp["epoch"] == hj["epoch"] and hp["complete"] == hj["complete"]
        for k in ("loss", "val_loss", "val_accuracy"):
            loss_err = max(loss_err, abs(hp[k] - hj[k]))
    assert loss_err <= LOSS_ATOL, loss_err
    return loss_err


def head_diff(a_path: Path, b_path: Path) -> float:
    """Max abs difference of two ``head.npz`` (same labels, parameters and shapes; float32)."""
    with np.load(a_path) as a, np.load(b_path) as b:
        assert sorted(a.files) == sorted(b.files)
        assert a["__labels__"].tolist() == b["__labels__"].tolist()
        err = 0.0
        for k in a.files:
            if not k.startswith("__"):
                assert a[k].shape == b[k].shape and b[k].dtype == np.float32, k
                err = max(err, float(np.abs(a[k] - b[k]).max()))
    return err


def split_of(bundle: Path, data: Path, py: Path, seed: int = 0) -> tuple:
    """The Python runner's train/validation split of ``data`` (labels as ``py``'s report)."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.bundle import Bundle
    from edgerun.data import load, split_mode, stratified_split

    m = Bundle(str(bundle)).manifest
    ds = load(str(data), m, need_labels=True)
    labels = json.loads((py / "report.json").read_text())["labels"]
    y = np.asarray([labels.index(v) for v in ds.y])
    return stratified_split(y, m["adapt"]["val_fraction"], seed, split_mode(m))


def compare(py: Path, js: Path, split: tuple) -> dict:
    """Assert the two runners' state folders agree; return the measured differences."""
    P = json.loads((py / "report.json").read_text())
    J = json.loads((js / "report.json").read_text())
    loss_err = compare_reports(P, J)
    assert [J["split"]["train"], J["split"]["val"]] == [split[0].tolist(), split[1].tolist()]
    head_err = 0.0
    for name in ("head.npz", "head.rejected.npz"):
        assert (py / name).exists() == (js / name).exists(), name
        if (py / name).exists():
            head_err = max(head_err, head_diff(py / name, js / name))
    assert (json.loads((py / "versions.json").read_text())
            == json.loads((js / "versions.json").read_text()))
    assert head_err <= HEAD_ATOL, f"heads differ by {head_err:.3g} (> {HEAD_ATOL})"
    return {"head_max_abs_diff": head_err, "history_max_abs_diff": loss_err}
