"""``edgetl check BUNDLE``: the release gate. Exit 0 only if every check holds.

Checks, in order (a failed integrity check stops the rest: nothing else can be trusted):

integrity   manifest schema, every file present with its sha256, none outside the bundle
selftest    the device runner reproduces the bundle's reference vectors in its runtime
smoke       the device runner adapts the head for one epoch on the reference windows
parity      (with ``--checkpoint``) backbone, head and 20 train steps vs the PyTorch student
accuracy    (with a recipe) held-out accuracy through the runner vs the fp32 reference
adaptation  (with a recipe) personalised heads not worse than the general head on average

Everything a device would run is run by the device runner in a subprocess, exactly as on a
device; only the parity check runs the exporter's in-process session.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgetl import adapt as device
from edgetl.errors import EdgetlError
from edgetl.manifest import Manifest
from edgetl.tolerances import TRAIN_STEPS_CHECKED, parity_atol, scaled_atol


@dataclass(frozen=True)
class CheckData:
    """Raw data the export and check stages draw from a recipe's data.

    reference: server-validation windows (parity checks, shipped test vectors);
    calibration: server-training windows (int8 activation ranges);
    heldout: the device users' windows and labels (accuracy gates);
    replay: labelled server-training windows, up to ``REPLAY_POOL`` per class in a seeded
    order (the bundle's latent-replay set takes the first ``adapt.replay_per_class`` of each).
    """

    reference: np.ndarray
    calibration: np.ndarray
    heldout_x: np.ndarray
    heldout_y: np.ndarray
    labels: tuple[str, ...] = ()
    replay_x: np.ndarray | None = None
    replay_y: np.ndarray | None = None


#: Server-training windows per class :class:`CheckData` keeps for replay sets.
REPLAY_POOL = 256


def per_class(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``k`` items of every class of ``y``, a seeded pick, in class order.

    The first ``j <= k`` of each class are the same pick for every ``j``.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k]
                           for c in np.unique(y)] or [np.zeros(0, np.int64)]).astype(np.int64)


@dataclass
class Check:
    """One check: did it hold, the measured value, its limit, and what was measured."""

    name: str
    ok: bool
    value: float | None = None
    limit: float | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        """Plain dict for ``--json``."""
        return asdict(self)


def integrity(bundle: Path, trust_key: Path | None = None) -> tuple[Check, Manifest | None]:
    """Schema, presence and sha256 of every file, no path leaving the bundle, the signature.

    With ``trust_key`` the bundle must carry a valid ``manifest.sig`` over the very bytes
    that are parsed (as on a ``--trust-key`` device); without it a signed bundle is reported
    as signed and not verified.
    """
    from edgerun import RunnerError
    from edgerun import manifest as schema
    from edgerun.bundle import verify_signature

    signed = (Path(bundle) / schema.SIGNATURE).exists()
    try:
        body = schema.read_bytes(str(bundle))
        if trust_key is not None:
            verify_signature(str(bundle), body, str(trust_key))
        m = Manifest.from_json(body)
        m.verify(bundle)  # the device's own guard: no file outside the bundle, sha256s
    except (EdgetlError, RunnerError, OSError, ValueError, KeyError, TypeError) as e:
        return Check("integrity", False, detail=str(e)), None
    sig = ("signature verified" if trust_key is not None else
           "signed (manifest.sig) but NOT verified: pass --trust-key" if signed else "unsigned")
    return Check("integrity", True, detail=f"schema {m.schema_version}, {len(m.files)} files, "
                                           f"sha256 ok, {sig}"), m


def _runner_check(name: str, fn) -> Check:
    try:
        return fn()
    except EdgetlError as e:
        return Check(name, False, detail=str(e))


def selftest(bundle: Path, m: Manifest) -> Check:
    """The runner's self-test against the shipped reference vectors."""

    def run():
        r = device.run_runner("selftest", bundle)
        return Check("selftest", True, r["max_abs_err"], float(m.test_vectors["atol"]),
                     f"{m.test_vectors['count']} reference windows")

    return _runner_check("selftest", run)


def _write_text_csv(path: Path, texts, labels) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *zip(texts, labels, strict=True)])
    return path


def smoke(bundle: Path, m: Manifest, work: Path) -> Check:
    """One epoch of on-device training on the reference windows (labels cycling)."""

    def run():
        with np.load(bundle / m.files["test_vectors"].path) as z:
            x = z["texts"] if "texts" in z.files else z["x"]
        # enough windows for a train/validation split: >= 24, and 3 of every label
        reps = max(1, -(-max(24, 3 * len(m.labels)) // len(x)))
        xs = np.concatenate([x] * reps)
        # labels cycle over the bundle's classes: a smoke test of the train step, not of
        # accuracy (and the runner refuses single-label data)
        y = np.array([m.labels[i % len(m.labels)] for i in range(len(xs))], dtype=str)
        if m.input.get("modality") == "text":  # text bundles read .csv (text, label)
            data = _write_text_csv(work / "smoke.csv", xs, y)
        else:
            data = work / "smoke.npz"
            np.savez(data, x=xs, y=y)
        r = device.adapt(bundle, data, work / "smoke", epochs=1, val_fraction=0.25)
        loss = r["history"][-1]["loss"]
        return Check("smoke", bool(np.isfinite(loss)) and r["steps"] >= 1, float(loss), None,
                     f"{r['steps']} train step(s) in {r['backend']}, loss {loss:.3g}")

    return _runner_check("smoke", run)


def parity(bundle: Path, m: Manifest, checkpoint: Path, reference_x: np.ndarray | None) -> Check:
    """fp32 backbone (fp32 bundles), head logits and 20 train steps vs the PyTorch student."""
    import torch

    from edgetl.checkpoint import load_checkpoint
    from edgetl.export.bundle import _check_train_step, compare, torch_features
    from edgetl.head import InferStep
    from edgetl.quantize import head_params, session_of, spec_of

    atol = parity_atol(m.target)
    try:
        ck = load_checkpoint(checkpoint)
        if list(ck.labels) != m.labels or list(ck.input_shape) != list(m.input["shape"][1:]):
            return Check("parity", False, detail=f"{checkpoint} is not this bundle's model "
                                                 f"(labels/window differ)")
        spec, params = spec_of(m), head_params(bundle, m)
        sess = session_of(bundle, m)
        if reference_x is None:
            with np.load(bundle / m.files["test_vectors"].path) as z:
                reference_x = z["texts"] if "texts" in z.files else z["x"]
        xn = ck.normalize(reference_x)
        model = ck.model.eval()
        backbone, infer_ref, train_ref = model.backbone, InferStep(spec), None
        if m.trainable:  # a tail bundle: the cut prefix, the tail's torch steps
            import dataclasses

            from edgetl.export.tail import prepare

            spec = dataclasses.replace(spec, in_features=model.backbone.out_features)
            tail = prepare(model.backbone, spec, m.optimizer["name"], m.trainable["spec"],
                           {k: v for k, v in params.items() if not k.startswith("backbone.")},
                           torch.from_numpy(xn[:2]))
            backbone, infer_ref, train_ref = tail.cut.prefix, tail.infer, tail.train
        feats = torch_features(backbone, xn)
        with torch.no_grad():
            logits = infer_ref(torch.from_numpy(feats),
                               *map(torch.from_numpy, params.values()))[0].numpy()
        parts = []
        worst = 0.0
        if m.precision == "fp32":
            worst = compare("backbone.features", sess.features(xn), feats,
                            scaled_atol(m.target, feats))
            parts.append(f"backbone {worst:.1e}")
        got = sess.infer({"features": feats, **params})["logits"]
        e_inf = compare("head_infer.logits", got, logits,
                        scaled_atol(m.target, logits[:, : len(m.labels)]))
        batch = m.train_step.get("batch_size") or 16
        e_step = _check_train_step(sess, spec, m.optimizer["name"], m.optimizer["hparams"],
                                   params, atol, batch, n_labels=len(m.labels), ref=train_ref,
                                   features=feats if m.trainable else None)
        worst = max(worst, e_inf, e_step)
        parts += [f"infer {e_inf:.1e}", f"{TRAIN_STEPS_CHECKED} train steps {e_step:.1e}"]
        if m.precision != "fp32":
            parts.append("int8 backbone: see accuracy")
        return Check("parity", True, worst, atol, f"{len(xn)} windows; " + ", ".join(parts))
    except EdgetlError as e:
        return Check("parity", False, limit=atol, detail=str(e))


def _bundle_accuracy(bundle: Path, data: Path) -> float:
    return float(device.infer(bundle, data)["accuracy"])


def accuracy(bundle: Path, m: Manifest, x: np.ndarray, y_names: np.ndarray, work: Path, *,
             max_drop: float, checkpoint: Path | None, reference_bundle: Path | None) -> Check:
    """Held-out accuracy through the runner vs the fp32 reference, in points."""

    def run():
        text = m.input.get("modality") == "text"
        data = work / ("heldout.csv" if text else "heldout.npz")
        if text:
            _write_text_csv(data, x, y_names)
        else:
            np.savez(data, x=x, y=y_names)
        got = _bundle_accuracy(bundle, data)
        if checkpoint is not None:
            import torch

            from edgetl.checkpoint import load_checkpoint
            from edgetl.export.bundle import torch_features

            ck = load_checkpoint(checkpoint)
            model = ck.model.eval()
            with torch.no_grad():
                feats = torch.from_numpy(torch_features(model.backbone, ck.normalize(x)))
                pred = model.head(feats).argmax(1).numpy()
            ref = float(np.mean(np.array(ck.labels)[pred] == y_names))
            ref_name = "PyTorch student"
        elif reference_bundle is not None:
            ref, ref_name = _bundle_accuracy(reference_bundle, data), str(reference_bundle)
        elif m.precision == "fp32":
            return Check("accuracy", True, got, None, f"{got:.4f} on {len(x)} held-out windows "
                                                      "(no fp32 reference given)")
        else:
            return Check("accuracy", False, got, max_drop,
                         "an int8 bundle needs a reference: pass --checkpoint (the torch "
                         "student) or --reference (the fp32 bundle)")
        drop = 100 * (ref - got)
        return Check("accuracy", drop <= max_drop + 1e-9, drop, max_drop,  # at the limit: ok
                     f"{got:.4f} vs {ref_name} {ref:.4f} on {len(x)} held-out windows "
                     f"(drop in points)")

    return _runner_check("accuracy", run)


def check_bundle(bundle: Path, *, checkpoint: Path | None = None,
                 reference_x: np.ndarray | None = None,
                 heldout: tuple[np.ndarray, np.ndarray] | None = None,
                 max_drop: float | None = None, reference_bundle: Path | None = None,
                 adaptation: Callable[[Path, Path], Check] | None = None,
                 trust_key: Path | None = None) -> list[Check]:
    """Run every applicable check on ``bundle``; see the module docstring.

    The check takes its data, never a recipe: a recipe's data comes from
    :func:`edgetl.pipeline.check_inputs`, a user's from ``--heldout``.

    Args:
        checkpoint: the PyTorch student, for parity and as the accuracy reference.
        reference_x: raw inputs for the parity check (default: the bundle's test vectors).
        heldout: ``(x, labels)`` (names or ids) for the accuracy check; ``max_drop`` points
            (default :data:`~edgetl.tolerances.MAX_ACCURACY_DROP_POINTS`) vs the reference.
        reference_bundle: an fp32 bundle as the accuracy reference, without a checkpoint.
        adaptation: ``(bundle, work_dir) -> Check``: personalises simulated devices through
            the runner (made by :func:`edgetl.pipeline.check_inputs` from a recipe).
        trust_key: Ed25519 public key (PEM): the signature must verify, as on a device.
    """
    from edgetl.tolerances import MAX_ACCURACY_DROP_POINTS

    bundle = Path(bundle)
    first, m = integrity(bundle, trust_key)
    checks = [first]
    if m is None:
        return checks
    work = Path(tempfile.mkdtemp(prefix="edgetl-check-"))
    try:
        checks += [selftest(bundle, m), smoke(bundle, m, work)]
        if checkpoint is not None:
            checks.append(parity(bundle, m, Path(checkpoint), reference_x))
        if heldout is not None:
            hx, hy = heldout
            names = np.asarray(hy)
            if names.dtype.kind in "iu":  # ids -> the bundle's label names
                names = np.asarray(m.labels)[names]
            checks.append(accuracy(bundle, m, hx, names.astype(str), work,
                                   max_drop=MAX_ACCURACY_DROP_POINTS if max_drop is None
                                   else max_drop, checkpoint=checkpoint,
                                   reference_bundle=reference_bundle))
        if adaptation is not None:
            checks.append(_runner_check("adaptation", lambda: adaptation(bundle, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return checks


def release_gate(bundle: Path, **check: object) -> list[dict]:
    """:func:`check_bundle` on a freshly exported bundle; raise if any check fails."""
    from edgetl.errors import EdgetlError
    from edgetl.progress import console

    res = check_bundle(bundle, **check)
    bad = failures(res)
    if bad:
        raise EdgetlError(f"bundle {bundle} failed `edgetl check`: " + "; ".join(
            f"{c.name}: {c.detail}" + (f" ({c.value:.3g} vs limit {c.limit:.3g})"
                                       if c.value is not None and c.limit is not None else "")
            for c in bad))
    console.log(f"edgetl check {bundle}: all {len(res)} checks hold")
    return [c.to_dict() for c in res]


def failures(checks: list[Check]) -> list[Check]:
    """The checks that did not hold."""
    return [c for c in checks if not c.ok]
