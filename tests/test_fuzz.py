"""Fuzz the device runner (issue 21): random CLI arguments and random nested manifest edits.

Whatever arrives, ``run.main`` either succeeds (exit 0) or exits 1 with exactly one
``error:`` line (a :class:`RunnerError`, or a usage error) — never another exception, never
a traceback. In-process (``run.main``) for speed; the bundle is restored for every example.

Budget: the default tier runs ``FAST`` (100) examples per test (a few seconds each);
``make test-slow`` runs the ``slow`` copies with ``SLOW`` (2000).
"""

import json
import os
import shutil
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import RUNNER, SHIFT, write_device_npz

sys.path.insert(0, str(RUNNER.parent))
import run  # noqa: E402

FAST, SLOW = 100, 2000
BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=6), lambda c: st.lists(c, max_size=3)
                    | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def world(tiny_bundle, tmp_path_factory):
    """A bundle, data, a good head, and hostile paths (a FIFO, a folder, a missing file)."""
    root = tmp_path_factory.mktemp("fuzz")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = write_device_npz(root / "ok.npz", 120, seed=2, **SHIFT)
    assert run.main(["adapt", str(bundle), "--data", str(data), "--out", str(root / "good"),
                     "--epochs", "1", "--quiet"]) == 0
    paths = {"data": data, "bundle": bundle, "head": root / "good" / "head.npz",
             "dir": root, "missing": root / "missing.npz", "devnull": "/dev/null",
             "nul": f"{root}/a\x00b", "manifest": bundle / "manifest.json"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo")
        paths["fifo"] = root / "fifo"
    return {"root": root, "bundle": bundle, "data": data, "paths": paths,
            "manifest": (bundle / "manifest.json").read_bytes()}


def outcome(capsys, argv) -> None:
    """Run ``argv``; assert success, or exit 1 with exactly one ``error:`` line."""
    try:
        rc = run.main([str(a) for a in argv])
    except SystemExit as e:  # argparse: usage errors exit 1 with one line (run.Parser)
        rc = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    if rc != 0:
        assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), (argv, rc, err)


NUMBERS = ["nan", "-1", "0", "1", "2", "3", "0.5", "1e309", "-inf", "x", "", "1e3",
           "1000000000", str(2**64), "\x00"]
FLAGS = {
    "adapt": ["--epochs", "--batch-size", "--val-fraction", "--lr", "--seed", "--head",
              "--l2sp", "--max-data-mb", "--checkpoint-every", "--max-seconds",
              "--max-memory-mb", "--threads", "--trainer", "--trust-key", "--data", "--out",
              "--resume", "--class-balanced", "--allow-downgrade"],
    "infer": ["--head", "--out", "--threads", "--data", "--trust-key"],
    "selftest": ["--trainer", "--threads", "--trust-key"],
    "bench": ["--repeats", "--batch", "--threads", "--trust-key"],
    "update": ["--data", "--epochs", "--threads", "--state", "--allow-downgrade"],
}
SWITCHES = {"--resume", "--class-balanced", "--allow-downgrade"}
#: Flags whose size sets the run time: fuzzed over small values only (a huge --epochs is a
#: long run, not an error; --max-seconds bounds adapt anyway).
SMALL = {"--epochs": ["nan", "-1", "0", "1", "2", "x", "\x00"],
         "--repeats": ["nan", "-1", "0", "9", "10", "12", "x", str(10**7)]}


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_cli_arguments(world, tmp_path_factory, capsys, monkeypatch, budget):
    # fuzzed values become relative paths (--out nan): keep them out of the checkout
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))

    @settings(max_examples=budget, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        cmd = data.draw(st.sampled_from(sorted(FLAGS)))
        out = tmp_path_factory.mktemp("o")
        pos = data.draw(st.sampled_from(["bundle", "bundle", "bundle", "dir", "missing",
                                         "fifo" if "fifo" in world["paths"] else "dir",
                                         "nul", "data"]))
        argv = [cmd, world["paths"][pos]]
        argv += {"adapt": ["--data", world["data"], "--out", out, "--max-seconds", "3"],
                 "infer": ["--data", world["data"]], "update": ["--state", out]}.get(cmd, [])
        if cmd == "bench":
            argv += ["--repeats", "10", "--batch", "4"]
        for flag in data.draw(st.lists(st.sampled_from(FLAGS[cmd]), max_size=4)):
            argv.append(flag)
            if flag in SWITCHES:
                continue
            if flag == "--trainer":
                argv.append(data.draw(st.sampled_from(["stateless", "ort-training", "x"])))
            else:
                argv.append(data.draw(st.sampled_from(SMALL.get(flag, NUMBERS))
                                      | st.sampled_from(sorted(world["paths"].values(),
                                                               key=str))))
        outcome(capsys, argv + ["--quiet"])

    check()
    assert (world["bundle"] / "manifest.json").read_bytes() == world["manifest"]


def _paths(o, p=()):
    yield p
    items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
    for k, v in items:
        yield from _paths(v, p + (k,))


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_nested_manifest_fields(world, tmp_path_factory, capsys, monkeypatch, budget):
    """Replace, delete or retype one random nested field (or a few); run every command."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    base = json.loads(world["manifest"])
    fields = [p for p in _paths(base) if p and p[0] not in ("provenance", "checks")]

    @settings(max_examples=budget, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        m = json.loads(world["manifest"])
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(fields))
            try:
                parent = m
                for k in path[:-1]:
                    parent = parent[k]
                parent[path[-1]]  # noqa: B018 - the path may be gone after an earlier edit
            except (KeyError, IndexError, TypeError):
                continue
            action = data.draw(st.sampled_from(["delete", "replace", "retype"]))
            if action == "delete":
                del parent[path[-1]]
            elif action == "replace":
                parent[path[-1]] = data.draw(JSON)
            else:
                old = parent[path[-1]]
                parent[path[-1]] = data.draw(st.sampled_from(
                    [str(old), [old], {"v": old}, None, True, -1, 2**40, 0.5, float("nan")]))
        (world["bundle"] / "manifest.json").write_text(json.dumps(m))
        try:
            cmd = data.draw(st.sampled_from(["selftest", "infer", "adapt", "update", "bench"]))
            out = tmp_path_factory.mktemp("o")
            b, d = world["bundle"], world["data"]
            outcome(capsys, {
                "selftest": ["selftest", b],
                "infer": ["infer", b, "--data", d],
                "adapt": ["adapt", b, "--data", d, "--out", out, "--epochs", "1"],
                "update": ["update", b, "--state", out, "--data", d, "--epochs", "1"],
                "bench": ["bench", b, "--repeats", "10", "--batch", "2"]}[cmd] + ["--quiet"])
        finally:
            (world["bundle"] / "manifest.json").write_bytes(world["manifest"])

    check()
