"""``edgetl quantize``: an fp32 ONNX bundle -> an int8 one, without the PyTorch checkpoint.

Only the backbone is quantized (static QDQ, per-channel int8 weights, uint8 activations
calibrated on source windows); the head graphs and parameters are copied unchanged. The new
bundle must keep the fp32 bundle's held-out accuracy within the threshold, measured in
onnxruntime on both, or it is not written.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
from pathlib import Path

import numpy as np

from edgetl.errors import BundleError, ConfigError, DataError
from edgetl.export.bundle import (
    accuracy_gate,
    checked_with,
    compare,
    device_session,
    runtime_predictions,
    staged_bundle,
)
from edgetl.export.onnx import quantize_int8
from edgetl.export.registry import get_exporter
from edgetl.head import HeadSpec
from edgetl.manifest import MANIFEST, Manifest, file_entry
from edgetl.tolerances import MAX_ACCURACY_DROP_POINTS, SELFTEST_INT8_REL


def normalize(m: Manifest, x: np.ndarray) -> np.ndarray:
    """Raw windows or uint8 images -> the backbone's input, as the manifest says."""
    if m.input.get("modality") == "image":
        from edgetl.data.images import to_model_input

        im = m.input["image"]
        return to_model_input(x, (im["height"], im["width"]), im["mode"], im["mean"],
                              im["std"], resample=im.get("resample", "bilinear"))
    want = (m.input["window"], len(m.input["channels"]))
    if x.ndim != 3 or x.shape[1:] != want:
        raise DataError(f"windows must be (N, {want[0]}, {want[1]}) for this bundle, "
                        f"got {x.shape}")
    norm = m.input["preprocess"]["normalize"]
    return ((x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
            ).astype(np.float32)


def spec_of(m: Manifest) -> HeadSpec:
    """The :class:`HeadSpec` a manifest describes."""
    return HeadSpec(m.head["kind"], int(m.features["dim"]),
                    int(m.head.get("capacity") or len(m.labels)), int(m.head.get("hidden") or 0),
                    learn_scale=bool(m.head.get("learn_scale", True)),
                    l2sp=bool(m.head.get("l2sp", 0)))


def session_of(bundle: Path, m: Manifest):
    """The device runner's backend (``edgerun.backends``) on a bundle and its manifest."""
    return device_session(bundle, m)


def head_params(bundle: Path, m: Manifest) -> dict[str, np.ndarray]:
    """The bundle's shipped head parameters, in manifest order."""
    with np.load(Path(bundle) / m.files[m.head["init_file"]].path) as z:
        return {p["name"]: z[p["name"]] for p in m.head["params"]}


def quantize_bundle(src: Path, out: Path, *, calib_x: np.ndarray,
                    eval_set: tuple[np.ndarray, np.ndarray],
                    max_drop: float = MAX_ACCURACY_DROP_POINTS) -> Manifest:
    """Write an int8 copy of the fp32 ONNX bundle ``src`` to ``out``.

    Args:
        calib_x: raw source windows for the activation ranges.
        eval_set: raw held-out windows and integer labels for the accuracy gate.

    Raises:
        ConfigError: ``src`` is not an fp32 ONNX bundle, or ``out`` is ``src``.
        ToleranceError: the int8 bundle loses more than ``max_drop`` points.
    """
    src, out = Path(src), Path(out)
    m = Manifest.read(src)
    m.verify(src)
    if m.target != "onnx" or m.precision != "fp32":
        raise ConfigError(f"{src} is a {m.target}/{m.precision} bundle; `edgetl quantize` takes "
                          "an fp32 ONNX bundle. For TFLite use `edgetl export --target tflite "
                          "--precision int8` with the checkpoint (PT2E needs the torch model)")
    if m.input.get("modality") == "text":
        raise ConfigError(f"{src} is a text bundle: its int8 backbone is optimum's dynamic "
                          "ORTQuantizer model, made by `edgetl export --precision int8` from the "
                          "checkpoint (`edgetl quantize` calibrates a static QDQ graph on "
                          "windows/images)")
    if out.resolve() == src.resolve():
        raise ConfigError("--out must differ from the fp32 bundle; it is kept as the reference")
    if len(calib_x) == 0:
        raise DataError("no calibration windows")
    with staged_bundle(out) as tmp:
        man = _build(src, m, tmp, normalize(m, calib_x), eval_set, max_drop)
    return man


def _fp32_replay(adapt: dict) -> dict:
    """The ``adapt`` block, a replay set's source saying its features stay the fp32 ones.

    ``replay.npz`` holds features, not windows, so the int8 backbone cannot recompute them
    here (``edgetl export --precision int8`` does); they differ by the quantisation error.
    """
    if not adapt.get("replay"):
        return adapt
    return {**adapt, "replay": {**adapt["replay"], "source": adapt["replay"]["source"]
                                + "; copied by edgetl quantize: the fp32 backbone's features"}}


def _build(src: Path, m: Manifest, tmp: Path, calib: np.ndarray,
           eval_set: tuple[np.ndarray, np.ndarray], max_drop: float) -> Manifest:
    for role, entry in m.files.items():
        if role not in ("backbone", "test_vectors"):
            shutil.copy2(src / entry.path, tmp / entry.path)
    bb = m.files["backbone"].path
    facts = quantize_int8(src / bb, tmp / bb, calib, m.input["name"])
    with np.load(src / m.files["test_vectors"].path) as z:
        tv = {k: z[k] for k in z.files}  # train_* reference steps stay valid: same head
    tv_x = tv["x"]
    shutil.copy2(src / m.files["test_vectors"].path, tmp / m.files["test_vectors"].path)
    files = {role: file_entry(tmp, e.path) for role, e in m.files.items()}
    m8 = dataclasses.replace(m, files=files)
    spec, params = spec_of(m), head_params(src, m)
    fp32, int8 = session_of(src, m), session_of(tmp, m8)

    x_eval, y_eval = eval_set
    xe = normalize(m, x_eval)
    acc = accuracy_gate(runtime_predictions(fp32, spec, params, xe),
                        runtime_predictions(int8, spec, params, xe), np.asarray(y_eval),
                        max_drop, reference="fp32_bundle")
    xt = normalize(m, tv_x)
    f8, f32 = int8.features(xt), fp32.features(xt)
    logits = int8.infer({"features": f8, **params})["logits"]
    np.savez(tmp / m.files["test_vectors"].path, **{**tv, "features": f8, "logits": logits})
    files = {role: file_entry(tmp, e.path) for role, e in m.files.items()}
    scale = float(np.abs(f32).max())
    err = compare("backbone.features", f8, f32, float("inf"))
    exporter = get_exporter("onnx")
    man = dataclasses.replace(
        m8, precision="int8", files=files,
        test_vectors={**m.test_vectors,
                      "atol": SELFTEST_INT8_REL * max(
                          scale, float(np.abs(logits[:, : len(m.labels)]).max()))},
        quantization={"backbone": "int8", "head": "fp32 (trainable)", "per_channel": True,
                      **facts,
                      "calibration_windows": int(len(calib)),
                      "calibration_source": "source windows given to edgetl quantize",
                      "checked_with": checked_with(exporter)},
        adapt=_fp32_replay(m.adapt),
        checks={**{k: v for k, v in m.checks.items() if k != "accuracy"},
                "backbone_max_abs_err": err, "backbone_rel_err": err / max(scale, 1e-12),
                "accuracy": acc},
        provenance={**m.provenance,
                    "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "quantized_from": {"bundle": str(src),
                                       "backbone_sha256": m.files["backbone"].sha256},
                    **exporter.runtime_info()})
    if set(files) != set(m.files):
        raise BundleError("internal: file roles changed while quantizing")
    (tmp / MANIFEST).write_text(man.to_json())
    return man
