"""``export_bundle``: student checkpoint -> device bundle directory, validated against PyTorch.

The bundle is built in a temporary sibling directory and swapped in only after every parity
check passed, so a failed export never replaces a good bundle.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgetl import __version__
from edgetl.checkpoint import Checkpoint
from edgetl.config import ExportConfig
from edgetl.errors import DataError, ShapeMismatchError, ToleranceError
from edgetl.export.registry import Exporter, as_feeds, get_exporter
from edgetl.head import HPARAMS, HeadSpec, InferStep, TrainStep, init_state
from edgetl.manifest import MANIFEST, Manifest, file_entry

log = logging.getLogger(__name__)


def head_spec(ck: Checkpoint) -> HeadSpec:
    """The :class:`HeadSpec` of a checkpoint's head."""
    return HeadSpec(ck.head.kind, ck.model.backbone.out_features, len(ck.labels),
                    ck.head.hidden if ck.head.kind == "mlp" else 0)


def compare(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> float:
    """Raise if shapes differ or ``max|got - want| > atol``; return the max difference."""
    if got.shape != want.shape:
        raise ShapeMismatchError(f"{name}: exported graph gives shape {got.shape}, "
                                 f"PyTorch gives {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    log.info("parity %s: max abs diff %.3g (atol %.1g)", name, err, atol)
    if not err <= atol:
        raise ToleranceError(f"{name}: exported graph differs from PyTorch by {err:.3g} "
                             f"(tolerance {atol:.1g})")
    return err


def _check_train_step(sess, spec: HeadSpec, optimizer: str, hparams: dict, params: dict,
                      atol: float, batch: int, steps: int = 20) -> float:
    """Run ``steps`` padded train steps in the runtime and in torch; return the max diff."""
    ref = TrainStep(spec, optimizer)
    names = ref.input_names()
    p = [torch.as_tensor(v) for v in params.values()]
    s = list(init_state(spec, optimizer, dict(zip(params, p, strict=True))).values())
    hp = [torch.tensor(hparams[k], dtype=torch.float32) for k in HPARAMS[optimizer]]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for i in range(steps):
        f = torch.randn(batch, spec.in_features, generator=g)
        t = torch.eye(spec.num_classes)[torch.randint(0, spec.num_classes, (batch,), generator=g)]
        w = (torch.arange(batch) < batch - i % 3).float()  # some padded rows
        args = [f, t, w, *hp, *p, *s]
        out = ref(*args)
        got = sess.train_step(as_feeds(names, [a.numpy() for a in args]))
        for name, want in zip(ref.output_names(), out, strict=True):
            worst = max(worst, compare(f"train_step[{i}].{name}", got[name], want.numpy(), atol))
        p = list(out[1 : 1 + len(p)])
        s = list(out[1 + len(p) :])
    return worst


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(ck: Checkpoint, out: Path, cfg: ExportConfig, *, reference_x: np.ndarray,
                  provenance: dict | None = None) -> Manifest:
    """Export ``ck`` as a device bundle in ``out`` and validate it against PyTorch.

    Args:
        ck: the student checkpoint.
        out: bundle directory; replaced only if the export and all checks succeed.
        cfg: target, precision, opset and number of test vectors.
        reference_x: raw (N, T, C) windows from source data, for parity checks and the
            test vectors shipped to the device.
        provenance: extra facts recorded in the manifest (recipe, metrics...).

    Raises:
        ShapeMismatchError, ToleranceError: an exported graph disagrees with PyTorch.
    """
    exporter: Exporter = get_exporter(cfg.target)
    if reference_x.ndim != 3 or reference_x.shape[1:] != (ck.window, len(ck.channels)):
        raise DataError(f"reference windows must be (N, {ck.window}, {len(ck.channels)}), "
                        f"got {reference_x.shape}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        manifest = _build(exporter, ck, tmp, cfg, reference_x, provenance or {})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shipped
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build(exporter: Exporter, ck: Checkpoint, tmp: Path, cfg: ExportConfig,
           reference_x: np.ndarray, provenance: dict) -> Manifest:
    spec = head_spec(ck)
    sfx = exporter.suffix
    files = {"backbone": f"backbone{sfx}", "head_train": f"head_train{sfx}",
             "head_infer": f"head_infer{sfx}", "head_init": "head_init.npz",
             "test_vectors": "test_vectors.npz"}
    model = ck.model.eval()
    xn = ck.normalize(reference_x)
    bb_sig = exporter.export_backbone(model.backbone, torch.from_numpy(xn[:2]),
                                      tmp / files["backbone"], opset=cfg.opset)
    batch = exporter.fixed_batch or 16
    sig = exporter.export_head(spec, ck.head.optimizer, tmp / files["head_train"],
                               tmp / files["head_infer"], opset=cfg.opset, batch=batch)
    params = {k: v.detach().numpy().astype(np.float32) for k, v in model.head_state().items()}
    np.savez(tmp / files["head_init"], **params)

    with torch.no_grad():
        feats = model.backbone(torch.from_numpy(xn)).numpy()
        logits, emb = InferStep(spec)(torch.from_numpy(feats), *map(torch.from_numpy,
                                                                    params.values()))
    n_tv = min(cfg.n_test_vectors, len(reference_x))
    np.savez(tmp / files["test_vectors"], x=reference_x[:n_tv].astype(np.float32),
             features=feats[:n_tv], logits=logits.numpy()[:n_tv])

    sess = exporter.session(tmp, files)
    atol = exporter.atol
    infer_out = sess.infer(as_feeds(InferStep(spec).input_names(), [feats, *params.values()]))
    checks = {
        "atol": atol,
        "backbone_max_abs_err": compare("backbone.features", sess.features(xn), feats, atol),
        "infer_max_abs_err": compare("head_infer.logits", infer_out["logits"], logits.numpy(),
                                     atol),
        "train_step_max_abs_err": _check_train_step(sess, spec, ck.head.optimizer,
                                                    ck.head.hparams(), params, atol, batch),
        "n_reference": len(reference_x),
        "train_steps_checked": 20,
    }
    shapes = spec.param_shapes()
    state = [{"name": n, "like": None if n == "step" else n.split(".", 1)[1],
              "shape": [1] if n == "step" else list(shapes[n.split(".", 1)[1]])}
             for n in spec.state_names(ck.head.optimizer)]
    manifest = Manifest(
        edgetl_version=__version__,
        name=ck.meta.get("recipe", "model"),
        target=exporter.target,
        precision=cfg.precision,
        files={role: file_entry(tmp, rel) for role, rel in files.items()},
        input={"name": bb_sig["inputs"][0], "shape": [None, ck.window, len(ck.channels)],
               "dtype": "float32", "layout": "NTC", "channels": list(ck.channels),
               "window": ck.window, "stride": ck.stride, "sample_rate_hz": ck.sample_rate_hz,
               "preprocess": {"normalize": {"mean": [float(v) for v in ck.mean],
                                            "std": [float(v) for v in ck.std]}}},
        features={"name": bb_sig["outputs"][0], "dim": spec.in_features},
        labels=list(ck.labels),
        head={"kind": spec.kind, "hidden": spec.hidden, "embedding_dim": spec.embedding_dim,
              "params": [{"name": n, "shape": list(s)} for n, s in shapes.items()],
              "class_params": list(spec.class_params), "init_file": "head_init"},
        optimizer={"name": ck.head.optimizer, "hparams": ck.head.hparams(), "state": state},
        train_step={"file": "head_train", **sig["train"], "loss_output": "loss",
                    "targets_input": "targets", "targets_encoding": "one_hot_float32",
                    "sample_weight_input": "sample_weight",
                    "hparam_inputs": list(HPARAMS[ck.head.optimizer]),
                    "batch_size": exporter.fixed_batch, "dynamic_classes": True},
        infer={"file": "head_infer", **sig["infer"]},
        test_vectors={"file": "test_vectors", "count": n_tv, "atol": 10 * atol},
        checks=checks,
        provenance={"created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "opset": cfg.opset,
                    **exporter.runtime_info(), **provenance},
    )
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest
