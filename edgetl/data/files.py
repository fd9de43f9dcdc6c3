"""Your own data for the server stages: sensor logs/windows, image folders, text CSVs.

The formats are the device runner's (``device_runners/edgerun``): the server parses them with
the runner's own functions (:func:`device_module`), so a file the server trained on is a file
a device reads the same way, and a bad file gets the same message on both sides (file, row,
what was expected, what to do), raised here as :class:`~edgetl.errors.DataError`.

Who plays server and devices (:func:`split_groups`): the ``user`` column (or user folders)
names the groups; without it the ``session`` (or, in a folder of CSV logs, the file) does;
without either, every label's samples are split by fractions (:func:`fraction_groups`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import ConfigError, DataError

#: Columns of a CSV sensor log that are not channels.
LOG_COLUMNS = ("label", "user", "session")


def device_module(name: str):
    """A numpy-only module of the device runner (``edgerun.data``, ``.images``, ``.text``)."""
    import importlib

    return importlib.import_module(name)  # edgerun is a dependency (device_runners/)


def _device_call(fn, *args):
    """Call a runner parser; its :class:`RunnerError` becomes a :class:`DataError`."""
    err = device_module("edgerun").RunnerError
    try:
        return fn(*args)
    except err as e:
        raise DataError(str(e)) from None


@dataclass(frozen=True)
class Groups:
    """Who every sample belongs to, and which groups train, validate and play devices.

    Shape:
        group: (N,) int64 index into ``names`` (-1: dropped, between two splits).
    """

    group: np.ndarray
    names: tuple[str, ...]
    train: tuple[int, ...]
    val: tuple[int, ...]
    device: tuple[int, ...]
    note: str

    def name(self, g: int) -> str:
        """The group's name, for folder names and tables."""
        return self.names[g]


def _sorted_names(values) -> list[str]:
    """Distinct names, numerically when every name is an integer ("2" before "10")."""
    names = sorted(set(values))
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    return names


def split_groups(cfg, owners: list[str], what: str) -> Groups:
    """User-disjoint train / val / device groups of ``owners`` (one name per sample).

    Explicit ``server_users`` / ``server_val_users`` / ``device_users`` win; the rest is
    filled by ``device_fraction`` (of all users) and ``val_fraction`` (of the server users).

    Raises:
        ConfigError: a named user is not in the data.
        DataError: fewer than 3 users (one each to train, validate and play a device).
    """
    names = _sorted_names(owners)
    index = {n: i for i, n in enumerate(names)}
    group = np.array([index[o] for o in owners], np.int64)
    for key in ("server_users", "server_val_users", "device_users"):
        miss = [str(u) for u in getattr(cfg, key) if str(u) not in index]
        if miss:
            raise ConfigError(f"data.{key}: {what} {miss} are not in {cfg.path}; it holds "
                              f"{what} {names}")
    if len(names) < 3:
        raise DataError(f"{cfg.path}: found {len(names)} {what} ({names}); the splits need at "
                        f"least 3 (one to train the server, one to validate it, one device). "
                        f"Add {what}, or drop the {what} column to split by fractions")
    rng = np.random.default_rng(cfg.seed)
    dev = [str(u) for u in cfg.device_users]
    server = [str(u) for u in cfg.server_users]
    if not dev:
        pool = [n for n in names if n not in server]
        n_dev = min(len(pool), max(1, round(cfg.device_fraction * len(names))))
        dev = sorted((pool[i] for i in rng.permutation(len(pool))[:n_dev]), key=index.get)
    if not server:
        server = [n for n in names if n not in dev]
    val = [str(u) for u in cfg.server_val_users]
    if not val and len(server) >= 2:
        n_val = min(len(server) - 1, max(1, round(cfg.val_fraction * len(server))))
        val = sorted((server[i] for i in rng.permutation(len(server))[:n_val]), key=index.get)
    train = [n for n in server if n not in val]
    if not dev or not val or not train:
        raise DataError(f"{cfg.path}: the {what} {names} leave no {what} to "
                        f"{'play a device' if not dev else 'validate' if not val else 'train'}"
                        f"; set data.server_users, data.server_val_users and data.device_users")
    ids = lambda ns: tuple(sorted(index[n] for n in ns))  # noqa: E731
    note = (f"{what}: server {sorted(train, key=index.get)}, validation "
            f"{sorted(val, key=index.get)}, devices {sorted(dev, key=index.get)}")
    return Groups(group, tuple(names), ids(train), ids(val), ids(dev), note)


def fraction_groups(cfg, y: np.ndarray, labels, *, in_order: bool, gap: int = 0) -> Groups:
    """No users: every label's samples split train / val / device by the recipe's fractions.

    Samples in a ``gap`` get group -1 (used nowhere).

    ``in_order`` (time series): contiguous blocks in file order, ``gap`` samples dropped at
    each boundary so overlapping windows never straddle two splits; otherwise a seeded
    shuffle within each label. The device share is dealt to ``device_count`` devices.

    Raises:
        DataError: a label has too few samples for the splits.
    """
    rng = np.random.default_rng(cfg.seed)
    k = cfg.device_count
    names = ("train", "val", *(f"device_{i + 1}" for i in range(k)))
    group = np.full(len(y), -1, np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if not in_order:
            idx = rng.permutation(idx)
        n = len(idx)
        n_dev = max(2 * k, int(math.floor(cfg.device_fraction * n + 0.5)))
        n_val = max(1, int(math.floor(cfg.val_fraction * n + 0.5)))
        if n - n_dev - n_val - 2 * gap < 1:
            raise DataError(f"{cfg.path}: label {labels[c]!r} has {n} samples; the splits need "
                            f"at least {n_dev + n_val + 2 * gap + 1} (train, validation and "
                            f"{2 * k} for {k} device(s)). Add data, lower data.device_count, "
                            "or add a 'user' column")
        n_tr = n - n_dev - n_val - 2 * gap
        group[idx[:n_tr]] = 0
        group[idx[n_tr + gap : n_tr + gap + n_val]] = 1
        dev = idx[n_tr + 2 * gap + n_val :]
        for i, part in enumerate(np.array_split(dev, k)):
            group[part] = 2 + i
    server = 1 - cfg.val_fraction - cfg.device_fraction
    note = (f"no user column: every label split by fractions ({server:.0%} server, "
            f"{cfg.val_fraction:.0%} validation, {cfg.device_fraction:.0%} for {k} device(s)"
            f"{', in file order' if in_order else ''}); add a 'user' column for user-disjoint "
            "splits")
    return Groups(group, names, (0,), (1,), tuple(range(2, 2 + k)), note)


def groups_of(cfg, owners: list[str] | None, what: str, y: np.ndarray, labels, *,
              in_order: bool, gap: int = 0) -> Groups:
    """:func:`split_groups` over the owners when the data name them, else by fractions."""
    if owners is not None:
        return split_groups(cfg, owners, what)
    return fraction_groups(cfg, y, labels, in_order=in_order, gap=gap)


def device_halves(y: np.ndarray, session: np.ndarray, *, in_order: bool, gap: int = 0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(adapt, eval)`` of one device's samples.

    Several sessions: the first session adapts, the later ones evaluate (as on a phone).
    One session: the first half of every label (file order for time series, ``gap`` samples
    dropped between the halves; else shuffled) adapts, the rest evaluates.
    """
    if len(np.unique(session)) > 1:
        first = session == session.min()
        return np.flatnonzero(first), np.flatnonzero(~first)
    rng = np.random.default_rng(seed)
    ad, ev = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if not in_order:
            idx = np.sort(rng.permutation(idx))
        half = (len(idx) + 1) // 2
        ad.extend(idx[:half].tolist())
        ev.extend(idx[min(len(idx), half + gap):].tolist())
    return np.sort(np.asarray(ad, np.int64)), np.sort(np.asarray(ev, np.int64))


def write_device_halves(out: Path, g, y: np.ndarray, labels, seed: int, write_part) -> list:
    """Each device user's samples, split by :func:`device_halves`, written under ``out/devices``.

    ``write_part(folder, part, indices)`` writes one part (``adapt`` or ``eval``) in the
    kind's device format and returns the path the device reads. No new labels: the device
    personalises the ones it knows. Returns :class:`edgetl.kinds.Device` records.
    """
    import shutil

    from edgetl.kinds import Device

    root = Path(out) / "devices"
    if root.exists():
        shutil.rmtree(root)
    devs = []
    for k, dev in enumerate(g.device):
        idx = np.flatnonzero(g.group == dev)
        ad, ev = device_halves(y[idx], np.zeros(len(idx)), in_order=False, seed=seed)
        folder = root / f"device_{k + 1}"
        paths = {part: write_part(folder, part, idx[sel])
                 for part, sel in (("adapt", ad), ("eval", ev))}
        devs.append(Device(f"device_{k + 1}", paths["adapt"], paths["eval"], len(ad), len(ev),
                           tuple(sorted({labels[i] for i in y[idx[ad]]})), g.name(dev)))
    return devs


def _label_ids(names: list[str], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    labels = tuple(_sorted_names(names))
    if len(labels) < 2:
        raise DataError(f"{where}: found {len(labels)} label(s) {list(labels)}; a classifier "
                        "needs at least 2")
    index = {n: i for i, n in enumerate(labels)}
    return np.array([index[n] for n in names], np.int64), labels


def _exists(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path {path} does not exist; expected {what}")
    return p


# ----------------------------------------------------------------------------- time series

@dataclass(frozen=True)
class SensorData:
    """Windows of your sensor files with their owners.

    Shape:
        x: (N, window, C) float32; y, session: (N,) int64; owners: N user/session names.
    """

    x: np.ndarray
    y: np.ndarray
    session: np.ndarray
    owners: list[str] | None
    labels: tuple[str, ...]
    channels: tuple[str, ...]
    what: str      # "users" or "sessions": what the owners are
    gap: int       # windows that overlap their neighbour (0 for .npz windows)


def load_timeseries(cfg) -> SensorData:
    """Windows from ``cfg.path``: an ``.npz`` of windows, a ``.csv`` log or a folder of them.

    Raises:
        DataError: a missing or malformed file (file, row, what was expected, what to do).
    """
    p = _exists(cfg.path, "an .npz of windows, a .csv sensor log, or a folder of .csv logs")
    if p.is_file() and p.suffix.lower() == ".npz":
        return _timeseries_npz(cfg, p)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() == ".csv")
        if not files:
            raise DataError(f"{p} holds no .csv file; expected one sensor log per file "
                            f"(header: channels, label[, user, session])")
    elif p.suffix.lower() == ".csv":
        files = [p]
    else:
        raise DataError(f"{p}: unknown data format {p.suffix or '(no extension)'!r}; expected "
                        ".npz (x, y arrays), .csv (one sensor sample per row) or a folder of .csv")
    dio = device_module("edgerun.data")
    xs, ys, users, sessions = [], [], [], []
    channels = list(cfg.channels) or None
    for f in files:
        sig, channels, cols = _device_call(dio.read_csv_log, str(f), channels, LOG_COLUMNS)
        if cols["label"] is None:
            raise DataError(f"{f}: header lacks a 'label' column; expected {channels} + "
                            "['label'] (+ optional 'user', 'session'): the server trains on "
                            "labelled samples")
        n = len(sig)
        user = cols["user"] or [""] * n
        session = cols["session"] or ([f.name] * n if len(files) > 1 else [""] * n)
        keys = list(zip(cols["label"], user, session, strict=True))
        for s, r in dio.window_starts(keys, cfg.window, cfg.stride):
            if cols["label"][r]:
                xs.append(sig[s : s + cfg.window])
                ys.append(cols["label"][r])
                users.append(user[r])
                sessions.append(session[r])
    if not xs:
        secs = cfg.window / cfg.sample_rate_hz
        raise DataError(f"{cfg.path}: no run of {cfg.window} samples with one label; windows "
                        f"are data.window = {cfg.window} samples ({secs:.2f} s at "
                        f"{cfg.sample_rate_hz:g} Hz): record longer runs or lower data.window")
    y, labels = _label_ids(ys, cfg.path)
    if any(users) and not all(users):
        raise DataError(f"{cfg.path}: some samples have no 'user' (e.g. window {users.index('')}"
                        "); give every row of every file a user, or drop the column")
    owners, what = (users, "users") if any(users) else (
        (sessions, "sessions") if any(sessions) else (None, ""))
    sess_names = _sorted_names(sessions)
    sid = {n: i for i, n in enumerate(sess_names)}
    return SensorData(np.stack(xs), y, np.array([sid[s] for s in sessions], np.int64), owners,
                      labels, tuple(channels), what, math.ceil(cfg.window / cfg.stride) - 1)


def _timeseries_npz(cfg, p: Path) -> SensorData:
    dio = device_module("edgerun.data")
    with _device_call(dio.open_npz, str(p), "windows") as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{p}: expected arrays 'x' (N, T, C) windows and 'y' (N,) label names, "
                        f"found keys {sorted(arrays)}; save with np.savez(path, x=x, y=names)")
    x, yn = arrays["x"], arrays["y"]
    if not np.issubdtype(x.dtype, np.number) or x.ndim != 3:
        raise DataError(f"{p}: 'x' must be numeric windows (N, T, C), found {x.dtype} {x.shape}")
    if x.shape[1] != cfg.window:
        raise DataError(f"{p}: windows have {x.shape[1]} samples, the recipe says data.window = "
                        f"{cfg.window}; set data.window = {x.shape[1]}")
    if yn.dtype.kind not in "US" or yn.shape != (len(x),):
        raise DataError(f"{p}: 'y' must be {len(x)} label names (np.array(names, dtype=str)), "
                        f"found {yn.dtype} {yn.shape}")
    ch = [str(c) for c in arrays["channels"]] if "channels" in arrays else [
        f"ch{i}" for i in range(x.shape[2])]
    if cfg.channels:
        miss = [c for c in cfg.channels if c not in ch]
        if miss:
            raise DataError(f"{p}: channels {miss} missing; data.channels wants "
                            f"{list(cfg.channels)}, the file has {ch}")
        x, ch = x[:, :, [ch.index(c) for c in cfg.channels]], list(cfg.channels)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=(1, 2)))
        raise DataError(f"{p}: windows {bad[:5].tolist()} contain NaN or inf; clean or drop "
                        "them")
    y, labels = _label_ids([str(v) for v in yn.tolist()], str(p))
    owner = {k: [str(v) for v in arrays[k].tolist()] for k in ("user", "session")
             if k in arrays}
    for k, v in owner.items():
        if len(v) != len(x):
            raise DataError(f"{p}: {len(x)} windows but {len(v)} '{k}' values")
    sessions = owner.get("session", [""] * len(x))
    sid = {n: i for i, n in enumerate(_sorted_names(sessions))}
    owners, what = ((owner["user"], "users") if "user" in owner else
                    (owner["session"], "sessions") if "session" in owner else (None, ""))
    return SensorData(x, y, np.array([sid[s] for s in sessions], np.int64), owners, labels,
                      tuple(ch), what, 0)


# ----------------------------------------------------------------------------------- images

@dataclass(frozen=True)
class ImageData:
    """Images of your folders, converted and resized as the device does, with their owners.

    Shape:
        x: (N, S, S) uint8 (mode L) or (N, S, S, 3) (RGB); y: (N,) int64.
    """

    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    owners: list[str] | None
    labels: tuple[str, ...]
    skipped: list[dict]


def load_images(cfg) -> ImageData:
    """``path/<label>/*.png|jpg`` (or, with ``by_user``, ``path/<user>/<label>/...``).

    Unreadable files are skipped and counted; a label folder with no readable image is an
    error.
    """
    root = _exists(cfg.path, "a folder with one sub-folder of PNG/JPEG images per label")
    if not root.is_dir():
        raise DataError(f"data.path {root} is a file; kind = 'image' takes a folder with one "
                        "sub-folder of PNG/JPEG images per label (path/<label>/<image>.png)")
    im = device_module("edgerun.images")
    spec = {"height": cfg.image_size, "width": cfg.image_size, "mode": cfg.image_mode,
            "resample": "bilinear"}
    users = ([d for d in sorted(os.listdir(root)) if (root / d).is_dir()
              and not d.startswith(".")] if cfg.by_user else [None])
    if cfg.by_user and not users:
        raise DataError(f"{root}: data.by_user expects one folder per user "
                        f"({root}/<user>/<label>/<image>.png), found none")
    arrays, names, paths, owners, skipped = [], [], [], [], []
    for user in users:
        base = root / user if user else root
        files, skip = _device_call(im.collect_images, str(base))
        skipped += skip
        found: dict[str, int] = {}
        tried: dict[str, list] = {}
        for path, label in files:
            r = im.read_image(path, spec)
            tried.setdefault(label, []).append(path)
            if isinstance(r, str):
                skipped.append({"path": path, "reason": r})
                continue
            found[label] = found.get(label, 0) + 1
            arrays.append(r[:, :, 0] if cfg.image_mode == "L" else r)
            names.append(label)
            paths.append(path)
            owners.append(user or "")
        labels = sorted(d for d in os.listdir(base) if (base / d).is_dir()
                        and not d.startswith("."))
        for label in labels:
            if not found.get(label):
                why = [s for s in skipped if s["path"].startswith(str(base / label) + os.sep)]
                raise DataError(
                    f"label folder {base / label} has no readable image"
                    + (f" ({len(why)} file(s) skipped, e.g. {why[0]['path']}: "
                       f"{why[0]['reason']})" if why else " (it is empty)")
                    + f"; expected PNG/JPEG files ({base / label}/<image>.png): add images or "
                      "remove the folder")
    if not arrays:
        raise DataError(f"{root} holds no label folder with images; expected "
                        f"{root}/<label>/<image>.png" + (" per user" if cfg.by_user else ""))
    y, labels = _label_ids(names, str(root))
    return ImageData(np.stack(arrays), y, paths, owners if cfg.by_user else None, labels,
                     skipped)


# ------------------------------------------------------------------------------------- text

@dataclass(frozen=True)
class TextData:
    """Labelled texts of your CSV with their owners."""

    texts: np.ndarray      # (N,) str
    y: np.ndarray          # (N,) int64
    owners: list[str] | None
    labels: tuple[str, ...]


def load_texts(cfg) -> TextData:
    """A ``.csv`` with ``text`` and ``label`` columns (optional ``user``), as the device reads."""
    p = _exists(cfg.path, "a .csv with 'text' and 'label' columns (optional 'user')")
    if p.suffix.lower() != ".csv":
        raise DataError(f"{p}: kind = 'text' takes a .csv with 'text' and 'label' columns "
                        f"(optional 'user'), not {p.suffix or '(no extension)'!r}")
    tx = device_module("edgerun.text")
    texts, names, extra = _device_call(tx.read_text_table, str(p), ("user",))
    if names is None:
        raise DataError(f"{p}: header lacks a 'label' column; expected text,label[,user]: the "
                        "server trains on labelled texts")
    if not texts:
        raise DataError(f"{p} has a header but no rows")
    y, labels = _label_ids(names, str(p))
    users = extra["user"]
    if users is not None and not all(users):
        bad = [i + 2 for i, u in enumerate(users) if not u][:5]
        raise DataError(f"{p}: empty 'user' on line(s) {bad}; give every row a user or drop "
                        "the column")
    return TextData(np.asarray(texts, dtype=str), y, users, labels)
