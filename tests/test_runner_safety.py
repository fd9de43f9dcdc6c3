"""Reliability and security of the device runner, round two: hostile or broken inputs.

Every case ends with one ``error:`` line and exit 1 (or works), and leaves the previous good
head, report and bundle intact. The runner runs as a device runs it: a subprocess.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import SHIFT, adapt_json, refused, run_runner, write_device_npz


def _adapt(bundle, data, out, *extra):
    return adapt_json(bundle, data, out, "--epochs", "5", *extra)


def _good_state(bundle, tmp_path):
    """A state folder after one good adaptation, and the bytes of its files."""
    state = tmp_path / "state"
    p = _adapt(bundle, write_device_npz(tmp_path / "ok.npz", 120, seed=2, **SHIFT), state)
    assert p.returncode == 0, p.stderr
    return state, _snapshot(state)


def _snapshot(state: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(state.iterdir()) if f.is_file()}




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
    refused(_adapt(bundle, data, state, "--head", nan_head, "--epochs", "0"),
             r"head_nan.npz: head parameter 'weight' holds \d+ non-finite value")
    assert _snapshot(state) == before  # no head.prev.npz, head.npz untouched
    refused(run_runner("infer", bundle, "--data", data, "--head", nan_head),
             r"non-finite value")
    # the state's own head.npz damaged: refused as --head, and `update` does not keep it
    shutil.copy(nan_head, state / "head.npz")
    refused(_adapt(bundle, data, state, "--head", state / "head.npz"), r"non-finite")


def test_a_non_finite_shipped_head_isrefused(bundle, tmp_path):
    with np.load(bundle / "head_init.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["bias"] = np.full_like(arrays["bias"], np.nan)
    np.savez(bundle / "head_init.npz", **arrays)
    _rehash(bundle, "head_init")
    refused(run_runner("selftest", bundle), r"bundle file head_init.npz: head parameter "
             r"'bias' holds 3 non-finite")
    out = tmp_path / "s"
    refused(_adapt(bundle, write_device_npz(tmp_path / "d.npz", 60, seed=1), out),
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
        refused(p, rf"^error: {flag} must be a finite number [<>]=? -?\d.*, got ")
        assert _snapshot(state) == before, flag
    refused(run_runner("update", bundle, "--state", state, "--epochs", "-1"), r"--epochs")
    refused(run_runner("bench", bundle, "--repeats", "0"), r"--repeats must be")
    refused(run_runner("infer", bundle, "--data", data, "--threads", "-1"), r"--threads")
    assert _snapshot(state) == before


# -- item 8: zip bombs, object arrays, corrupt archives -----------------------------------


def _zip_bomb(path: Path, mib: int = 400) -> Path:
    """A deflated ``x.npy`` of zeros: ~``mib`` KiB on disk, ``mib`` MiB once unpacked."""
    import zipfile

    per = 16 * 3 * 4  # (N, 16, 3) float32 windows
    n = (mib << 20) // per
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array_header_1_0(
                m, {"descr": "<f4", "fortran_order": False, "shape": (n, 16, 3)})
            left, chunk = n * per, bytes(1 << 20)
            while left:
                m.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def test_max_data_mb_applies_to_the_declared_uncompressed_size(bundle, tmp_path):
    state, before = _good_state(bundle, tmp_path)
    bomb = _zip_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 1 << 20  # under a MiB on disk
    refused(_adapt(bundle, bomb, state, "--max-data-mb", "100"),
             r"bomb.npz declares 400.0 MiB uncompressed, above the 100 MiB limit; raise "
             r"--max-data-mb")
    assert _snapshot(state) == before


@pytest.mark.parametrize("case,match", [
    ("object_y", r"array 'y' holds Python objects \(dtype object\), which cannot be read "
                 r"without pickle"),
    ("object_x", r"array 'x' holds Python objects"),
    ("truncated", r"is not a readable .npz file \(corrupt or truncated"),
    ("bitflip", r"is not a readable .npz file \(corrupt or truncated"),
    ("not_npy", r"member 'notes.txt' is not a numpy array"),
])
def test_object_and_corrupt_npz_are_clean_errors(bundle, tmp_path, case, match):
    import zipfile

    state, before = _good_state(bundle, tmp_path)
    good = write_device_npz(tmp_path / "g.npz", 60, seed=3)
    data = tmp_path / "bad.npz"
    with np.load(good) as z:
        x, y = z["x"], z["y"]
    if case == "object_y":
        np.savez(data, x=x, y=np.array(list(y), dtype=object))
    elif case == "object_x":
        np.savez(data, x=np.array([None] * len(x), dtype=object), y=y)
    elif case == "truncated":
        data.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "bitflip":
        np.savez_compressed(data, x=np.random.default_rng(0).normal(size=x.shape), y=y)
        body = bytearray(data.read_bytes())
        body[len(body) // 3] ^= 0xFF  # inside x's compressed stream
        data.write_bytes(bytes(body))
    elif case == "not_npy":
        shutil.copy(good, data)
        with zipfile.ZipFile(data, "a") as zf:
            zf.writestr("notes.txt", "hello")
    refused(_adapt(bundle, data, state), match)
    assert _snapshot(state) == before
    # a damaged head checkpoint is the same clean error
    head = tmp_path / "head_bad.npz"
    head.write_bytes((state / "head.npz").read_bytes()[:100])
    refused(run_runner("infer", bundle, "--data", good, "--head", head),
             r"head checkpoint .*head_bad.npz is not a readable .npz file")


# -- item 13: FIFOs and devices -----------------------------------------------------------


def _run_with_timeout(*args, timeout=30):
    import os
    import subprocess
    import sys

    from .conftest import RUNNER

    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs POSIX FIFOs")
@pytest.mark.parametrize("target", ["fifo", "dev_zero"])
def test_fifos_and_devices_are_refused_without_reading(bundle, tmp_path, target):
    import os

    state, before = _good_state(bundle, tmp_path)
    data = tmp_path / "ok.npz"

    def special(name):
        p = tmp_path / name
        if target == "fifo":
            os.mkfifo(p)
        else:
            os.symlink("/dev/zero", p)
        return p

    match = r"is not a regular file \(a FIFO, socket or device\); refusing to read it"
    for flag in ("--head", "--trust-key"):
        p = _run_with_timeout("adapt", bundle, "--data", data, "--out", state, "--quiet",
                              flag, special(f"x{flag}.npz"))
        refused(p, rf"{flag} .* {match}" if flag == "--trust-key" else match)
    for name in ("d.npz", "d.csv"):
        p = _run_with_timeout("adapt", bundle, "--data", special(name), "--out", state)
        refused(p, rf"data file .*{name} {match}")
    refused(_run_with_timeout("infer", bundle, "--data", data, "--head", special("h.npz")),
             match)
    assert _snapshot(state) == before


# -- item 9: one run per state folder -----------------------------------------------------


@pytest.mark.skipif(__import__("sys").platform == "win32", reason="no flock on Windows")
def test_a_second_run_on_one_state_folder_is_refused_naming_the_first(bundle, tmp_path):
    import subprocess
    import sys
    import time

    from .conftest import RUNNER

    state, _ = _good_state(bundle, tmp_path)
    data = tmp_path / "ok.npz"
    lock = state / ".lock"
    assert lock.read_text() == ""  # held only while a run is in progress
    first = subprocess.Popen([sys.executable, str(RUNNER), "adapt", bundle, "--data", data,
                              "--out", state, "--quiet", "--epochs", "100000", "--patience", "0",
                              "--max-seconds", "120"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while lock.read_text().strip() != str(first.pid):
            assert first.poll() is None and time.monotonic() < deadline, "never took the lock"
            time.sleep(0.05)
        refused(_adapt(bundle, data, state), rf"state is in use by another run \(pid "
                 rf"{first.pid}\); wait for it to finish")
        refused(run_runner("update", bundle, "--state", state, "--data", data),
                 rf"in use by another run \(pid {first.pid}\)")
    finally:
        first.kill()  # SIGKILL: the kernel drops the lock with the process
        first.wait()
    p = _adapt(bundle, data, state)
    assert p.returncode == 0, p.stderr
    assert lock.read_text() == ""


# -- item 12 / 14: what the data and the manifest may say ---------------------------------


def _csv_log(path: Path, n_windows: int = 12, label=lambda i: "slow", bom: bool = False):
    from edgetl.data.synthetic import make_windows

    from .conftest import WINDOW

    x, _ = make_windows(n_windows, window=WINDOW, seed=8)
    rows = ["ax,ay,az,label"]
    for i, w in enumerate(x):
        rows += [f"{r[0]},{r[1]},{r[2]},{label(i)}" for r in w]
    path.write_bytes(("\ufeff" if bom else "").encode() + ("\n".join(rows) + "\n").encode())
    return path


@pytest.mark.parametrize("case,match", [
    ("complex_x", r"'x' is complex \(complex\d+\); the model takes real values"),
    ("y_2d", r"'y' must be a 1-D array with one label name per window, found shape \(60, 1\)"),
    ("nul_csv", r"label \d+ \('sl\\x00ow'\) contains the control character '\\x00'"),
    ("nul_npz", r"contains the control character '\\x00'"),
    ("dup_head_labels", r"head_dup.npz: duplicate labels \['slow'\]"),
    ("manifest_more_labels", r"4 labels but the head has 3 class rows"),
    ("manifest_dup_labels", r"labels must be distinct names"),
])
def test_data_and_manifest_contents_are_checked(bundle, tmp_path, case, match):
    state, before = _good_state(bundle, tmp_path)
    good = write_device_npz(tmp_path / "g.npz", 60, seed=3)
    with np.load(good) as z:
        x, y = z["x"], z["y"]
    data, extra = tmp_path / "bad.npz", []
    if case == "complex_x":
        np.savez(data, x=x + 1j * x, y=y)
    elif case == "y_2d":
        np.savez(data, x=x, y=y[:, None])
    elif case == "nul_csv":
        data = _csv_log(tmp_path / "bad.csv", label=lambda i: "sl\x00ow" if i == 5 else
                        ("slow", "fast")[i % 2])
    elif case == "nul_npz":
        y = y.copy()
        y[7] = "me\x00d"
        np.savez(data, x=x, y=y)
    elif case == "dup_head_labels":
        data = good
        extra = ["--head", _rewrite_head(state / "head.npz", tmp_path / "head_dup.npz",
                                         __labels__=np.array(["slow", "slow", "fast"]))]
    else:
        data = good
        man = json.loads((bundle / "manifest.json").read_text())
        man["labels"] = (man["labels"] + ["extra"] if case == "manifest_more_labels"
                         else [man["labels"][0]] * 3)
        (bundle / "manifest.json").write_text(json.dumps(man))
    refused(_adapt(bundle, data, state, *extra), match)
    assert _snapshot(state) == before


def test_a_csv_with_a_utf8_bom_is_read(bundle, tmp_path):
    log = _csv_log(tmp_path / "bom.csv", label=lambda i: ("slow", "fast")[i % 2], bom=True)
    assert log.read_bytes().startswith(b"\xef\xbb\xbf")
    p = run_runner("infer", bundle, "--data", log, "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_windows"] == 12


# -- item 3: a SIGKILL during `update` ----------------------------------------------------


def test_sigkill_during_update_readaptation_keeps_the_old_head(bundle, tmp_path):
    """A new backbone with --data: the old head stays as head.npz until the new one is
    written; a kill mid-re-adaptation leaves it, and the next update finishes the job."""
    import subprocess
    import sys
    import time

    from .conftest import RUNNER, export_tiny, tiny_checkpoint

    other = export_tiny(tiny_checkpoint(epochs=6), tmp_path / "other")  # new backbone
    state, before = _good_state(bundle, tmp_path)
    data = tmp_path / "ok.npz"
    cached = set((state / "features").iterdir())
    p = subprocess.Popen([sys.executable, str(RUNNER), "update", other, "--state", state,
                          "--data", data, "--epochs", "100000", "--patience", "0", "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while set((state / "features").iterdir()) == cached:  # the new backbone's features
            assert p.poll() is None and time.monotonic() < deadline, "update never re-adapted"
            time.sleep(0.02)
        time.sleep(0.3)  # now training
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
    assert (state / "head.npz").read_bytes() == before["head.npz"]
    res = json.loads(run_runner("update", other, "--state", state, "--data", data,
                                "--epochs", "5", "--json", "--quiet", check=True).stdout)
    assert res["action"] == "readapted"
    with np.load(state / "head.npz") as z:
        meta = json.loads(str(z["__meta__"]))
    new_bb = json.loads((other / "manifest.json").read_text())["files"]["backbone"]["sha256"]
    assert meta["backbone_sha256"] == new_bb
    stale = Path(res["stale_head"])
    assert stale.read_bytes() == before["head.npz"]
    assert not (state / "head.prev.npz").exists()  # a head of another backbone is not kept


def test_out_naming_a_file_and_a_damaged_bundle_record_are_handled(bundle, tmp_path):
    """`--out` at a file was a FileExistsError traceback; a damaged STATE/bundle.json a
    JSONDecodeError one (issue 21, item 7)."""
    data = write_device_npz(tmp_path / "d.npz", 120, seed=2, **SHIFT)
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    refused(_adapt(bundle, data, a_file), "is a file; expected a folder")
    assert a_file.read_text() == "keep me"
    state, _ = _good_state(bundle, tmp_path)
    run_runner("update", bundle, "--state", state, "--quiet", check=True)
    (state / "bundle.json").write_text("{")
    before = _snapshot(state)
    p = run_runner("update", bundle, "--state", state, "--json")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    res = json.loads(p.stdout)
    assert res["action"] == "kept" and "bundle.json is damaged" in res["warnings"][0]
    assert json.loads((state / "bundle.json").read_text())["version"] == 1
    assert (state / "head.npz").read_bytes() == before["head.npz"]
