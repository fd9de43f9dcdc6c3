"""One commit for head + report + state, full and read-only disks, budgets, the feature cache.

Issue 21 items 8, 10, 11 and the feature cache. The runner runs as a device runs it: a
subprocess. Every failure is one ``error:`` line, exit 1, the previous head, report and
``head.prev.npz`` intact.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, RUNNER, SHIFT, refused, run_runner, write_device_npz

KILL_AT = "EDGERUN_TEST_KILL_AT_COMMIT_STEP"


def _runner(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": "", **(env or {})},
                          timeout=timeout, check=False)


def _adapt(bundle, data, out, *extra, env=None, timeout=120):
    return _runner("adapt", bundle, "--data", data, "--out", out, "--json", "--quiet",
                   "--epochs", "5", *extra, env=env, timeout=timeout)


def _snapshot(state: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(state.iterdir())
            if f.is_file() and f.name != ".lock"}




def _meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["__meta__"]))


def _params(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if not k.startswith("__")}


def _temps(state: Path) -> list:
    """Temp files of the runner's writers, and a commit journal, left in a state folder."""
    return [p.name for d in (state, state / "features") if d.is_dir() for p in d.iterdir()
            if p.name.startswith((".commit.", ".tmp.", ".head.", ".train.", ".copy."))
            or p.name == "commit.journal"]


def recover(state: Path) -> None:
    """What the next run does first (``edgerun.commit.recover``): finish a journaled commit."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.commit import recover as finish

    finish(str(state))


@pytest.fixture()
def two_data(tmp_path):
    """Data of a first adaptation and of a second one (another device shift)."""
    a = write_device_npz(tmp_path / "a.npz", 120, seed=2, **SHIFT)
    b = write_device_npz(tmp_path / "b.npz", 120, seed=3, gain=np.array([0.5, 2.0, 1.0]),
                         offset=np.array([-1.0, 1.0, 0.0]))
    return a, b


def _first_state(bundle, data, state):
    p = _adapt(bundle, data, state)
    assert p.returncode == 0, p.stderr
    return _snapshot(state)


def _one_run(state: Path) -> bool:
    """head.npz is the head report.json describes: written by its run, or kept by it (a
    rollback that did not rewrite the head)."""
    report = json.loads((state / "report.json").read_text())
    if report.get("rolled_back") and not report.get("checkpoint_written"):
        return True
    return report.get("run_key") == _meta(state / "head.npz").get("run_key")



def _run_maybe_killed(args: list, env: dict | None, rng) -> bool:
    """Run the runner with ``args``; without ``env`` (a commit-step kill hook), SIGKILL it at
    a random moment. Whether it died by SIGKILL."""
    p = subprocess.Popen([sys.executable, str(RUNNER), *map(str, args)],
                         env={**os.environ, "PYTHONPATH": "", **(env or {})},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if env is None:
        time.sleep(rng.uniform(0.1, 1.0))
        p.send_signal(signal.SIGKILL)
    return p.wait() == -signal.SIGKILL

def _consistent(state: Path, before: dict) -> str:
    """Assert the folder holds the old run or the new one, whole; return which."""
    assert _one_run(state), "head.npz and report.json are from different runs"
    if (state / "head.npz").read_bytes() == before["head.npz"]:
        assert (state / "report.json").read_bytes() == before["report.json"]
        return "old"
    assert (state / "head.prev.npz").read_bytes() == before["head.npz"]
    return "new"


# --- item 10: one commit ---------------------------------------------------------------


def test_a_kill_at_every_commit_step_is_finished_or_undone(bundle, tmp_path, two_data):
    """SIGKILL after each commit step (staged, journal, each rename): the folder holds the old
    run or the new one, whole; ``--resume`` ends where an uninterrupted run ends, with the
    pre-adaptation head as head.prev.npz; no temp file or journal is left.

    Before the fix: no commit steps (the hook never fires) and report/head could disagree.
    """
    a, b = two_data
    ref = tmp_path / "ref"
    before = _first_state(bundle, a, ref)
    assert _adapt(bundle, b, ref).returncode == 0
    want = _params(ref / "head.npz")
    seen = []
    for step in range(5):  # 0 staged, 1 journal durable, 2..4 renames (prev, head, report)
        state = tmp_path / f"s{step}"
        state.mkdir()
        for name, body in before.items():
            (state / name).write_bytes(body)
        p = _adapt(bundle, b, state, "--checkpoint-every", "0", env={KILL_AT: str(step)})
        assert p.returncode == -signal.SIGKILL, (step, p.stderr)
        r = _adapt(bundle, b, state, "--checkpoint-every", "0", "--resume")
        assert r.returncode == 0, r.stderr
        seen.append(_consistent(state, before))
        got = _params(state / "head.npz")
        assert all(np.allclose(got[k], want[k], atol=1e-5) for k in want), step
        assert (state / "head.prev.npz").read_bytes() == before["head.npz"], step
        assert not (state / "train_state.npz").exists()
        assert _temps(state) == [], step
    assert seen == ["new"] * 5


def test_resume_after_a_finished_run_keeps_it_and_the_previous_head(bundle, tmp_path, two_data):
    """A kill after the commit (before the exit): ``--resume`` must not redo the run and move
    the adapted head into head.prev.npz. Before the fix it redid the run and the
    pre-adaptation head was lost."""
    a, b = two_data
    state = tmp_path / "state"
    before = _first_state(bundle, a, state)
    assert _adapt(bundle, b, state).returncode == 0
    done = _snapshot(state)
    r = _adapt(bundle, b, state, "--resume")
    assert r.returncode == 0, r.stderr
    assert "already finished" in run_runner("adapt", bundle, "--data", b, "--out", state,
                                            "--epochs", "5", "--resume").stderr
    assert _snapshot(state) == done
    assert (state / "head.prev.npz").read_bytes() == before["head.npz"]


def test_orphan_temps_are_removed_and_a_journal_is_finished_on_start(bundle, tmp_path, two_data):
    """Temp files of killed writes are removed by the next run; a durable journal left by a
    killed commit is finished before anything else (also by ``update``). Before the fix the
    temps piled up."""
    a, _ = two_data
    state = tmp_path / "state"
    _first_state(bundle, a, state)
    (state / "features").mkdir(exist_ok=True)
    for name in (".tmp.abc.json", ".head.x.npz", ".train.y.npz", ".copy.z", ".commit.w",
                 "features/.tmp.q.npz"):
        (state / name).write_bytes(b"partial")
    p = _adapt(bundle, a, state)
    assert p.returncode == 0, p.stderr
    assert _temps(state) == []
    assert any("orphan temp" in w for w in json.loads(p.stdout)["warnings"])
    # a journal whose first rename happened, second did not
    (state / ".commit.r1").write_text('{"marker": 1}')
    (state / "commit.journal").write_text(json.dumps(
        {"format": "edgerun.commit/1", "renames": [[".commit.r0", "x.json"],
                                                   [".commit.r1", "y.json"]],
         "deletes": ["train_state.npz"]}))
    (state / "x.json").write_text('{"marker": 0}')
    u = run_runner("update", bundle, "--state", state, "--json", "--quiet")
    assert u.returncode == 0, u.stderr
    assert json.loads((state / "y.json").read_text()) == {"marker": 1}
    assert _temps(state) == []
    assert "finished an interrupted commit" in " ".join(json.loads(u.stdout)["warnings"])


# --- item 11: full and read-only disks ---------------------------------------------------


@pytest.fixture()
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root and mount needed; skipped otherwise), unmounted after."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Leave about ``leave`` bytes free on ``folder``'s file system."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


KEPT = ("head.npz", "head.prev.npz", "report.json", "versions.json")


@pytest.mark.parametrize("free", [4 << 10, 12 << 10])
def test_a_full_disk_replaces_nothing(bundle, tmp_path, two_data, small_fs, free):
    """8 KiB free: one error line naming the disk, the file and what to do; head, head.prev,
    report byte-identical and no temp left (4 KiB: the training-state checkpoint already
    fails; 12 KiB: the commit's staging fails). Before the fix: a traceback after head.npz was
    already replaced."""
    a, b = two_data
    state = small_fs / "state"
    assert _adapt(bundle, a, state).returncode == 0
    assert _adapt(bundle, b, state).returncode == 0  # now head.prev.npz exists too
    before = _snapshot(state)
    _fill(small_fs, free)
    p = _adapt(bundle, a, state, "--seed", "7", "--checkpoint-every", "0")
    refused(p, r"No space left on device.*nothing was replaced.*free space")
    after = _snapshot(state)  # a training-state checkpoint may have been written: fine
    assert {k: after.get(k) for k in KEPT} == {k: before.get(k) for k in KEPT}
    assert _temps(state) == []


def test_a_read_only_state_folder_is_one_error_line(bundle, tmp_path, two_data, small_fs):
    """A read-only state folder (remounted ro: root ignores chmod): adapt and update end in
    one error line before any work, the state untouched. Before: an OSError traceback."""
    a, _ = two_data
    state = small_fs / "state"
    assert _adapt(bundle, a, state).returncode == 0
    before = _snapshot(state)
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"remount read-only is not permitted here: {r.stderr.strip()}")
    refused(_adapt(bundle, a, state), r"not writable \(Read-only file system\).*nothing was")
    refused(run_runner("update", bundle, "--state", state, "--data", a),
             r"not writable \(Read-only file system\)")
    assert _snapshot(state) == before


# --- item 8: messages that stay true, budgets that bind ----------------------------------


def test_nothing_was_written_means_no_feature_cache_either(bundle, tmp_path, two_data):
    """A memory budget below the runtime's footprint refuses with "nothing was written" after
    the feature pass: the feature cache must not have been written. Before: 'nothing was
    written' beside a fresh features/*.npy."""
    a, _ = two_data
    state = tmp_path / "state"
    refused(_adapt(bundle, a, state, "--max-memory-mb", "1"), "nothing was written")
    assert not (state / "features").exists() or not any((state / "features").iterdir())


def _loop_backbone(path: Path, input_name: str, dim: int) -> None:
    """An ONNX backbone (N, 32, 3) -> (N, dim) that first spins a 10^12-step Loop."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import save

    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]),
         h.make_node("Add", ["v_in", "one"], ["v_out"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []),
         h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("v_in", T.FLOAT, [])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("v_out", T.FLOAT, [])],
        [h.make_tensor("one", T.FLOAT, [], [1.0])])
    nodes = [h.make_node("Loop", ["M", "c", "v0"], ["vf"], body=body),
             h.make_node("ReduceMean", [input_name, "ax"], ["m"], keepdims=0),
             h.make_node("MatMul", ["m", "W"], ["f0"]),
             h.make_node("Mul", ["vf", "zero"], ["z"]),
             h.make_node("Add", ["f0", "z"], ["features"])]
    g = h.make_graph(nodes, "loop_backbone",
                     [h.make_tensor_value_info(input_name, T.FLOAT, [None, 32, 3])],
                     [h.make_tensor_value_info("features", T.FLOAT, [None, dim])],
                     [h.make_tensor("M", T.INT64, [], [10**12]),
                      h.make_tensor("c", T.BOOL, [], [True]),
                      h.make_tensor("v0", T.FLOAT, [], [0.0]),
                      h.make_tensor("ax", T.INT64, [1], [1]),
                      h.make_tensor("W", T.FLOAT, [3, dim], [0.1] * (3 * dim)),
                      h.make_tensor("zero", T.FLOAT, [], [0.0])])
    save(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]), str(path))


def test_max_seconds_cancels_a_backbone_that_does_not_finish(bundle, tmp_path, two_data):
    """A backbone with a 10^12-step Loop under --max-seconds 2: onnxruntime's call is
    cancelled (RunOptions.terminate from a timer), one error line, the state untouched, in
    well under 20 s. Before the fix it ran until killed."""
    import hashlib

    a, _ = two_data
    state = tmp_path / "state"
    before = _first_state(bundle, a, state)
    man = json.loads((bundle / "manifest.json").read_text())
    entry = man["files"]["backbone"]
    _loop_backbone(bundle / entry["path"], man["input"]["name"], int(man["features"]["dim"]))
    body = (bundle / entry["path"]).read_bytes()
    entry["sha256"], entry["bytes"] = hashlib.sha256(body).hexdigest(), len(body)
    (bundle / "manifest.json").write_text(json.dumps(man))
    t0 = time.monotonic()
    p = _adapt(bundle, a, state, "--max-seconds", "2", timeout=20)
    took = time.monotonic() - t0
    refused(p, r"time budget ran out.*cancelled.*nothing was written.*--max-seconds")
    assert took < 12, took
    assert _snapshot(state) == before


# --- the feature cache ---------------------------------------------------------------


def test_a_tampered_feature_cache_is_recomputed_with_a_warning(bundle, tmp_path, two_data):
    """The cache entry records its key and the sha256 of its features; a changed entry (one
    feature changed, the file otherwise valid) or a stale key is recomputed, with a warning in
    the report. Before: any array of the right shape was used."""
    a, _ = two_data
    state = tmp_path / "state"
    assert _adapt(bundle, a, state).returncode == 0
    (entry,) = (state / "features").glob("*.npz")
    with np.load(entry, allow_pickle=False) as z:
        meta, feats = z["__meta__"], z["features"].copy()
    good = _adapt(bundle, a, state)
    assert json.loads(good.stdout)["features_cached"] is True
    feats[0, 0] += 1.0
    np.savez(entry, __meta__=meta, features=feats)
    rep = json.loads(_adapt(bundle, a, state).stdout)
    assert rep["features_cached"] is False
    assert any("feature cache" in w and "damaged" in w for w in rep["warnings"]), rep["warnings"]
    m = json.loads(str(meta))
    m["key"] = m["key"].replace("[", "[\"x\", ", 1)
    with np.load(entry, allow_pickle=False) as z:
        np.savez(entry, __meta__=np.array(json.dumps(m)), features=z["features"])
    rep = json.loads(_adapt(bundle, a, state).stdout)
    assert rep["features_cached"] is False
    assert any("other data, backbone" in w for w in rep["warnings"]), rep["warnings"]
    assert json.loads(_adapt(bundle, a, state).stdout)["features_cached"] is True


# --- item 5 of the brief: the SIGKILL and concurrency campaign ---------------------------


def _campaign_adapt(bundle, tmp_path, a, b, kills: int, rng: random.Random) -> dict:
    """Random SIGKILLs of one adaptation (many checkpoints), then ``--resume`` each time."""
    ref = tmp_path / "cref"
    before = _first_state(bundle, a, ref)
    # ~0.9 s, 300 checkpoints (no early stop)
    args = ("--epochs", "300", "--patience", "0", "--checkpoint-every", "0")
    assert _adapt(bundle, b, ref, *args).returncode == 0
    want = _params(ref / "head.npz")
    survived = killed = 0
    for k in range(kills):
        state = tmp_path / f"ck{k}"
        state.mkdir()
        for name, body in before.items():
            (state / name).write_bytes(body)
        env = {KILL_AT: str(rng.randrange(5))} if k % 3 == 0 else None  # a third in the commit
        killed += _run_maybe_killed(["adapt", bundle, "--data", b, "--out", state, "--quiet",
                                     *args], env, rng)
        ok = (state / "head.npz").is_file()
        try:
            _meta(state / "head.npz")  # a whole head at every moment
            recover(state)  # what the next start does first: a journaled commit is done
            ok = ok and _consistent(state, before) in ("old", "new")
            r = _adapt(bundle, b, state, *args, "--resume")
            got = _params(state / "head.npz")
            ok = (ok and r.returncode == 0 and _consistent(state, before) == "new"
                  and all(np.allclose(got[n], want[n], atol=1e-5) for n in want)
                  and (state / "head.prev.npz").read_bytes() == before["head.npz"]
                  and _temps(state) == [])
        except (AssertionError, OSError, ValueError, KeyError):
            ok = False
        survived += bool(ok)
    return {"runs": kills, "killed": killed, "survived": survived}


def _campaign_update(bundle, tmp_path, a, kills: int, rng: random.Random) -> dict:
    """SIGKILLs of ``update --data`` onto a new backbone (random times and commit steps)."""
    from .conftest import export_tiny, tiny_checkpoint

    other = export_tiny(tiny_checkpoint(epochs=6), tmp_path / "other")
    new_bb = json.loads((other / "manifest.json").read_text())["files"]["backbone"]["sha256"]
    base = tmp_path / "ubase"
    before = _first_state(bundle, a, base)
    old_bb = _meta(base / "head.npz")["backbone_sha256"]
    survived = killed = 0
    failures = []
    for k in range(kills):
        state = tmp_path / f"cu{k}"
        state.mkdir()
        for name, body in before.items():
            (state / name).write_bytes(body)
        env = {KILL_AT: str(rng.randrange(6))} if k % 2 == 0 else None
        killed += _run_maybe_killed(["update", other, "--state", state, "--data", a,
                                     "--epochs", "300", "--patience", "0", "--quiet"], env, rng)
        try:
            bb = _meta(state / "head.npz")["backbone_sha256"]  # a head is always there
            recover(state)  # what the next start does first: a journaled commit is done
            bb = _meta(state / "head.npz")["backbone_sha256"]
            rec = state / "bundle.json"
            if bb == new_bb:  # committed: the record says so too
                assert json.loads(rec.read_text())["backbone_sha256"] == new_bb, "record"
            else:
                assert bb == old_bb, "a head of neither backbone"
                assert (state / "head.npz").read_bytes() == before["head.npz"], "old head"
            r = run_runner("update", other, "--state", state, "--data", a, "--epochs", "300",
                           "--patience", "0", "--json", "--quiet")
            assert r.returncode == 0, r.stderr[-300:]
            assert _meta(state / "head.npz")["backbone_sha256"] == new_bb, "retry's head"
            assert json.loads(rec.read_text())["backbone_sha256"] == new_bb, "retry's record"
            assert _one_run(state), "head and report of different runs"
            assert _temps(state) == [], _temps(state)
            ok = True
        except (AssertionError, OSError, ValueError, KeyError) as e:
            ok = False
            failures.append(f"run {k} ({env or 'random time'}): {type(e).__name__}: {e}")
        survived += bool(ok)
    return {"runs": kills, "killed": killed, "survived": survived, "failures": failures}


def _campaign_concurrent(bundle, tmp_path, a, pairs: int) -> dict:
    """Two adapts (other seeds) started together on one folder: head and report of one run."""
    mixed = both_ok = 0
    for k in range(pairs):
        state = tmp_path / f"cc{k}"
        ps = [subprocess.Popen([sys.executable, str(RUNNER), "adapt", bundle, "--data", a,
                                "--out", state, "--quiet", "--epochs", "5", "--seed", str(s)],
                               env={**os.environ, "PYTHONPATH": ""},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for s in (10 + 2 * k, 11 + 2 * k)]
        rcs = [p.wait() for p in ps]
        both_ok += rcs == [0, 0]
        for p in ps:
            p.stderr.close()
        mixed += not _one_run(state)
    return {"pairs": pairs, "mixed": mixed, "both_exit_0": both_ok}


def _campaign(bundle, tmp_path, two_data, adapt_kills, update_kills, pairs):
    a, b = two_data
    rng = random.Random(21)
    res = {"adapt": _campaign_adapt(bundle, tmp_path, a, b, adapt_kills, rng),
           "update": _campaign_update(bundle, tmp_path, a, update_kills, rng),
           "concurrent": _campaign_concurrent(bundle, tmp_path, a, pairs)}
    print("campaign:", json.dumps(res))
    out = os.environ.get("EDGETL_CAMPAIGN_OUT")
    if out:
        Path(out).write_text(json.dumps(res, indent=2))
    assert res["adapt"]["survived"] == adapt_kills, res
    assert res["update"]["survived"] == update_kills, res
    assert res["concurrent"]["mixed"] == 0, res


def test_sigkill_and_concurrency_campaign_short(bundle, tmp_path, two_data):
    """A few random and commit-step SIGKILLs of adapt and update, 2 concurrent pairs."""
    _campaign(bundle, tmp_path, two_data, adapt_kills=3, update_kills=2, pairs=2)


@pytest.mark.slow
def test_sigkill_and_concurrency_campaign_long(bundle, tmp_path, two_data):
    """The campaign of the issue's closing note: 30 + 15 SIGKILLs, 20 concurrent pairs."""
    _campaign(bundle, tmp_path, two_data, adapt_kills=30, update_kills=15, pairs=20)
