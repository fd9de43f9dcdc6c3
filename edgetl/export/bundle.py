"""``export_bundle``: student checkpoint -> device bundle directory, validated against PyTorch.

The bundle is built in a temporary sibling directory and swapped in only after every parity
check passed, so a failed export never replaces a good bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from edgetl.config import AdaptConfig, ExportConfig
from edgetl.errors import (
    BundleError,
    ConfigError,
    DataError,
    EdgetlError,
    ShapeMismatchError,
    ToleranceError,
)
from edgetl.export import adabn
from edgetl.export.registry import Exporter, as_feeds, get_exporter
from edgetl.head import HeadSpec, InferStep, TrainStep, init_state
from edgetl.manifest import MANIFEST, Manifest, file_entry
from edgetl.tolerances import (
    TRAIN_STEP_OUTLIER_FACTOR,
    TRAIN_STEP_OUTLIER_STEPS,
    TRAIN_STEPS_CHECKED,
    TRAIN_VECTOR_STEPS,
    parity_atol,
    scaled_atol,
    selftest_tolerances,
    train_step_bound,
)
from edgetl.trainable.step import BACKBONE_LR_SCALE

log = logging.getLogger(__name__)


def head_spec(ck: Checkpoint) -> HeadSpec:
    """The :class:`HeadSpec` of a checkpoint's head."""
    return HeadSpec(ck.head.kind, ck.model.backbone.out_features, len(ck.labels),
                    ck.head.hidden if ck.head.kind == "mlp" else 0,
                    learn_scale=ck.head.learn_scale, l2sp=ck.head.l2sp > 0)


def max_diff(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """``max|got - want|`` (0 when empty); :class:`ShapeMismatchError` if the shapes differ."""
    if got.shape != want.shape:
        raise ShapeMismatchError(f"{name}: exported graph gives shape {got.shape}, "
                                 f"PyTorch gives {want.shape}")
    return float(np.max(np.abs(got - want))) if got.size else 0.0


def compare(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> float:
    """Raise if shapes differ or ``max|got - want| > atol``; return the max difference."""
    err = max_diff(name, got, want)
    log.info("parity %s: max abs diff %.3g (atol %.1g)", name, err, atol)
    if not err <= atol:
        raise ToleranceError(f"{name}: exported graph differs from PyTorch by {err:.3g} "
                             f"(tolerance {atol:.1g})")
    return err


def _hparam_tensors(ref, hparams: dict) -> list[torch.Tensor]:
    """``ref``'s hyper-parameter inputs, in order (a tail step's backbone lr scale: 1 if absent)."""
    hparams = {BACKBONE_LR_SCALE: 1.0, **hparams}
    return [torch.tensor(hparams[k], dtype=torch.float32) for k in ref.hparam_names]


def _check_train_step(sess, spec: HeadSpec, optimizer: str, hparams: dict, params: dict,
                      atol: float, batch: int, steps: int = TRAIN_STEPS_CHECKED,
                      n_labels: int | None = None, ref=None,
                      features: np.ndarray | None = None, on_fused_error=None) -> float:
    """Run ``steps`` padded train steps in the runtime and in torch; return the max diff.

    Each output may differ by ``atol * max(1, max|torch value|)``: float32 rounds relative
    to the value, so a head with large logits or weights gets the same relative slack. A tail
    step (``ref`` given) is compared with the same torch step in float64 instead, within
    :func:`edgetl.tolerances.train_step_bound` of its measured float32 noise (the tolerance
    module says why); a tail that cannot run in float64 keeps the float32 rule (logged).

    Targets are drawn from the first ``n_labels`` classes (default all): spare rows of a
    fixed-capacity head never get targets on a device.

    ``ref``: the torch train step of a tail bundle (:class:`edgetl.trainable.step.TailTrain`;
    its features are the flattened cut); default the head's :class:`TrainStep`.

    ``features``: (n, dim) real features (the reference inputs through the bundle's frozen
    part); each step's batch is drawn from their rows, so the step sees the model's own input
    scale. Default N(0, 1) features (the head's graphs: a linear or MLP head stays stable on
    them). A tail's step runs backbone layers trained on real inputs: on N(0, 1) at the cut
    (white noise where the model saw smooth, normalised windows) at the device's lr, the torch
    reference itself can diverge (HAR ``--trainable all``: NaN by step 9), which checks nothing.

    ``on_fused_error(error)``: called instead of raising when the fused K-step graph fails its
    check (:func:`edgetl.export.fused.check_fused`), for an export that then ships without it.
    """
    ref, s, dim = _reference(spec, optimizer, params, ref)
    names = ref.input_names()
    p = [torch.as_tensor(v) for v in params.values()]
    hp = _hparam_tensors(ref, hparams)
    anchors = p if spec.l2sp else []  # L2-SP toward the starting head, as the runner does
    truth = _float64(ref)  # None for the head's step
    loss0 = 0.0
    g = torch.Generator().manual_seed(0)
    done: list = []
    noise: dict[str, float] = {}  # output -> torch float32's largest distance to float64
    judged: list = []  # (step, label, output, runtime value, truth, vs float64), after the steps
    for i in range(steps):
        f = _check_features(batch, dim, g, features)
        t = torch.eye(spec.num_classes)[torch.randint(0, n_labels or spec.num_classes, (batch,),
                                                      generator=g)]
        w = (torch.arange(batch) < batch - i % 3).float()  # some padded rows
        args = [f, t, w, *hp, *p, *s, *anchors]
        out = ref(*args)
        loss0 = loss0 if i else abs(float(out[0]))
        if (not all(bool(torch.isfinite(o).all()) for o in out)  # NaN, or blown up
                or abs(float(out[0])) > DIVERGED_LOSS_FACTOR * max(1.0, loss0)):
            raise DataError(
                f"train-step check: the PyTorch reference itself diverged at step {i} of "
                f"{steps} (loss {float(out[0]):.3g}; lr {hparams.get('lr')}) on "
                + (f"{len(features)} reference inputs" if features is not None and len(features)
                   else "N(0, 1) features") + " with random labels, so it cannot judge the "
                "exported graph; give more reference inputs (edgetl check --recipe) or a "
                "smaller head.lr")
        got = sess.train_step(as_feeds(names, [a.numpy() for a in args]))
        exact = _run_float64(truth, args)
        truth = truth if exact is not None else None
        for j, (name, want) in enumerate(zip(ref.output_names(), out, strict=True)):
            w = want.detach().numpy()
            if exact is None:  # float32 rounds relative to the value: scales with it past 1
                judged.append((i, f"train_step[{i}].{name}", name, np.array(got[name]), w,
                               False))
            else:  # the float64 step is the truth; torch float32's distance to it, the noise
                noise[name] = max(noise.get(name, 0.0),
                                  float(np.abs(w - exact[j]).max()) if w.size else 0.0)
                judged.append((i, f"train_step[{i}].{name} (vs the float64 step)", name,
                               np.array(got[name]), exact[j], True))
        p = list(out[1 : 1 + len(p)])
        s = list(out[1 + len(p) :])
        done.append(([a.numpy() for a in args], [o.detach().numpy() for o in out]))
    # an output's noise is the most torch float32 strayed from float64 on it over the steps:
    # a ReLU or max-pool tie that float32 rounds the other way reroutes a gradient (a
    # discrete jump, measured 5e-4 on a 64 px CNN's conv momentum at one step of 20, 1e-6 at
    # the others), and another runtime's jumps fall on other steps
    worst = _judge_steps([(i, label, got, want, train_step_bound(
        atol, want, noise[name] if vs64 else None)) for i, label, name, got, want, vs64 in judged])
    if getattr(sess, "fused", None):  # the K-step graph replays the same steps
        from edgerun import RunnerError

        from edgetl.export.fused import check_fused

        try:
            worst = max(worst, check_fused(sess, names, ref.output_names(), len(hp), done,
                                           atol))
        except (EdgetlError, RunnerError) as e:  # wrong values, or the runtime failed it
            if on_fused_error is None:
                raise
            on_fused_error(e)
    if getattr(sess, "run_graph", None):  # the whole-run graph: epochs of the same steps
        from edgetl.export.fused import check_run

        worst = max(worst, check_run(sess, names, ref.output_names(), len(hp), done,
                                     InferStep(spec).input_names(), atol))
    return worst


def _judge_steps(checks: list[tuple]) -> float:
    """Judge ``(step, label, got, want, bound)`` checks of a train-step run; the max difference.

    Every output within its bound at every step, except that
    :data:`~edgetl.tolerances.TRAIN_STEP_OUTLIER_STEPS` steps may break bounds by at most
    :data:`~edgetl.tolerances.TRAIN_STEP_OUTLIER_FACTOR` times (a kink rounded the other way
    at one step, logged); anything more raises the worst check's :class:`ToleranceError`,
    with what to do.
    """
    worst, over = 0.0, []  # over: (err / bound, step, label, err, bound)
    for i, label, got, want, bound in checks:
        err = max_diff(label, got, want)
        worst = max(worst, err)
        if not err <= bound:  # NaN breaks it too
            over.append((err / bound if err == err else float("inf"), i, label, err, bound))
    if not over:
        return worst
    steps = sorted({o[1] for o in over})
    ratio, _, label, err, bound = max(over)
    if len(steps) <= TRAIN_STEP_OUTLIER_STEPS and ratio <= TRAIN_STEP_OUTLIER_FACTOR:
        log.warning("train-step check: %d output(s) off their bound at step %s only (worst %s: "
                    "%.3g, bound %.1g): taken as a kink rounded the other way; every other step "
                    "is within bounds", len(over), steps[0], label, err, bound)
        return worst
    raise ToleranceError(
        f"{label}: exported graph differs from PyTorch by {err:.3g} (tolerance {bound:.1g}; "
        f"{len(over)} output(s) over their bound at step(s) {', '.join(map(str, steps[:8]))} "
        f"of the checked steps). The exported train step does not compute what torch does: "
        f"export with --trainable head or a smaller SPEC (last:1, bias), or another --target, "
        f"and report the model")


def _check_features(batch: int, dim: int, g: torch.Generator,
                    features: np.ndarray | None) -> torch.Tensor:
    """A (batch, dim) check batch: rows of ``features`` (with replacement) or N(0, 1)."""
    if features is None or not len(features):
        return torch.randn(batch, dim, generator=g)
    if features.shape[1:] != (dim,):
        raise ShapeMismatchError(f"check features have shape {features.shape[1:]}, the train "
                                 f"step takes ({dim},)")
    rows = torch.randint(0, len(features), (batch,), generator=g)
    return torch.from_numpy(np.ascontiguousarray(features, np.float32))[rows]


#: A check step whose loss exceeds this multiple of the first step's (at least 1) has blown up.
DIVERGED_LOSS_FACTOR = 1e3


def _float64(ref):
    """The float64 twin of a tail step (``None`` for a head, or a tail that cannot run it)."""
    if not hasattr(ref, "float64"):
        return None
    try:
        return ref.float64()
    except Exception as e:  # noqa: BLE001 - the float32 rule still checks the graph
        log.warning("train-step check: no float64 twin of the tail (%s); float32 rule", e)
        return None


def _run_float64(twin, args: list) -> list[np.ndarray] | None:
    """``twin``'s outputs for float32 ``args`` (cast up), as float32 arrays.

    ``None`` when it cannot run them (a tail making float32 constants of its own).
    """
    if twin is None:
        return None
    try:
        with torch.no_grad():
            out = twin(*[a.double() if a.is_floating_point() else a for a in args])
    except Exception as e:  # noqa: BLE001
        log.warning("train-step check: the float64 tail step failed (%s); float32 rule", e)
        return None
    return [o.detach().numpy().astype(np.float32) for o in out]


def _reference(spec: HeadSpec, optimizer: str, params: dict, ref=None):
    """The torch train step, its zero state (a list) and its feature width."""
    p = {k: torch.as_tensor(v) for k, v in params.items()}
    if ref is None:
        return (TrainStep(spec, optimizer), list(init_state(spec, optimizer, p).values()),
                spec.in_features)
    return ref, list(ref.init_state(p).values()), ref.model.tail_dim


def train_vectors(spec: HeadSpec, optimizer: str, hparams: dict, params: dict, batch: int,
                  steps: int = TRAIN_VECTOR_STEPS, seed: int = 1,
                  n_labels: int | None = None, ref=None,
                  features: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Reference train steps for the device self-test, computed by the torch train step.

    Starting from ``params`` (the shipped head) and zero optimizer state, ``steps`` batches
    of random features with some padded rows; stores the inputs compactly (features exactly
    representable in float16, labels as ids, weights as 0/1), every step's loss and the
    parameters after the last step (``train_final.<name>``). ``ref``, ``features``: as
    :func:`_check_train_step`.
    """
    ref, s0, dim = _reference(spec, optimizer, params, ref)
    g = torch.Generator().manual_seed(seed)
    p = {k: torch.as_tensor(v) for k, v in params.items()}
    s = dict(enumerate(s0))  # positional: only the order matters
    hp = _hparam_tensors(ref, hparams)
    anchors = list(p.values()) if spec.l2sp else []
    f = torch.stack([_check_features(batch, dim, g, features)
                     for _ in range(steps)]).half().float()
    labels = torch.randint(0, n_labels or spec.num_classes, (steps, batch), generator=g)
    t = torch.eye(spec.num_classes)[labels]
    w = (torch.arange(batch)[None] < batch - torch.arange(steps)[:, None] % 3).float()
    losses = []
    with torch.no_grad():
        for i in range(steps):
            out = ref(f[i], t[i], w[i], *hp, *p.values(), *s.values(), *anchors)
            losses.append(float(out[0]))
            p = dict(zip(p, out[1 : 1 + len(p)], strict=True))
            s = dict(zip(s, out[1 + len(p) :], strict=True))
    return {"train_features": f.half().numpy(), "train_labels": labels.numpy().astype(np.int32),
            "train_weights": w.numpy().astype(np.uint8),
            "train_loss": np.asarray(losses, np.float32),
            **{f"train_final.{k}": v.numpy() for k, v in p.items()}}


def checked_with(exporter: Exporter) -> str:
    """The runtime (and version) the export's checks ran in, e.g. ``onnxruntime 1.31.1``."""
    info = exporter.runtime_info()
    return ", ".join(f"{k.removesuffix('_validated')} {v}" for k, v in info.items()
                     if k.endswith("_validated"))


@contextlib.contextmanager
def staged_bundle(out: Path):
    """A temporary folder beside ``out`` to build a bundle in.

    It replaces ``out`` only if the block finishes and is removed otherwise, so a failed build
    never touches a good bundle.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shipped
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``tmp`` folder (the old one is removed after)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(ck: Checkpoint, out: Path, cfg: ExportConfig, *, reference_x: np.ndarray,
                  calib_x: np.ndarray | None = None,
                  eval_set: tuple[np.ndarray, np.ndarray] | None = None,
                  provenance: dict | None = None, sign_key: Path | None = None,
                  adapt: AdaptConfig | None = None,
                  replay: tuple[np.ndarray, np.ndarray] | None = None) -> Manifest:
    """Export ``ck`` as a device bundle in ``out`` and validate it against PyTorch.

    Args:
        ck: the student checkpoint.
        out: bundle directory; replaced only if the export and all checks succeed.
        cfg: target, precision, opset, head batch, calibration size, accuracy threshold.
        reference_x: raw (N, T, C) windows, for parity checks and the test vectors shipped
            to the device.
        calib_x: raw source windows that calibrate int8 activation ranges (int8 only).
        eval_set: raw windows and integer labels of held-out data: the bundle's accuracy
            must stay within ``cfg.max_accuracy_drop`` points of the PyTorch student's.
        provenance: extra facts recorded in the manifest (recipe, metrics...).
        sign_key: Ed25519 private key (PEM): writes ``manifest.sig`` before the swap-in.
        adapt: the device's adaptation defaults (the recipe's ``[adapt]``), written to the
            manifest; default :class:`AdaptConfig`.
        replay: raw labelled server-training windows ``(x, label ids)``, class-grouped in a
            seeded order (:func:`edgetl.check.per_class`): with ``adapt.replay_per_class > 0``
            the bundle ships the backbone's features of the first that many of each class
            (``replay.npz``, :mod:`edgerun.replay`).

    Raises:
        ShapeMismatchError, ToleranceError: an exported graph disagrees with PyTorch, or
            loses too much accuracy.
    """
    exporter: Exporter = get_exporter(cfg.target)
    for name, x in (("reference", reference_x), ("calibration", calib_x),
                    ("evaluation", None if eval_set is None else eval_set[0])):
        if x is not None:
            ck.kind.check_raw(name, x)
    if cfg.precision == "int8" and not ck.kind.dynamic_int8 and (
            calib_x is None or len(calib_x) == 0):
        raise DataError("an int8 export needs calibration windows from source data (calib_x)")
    with staged_bundle(out) as tmp:
        manifest = _build(exporter, ck, tmp, cfg, reference_x, calib_x, eval_set,
                          provenance or {}, adapt or AdaptConfig(), replay)
        if cfg.trainer == "ort-training":
            manifest = _check_ort_training(tmp, manifest)
        if sign_key is not None:
            from edgetl.signing import sign_bundle

            sign_bundle(tmp, sign_key)
    return manifest


class _Staged:
    """A bundle folder and its manifest as the device runner's ``Bundle`` presents them."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = str(root), manifest

    def path(self, role: str) -> str:
        from edgerun.manifest import safe_path

        return safe_path(self.root, self.manifest["files"][role]["path"])


def device_session(root: Path, manifest: Manifest | dict, threads: int = 2):
    """The device runner's backend for the bundle in ``root`` (its manifest may be unwritten).

    ``features(x)`` on preprocessed input, ``infer(feeds)`` and ``train_step(feeds)``, run
    by exactly the code a device runs (``edgerun.backends``), with the stateless train step.
    """
    from edgerun import RunnerError
    from edgerun.backends import make_backend

    m = dataclasses.asdict(manifest) if isinstance(manifest, Manifest) else manifest
    try:
        return make_backend(_Staged(Path(root), m), threads, trainer="stateless")
    except RunnerError as e:
        raise BundleError(str(e)) from None


def runtime_predictions(sess, spec: HeadSpec, params: dict, xn: np.ndarray,
                        names: list[str] | None = None) -> np.ndarray:
    """Class ids predicted by a bundle session (its runtime) for normalised windows.

    ``names``: the infer graph's inputs (default the head's :class:`InferStep`).
    """
    feats = sess.features(xn)
    out = sess.infer(as_feeds(names or InferStep(spec).input_names(), [feats, *params.values()]))
    return out["logits"].argmax(1)


#: Float slack of accuracy-drop comparisons: 20 of 2,000 windows is 1.00 pt, not 1.0000000001.
DROP_EPS = 1e-9


def accuracy_gate(want: np.ndarray, got: np.ndarray, y: np.ndarray, max_drop: float, *,
                  reference: str = "torch_fp32") -> dict:
    """Compare a bundle's predictions ``got`` with the reference's ``want`` on labels ``y``.

    Returns accuracies, agreement and the drop in points; raises :class:`ToleranceError` if
    the bundle loses more than ``max_drop`` points.
    """
    ref = float((want == y).mean())
    res = {"n": int(len(y)), "reference": reference, "reference_accuracy": ref,
           "bundle": float((got == y).mean()), "agreement": float((got == want).mean())}
    res["drop_points"] = 100 * (ref - res["bundle"])
    res["max_drop_points"] = max_drop
    log.info("accuracy: %s %.4f, bundle %.4f (drop %.2f pt)", reference, ref, res["bundle"],
             res["drop_points"])
    if res["drop_points"] > max_drop + DROP_EPS:  # exactly at the limit passes
        raise ToleranceError(
            f"the bundle's held-out accuracy {res['bundle']:.4f} is {res['drop_points']:.2f} "
            f"points below the {reference.replace('_', ' ')} reference's {ref:.4f} "
            f"(allowed: {max_drop}); try more calibration windows "
            "(export.calibration_windows) or fp32")
    return res


def torch_features(backbone: torch.nn.Module, xn: np.ndarray, batch: int = 128) -> np.ndarray:
    """PyTorch backbone features of model input, in chunks (text: padding columns cut)."""
    text = getattr(backbone, "is_text", False)
    out = []
    with torch.no_grad():
        for i in range(0, len(xn), batch):
            c = xn[i : i + batch]
            if text:
                from edgetl.text.encoder import trim

                c = trim(c)
            out.append(backbone(torch.from_numpy(np.ascontiguousarray(c))).numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.out_features), np.float32)


def _input_block(ck: Checkpoint, bb_sig: dict) -> dict:
    """The manifest's ``input``: what the device feeds the backbone and how to make it."""
    return {"name": bb_sig["inputs"][0], "shape": [bb_sig["batch_size"], *ck.input_shape],
            "batch_size": bb_sig["batch_size"], "signature": bb_sig.get("signature"),
            "dtype": "float32", "modality": ck.kind.modality, **ck.kind.block(bb_sig)}


def _accuracy_check(sess, model, ck: Checkpoint, spec: HeadSpec, params: dict,
                    eval_set: tuple[np.ndarray, np.ndarray], max_drop: float,
                    names: list[str] | None = None) -> dict:
    """Held-out accuracy of the bundle (its runtime) vs the PyTorch student, in points."""
    x, y = eval_set
    xn = ck.normalize(x)
    with torch.no_grad():
        feats = torch.from_numpy(torch_features(model.backbone, xn))
        want = model.head(feats).argmax(1).numpy()
    return accuracy_gate(want, runtime_predictions(sess, spec, params, xn, names), y, max_drop)


def _check_ort_training(tmp: Path, manifest: Manifest) -> Manifest:
    """Replay the reference train steps with ONNX Runtime training, in its own environment."""
    from edgetl.adapt import run_runner
    from edgetl.export.ort_training import ort_python

    python = ort_python()
    res = run_runner("selftest", tmp, python=python)
    if res.get("trainer") != "ort-training":
        raise ToleranceError(f"the runner in {python} did not train with ort-training")
    log.info("ort-training self-test: train max abs err %.3g", res["train_max_abs_err"])
    manifest = dataclasses.replace(manifest, checks={
        **manifest.checks, "ort_training_train_max_abs_err": res["train_max_abs_err"],
        "ort_training_runtime": res.get("trainer_version")})
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


#: Bias of a spare class row of a fixed-capacity head: its logit never wins and its softmax
#: probability (and so its gradient) is exactly 0 in float32.
UNUSED_BIAS = -1e4


def pad_classes(spec: HeadSpec, params: dict, capacity: int) -> tuple[HeadSpec, dict]:
    """A head with ``capacity`` class rows: the trained ones, then spare rows.

    Spare rows have zero weights and bias :data:`UNUSED_BIAS`; a device fills them with new
    labels (weight imprinting) without changing the graph's shapes. Fixed-shape runtimes
    (TFLite) can then learn new classes on the device.
    """
    extra = capacity - spec.num_classes
    if extra <= 0:
        return spec, params
    w_name, b_name = spec.class_params
    out = dict(params)
    out[w_name] = np.concatenate([params[w_name],
                                  np.zeros((extra, params[w_name].shape[1]), np.float32)])
    out[b_name] = np.concatenate([params[b_name], np.full(extra, UNUSED_BIAS, np.float32)])
    return dataclasses.replace(spec, num_classes=capacity), out


def _build(exporter: Exporter, ck: Checkpoint, tmp: Path, cfg: ExportConfig,
           reference_x: np.ndarray, calib_x: np.ndarray | None,
           eval_set: tuple[np.ndarray, np.ndarray] | None, provenance: dict,
           adapt: AdaptConfig, replay: tuple | None = None) -> Manifest:
    spec = head_spec(ck)
    params = {k: v.detach().numpy().astype(np.float32) for k, v in ck.model.head_state().items()}
    capacity = spec.num_classes
    if (not exporter.dynamic_classes or cfg.trainable != "head") and cfg.class_capacity:
        if cfg.class_capacity < spec.num_classes:
            raise ConfigError(f"export.class_capacity {cfg.class_capacity} is below the "
                              f"{spec.num_classes} classes the model already has")
        capacity = cfg.class_capacity
        spec, params = pad_classes(spec, params, capacity)
    files = {"backbone": f"backbone{exporter.suffix}"}
    if ck.text is not None:  # the device tokenises with the bundle's own tokenizer
        from edgetl.text.encoder import copy_tokenizer

        files.update(copy_tokenizer(tmp))
    model = ck.model.eval()
    xn = ck.normalize(reference_x)
    int8 = cfg.precision == "int8"
    calib = (ck.normalize(calib_x[: cfg.calibration_windows])
             if int8 and calib_x is not None and len(calib_x) else None)
    tail = None
    if cfg.trainable != "head":  # the frozen prefix is the backbone graph (edgetl.trainable)
        tail = _tail_for(exporter, ck, cfg, spec, params, xn)
        params = tail.params
    backbone = tail.cut.prefix if tail else model.backbone
    infer_ref = tail.infer if tail else InferStep(spec)
    bb_sig = exporter.export_backbone(backbone, torch.from_numpy(xn[:2]),
                                      tmp / files["backbone"], opset=cfg.opset,
                                      precision=cfg.precision, calib=calib,
                                      int8_io=cfg.int8_io)
    bn_block, bn_files = adabn.block(model.backbone, torch.from_numpy(xn[:2]), exporter.target,
                                     tmp, precision=cfg.precision, modality=ck.kind.modality,
                                     opset=cfg.opset, tail=tail is not None)
    files.update(bn_files)
    batch = cfg.train_batch
    if tail and exporter.target == "tflite":
        from edgetl.export.tail import export_tflite

        sig = export_tflite(tail, tmp, batch=batch, rows=spec.num_classes)
        sig.pop("permute_expand_rewrites")
    elif tail:
        from edgetl.export.tail import export_onnx

        sig = export_onnx(tail, tmp, opset=cfg.opset, batch=batch, rows=spec.num_classes)
    else:
        sig = exporter.export_head(spec, ck.head.optimizer, tmp, opset=cfg.opset, batch=batch)
    files.update(sig["files"])
    # the train step's hyper-parameters: the head's, and a tail's backbone lr scale
    hp_names = list(tail.train.hparam_names if tail else spec.hparam_names(ck.head.optimizer))
    hparams = {**ck.head.hparams(), **({BACKBONE_LR_SCALE: cfg.backbone_lr_scale}
                                       if BACKBONE_LR_SCALE in hp_names else {})}
    fused = exporter.export_fused(tmp, sig["train"], files, shared=[
        *hp_names,
        *(tail.train.anchor_names() if tail else spec.anchor_names)],
        trace=sig.pop("trace", None))
    fused_unsupported = (fused or {}).get("unsupported")
    fused = fused if fused and fused.get("fused") else None
    if fused:
        files.update(fused["files"])
    run = fused and not tail and exporter.export_run(tmp, fused["fused"], sig["infer"], files)
    if run:
        files.update(run["files"])
    files.update(head_init="head_init.npz", test_vectors="test_vectors.npz")
    np.savez(tmp / files["head_init"], **params)
    ort_training = None
    if cfg.trainer == "ort-training":
        from edgetl.export.ort_training import export_artifacts

        ort_files = export_artifacts(spec, ck.head.optimizer, params, tmp, opset=cfg.opset)
        files.update(ort_files)
        ort_training = {"training_model": "ort_training_model", "eval_model": "ort_eval_model",
                        "optimizer_model": "ort_optimizer_model", "checkpoint": "ort_checkpoint",
                        "inputs": ["features", "targets", "sample_weight"],
                        "package": "onnxruntime-training-cpu==1.19.2",
                        "update": "ORT SGD optimizer when momentum and weight decay are 0, "
                                  "else torch-semantics SGD applied to ORT's gradients"}

    feats = torch_features(backbone, xn)
    with torch.no_grad():
        logits = infer_ref(torch.from_numpy(feats), *map(torch.from_numpy,
                                                         params.values()))[0].numpy()
    quant = {}
    if int8:
        quant = {"backbone": "int8", "head": "fp32 (trainable)", "per_channel": True,
                 **({"tail": "fp32 (trainable; the backbone graph is the frozen prefix)"}
                    if tail else {}),
                 "calibration_windows": 0 if calib is None else len(calib),
                 "calibration_source": "server training data" if calib is not None else
                 "none: activations are quantised per call (dynamic)",
                 "checked_with": checked_with(exporter), **bb_sig.get("quantization", {})}
    shapes = ({n: tuple(v.shape) for n, v in params.items()} if tail
              else spec.param_shapes())
    state = [{"name": n, "like": None if n == "step" else n.split(".", 1)[1],
              "shape": [1] if n == "step" else list(shapes[n.split(".", 1)[1]])}
             for n in (tail.train.state_names() if tail
                       else spec.state_names(ck.head.optimizer))]
    anchor_names = tail.train.anchor_names() if tail else spec.anchor_names
    fixed = exporter.fixed_head_batch
    blocks = dict(
        edgetl_version=__version__,
        name=ck.meta.get("recipe", "model"),
        target=exporter.target,
        precision=cfg.precision,
        input=_input_block(ck, bb_sig),
        features={"name": bb_sig["outputs"][0],
                  "dim": tail.cut.dim if tail else spec.in_features},
        labels=list(ck.labels),
        head={"kind": spec.kind, "hidden": spec.hidden, "embedding_dim": spec.embedding_dim,
              **({"learn_scale": spec.learn_scale} if spec.kind == "cosine" else {}),
              **({"l2sp": ck.head.l2sp} if spec.l2sp else {}),
              "params": [{"name": n, "shape": list(s)} for n, s in shapes.items()],
              "class_params": list(spec.class_params), "init_file": "head_init",
              "capacity": capacity, "unused_bias": UNUSED_BIAS},
        optimizer={"name": ck.head.optimizer, "hparams": hparams, "state": state},
        train_step={**sig["train"], "loss_output": "loss",
                    "targets_input": "targets", "targets_encoding": "one_hot_float32",
                    "sample_weight_input": "sample_weight",
                    "hparam_inputs": hp_names,
                    **({"anchor_inputs": {a: a.split(".", 1)[1] for a in anchor_names}}
                       if spec.l2sp else {}),
                    "batch_size": batch if fixed or tail else None,
                    "dynamic_classes": (exporter.dynamic_classes and ort_training is None
                                        and tail is None),
                    "trainer": cfg.trainer,
                    **({"fused": fused["fused"]} if fused else {}),
                    **({"run": run["run"]} if run else {}),
                    **({"ort_training": ort_training} if ort_training else {})},
        infer={**sig["infer"], "batch_size": batch if fixed else None},
        adapt={"epochs": adapt.epochs, "batch_size": adapt.batch_size,
               "val_fraction": adapt.val_fraction, "patience": adapt.patience,
               "mix": list(adapt.mix), "class_balanced": adapt.class_balanced,
               "freeze_absent": adapt.freeze_absent,
               "gate": {"rule": "mcnemar", "alpha": adapt.gate_alpha,
                        "chosen_on": "server-validation users (docs/personalisation.md)",
                        **({"folds": adapt.gate_folds} if adapt.gate_folds > 1 else {})}},
        quantization=quant,
        adabn=bn_block,
        provenance={"created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "opset": cfg.opset,
                    **({"backbone_exporter": bb_sig["exporter"]} if "exporter" in bb_sig
                       else {}),
                    **exporter.runtime_info(), **provenance},
    )
    # the checks run in the device runner's own backend (edgerun.backends), not a copy of it
    if tail:
        blocks["trainable"] = tail.block()
    sess = device_session(tmp, {**blocks, "files": {r: {"path": p} for r, p in files.items()}})
    if replay is not None and adapt.replay_per_class > 0:
        blocks["adapt"]["replay"] = _replay_set(sess, ck, replay, adapt, tmp,
                                                with_inputs="stats" in bn_block)
        files["replay"] = REPLAY_FILE
        if adapt.gate_max_forget >= 0:
            blocks["adapt"]["gate"]["max_forget"] = adapt.gate_max_forget
    atol = parity_atol(exporter.target)
    got_feats = sess.features(xn)
    scale = float(np.abs(feats).max())
    n_real = len(ck.labels)  # logit columns of real classes (spare rows sit at UNUSED_BIAS)
    checks: dict = {"atol": atol, "feature_scale": scale}
    if int8:
        # Quantised features differ from fp32 by design: record how much, gate on accuracy,
        # and ship the runtime's own outputs as test vectors (a quantisation step of slack).
        err = compare("backbone.features", got_feats, feats, float("inf"))
        checks["backbone_max_abs_err"] = err
        tv_feats = got_feats
        tv_logits = infer_ref(torch.from_numpy(got_feats), *map(
            torch.from_numpy, params.values()))[0].detach().numpy()
    else:
        checks["backbone_max_abs_err"] = compare("backbone.features", got_feats, feats,
                                                 scaled_atol(exporter.target, feats))
        tv_feats, tv_logits = feats, logits
    tol = selftest_tolerances(exporter.target, "int8" if int8 else "fp32", quant, tv_feats,
                              tv_logits, n_real)
    checks["selftest_tolerance"] = tol.pop("basis")
    checks["backbone_rel_err"] = checks["backbone_max_abs_err"] / max(scale, 1e-12)
    infer_out = sess.infer(as_feeds(infer_ref.input_names(), [feats, *params.values()]))
    checks["infer_max_abs_err"] = compare("head_infer.logits", infer_out["logits"], logits,
                                          scaled_atol(exporter.target, logits[:, :n_real]))
    failed: list = []  # a fused graph the exporter may leave out: dropped if it fails
    checks["train_step_max_abs_err"] = _check_train_step(
        sess, spec, ck.head.optimizer, hparams, params, atol, batch,
        n_labels=len(ck.labels), ref=tail.train if tail else None,
        features=feats if tail else None,
        on_fused_error=failed.append if exporter.fused_optional else None)
    if failed:
        fused_unsupported = f"failed the export check: {' '.join(str(failed[0]).split())}"
        log.warning("the fused train graph %s is not shipped (%s); the bundle trains one step "
                    "per call", fused["fused"]["file"], fused_unsupported)
        blocks["train_step"].pop("fused")
        (tmp / files.pop(fused["fused"]["file"])).unlink()
        fused = None
    checks.update(n_reference=len(reference_x), train_steps_checked=TRAIN_STEPS_CHECKED,
                  fused_train_checked=fused is not None,
                  run_train_checked=bool(getattr(sess, "run_graph", None)))
    if fused_unsupported:
        checks["fused_train_unsupported"] = fused_unsupported
    if eval_set is not None:
        checks["accuracy"] = _accuracy_check(sess, model, ck, spec, params, eval_set,
                                             cfg.max_accuracy_drop, infer_ref.input_names())
    n_tv = min(cfg.n_test_vectors, len(reference_x))
    # at least one call of a fixed-K fused graph, so the device self-test replays it too
    n_train_tv = max(TRAIN_VECTOR_STEPS, (fused["fused"]["steps"] or 0) if fused else 0)
    tvec = train_vectors(spec, ck.head.optimizer, hparams, params, batch,
                         steps=n_train_tv, n_labels=len(ck.labels),
                         ref=tail.train if tail else None, features=feats if tail else None)
    # the device replays these steps: same relative slack as the check above, scaled by the
    # loss and the parameters of the labels in use (spare class rows sit at UNUSED_BIAS; the
    # runners compare values above 1 relatively)
    train_atol = atol * max([1.0] + [float(np.abs(v).max()) for k, v in _in_use(
        tvec, spec.class_params, len(ck.labels)).items()])
    if "stats" in bn_block:  # the device's AdaBN statistics vs torch's (edgetl.export.adabn)
        bn_checks, bn_tol, bn_tv = adabn.check(
            _Staged(tmp, {**blocks, "files": {r: {"path": p} for r, p in files.items()}}),
            model.backbone, xn, xn[: max(n_tv, 8)], exporter.target)
        checks.update(bn_checks)
        bn_block.update(bn_tol)
        tvec.update(bn_tv)
    np.savez(tmp / files["test_vectors"], **ck.kind.vector_x(reference_x[:n_tv], xn[:n_tv]),
             features=tv_feats[:n_tv], logits=tv_logits[:n_tv], **tvec)

    manifest = Manifest(
        **blocks,
        files={role: file_entry(tmp, rel) for role, rel in files.items()},
        test_vectors={"file": "test_vectors", "count": n_tv, **tol,
                      "train_steps": n_train_tv, "train_atol": train_atol},
        checks=checks,
    )
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


REPLAY_FILE = "replay.npz"


def _in_use(tvec: dict, class_params, n_labels: int) -> dict:
    """The reference loss and final parameters, class parameters cut to the labels in use."""
    out = {}
    for k, v in tvec.items():
        if k == "train_loss":
            out[k] = v
        elif k.startswith("train_final."):
            out[k] = v[:n_labels] if k.split(".", 1)[1] in class_params else v
    return out


def _replay_set(sess, ck: Checkpoint, replay: tuple, adapt: AdaptConfig, tmp: Path, *,
                with_inputs: bool = False) -> dict:
    """Write the latent-replay set: features by the bundle's own backbone (``sess``).

    The first ``adapt.replay_per_class`` windows of each class of ``replay`` (already a seeded
    per-class order); int8 bundles get their int8 backbone's features, tail bundles the cut's.
    ``with_inputs`` (bundles with AdaBN graphs): also the first windows of each class
    themselves, preprocessed, float16, within ``adapt.replay_inputs_mb``: recalibrated BN
    statistics change the features, so the device's gate judges them on these.
    """
    x, y = replay
    y = np.asarray(y, np.int64)
    k = adapt.replay_per_class
    classes = np.unique(y)
    pick = np.concatenate([np.flatnonzero(y == c)[:k] for c in classes])
    xn = ck.normalize(x[pick])
    feats = sess.features(xn).astype(np.float32)
    arrays = {"features": feats, "labels": y[pick]}
    per_window = int(np.prod(xn.shape[1:])) * 2  # float16 bytes
    k_in = min(k, int(adapt.replay_inputs_mb * 2**20) // (per_window * len(classes)))
    if with_inputs and k_in > 0 and np.issubdtype(xn.dtype, np.floating):
        rows = np.concatenate([np.flatnonzero(y[pick] == c)[:k_in] for c in classes])
        arrays.update(inputs=xn[rows].astype(np.float16), input_labels=y[pick][rows])
    np.savez(tmp / REPLAY_FILE, **arrays)
    counts = np.bincount(y[pick], minlength=len(ck.labels))
    return {"weight": adapt.replay_weight, "count": int(len(pick)), "per_class": k,
            "min_per_class": int(counts.min()),
            **({"inputs": int(len(arrays["inputs"]))} if "inputs" in arrays else {}),
            "source": "server-training windows (never the server-validation users), features "
                      "by this bundle's backbone"}


def _tail_for(exporter: Exporter, ck: Checkpoint, cfg: ExportConfig, spec: HeadSpec,
              params: dict, xn: np.ndarray):
    """The :class:`edgetl.export.tail.Tail` of ``cfg.trainable``, or a clear refusal."""
    from edgetl.export.tail import prepare

    if exporter.target not in ("onnx", "tflite"):
        raise ConfigError(f"--trainable {cfg.trainable}: only the onnx and tflite targets "
                          f"export a tail train step so far, not {exporter.target}; use "
                          "--trainable head")
    if cfg.trainer != "stateless":
        raise ConfigError(f"--trainable {cfg.trainable} needs the stateless trainer")
    tail = prepare(ck.model.backbone.eval(), spec, ck.head.optimizer, cfg.trainable, params,
                   torch.from_numpy(xn[:2]))
    if cfg.precision != "fp32" and not any(True for _ in tail.cut.prefix.parameters()):
        raise ConfigError(f"--trainable {cfg.trainable} trains the backbone's first layer, so "
                          "no frozen prefix is left to quantise (the tail stays fp32); use "
                          "--precision fp32 or a SPEC that freezes the first layers")
    ints = [p.node for p in tail.cut.parts if not p.dtype.is_floating_point]
    if cfg.precision != "fp32" and ints:
        raise ConfigError(f"--trainable {cfg.trainable}: the cut passes integer or boolean "
                          f"tensors ({', '.join(ints)}: token ids, masks) to the trained layers, "
                          "which an int8 backbone would quantise; use --precision fp32, or a "
                          "SPEC whose cut is a float tensor (e.g. last:1)")
    return tail
