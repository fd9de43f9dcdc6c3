"""Device data: ``.npz`` windows or a ``.csv`` sensor log, validated against the manifest.

* ``.npz``: ``x`` (N, T, C) float windows, optional ``y`` (N,) label *names*, optional
  ``channels`` (C,) names (reordered to the manifest's channel order when given).
* ``.csv``: one row per sample at the manifest's sample rate; a header naming every manifest
  channel (any order, extra columns ignored), optional ``label`` and ``session`` columns.
  The runner cuts windows of the manifest's length and stride inside runs of one label
  (and one session).
* Image bundles (``input.modality == "image"``): a folder with one sub-folder of PNG/JPEG
  files per label, or an ``.npz`` of uint8 images; see :mod:`edgerun.images`.
* Text bundles (``input.modality == "text"``): a ``.csv`` with ``text`` (and ``label``)
  columns or a ``.txt`` with one text per line, tokenised with the bundle's tokenizer into
  ``(N, 2, L)`` int64 ids + attention mask; see :mod:`edgerun.text`.
* Bundles of any other model (``input.modality == "tensor"``): an ``.npz`` whose ``x`` is the
  model's input (shape and dtype as the manifest says) and ``y`` label names; see
  :mod:`edgerun.tensors`.

Each input kind is one entry of :data:`KINDS` (its loader, preprocessing and split rule).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from edgerun import RunnerError
from edgerun import files as fileio


@dataclass
class Dataset:
    """Raw windows ``x`` (N, T, C) float32 and optional label names ``y`` (N,)."""

    x: np.ndarray
    y: list[str] | None
    source: str
    skipped: list = field(default_factory=list)  # unreadable files: {"path", "reason"}
    info: dict = field(default_factory=dict)  # text: tokenizer used, texts truncated


def modality(manifest: dict) -> str:
    """The bundle's input kind (a key of :data:`KINDS`)."""
    kind = manifest["input"].get("modality", "timeseries")
    if kind not in KINDS:
        raise RunnerError(f"manifest input.modality {kind!r} is not supported by this runner "
                          f"(known: {sorted(KINDS)}); update the runner")
    return kind


def is_image(manifest: dict) -> bool:
    """Whether the bundle's backbone takes images."""
    return modality(manifest) == "image"


def is_text(manifest: dict) -> bool:
    """Whether the bundle's backbone takes tokenised text."""
    return modality(manifest) == "text"


def split_mode(manifest: dict) -> str:
    """How to hold out validation data: ``block`` or ``random``.

    Time series: contiguous runs (overlapping windows must not leak into validation);
    images, texts and other samples are independent: random.
    """
    return KINDS[modality(manifest)].split


def _load_texts(path: str, manifest: dict, need_labels: bool, bundle=None,
                max_mb: float | None = None) -> Dataset:
    from edgerun import text

    if bundle is None:
        raise RunnerError("text data needs the bundle (its tokenizer) to load")
    texts, y = text.read_texts(path, max_mb=max_mb)
    if not texts:
        raise RunnerError(f"{path} holds no texts")
    if need_labels and y is None:
        raise RunnerError(f"{path} has no labels: adaptation needs a .csv with 'text' and "
                          "'label' columns")
    enc = text.TextEncoder(bundle)
    x, truncated = enc.encode(texts)
    return Dataset(x, y, path, info={"tokenizer": enc.name, "n_texts": len(texts),
                                     "truncated_texts": truncated,
                                     "max_length": enc.max_length})


def _load_images(path: str, manifest: dict, need_labels: bool, bundle=None,
                 max_mb: float | None = None) -> Dataset:
    from edgerun import images

    if os.path.isdir(path):
        x, y, skipped = images.load_image_folder(path, manifest, max_mb=max_mb)
    elif os.path.splitext(path)[1].lower() == ".npz":
        x, y, skipped = images.load_image_npz(path, manifest, max_mb=max_mb)
    else:
        raise RunnerError(f"{path}: this bundle takes images: a folder with one sub-folder of "
                          "PNG/JPEG files per label, or an .npz with uint8 'x' and label 'y'")
    if need_labels and y is None:
        raise RunnerError(f"{path} has no labels (npz key 'y' or label sub-folders); "
                          "adaptation needs labelled images")
    return Dataset(x, y, path, skipped)


#: Data files above this size are refused before reading (``--max-data-mb`` overrides).
MAX_DATA_MB = 2048.0


def _check_size(path: str, max_mb: float) -> None:
    """A data file must be a regular file (never a FIFO or device) of at most ``max_mb``."""
    if os.path.isdir(path):
        return  # an image folder: each image is checked as it is read
    with fileio.open_regular(path, "data file") as f:
        size = os.fstat(f.fileno()).st_size / 2**20
    if size > max_mb:
        raise RunnerError(f"{path} is {size:,.1f} MiB, above the {max_mb:g} MiB limit for one "
                          "data file; split it into smaller files or raise --max-data-mb")


def load(path: str, manifest: dict, need_labels: bool,
         max_mb: float = MAX_DATA_MB, bundle=None) -> Dataset:
    """Load ``path`` and check it against the manifest's input (text needs ``bundle``)."""
    _check_size(path, max_mb)
    ds = KINDS[modality(manifest)].load(path, manifest, need_labels, bundle, max_mb)
    if need_labels and ds.y is None:
        raise RunnerError(f"{path} has no labels (npz key 'y', csv column 'label' or label "
                          "sub-folders); adaptation needs labelled data")
    return ds


def _load_windows(path: str, manifest: dict, need_labels: bool, bundle=None,
                  max_mb: float | None = None) -> Dataset:
    ext = os.path.splitext(path)[1].lower()
    inp = manifest["input"]
    if ext == ".npz":
        ds = _load_npz(path, inp, max_mb)
    elif ext == ".csv":
        ds = _load_csv(path, inp, max_mb)
    else:
        raise RunnerError(f"{path}: unknown data format {ext or '(no extension)'!r}; expected "
                          ".npz (x, y arrays) or .csv (one sensor sample per row)")
    _validate(ds, inp, manifest)
    return ds


def _load_tensors(path: str, manifest: dict, need_labels: bool, bundle=None,
                  max_mb: float | None = None) -> Dataset:
    from edgerun import tensors

    if os.path.splitext(path)[1].lower() != ".npz":
        raise RunnerError(f"{path}: this bundle takes model inputs as an .npz with 'x' "
                          f"(N, {', '.join(map(str, manifest['input']['shape'][1:]))}) and "
                          "label names 'y'")
    x, y = tensors.load_npz(path, manifest, max_mb=max_mb)
    return Dataset(x, y, path)


def check_label_text(where: str, names) -> None:
    """Refuse label names holding a NUL byte or another control character.

    Labels end up in reports, JSON and the head's label list: they must be printable text.
    """
    for i, v in enumerate(names):
        bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise RunnerError(f"{where}: label {i + 1} ({v[:40]!r}) contains the control "
                              f"character {bad!r}; labels must be printable text")


def label_names(path: str, y: np.ndarray, n: int, noun: str = "samples") -> list[str]:
    """``y`` of an ``.npz`` as label names, checked: 1-D strings, one non-empty per sample."""
    if y.dtype.kind not in "US" or y.ndim != 1:
        raise RunnerError(f"{path}: 'y' must be a 1-D array of label names (e.g. "
                          f"np.array(['cat', ...])), found {y.dtype} {y.shape}")
    names = [str(v) for v in y.tolist()]
    if len(names) != n:
        raise RunnerError(f"{path}: {n} {noun} but {len(names)} labels")
    if any(not v for v in names):
        raise RunnerError(f"{path}: empty label names; every one of the {noun} needs a label")
    check_label_text(path, names)
    return names


class NpzArrays(dict):
    """The arrays of an ``.npz``, all loaded: ``z.files``, ``z[name]``, usable in ``with``."""

    @property
    def files(self) -> list[str]:
        """Array names, in file order."""
        return list(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _max_bytes(max_mb: float | None) -> int | None:
    return None if max_mb is None else int(max_mb * 2**20)


def open_npz(path: str, what: str, max_mb: float | None = None) -> NpzArrays:
    """Every array of an ``.npz``, without pickle, with errors that say how to write one.

    Only a regular file is read (never a FIFO or device). With ``max_mb``, the uncompressed
    size its zip and ``.npy`` headers declare is checked before anything is decompressed.
    Object arrays, corrupt and truncated archives are one :class:`RunnerError` each.
    """
    return NpzArrays(fileio.read_npz(
        path, "data file", _max_bytes(max_mb), limit_flag="--max-data-mb",
        hint=f"save it with np.savez(path, x={what}, y=labels)"))


def _load_npz(path: str, inp: dict, max_mb: float | None = None) -> Dataset:
    with open_npz(path, "windows", max_mb) as z:
        if "x" not in z.files:
            raise RunnerError(f"{path}: expected an array 'x' of windows, found keys {z.files}")
        x = np.asarray(z["x"])
        y = z["y"] if "y" in z.files else None
        ch = [str(c) for c in z["channels"]] if "channels" in z.files else None
    if x.dtype.kind == "c":  # astype(float32) would silently drop the imaginary part
        raise RunnerError(f"{path}: 'x' is complex ({x.dtype}); the model takes real values: "
                          "save x.real, np.abs(x) or both as channels")
    if not np.issubdtype(x.dtype, np.number):
        raise RunnerError(f"{path}: 'x' must be numeric, found dtype {x.dtype}")
    if ch is not None:
        want = list(inp["channels"])
        miss = [c for c in want if c not in ch]
        if miss:
            raise RunnerError(f"{path}: channels {miss} missing; the bundle needs {want}, "
                              f"the file has {ch}")
        if x.ndim == 3 and x.shape[2] == len(ch):
            x = x[:, :, [ch.index(c) for c in want]]
    if y is not None:
        if y.dtype.kind not in "US":
            raise RunnerError(f"{path}: 'y' must hold label names (a string array, e.g. "
                              f"np.array(['walking', ...])), found dtype {y.dtype}")
        if y.ndim != 1:
            raise RunnerError(f"{path}: 'y' must be a 1-D array with one label name per "
                              f"window, found shape {y.shape}")
        y = [str(v) for v in y.tolist()]
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        x = x.astype(np.float32, copy=False)
    return Dataset(x, y, path)


def _csv_encoding(path: str, raw) -> str:
    """The text encoding of a CSV: UTF-8 (BOM or not), or UTF-16 when it starts with a BOM.

    Excel's "Unicode text" and Windows tools write UTF-16 with a byte-order mark, which is
    unambiguous; UTF-16 without one (NUL bytes in the first line) and other encodings are
    refused with what to do, rather than read as a header that matches nothing.
    """
    head = raw.peek(256)[:256]
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    if b"\x00" in head:
        raw.close()
        raise RunnerError(f"{path} holds NUL bytes: UTF-16 text without a byte-order mark, or "
                          "not a text file; CSV files must be UTF-8 (or UTF-16 with a "
                          "byte-order mark): re-save it as UTF-8")
    return "utf-8-sig"


def read_csv_log(path: str, channels, columns=("label", "session"), max_mb: float | None = None):
    """One sensor sample per row: ``(signals, channel names, {column: values or None})``.

    ``channels``: the channel columns in model order (any order in the file, extra columns
    ignored); ``None`` takes every column not in ``columns``. ``columns``: optional text
    columns (label, session, user) returned as stripped strings, ``None`` when absent.
    The server reads users' logs with this same function. Only a regular file is read, of at
    most ``max_mb`` MiB when given.

    Shape:
        signals: (S, C) float32, finite.
    """
    raw = fileio.open_regular(path, "data file", _max_bytes(max_mb), limit_flag="--max-data-mb")
    encoding = _csv_encoding(path, raw)
    try:
        with io.TextIOWrapper(raw, encoding=encoding, newline="") as f:  # a BOM is dropped
            reader = csv.reader(f)
            header = next(reader, None)
            want = list(channels) if channels is not None else None
            if header is None:
                raise RunnerError(f"{path} is empty; expected a header row "
                                  f"{(want or ['<channels>']) + ['label']}")
            header = [h.strip() for h in header]
            if want is None:
                want = [h for h in header if h not in columns]
                if not want:
                    raise RunnerError(f"{path}: header has no channel columns besides "
                                      f"{list(columns)}; found {header}")
            miss = [c for c in want if c not in header]
            if miss:
                raise RunnerError(f"{path}: header lacks channel column(s) {miss}; expected "
                                  f"{want} (+ optional 'label', 'session'), found {header}")
            cols = [header.index(c) for c in want]
            extra = {c: header.index(c) for c in columns if c in header}
            rows = []
            values = {c: [] for c in extra}
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    rows.append([float(row[i]) for i in cols])
                except (ValueError, IndexError):
                    raise RunnerError(f"{path}:{lineno}: expected {len(want)} numeric channel "
                                      f"values, found {row}") from None
                for c, i in extra.items():
                    values[c].append(row[i].strip() if i < len(row) else "")
    except UnicodeDecodeError as e:
        raise RunnerError(f"{path} is not {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text "
                          f"({e}); CSV files must be "
                          "UTF-8 (or UTF-16 with a byte-order mark): re-save it as UTF-8"
                          ) from None
    except csv.Error as e:
        raise RunnerError(f"{path}: not a readable CSV file ({e}); expected one sample per row "
                          "of numbers and short labels") from None
    if not rows:
        raise RunnerError(f"{path} has a header but no samples")
    sig = np.asarray(rows, np.float32)
    if not np.isfinite(sig).all():
        bad = int(np.argwhere(~np.isfinite(sig))[0][0]) + 2
        raise RunnerError(f"{path}:{bad}: non-finite sensor value (NaN/inf); clean or drop "
                          "those samples before adapting")
    return sig, want, {c: values.get(c) for c in columns}


def window_starts(keys: list, win: int, stride: int) -> list:
    """``(start, run)`` of every window of ``win`` samples inside a run of equal ``keys[i]``.

    A run is a stretch of consecutive samples with one key (label, session, ...); windows
    never cross runs. ``run`` is the index of the run's first sample.
    """
    out = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            for s in range(start, i - win + 1, stride):
                out.append((s, start))
            start = i
    return out


def _load_csv(path: str, inp: dict, max_mb: float | None = None) -> Dataset:
    want = list(inp["channels"])
    sig, _, cols = read_csv_log(path, want, max_mb=max_mb)
    n = len(sig)
    labels = cols["label"] or [""] * n
    sessions = cols["session"] or [""] * n
    win, stride = int(inp["window"]), int(inp["stride"])
    starts = window_starts(list(zip(labels, sessions)), win, stride)
    xs = [sig[s : s + win] for s, _ in starts]
    ys = [labels[r] for _, r in starts]
    if not xs:
        raise RunnerError(f"{path}: no run of {win} samples with one label; windows are "
                          f"{win} samples ({win / float(inp['sample_rate_hz']):.2f} s at "
                          f"{inp['sample_rate_hz']} Hz)")
    has_label = cols["label"] is not None
    keep = [j for j, lab in enumerate(ys) if lab != ""] if has_label else list(range(len(ys)))
    x = np.stack([xs[j] for j in keep]) if keep else np.zeros((0, win, len(want)), np.float32)
    return Dataset(x, [ys[j] for j in keep] if has_label else None, path)


def _validate(ds: Dataset, inp: dict, manifest: dict) -> None:
    t, c = int(inp["window"]), len(inp["channels"])
    x = ds.x
    if x.ndim != 3 or x.shape[1:] != (t, c):
        raise RunnerError(
            f"{ds.source}: windows have shape {tuple(x.shape)}, the bundle expects (N, {t}, {c}) "
            f"= {t} samples at {inp['sample_rate_hz']} Hz x channels {list(inp['channels'])}; "
            "re-window/resample the recording (or pass the raw .csv log)")
    if len(x) == 0:
        raise RunnerError(f"{ds.source} holds no windows")
    if not np.isfinite(x).all():
        n_bad = int((~np.isfinite(x)).any(axis=(1, 2)).sum())
        raise RunnerError(f"{ds.source}: {n_bad} window(s) contain NaN or inf; clean or drop "
                          "them before adapting")
    if ds.y is not None and len(ds.y) != len(x):
        raise RunnerError(f"{ds.source}: {len(x)} windows but {len(ds.y)} labels")
    if ds.y is not None and any(not lab for lab in ds.y):
        raise RunnerError(f"{ds.source}: empty label names; every window needs a label")
    if ds.y is not None:
        check_label_text(ds.source, ds.y)


def preprocess(x: np.ndarray, manifest: dict) -> np.ndarray:
    """Apply the manifest's preprocessing (per-channel normalisation) to raw windows.

    Image bundles: uint8 images are converted as the manifest says; the loaders already
    return model input (float32 NCHW), which passes through unchanged.
    """
    return KINDS[modality(manifest)].preprocess(x, manifest)


def _preprocess_text(x: np.ndarray, manifest: dict) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)  # token ids and mask pass through


def _preprocess_image(x: np.ndarray, manifest: dict) -> np.ndarray:
    if x.dtype == np.uint8:
        from edgerun import images

        return images._array_input(x, images._manifest_spec(manifest))
    return np.ascontiguousarray(x, dtype=np.float32)


def _preprocess_tensor(x: np.ndarray, manifest: dict) -> np.ndarray:
    from edgerun import tensors

    return tensors.preprocess(x, manifest)


def _preprocess_windows(x: np.ndarray, manifest: dict) -> np.ndarray:
    norm = manifest["input"].get("preprocess", {}).get("normalize")
    if norm:
        mean = np.asarray(norm["mean"], np.float32)
        std = np.asarray(norm["std"], np.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Kind:
    """One input kind: how its data files load, how they become model input, how to split."""

    load: object  # (path, manifest, need_labels, bundle, max_mb) -> Dataset
    preprocess: object  # (raw x, manifest) -> backbone input
    split: str  # "block" (time order matters) or "random"


KINDS = {
    "timeseries": Kind(_load_windows, _preprocess_windows, "block"),
    "image": Kind(_load_images, _preprocess_image, "random"),
    "text": Kind(_load_texts, _preprocess_text, "random"),
    "tensor": Kind(_load_tensors, _preprocess_tensor, "random"),
}


def stratified_split(y: np.ndarray, frac: float, seed: int,
                     mode: str = "block") -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with ``frac`` of every class (>= 2 windows) in validation.

    ``mode="block"`` (default) takes the *last* windows of each class in file (= recording)
    order and drops the one window before them: overlapping windows are near-duplicates, so a
    random split would leak training windows into validation and make the gate optimistic.
    ``mode="random"`` shuffles within each class (for data with no time order).
    """
    return stratified_folds(y, frac, seed, mode, 1)[0]


def stratified_folds(y: np.ndarray, frac: float, seed: int, mode: str = "block",
                     folds: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` splits ``(train, val)``: the first is :func:`stratified_split`'s.

    Fold ``j`` validates on the ``j``-th block of ``frac`` of every class counted back from
    its end (the last windows, then the ones before them, ...; the first block of a class
    may be shorter), in recording order for ``mode="block"`` or in one seeded shuffle per class
    for ``"random"``; block mode drops the window on each side of a validation block from
    training. A class with no windows left for block ``j``, or none to train on beside it,
    validates nothing in that fold.
    """
    if mode not in ("block", "random"):
        raise RunnerError(f"split mode must be 'block' or 'random', got {mode!r}")
    rng = np.random.default_rng(seed)
    out = [([], []) for _ in range(folds)]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if mode == "random":
            idx = rng.permutation(idx)
        n = len(idx)
        n_val = 0 if n < 2 else min(n - 1, max(1, int(math.floor(frac * n + 0.5))))
        gap = 1 if mode == "block" else 0
        for j, (tr, va) in enumerate(out):
            hi = n - j * n_val
            lo = max(0, hi - n_val)
            before = lo - gap if lo - gap >= 1 else (lo if j == 0 else 0)
            train = idx[:before].tolist() + idx[min(n, hi + gap):].tolist()
            if j and (hi < 1 or not train):  # no room for this block: every window trains
                tr.extend(idx.tolist())
                continue
            va.extend(idx[lo:hi].tolist())
            tr.extend(train)
    return [(np.sort(np.asarray(tr, np.int64)), np.sort(np.asarray(va, np.int64)))
            for tr, va in out]
