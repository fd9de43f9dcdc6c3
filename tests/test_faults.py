"""Crash safety: the runner killed with SIGKILL at random moments, then resumed."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np

from .conftest import RUNNER, SHIFT, run_runner, write_device_npz


def _valid_head(path):
    with np.load(path, allow_pickle=False) as z:
        assert {"weight", "bias", "__meta__"} <= set(z.files)
        assert np.isfinite(z["weight"]).all() and z["weight"].shape[1] == 8
        return json.loads(str(z["__meta__"]))


def test_sigkill_at_random_moments_then_resume(tiny_bundle, tmp_path):
    data = write_device_npz(tmp_path / "d.npz", 200, seed=2, **SHIFT)
    args = ["adapt", str(tiny_bundle), "--data", str(data), "--epochs", "3000", "--threads", "1",
            "--patience", "0", "--checkpoint-every", "0", "--json", "--quiet"]
    ref = json.loads(run_runner(*args, "--out", tmp_path / "ref", check=True).stdout)
    out = tmp_path / "killed"
    run_runner(*args[:4], "--epochs", "3", "--out", out, check=True)
    _valid_head(out / "head.npz")  # the old, good head the kills must never lose

    rng, kills, resumed = random.Random(0), 0, 0
    for _ in range(40):
        if kills >= 22:
            break
        p = subprocess.Popen([sys.executable, str(RUNNER), *args, "--out", str(out), "--resume"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        _valid_head(out / "head.npz")  # old or complete new: never missing, never partial
        if (out / "train_state.npz").exists():
            with np.load(out / "train_state.npz", allow_pickle=False) as z:
                resumed = max(resumed, json.loads(str(z["__meta__"]))["epoch"])
    assert kills >= 20, kills
    assert resumed > 0  # some kills landed mid-training and left a resumable state

    final = json.loads(run_runner(*args, "--out", out, "--resume", check=True).stdout)
    assert final["epochs_run"] == ref["epochs_run"] == 3000
    assert abs(final["accuracy_after"] - ref["accuracy_after"]) < 1e-9
    with np.load(out / "head.npz") as a, np.load(tmp_path / "ref" / "head.npz") as b:
        for k in ("weight", "bias"):
            np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    assert not (out / "train_state.npz").exists()  # finished runs leave no state behind
