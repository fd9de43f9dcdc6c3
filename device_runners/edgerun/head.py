"""Head parameters as numpy arrays: load, imprint new classes, save atomically."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from edgerun import RunnerError, atomic_write
from edgerun.files import MAX_HEAD_BYTES, read_npz

FORMAT = "edgerun.head/1"


def check_finite(params: dict, where: str,
                 fix: str = "start from the bundle's head (drop --head) or re-adapt") -> None:
    """Refuse head parameters holding NaN or inf: such a head predicts nothing useful.

    Raises :class:`RunnerError` naming the first bad parameter and its count of bad values.
    """
    for name, v in params.items():
        a = np.asarray(v)
        if a.dtype.kind not in "fiu":
            raise RunnerError(f"{where}: head parameter {name!r} is not numeric ({a.dtype}); "
                              "the head is damaged")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise RunnerError(f"{where}: head parameter {name!r} holds {bad} non-finite "
                              f"value(s) (NaN/inf) of {a.size}; the head is damaged: {fix}")


def check_shapes(params: dict, manifest: dict, where: str, exact: bool = False,
                 fix: str = "is it a head of another bundle? Drop --head or re-adapt") -> None:
    """Every parameter has the shape ``head.params`` declares.

    Class parameters may have more rows than declared (labels imprinted on the device)
    unless ``exact`` (the shipped head). A head of another shape would fail in the runtime.
    """
    cls = manifest["head"]["class_params"]
    for spec in manifest["head"]["params"]:
        have, want = tuple(np.shape(params[spec["name"]])), tuple(spec["shape"])
        ok = have == want or (not exact and spec["name"] in cls and len(have) == len(want)
                              and have[1:] == want[1:] and have[:1] >= want[:1])
        if not ok:
            raise RunnerError(f"{where}: head parameter {spec['name']!r} has shape {have}, "
                              f"the bundle's head needs {want}"
                              + (" (more class rows allowed)" if spec["name"] in cls else "")
                              + f"; {fix}")


def check_labels(labels: list, params: dict, class_params: list, where: str,
                 capacity: int | None = None) -> None:
    """The labels fit the head: distinct, printable, no more than its class rows.

    ``capacity`` (the shipped head): the class rows must be exactly the manifest's
    ``head.capacity`` (when it gives one). Raises :class:`RunnerError` naming what does not fit.
    """
    from edgerun.data import check_label_text

    if len(set(labels)) != len(labels):
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        raise RunnerError(f"{where}: duplicate labels {dup[:10]}; every class row needs its "
                          "own name")
    check_label_text(where, labels)
    w_name, b_name = class_params
    if w_name not in params or b_name not in params:
        raise RunnerError(f"{where}: the class parameters {class_params} are missing")
    w, b = np.asarray(params[w_name]), np.asarray(params[b_name])
    rows = int(w.shape[0]) if w.ndim else 0
    if w.ndim != 2 or b.shape != (rows,):
        raise RunnerError(f"{where}: class parameters {w_name} {w.shape} and {b_name} "
                          f"{b.shape} are not (rows, E) and (rows,)")
    if len(labels) > rows:
        raise RunnerError(f"{where}: {len(labels)} labels but the head has {rows} class rows; "
                          "the bundle or head is damaged, re-export it")
    if capacity and rows != capacity:  # 0: a manifest that does not say
        raise RunnerError(f"{where}: the head has {rows} class rows but the manifest's "
                          f"head.capacity is {capacity}; re-export the bundle")


def backbone_of(path: str) -> str | None:
    """The backbone sha256 a head checkpoint records; ``None`` if it is unreadable."""
    try:
        z = read_npz(path, "head checkpoint", MAX_HEAD_BYTES)
        meta = json.loads(str(z["__meta__"]))
        return str(meta["backbone_sha256"]) if isinstance(meta, dict) else None
    except (RunnerError, ValueError, KeyError):
        return None


class Head:
    """Named head parameters plus the label of every logit."""

    def __init__(self, params: dict, labels: list, meta: dict | None = None):
        self.params = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
        self.labels = list(labels)
        self.meta = dict(meta or {})

    def copy(self) -> Head:
        """Deep copy."""
        return Head({k: v.copy() for k, v in self.params.items()}, self.labels, self.meta)

    @classmethod
    def from_bundle(cls, bundle) -> Head:
        """The server-trained head shipped in the bundle."""
        m = bundle.manifest
        path = bundle.path(m["head"]["init_file"])
        z = bundle.arrays(m["head"]["init_file"], [p["name"] for p in m["head"]["params"]])
        params = {p["name"]: z[p["name"]] for p in m["head"]["params"]}
        where = f"bundle file {os.path.basename(path)}"
        check_finite(params, where, "re-export or re-download the bundle")
        check_shapes(params, m, where, exact=True, fix="re-export or re-download the bundle")
        check_labels(list(m["labels"]), params, m["head"]["class_params"],
                     f"{where} with manifest labels", capacity=int(m["head"]["capacity"]))
        return cls(params, m["labels"], {"source": "bundle"})

    @classmethod
    def load(cls, path: str, bundle) -> Head:
        """A checkpoint written by :meth:`save`, checked against the bundle."""
        z = read_npz(path, "head checkpoint", MAX_HEAD_BYTES)
        try:
            meta = json.loads(str(z["__meta__"]))
            labels = [str(v) for v in z["__labels__"]]
            params = {k: v for k, v in z.items() if not k.startswith("__")}
        except (ValueError, KeyError) as e:
            raise RunnerError(f"{path} is not a readable head checkpoint ({e})") from None
        if not isinstance(meta, dict):
            raise RunnerError(f"{path} is not a readable head checkpoint (bad __meta__)")
        if meta.get("format") != FORMAT:
            raise RunnerError(f"{path}: expected format {FORMAT!r}, found {meta.get('format')!r}")
        want = bundle.manifest["files"]["backbone"]["sha256"]
        if meta.get("backbone_sha256") != want:
            have = str(meta.get("backbone_sha256"))[:12]
            raise RunnerError(f"{path} was trained on another backbone (sha256 {have}…, "
                              f"bundle has {want[:12]}…); "
                              "start from the bundle's head instead (drop --head)")
        names = [p["name"] for p in bundle.manifest["head"]["params"]]
        if sorted(params) != sorted(names):
            raise RunnerError(f"{path}: parameters {sorted(params)} do not match the bundle's "
                              f"{sorted(names)}")
        check_finite(params, path)
        check_shapes(params, bundle.manifest, path)
        check_labels(labels, params, bundle.manifest["head"]["class_params"], path)
        return cls(params, labels, meta)

    def save(self, path: str, bundle, extra: dict | None = None) -> None:
        """Write atomically: a temporary file in the same folder, then ``os.replace``.

        A head with non-finite parameters is refused before anything is written.
        """
        check_finite(self.params, f"refusing to write {path}")
        atomic_write(path, lambda f: self.write(f, bundle, extra), prefix=".head.",
                     suffix=".npz")

    def write(self, f, bundle, extra: dict | None = None) -> None:
        """The checkpoint into the binary file ``f`` (non-finite parameters refused first)."""
        check_finite(self.params, "refusing to write a head checkpoint")
        meta = {**self.meta, **(extra or {}), "format": FORMAT,
                "backbone_sha256": bundle.manifest["files"]["backbone"]["sha256"],
                "saved_unix": time.time()}
        np.savez(f, __meta__=np.array(json.dumps(meta)),
                 __labels__=np.array(self.labels, dtype=str), **self.params)

    def rows(self, class_params: list) -> int:
        """Class rows of the last layer (labels plus spare rows of a fixed-capacity head)."""
        return int(self.params[class_params[0]].shape[0])

    def add_classes(self, names: list, embeddings: dict, class_params: list,
                    grow: bool = True, normalise: bool = False) -> None:
        """Weight imprinting (Qi et al., 2018): one last-layer row per new class.

        A new class's weight row is its mean embedding, rescaled to the mean norm of the
        rows in use; its bias is their mean bias. ``grow``: append rows (dynamic-class
        graphs); otherwise fill the spare rows of a fixed-capacity head. ``normalise``
        (cosine heads): each embedding is scaled to unit length before averaging, so the row
        is the normalised prototype of the class.

        Args:
            names: new class names.
            embeddings: name -> (n, E) embeddings of that class's windows.
            class_params: [weight name, bias name] of the last layer.
        """
        w_name, b_name = class_params
        used = len(self.labels)
        w, b = self.params[w_name], self.params[b_name]
        scale = float(np.linalg.norm(w[:used], axis=1).mean()) if used else 1.0
        bias = float(b[:used].mean()) if used else 0.0
        rows = []
        for n in names:
            e = np.asarray(embeddings[n], np.float32)
            if normalise:
                e = e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-12)
            mu = e.mean(axis=0)
            rows.append(mu / (np.linalg.norm(mu) + 1e-12) * scale)
        rows = np.asarray(rows, np.float32).reshape(len(names), w.shape[1])
        if grow:
            self.params[w_name] = np.concatenate([w[:used], rows, w[used:]], axis=0)
            self.params[b_name] = np.concatenate(
                [b[:used], np.full(len(names), bias, np.float32), b[used:]])
        else:
            if used + len(names) > len(w):
                raise RunnerError(f"this head has {len(w)} class rows, {used} in use: no room "
                                  f"for {len(names)} new label(s) {list(names)}")
            w, b = w.copy(), b.copy()
            w[used : used + len(names)] = rows
            b[used : used + len(names)] = bias
            self.params[w_name], self.params[b_name] = w, b
        self.labels += list(names)
