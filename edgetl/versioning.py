"""Bundle versions: a new head on the same backbone, recorded as ``version`` + ``parent``.

``manifest.json`` carries ``version`` (1 for an export; old manifests without it read as 1)
and ``parent`` (null for an export; else the parent's version, the sha256 of its
``manifest.json`` bytes and of its backbone). :func:`publish_head` writes version n+1 of a
bundle with new head parameters (e.g. the fleet's aggregated head, ``edgetl fleet``): every
graph and the backbone are copied byte for byte, ``head_init`` is replaced, and the self-test
vectors that depend on the head (reference logits, reference train steps) are recomputed with
the PyTorch head, then checked in the bundle's runtime before the bundle is swapped in.

On the device, ``run.py update NEW_BUNDLE --state STATE`` keeps a personal head whose backbone
sha256 matches the new bundle's and re-adapts (or falls back to the shipped head) otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
from pathlib import Path

import numpy as np

from edgetl.errors import BundleError, ConfigError
from edgetl.manifest import MANIFEST, Manifest, file_entry, sha256_file
from edgetl.tolerances import scaled_atol, selftest_tolerances


def parent_record(bundle: Path, m: Manifest) -> dict:
    """What a child bundle records of its parent: version and sha256s."""
    return {"version": m.version, "manifest_sha256": sha256_file(Path(bundle) / MANIFEST),
            "backbone_sha256": m.files["backbone"].sha256, "name": m.name}


def _check_params(m: Manifest, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    want = {p["name"]: tuple(p["shape"]) for p in m.head["params"]}
    got = {k: tuple(np.shape(v)) for k, v in params.items()}
    if got != want:
        raise ConfigError(f"new head parameters {got} do not match the bundle's head {want}; "
                          "a new version keeps the head's names and shapes")
    out = {k: np.asarray(params[k], np.float32) for k in want}
    bad = [k for k, v in out.items() if not np.isfinite(v).all()]
    if bad:
        raise ConfigError(f"new head parameters {bad} contain NaN or inf")
    return out


def publish_head(parent: Path, out: Path, params: dict[str, np.ndarray], *,
                 note: dict | None = None, sign_key: Path | None = None) -> Manifest:
    """Write ``out``: version n+1 of the bundle ``parent`` with head parameters ``params``.

    Args:
        parent: an existing bundle (verified first).
        out: the new bundle's folder (replaced only when complete and checked).
        params: head parameters by manifest name, with the parent's shapes.
        note: recorded under ``provenance.version_note`` (e.g. fleet rounds and clients).
        sign_key: Ed25519 private key; required when the parent is signed.

    Raises:
        BundleError: the parent fails verification or ``out`` is the parent.
        ConfigError: wrong parameter names/shapes, or a signed parent without ``sign_key``.
    """
    from edgetl.export.bundle import staged_bundle

    parent, out = Path(parent), Path(out)
    m = Manifest.read(parent)
    m.verify(parent)
    if out.resolve() == parent.resolve():
        raise BundleError("the new version needs its own folder (--out); the parent is kept "
                          "as it is, devices may still run it")
    if (parent / "manifest.sig").exists() and sign_key is None:
        raise ConfigError(f"{parent} is signed: pass the signing key (--sign-key) so the new "
                          "version is signed too; devices that trust the key refuse an "
                          "unsigned bundle")
    params = _check_params(m, params)
    with staged_bundle(out) as tmp:
        man = _build(parent, m, tmp, params, note or {})
        if sign_key is not None:
            from edgetl.signing import sign_bundle

            sign_bundle(tmp, sign_key)
    return man


def _build(parent: Path, m: Manifest, tmp: Path, params: dict, note: dict) -> Manifest:
    import torch

    from edgetl.export.bundle import compare, train_vectors
    from edgetl.head import InferStep
    from edgetl.quantize import session_of, spec_of

    for entry in m.files.values():
        shutil.copy2(parent / entry.path, tmp / entry.path)
    np.savez(tmp / m.files[m.head["init_file"]].path, **params)
    spec = spec_of(m)
    tv_path = tmp / m.files[m.test_vectors["file"]].path
    with np.load(tv_path) as z:
        tv = {k: z[k] for k in z.files}
    with torch.no_grad():
        logits = InferStep(spec)(torch.from_numpy(tv["features"]),
                                 *map(torch.from_numpy, params.values()))[0].numpy()
    if "train_features" in tv:  # the reference steps start from the shipped head
        steps, batch = tv["train_features"].shape[:2]
        tv.update(train_vectors(spec, m.optimizer["name"], m.optimizer["hparams"], params,
                                int(batch), steps=int(steps), n_labels=len(m.labels)))
    tv["logits"] = logits
    np.savez(tv_path, **tv)
    n_real = len(m.labels)
    tol = selftest_tolerances(m.target, m.precision, m.quantization, tv["features"], logits,
                              len(m.labels))
    basis = tol.pop("basis")
    files = {role: file_entry(tmp, e.path) for role, e in m.files.items()}
    man = dataclasses.replace(
        m, files=files, version=m.version + 1, parent=parent_record(parent, m),
        test_vectors={**{k: v for k, v in m.test_vectors.items() if k != "logits_atol"},
                      **tol},
        checks={**{k: v for k, v in m.checks.items() if k != "accuracy"},
                "selftest_tolerance": basis,
                "head_replaced": "held-out accuracy of the parent's head no longer applies; "
                                 "see provenance.version_note"},
        provenance={**m.provenance,
                    "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "version_note": note})
    sess = session_of(tmp, man)  # the new head through the bundle's own runtime
    got = sess.infer({"features": tv["features"], **params})["logits"]
    compare("head_infer.logits (new head)", got, logits,
            scaled_atol(m.target, logits[:, :n_real]))
    if man.files["backbone"].sha256 != m.files["backbone"].sha256:
        raise BundleError("internal: the backbone changed while writing a new head version")
    (tmp / MANIFEST).write_text(man.to_json())
    return man
