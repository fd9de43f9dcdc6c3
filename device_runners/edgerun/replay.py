"""Latent replay: the server's own features train beside the device's windows.

A device that adapts on one session's windows fits that session; if the session was odd (the
phone carried differently that day), the head forgets what it knew and the next session pays.
A bundle may therefore ship ``replay.npz``: the frozen backbone's features of a
class-stratified sample of the *server's training* windows (never the server-validation users
the defaults are chosen on), computed at export by this bundle's own backbone graph (int8
bundles: the int8 features), with their label ids into ``manifest["labels"]``. ``adapt``
then trains the head on the device's training windows and these together, so the head must
stay right on the server's data while it learns the device's (latent replay: Pellegrini et
al. 2020, "Latent replay for real-time continual learning"; rehearsal at the cut layer, so no
raw server data and no backbone pass on the device).

``weight`` is the replay set's total sample weight relative to the device's training windows
(1: as much as the device's data; 0: off). Validation and the gate use the device's windows
only: replay shapes training, the device's evidence decides.
"""

from __future__ import annotations

import numpy as np

from edgerun import RunnerError

#: The manifest's ``files`` role of the replay features.
ROLE = "replay"


def block(m: dict) -> dict | None:
    """The manifest's ``adapt.replay`` block, or None when the bundle ships no replay set."""
    r = m["adapt"].get("replay")
    return r if r and ROLE in m["files"] else None


def settings(m: dict, weight: float | None) -> float:
    """The replay weight: the flag given, else the bundle's, else 0 (no replay set: 0)."""
    r = block(m)
    if weight is None:
        return float(r["weight"]) if r else 0.0
    if not (0 <= weight < float("inf")):
        raise RunnerError(f"--replay-weight must be a finite number >= 0, got {weight}")
    if weight > 0 and r is None:
        raise RunnerError("--replay-weight > 0 needs a bundle that ships a replay set (manifest "
                          "adapt.replay and files.replay); this one has none: export it with "
                          "the recipe's [adapt] replay_per_class > 0, or use --replay-weight 0")
    return float(weight)


def load(bundle, names: list, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The replay features ``(R, dim)`` and their class ids into ``names`` (the head's labels).

    Windows of labels the head no longer has are dropped. A file of the wrong shape, with
    non-finite features or with label ids outside ``manifest["labels"]`` is refused by name.
    """
    m = bundle.manifest
    z = bundle.arrays(ROLE, ["features", "labels"])
    f = np.asarray(z["features"], np.float32)
    ids = np.asarray(z["labels"])
    where = f"bundle file {m['files'][ROLE]['path']} (replay)"
    fix = "re-export the bundle, or adapt with --replay-weight 0"
    if f.ndim != 2 or f.shape[1] != dim or ids.shape != (len(f),):
        raise RunnerError(f"{where}: expected features (R, {dim}) and labels (R,), found "
                          f"{f.shape} and {ids.shape}; {fix}")
    return _known(f, ids, m, names, where, fix, "features")


def _known(x: np.ndarray, ids: np.ndarray, m: dict, names: list, where: str, fix: str,
           what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` whose label the head has, and their class ids into ``names``.

    Label ids outside ``manifest["labels"]`` or non-finite rows are refused by name.
    """
    if ids.dtype.kind not in "iu" or (len(ids) and (ids.min() < 0
                                                    or ids.max() >= len(m["labels"]))):
        raise RunnerError(f"{where}: label ids must be integers in [0, {len(m['labels'])}), "
                          f"found {ids.dtype} in [{ids.min()}, {ids.max()}]; {fix}")
    if not np.isfinite(x).all():
        raise RunnerError(f"{where}: {what} hold NaN or infinity; {fix}")
    labels = [m["labels"][i] for i in ids.tolist()]
    keep = np.asarray([lab in names for lab in labels], bool)
    y = np.asarray([names.index(lab) for lab, k in zip(labels, keep) if k], np.int64)
    return x[keep], y


def inputs(bundle, names: list, shape: tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """The replay windows themselves ``(R, *shape)`` float32 and class ids into ``names``.

    ``shape``: one window's (the manifest's ``input.shape`` without the batch axis; None
    matches any size).

    Bundles with AdaBN graphs ship them (``adapt.replay.inputs``) so recalibrated BN
    statistics can be judged on the server's data; None where the bundle has none. Refused
    by name as :func:`load`.
    """
    r = block(bundle.manifest)
    if not r or not r.get("inputs"):
        return None
    m = bundle.manifest
    z = bundle.arrays(ROLE, ["inputs", "input_labels"])
    x = np.asarray(z["inputs"], np.float32)
    ids = np.asarray(z["input_labels"])
    where = f"bundle file {m['files'][ROLE]['path']} (replay inputs)"
    fix = "re-export the bundle"
    fits = x.ndim == len(shape) + 1 and all(s is None or s == d
                                             for s, d in zip(shape, x.shape[1:]))
    if not fits or ids.shape != (len(x),) or len(x) != r["inputs"]:
        raise RunnerError(f"{where}: expected {r['inputs']} windows of shape "
                          f"{tuple(shape)} with one label each, found {x.shape} and "
                          f"{ids.shape}; {fix}")
    return _known(x, ids, m, names, where, fix, "windows")


def weights(local: np.ndarray, n: int, weight: float) -> np.ndarray:
    """Per-window sample weights of ``n`` replay windows: ``weight`` x the local total, shared.

    Shape:
        local: (N,) the device's training-window weights -> (n,) float32.
    """
    if n == 0:
        return np.zeros(0, np.float32)
    return np.full(n, weight * float(local.sum()) / n, np.float32)
