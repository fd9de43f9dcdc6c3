"""Reliability and security of the device runner, round two: hostile or broken inputs.

Every case ends with one ``error:`` line and exit 1 (or works), and leaves the previous good
head, report and bundle intact. The runner runs as a device runs it: a subprocess.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import SHIFT, run_runner, write_device_npz


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    return b


def _adapt(bundle, data, out, *extra):
    return run_runner("adapt", bundle, "--data", data, "--out", out, "--json", "--quiet",
                      "--epochs", "5", *extra)


def _good_state(bundle, tmp_path):
    """A state folder after one good adaptation, and the bytes of its files."""
    state = tmp_path / "state"
    p = _adapt(bundle, write_device_npz(tmp_path / "ok.npz", 120, seed=2, **SHIFT), state)
    assert p.returncode == 0, p.stderr
    return state, _snapshot(state)


def _snapshot(state: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(state.iterdir()) if f.is_file()}


def _refused(p, match: str) -> str:
    """Assert exit 1 with exactly one ``error:`` line matching ``match``; return it."""
    assert p.returncode == 1, (p.returncode, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert re.search(match, err[0]), err[0]
    return err[0]


def _rewrite_head(src: Path, dst: Path, **changes) -> Path:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(dst, **arrays)
    return dst


def _rehash(bundle: Path, role: str) -> None:
    """Make the manifest match a modified bundle file (as a careless exporter would)."""
    man = json.loads((bundle / "manifest.json").read_text())
    entry = man["files"][role]
    body = (bundle / entry["path"]).read_bytes()
    entry["sha256"], entry["bytes"] = hashlib.sha256(body).hexdigest(), len(body)
    (bundle / "manifest.json").write_text(json.dumps(man))


# -- item 6: non-finite heads -------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_head_is_refused_and_the_good_head_kept(bundle, tmp_path, bad):
    state, before = _good_state(bundle, tmp_path)
    with np.load(state / "head.npz") as z:
        w = np.full_like(z["weight"], bad)
    nan_head = _rewrite_head(state / "head.npz", tmp_path / "head_nan.npz", weight=w)
    data = tmp_path / "ok.npz"
    _refused(_adapt(bundle, data, state, "--head", nan_head, "--epochs", "0"),
             r"head_nan.npz: head parameter 'weight' holds \d+ non-finite value")
    assert _snapshot(state) == before  # no head.prev.npz, head.npz untouched
    _refused(run_runner("infer", bundle, "--data", data, "--head", nan_head),
             r"non-finite value")
    # the state's own head.npz damaged: refused as --head, and `update` does not keep it
    shutil.copy(nan_head, state / "head.npz")
    _refused(_adapt(bundle, data, state, "--head", state / "head.npz"), r"non-finite")


def test_a_non_finite_shipped_head_is_refused(bundle, tmp_path):
    with np.load(bundle / "head_init.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["bias"] = np.full_like(arrays["bias"], np.nan)
    np.savez(bundle / "head_init.npz", **arrays)
    _rehash(bundle, "head_init")
    _refused(run_runner("selftest", bundle), r"bundle file head_init.npz: head parameter "
             r"'bias' holds 3 non-finite")
    out = tmp_path / "s"
    _refused(_adapt(bundle, write_device_npz(tmp_path / "d.npz", 60, seed=1), out),
             r"non-finite")
    assert not (out / "head.npz").exists()


@pytest.mark.unit
def test_a_non_finite_head_is_never_written(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "device_runners"))
    from edgerun import RunnerError
    from edgerun.head import Head

    class _Bundle:
        manifest = {"files": {"backbone": {"sha256": "0" * 64}}}

    head = Head({"weight": np.full((3, 8), np.nan), "bias": np.zeros(3)}, ["a", "b", "c"])
    with pytest.raises(RunnerError, match="refusing to write .*'weight' holds 24 non-finite"):
        head.save(str(tmp_path / "head.npz"), _Bundle())
    assert list(tmp_path.iterdir()) == []  # not even a temp file


# -- item 8: numeric flags ----------------------------------------------------------------

BAD_NUMBERS = [("--max-seconds", "nan"), ("--max-seconds", "-1"), ("--max-memory-mb", "nan"),
               ("--max-memory-mb", "inf"), ("--checkpoint-every", "nan"),
               ("--checkpoint-every", "-1"), ("--max-data-mb", "nan"), ("--max-data-mb", "0"),
               ("--lr", "nan"), ("--lr", "inf"), ("--l2sp", "inf"), ("--val-fraction", "nan"),
               ("--seed", "-1"), ("--batch-size", "-1"), ("--batch-size", "0"),
               ("--epochs", "-1"), ("--threads", "-1")]


def test_numeric_flags_must_be_finite_and_in_range(bundle, tmp_path):
    state, before = _good_state(bundle, tmp_path)
    data = tmp_path / "ok.npz"
    for flag, value in BAD_NUMBERS:
        p = run_runner("adapt", bundle, "--data", data, "--out", state, "--quiet", flag, value)
        _refused(p, rf"^error: {flag} must be a finite number [<>]=? -?\d.*, got ")
        assert _snapshot(state) == before, flag
    _refused(run_runner("update", bundle, "--state", state, "--epochs", "-1"), r"--epochs")
    _refused(run_runner("bench", bundle, "--repeats", "0"), r"--repeats must be")
    _refused(run_runner("infer", bundle, "--data", data, "--threads", "-1"), r"--threads")
    assert _snapshot(state) == before
