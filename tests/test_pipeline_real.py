"""The real HAR pipeline on UCI HAPT: a shortened recipe in the fast tier, the demo as slow."""

import dataclasses
import json

import pytest

from edgetl.config import AdaptConfig, DataConfig, TrainConfig, load_recipe
from edgetl.pipeline import run_recipe


def _short_recipe():
    r = load_recipe("models/har/recipe.toml")
    quick = TrainConfig(epochs=2, batch_size=128, lr=0.005)
    return dataclasses.replace(
        r, pretrain=quick, student_train=quick,
        data=dataclasses.replace(r.data, device_users=(21, 25, 29)),
        adapt=AdaptConfig(epochs=10))


@pytest.mark.data
def test_short_har_run_end_to_end(tmp_path):
    s = run_recipe(_short_recipe(), tmp_path, show=False)
    assert s.server["teacher"]["params"] >= 8 * s.server["student"]["params"]
    assert s.server["student"]["heldout_accuracy"] > 0.6  # 2 epochs: well above 1/6 chance
    names = ["onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"]
    assert [b["name"] for b in s.bundles] == s.bundle_names() == names
    for name in names:
        rows = [d for d in s.devices if d["bundle"] == name]
        assert [d["user"] for d in rows] == [21, 25, 29]
        backend = "ai-edge-litert" if name.startswith("tflite") else "onnxruntime"
        for d in rows:
            assert d["n_adapt"] > 100 and d["n_eval"] > 100 and d["peak_rss_mb"] < 400
            assert d["backend"] == backend and d["precision"] == name.split("-")[1]
        assert (tmp_path / "bundles" / name / "manifest.json").exists()
    for b in s.bundles:  # `edgetl run` gated every bundle with `edgetl check`
        assert [c["name"] for c in b["gate"]] == ["integrity", "selftest", "smoke", "parity",
                                                  "accuracy", "adaptation"]
        assert all(c["ok"] for c in b["gate"])
    acc = {b["name"]: b["checks"]["accuracy"] for b in s.bundles}
    for target in ("onnx", "tflite"):
        # int8 backbone on the held-out users: within 1 point of the fp32 bundle
        assert acc[f"{target}-int8"]["bundle"] >= acc[f"{target}-fp32"]["bundle"] - 0.01
        assert acc[f"{target}-fp32"]["drop_points"] == pytest.approx(0.0, abs=0.1)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["totals"]["by_bundle"]["tflite-int8"]["mean_gain"] == pytest.approx(
        s.totals["by_bundle"]["tflite-int8"]["mean_gain"])
    assert (tmp_path / "personalisation.png").stat().st_size > 1000


@pytest.mark.data
def test_quantize_and_check_a_real_fp32_bundle(tmp_path):
    """`edgetl quantize` then `edgetl check --reference` on a bundle of the real student."""
    from edgetl import stages
    from edgetl.check import check_bundle, failures
    from edgetl.pipeline import check_inputs

    r = _short_recipe()
    sd = stages.server_data(r)
    teacher = stages.pretrain(r, tmp_path, data=sd, show=False)
    student = stages.distill_student(r, teacher.path, tmp_path, data=sd, baseline=False,
                                     show=False)["student"]
    fp32 = tmp_path / "onnx-fp32"
    stages.export(student.path, fp32, r, data=sd)
    m = stages.quantize(fp32, tmp_path / "onnx-q8", r, data=sd)
    assert m.precision == "int8" and m.checks["accuracy"]["drop_points"] <= 1.0
    res = check_bundle(tmp_path / "onnx-q8", reference_bundle=fp32, **check_inputs(r, sd))
    assert not failures(res), [c for c in res if not c.ok]
    assert [c.name for c in res][-2:] == ["accuracy", "adaptation"]


@pytest.mark.unit
def test_data_config_rejects_overlapping_users():
    with pytest.raises(ValueError, match="user-disjoint"):
        DataConfig(server_users=(1, 2), device_users=(2,), server_val_users=(1,))


@pytest.mark.data
@pytest.mark.slow
def test_full_demo_recipe(tmp_path):
    s = run_recipe(load_recipe("models/har/recipe.toml"), tmp_path, show=False)
    assert s.server["teacher"]["heldout_accuracy"] > 0.9
    assert s.server["student"]["heldout_accuracy"] > 0.9
    assert s.totals["wall_seconds"] < 600


@pytest.mark.unit
def test_personalise_refuses_users_the_server_trained_on(tmp_path):
    from edgetl.errors import ConfigError
    from edgetl.pipeline import personalise_bundle

    with pytest.raises(ConfigError, match=r"users \[3\] trained the server model"):
        personalise_bundle(load_recipe("models/har/recipe.toml"), tmp_path / "b", tmp_path,
                    users=(3, 21), show=False)
