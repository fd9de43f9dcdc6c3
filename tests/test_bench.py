"""``edgetl bench``: runner measurements, baselines, the within-run ratios and the plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetl import bench
from edgetl.adapt import run_json
from edgetl.checkpoint import save_checkpoint
from edgetl.errors import EdgetlError
from edgetl.kinds import Device
from edgetl.pipeline import write_device_index

from .conftest import SHIFT, export_tiny, run_runner, write_device_npz


@pytest.fixture(scope="module")
def run_dir(tiny_ck, tmp_path_factory) -> Path:
    """A run folder like `edgetl run` writes: a checkpoint, two bundles, one device's data."""
    run = tmp_path_factory.mktemp("benchrun")
    ck = save_checkpoint(tiny_ck, run / "student.pt")
    for target, precision in (("onnx", "fp32"), ("tflite", "int8")):
        export_tiny(tiny_ck, run / "bundles" / f"{target}-{precision}", target, precision,
                    provenance={"checkpoint": str(ck)})
    dev = run / "devices" / "user_21"
    dev.mkdir(parents=True)
    write_device_npz(dev / "adapt.npz", 160, seed=11, **SHIFT)
    write_device_npz(dev / "eval.npz", 120, seed=12, **SHIFT)
    write_device_index(run, [Device("user_21", dev / "adapt.npz", dev / "eval.npz", 160, 120,
                                    ("a", "b", "c"), 21)])
    return run


def test_runner_bench_reports_latency_throughput_and_how_the_batch_ran(run_dir):
    for name, mode in (("onnx-fp32", "one call of batch 8"),
                       ("tflite-int8", "8 calls of the batch-1 graph")):
        p = run_runner("bench", run_dir / "bundles" / name, "--repeats", "20", "--batch", "8",
                       "--threads", "1", "--json", "--quiet")
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        assert 0 < r["backbone_ms_p50"] <= r["backbone_ms_p95"]
        assert r["batch"] == 8 and r["batch_mode"] == mode and r["throughput_per_s"] > 0
        assert r["peak_rss_mb"] > 0 and r["bundle_bytes"] > r["backbone_bytes"]
    bad = run_runner("bench", run_dir / "bundles" / "onnx-fp32", "--repeats", "5")
    assert bad.returncode == 1 and "--repeats >= 10" in bad.stderr


def test_prepared_baseline_data_is_the_runners_training_split(run_dir, tmp_path):
    b = run_dir / "bundles" / "onnx-fp32"
    data = run_dir / "devices" / "user_21" / "adapt.npz"
    info = bench.prepare_data(b, data, data.with_name("eval.npz"), tmp_path / "p.npz",
                              val_fraction=0.25, seed=0)
    p = run_runner("adapt", b, "--data", data, "--out", tmp_path / "s", "--epochs", "1",
                   "--json", "--quiet")
    assert json.loads(p.stdout)["n_train"] == info["n_train"]
    with np.load(tmp_path / "p.npz") as z:
        assert z["x_train"].shape == (info["n_train"], 32, 3) and z["x_train"].dtype == np.float32
        assert abs(float(z["x_train"].mean())) < 2  # normalised by the manifest, not raw
        assert set(z["y_train"].tolist()) <= {0, 1, 2} and not info["new_labels"]


@pytest.mark.env_ort
def test_baselines_with_a_zero_learning_rate_reproduce_the_shipped_head(run_dir, tmp_path):
    """The oracle for both baselines: with lr 0 their model IS the bundle's backbone + head, so
    their eval accuracy must equal the runner's with the shipped head."""
    from edgetl.baselines import torch_eager

    b = run_dir / "bundles" / "onnx-fp32"
    dev = run_dir / "devices" / "user_21"
    bench.prepare_data(b, dev / "adapt.npz", dev / "eval.npz", tmp_path / "p.npz",
                       val_fraction=0.25, seed=0)
    shipped = json.loads(run_runner("infer", b, "--data", dev / "eval.npz", "--json",
                                    "--quiet").stdout)["accuracy"]
    r = torch_eager(run_dir / "student.pt", tmp_path / "p.npz", epochs=2, batch=32, threads=1,
                    optimizer="sgd", hparams={"lr": 0.0, "momentum": 0.0})
    assert r["accuracy_after"] == pytest.approx(shipped) and r["steps"] > 0
    try:
        from edgetl.export.ort_training import ort_python

        py = ort_python()
    except EdgetlError:
        pytest.skip("no ORT-training environment (make venv-ort)")
    script = Path(bench.__file__).with_name("_ort_merged_baseline.py")
    o = run_json([py, str(script), str(b), str(tmp_path / "p.npz"),
                          str(tmp_path / "ort"), "--epochs", "2", "--lr", "0"], "ort")
    assert o["accuracy_after"] == pytest.approx(shipped) and o["steps"] == r["steps"]


@pytest.mark.env_ort
def test_bench_run_end_to_end(run_dir, tmp_path):
    res = bench.bench_bundles([run_dir], threads=(1,), repeats=10, epochs=3, adapt_repeats=1,
                              show=False)
    assert [r["name"] for r in res["rows"]] == ["onnx-fp32", "tflite-int8"]
    for r in res["rows"]:
        a = r["adaptation"]
        assert a["epochs"] == 3 and a["feature_seconds"] > 0 and a["train_seconds"] > 0
        assert a["adapt_seconds"] == pytest.approx(a["feature_seconds"] + a["train_seconds"])
        assert a["infer_seconds"] > 0 and a["peak_rss_mb"] > 0
        assert 0 <= r["device_accuracy"]["accuracy_before"] <= 1
        assert r["backbone_flops"] > 0 and 0 < r["limit"]["batch1_fraction"] < 1
    names = [x["name"] for x in res["baselines"][0]["rows"]]
    assert names[0] == "pytorch-eager"
    pt = res["baselines"][0]["rows"][0]
    assert pt["peak_rss_mb"] > 100  # torch itself; the runner's is below that
    assert {t["target"] for t in res["targets"]} == set(bench.TARGETS)
    j, md, png = bench.write(res, tmp_path / "out")
    text = md.read_text()
    for heading in ("Inference", "On-device adaptation", "Baselines", "Targets"):
        assert f"#### {heading}" in text
    assert png.stat().st_size > 10_000 and json.loads(j.read_text())["epochs"] == 3


def test_bench_without_device_data_says_what_to_pass(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "bundles", run / "bundles")
    with pytest.raises(EdgetlError, match="--data and --eval"):
        bench.bench_bundles([run], threads=(1,), repeats=10, show=False)


def _row(name, target, precision, p50_ms, adapt_s, infer_s, rss, ck="ck"):
    return {"name": name, "target": target, "precision": precision, "threads": 1,
            "checkpoint": ck, "backbone_ms_p50": p50_ms,
            "adaptation": {"adapt_seconds": adapt_s, "infer_seconds": infer_s,
                           "peak_rss_mb": rss}}


@pytest.mark.unit
def test_comparisons_and_targets_are_computed_within_the_run():
    res = {"rows": [_row("onnx-fp32", "onnx", "fp32", 1.0, 0.010, 0.008, 60),
                    _row("onnx-int8", "onnx", "int8", 0.4, 0.012, 0.006, 70)],
           "baselines": [{"checkpoint": "ck", "rows": [
               {"name": "pytorch-eager", "threads": 1, "train_seconds": 0.2,
                "peak_rss_mb": 300}]}]}
    res["comparisons"] = bench.comparisons(res)
    c = {x["name"]: x for x in res["comparisons"]}
    assert c["onnx-fp32"]["speedup_vs_pytorch"] == pytest.approx(20)
    assert c["onnx-int8"]["adapt_vs_inference"] == pytest.approx(2.0)
    assert c["onnx-int8"]["int8_speedup"] == pytest.approx(2.5)
    t = {x["target"]: x for x in bench.targets(res)}
    assert t["speedup_vs_pytorch"]["value"] == pytest.approx(0.2 / 0.012)  # the worst bundle
    assert t["speedup_vs_pytorch"]["met"] and t["int8_speedup"]["met"]
    assert not t["adapt_vs_inference"]["met"]  # 2.0 > 1.5 on onnx-int8
    assert t["rss_vs_pytorch"]["value"] == pytest.approx(70 / 300) and t["rss_vs_pytorch"]["met"]


@pytest.mark.unit
def test_pareto_front():
    pts = [(1.0, 0.90), (2.0, 0.95), (3.0, 0.93), (0.5, 0.80), (2.0, 0.94), (4.0, 0.96)]
    assert bench.pareto(pts) == [(0.5, 0.80), (1.0, 0.90), (2.0, 0.95), (4.0, 0.96)]


def test_each_run_folder_benches_on_its_own_device_data(run_dir, tmp_path):
    other = tmp_path / "vision"
    shutil.copytree(run_dir, other)
    groups = bench.bench_groups([run_dir, other])
    assert [g["run"] for g in groups] == [run_dir.name, "vision"]
    assert groups[1]["data"] == other / "devices" / "user_21" / "adapt.npz"
    loose = [run_dir / "bundles" / "onnx-fp32"]
    with pytest.raises(EdgetlError, match="need --data and --eval"):
        bench.bench_groups(loose)
    data = groups[0]["data"]
    assert bench.bench_groups(loose, data, data)[0]["bundles"] == loose


def test_a_moved_run_folder_still_finds_its_checkpoint(run_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    b = moved / "bundles" / "onnx-fp32"
    man = json.loads((b / "manifest.json").read_text())
    man["provenance"]["checkpoint"] = "/nowhere/student.pt"  # recorded on another machine
    assert bench._checkpoint_of(man, b) == (moved / "student.pt").resolve()
    man["provenance"]["checkpoint"] = "/nowhere/other.pt"
    assert bench._checkpoint_of(man, b) is None


def test_without_the_ort_training_environment_that_baseline_is_skipped_and_said(
        run_dir, tmp_path, monkeypatch):
    from edgetl.errors import MissingBackendError
    from edgetl.export import ort_training

    def missing():
        raise MissingBackendError("no .venv-ort here")

    monkeypatch.setattr(ort_training, "ort_python", missing)
    dev = run_dir / "devices" / "user_21"
    b = bench.bench_baselines(run_dir / "student.pt", [run_dir / "bundles" / "onnx-fp32"],
                              dev / "adapt.npz", dev / "eval.npz", tmp_path, threads=(1,),
                              epochs=1, val_fraction=0.25, seed=0)
    assert [r["name"] for r in b["rows"]] == ["pytorch-eager"]
    assert "no .venv-ort here" in b["ort_training_skipped"]
    res = {"rows": [], "baselines": [b], "comparisons": [], "targets": [], "epochs": 1,
           "adapt_repeats": 1, "repeats": 10, "groups": [], "peak": {},
           "machine": {"machine": "x", "cpus": 1, "platform": "p"}}
    assert "ort-training-merged | – | skipped: no .venv-ort here" in bench.markdown(res)
