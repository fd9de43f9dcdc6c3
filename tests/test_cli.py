"""CLI: --help of every command, one-line errors with exit 1, lazy heavy imports."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgetl.cli import app

from .conftest import write_device_npz

COMMANDS = ["pretrain", "distill", "export", "keygen", "sign", "quantize", "check", "adapt",
            "run", "personalise", "bench", "methods", "fleet"]
IN_PLACE = {"sign"}  # commands that write into the bundle they are given, not an --out
runner = CliRunner()


@pytest.mark.unit
def test_every_command_is_listed_and_has_help():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output
        sub = runner.invoke(app, [cmd, "--help"])
        assert sub.exit_code == 0, cmd
        assert "--out" in sub.output or "-o" in sub.output or cmd in IN_PLACE, cmd


@pytest.mark.unit
def test_registered_commands_match_the_tested_list():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == set(COMMANDS)


@pytest.mark.parametrize("args,needle", [
    (["run", "no/such/recipe.toml"], "does not exist"),
    (["pretrain", "tests/data/bad_recipe.toml"], "unknown key(s) ['epoch']"),
    (["export", "no/such.pt"], "checkpoint no/such.pt does not exist"),
    (["adapt", "no/such/bundle", "--data", "x.npz"], "is not a directory"),
])
def test_user_errors_exit_1_with_one_line(args, needle):
    p = subprocess.run([sys.executable, "-m", "edgetl.cli", *args], capture_output=True,
                       text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert needle in " ".join(p.stderr.split()), p.stderr


@pytest.mark.unit
def test_cli_import_is_light():
    code = ("import sys, edgetl.cli; print([m for m in ('torch', 'onnx', 'onnxruntime', "
            "'tensorflow', 'matplotlib') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_adapt_command_runs_the_device_runner(tiny_bundle, tmp_path):
    data = write_device_npz(tmp_path / "d.npz", 90, seed=3)
    res = runner.invoke(app, ["adapt", str(tiny_bundle), "--data", str(data), "--out",
                              str(tmp_path / "s"), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout[res.stdout.index("{"):])
    assert rep["n_train"] > 0 and (tmp_path / "s" / "report.json").exists()


@pytest.mark.env_ort
@pytest.mark.slow  # ~95 s; tests/test_bench.py::test_bench_run_end_to_end runs the same bench
def test_bench_measures_every_bundle_of_a_run(tiny_bundle, tiny_tflite_int8_bundle, tmp_path):
    import shutil

    from .conftest import SHIFT, write_device_npz

    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run / "bundles" / "onnx-fp32")
    shutil.copytree(tiny_tflite_int8_bundle, run / "bundles" / "tflite-int8")
    data = write_device_npz(tmp_path / "local.npz", 120, seed=3, **SHIFT)
    ev = write_device_npz(tmp_path / "later.npz", 60, seed=4, **SHIFT)
    res = runner.invoke(app, ["bench", str(run), "--threads", "1", "--repeats", "20",
                              "--epochs", "2", "--adapt-repeats", "1", "--data", str(data),
                              "--eval", str(ev), "--no-baselines"])
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "bench.json").read_text())
    assert [(r["name"], r["backend"]) for r in saved["rows"]] == [
        ("onnx-fp32", "onnxruntime"), ("tflite-int8", "ai-edge-litert")]
    for r in saved["rows"]:
        assert 0 < r["backbone_ms_p50"] <= r["backbone_ms_p95"] and r["repeats"] == 20
        assert r["bundle_bytes"] > r["backbone_bytes"] > 0
    assert "| tflite-int8 | 1 |" in (run / "bench.md").read_text()
    assert (run / "tradeoff.png").is_file() and saved["baselines"] == []


def test_bench_refuses_no_bundles_and_bad_threads(tiny_bundle, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run / "bundles" / "onnx-fp32")
    empty = runner.invoke(app, ["bench", str(tmp_path / "nothing")])
    assert empty.exit_code == 1 and "no bundles" in empty.output
    bad = runner.invoke(app, ["bench", str(run), "--threads", "one"])
    assert bad.exit_code == 1 and "comma-separated integers" in bad.output
