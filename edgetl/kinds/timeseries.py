"""Sensor windows: HAPT or your own CSV / ``.npz`` logs, split by user.

Device simulation: each held-out user's first recording session is the local data the phone
adapts on; their later sessions are the evaluation data. Windows never cross sessions, so
nothing leaks between the two. A user with one session (your own files): the first half of
each label's windows adapts, the second half, after the windows that overlap it, evaluates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from edgetl.check import REPLAY_POOL, CheckData, per_class
from edgetl.checkpoint import Checkpoint
from edgetl.data import hapt
from edgetl.errors import ConfigError, DataError
from edgetl.kinds.base import Device, RecipeKind, ServerData
from edgetl.train import Split


@dataclass(frozen=True)
class UserSplit:
    """Which users (``Windows.user`` ids) train the server, validate it and play the phones.

    ``names``: each id's name for user files (``()`` for HAPT, whose ids are its names);
    ``note``: how the split was made, for the run's log.
    """

    train: tuple[int, ...]
    val: tuple[int, ...]
    device: tuple[int, ...]
    names: tuple[str, ...] = ()
    note: str = ""

    def name(self, user: int) -> int | str:
        """The user as tables and summaries show it (the HAPT id, or the file's name)."""
        return self.names[user] if self.names else int(user)

    def folder(self, user: int) -> str:
        """A folder name for the user's device files."""
        if not self.names:
            return f"user_{user:02d}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.names[user])
        return f"user_{safe}"


def load_windows(recipe) -> tuple[hapt.Windows, UserSplit]:
    """The recipe's windows (HAPT or your sensor files) and its user split."""
    d = recipe.data
    if not d.is_files:
        return hapt.load_hapt(d.window, d.stride), hapt_split(recipe)
    from edgetl.data import files

    sd = files.load_timeseries(d)
    g = files.groups_of(d, sd.owners, sd.what, sd.y, sd.labels, in_order=True, gap=sd.gap)
    keep = g.group >= 0
    n = int(keep.sum())
    w = hapt.Windows(sd.x[keep], sd.y[keep], g.group[keep], sd.session[keep],
                     np.arange(n, dtype=np.int64), sd.labels, sd.channels)
    return w, UserSplit(g.train, g.val, g.device, g.names, g.note)


def hapt_split(recipe) -> UserSplit:
    """The HAPT recipe's user split, as its ``[data]`` names it."""
    d = recipe.data
    return UserSplit(tuple(sorted(set(d.server_users) - set(d.server_val_users))),
                     tuple(d.server_val_users), tuple(d.device_users))


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-window, per-channel amplitude jitter plus a little noise.

    Users hold phones differently; this keeps the model from keying on one person's absolute
    magnitudes.
    """
    scale = 1.0 + 0.1 * torch.randn(xb.shape[0], 1, xb.shape[2], generator=gen)
    return xb * scale + 0.01 * torch.randn(xb.shape, generator=gen)


#: How a device's labelled data arrives and what scores it (``edgetl run`` reports each).
PROTOCOLS = {
    "sessions": "adapt on the first recording session, score the later ones",
    "within": "adapt on the first half of each activity in the first session, score the rest "
              "of that session",
    "stream": "labelled data arrives in time-ordered chunks; after each chunk the device adapts "
              "(from its current head, on everything so far) and is scored on the next chunk",
}
#: Chunks of the ``stream`` protocol (the device adapts after each but the last).
STREAM_CHUNKS = 4
#: Stress protocols: not in ``make demo``; ``edgetl personalise --stress`` adds them, to choose
#: defaults that also survive labelled data unlike what the device sees later.
#: Rotation of the ``odd`` protocol's adaptation session, degrees.
ODD_ANGLE = 45.0
STRESS = {
    "odd": "the first session recorded with the phone turned (every 3-axis sensor rotated by "
           f"{ODD_ANGLE:g} degrees about a random axis, seeded per user): adapt on it, score "
           "the later, unturned sessions",
}


def turned(x: np.ndarray, user: int, angle: float = ODD_ANGLE) -> np.ndarray:
    """``x`` (N, T, C) with every 3-axis sensor (channels 3k..3k+2) rotated alike.

    The rotation: ``angle`` degrees about a unit axis drawn from ``user``'s seed (Rodrigues).
    """
    c = x.shape[2]
    if c % 3:
        raise ConfigError(f"the odd protocol rotates 3-axis sensors; these windows have {c} "
                          "channels (not a multiple of 3)")
    axis = np.random.default_rng(1000 + user).normal(size=3)
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(angle)
    r = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
    out = x.reshape(*x.shape[:2], c // 3, 3) @ r.T
    return out.reshape(x.shape).astype(x.dtype)


def _save(w: hapt.Windows, s: hapt.Windows, path: Path) -> Path:
    np.savez(path, x=s.x, y=np.array([w.labels[i] for i in s.y], dtype=str),
             channels=np.array(w.channels, dtype=str))
    return path


def write_device_files(w: hapt.Windows, user: int, folder: Path, *, gap: int = 0,
                       protocol: str = "sessions") -> tuple[Path, ...]:
    """A user's device files under ``folder`` for ``protocol`` (:data:`PROTOCOLS`).

    ``sessions``: the first session as ``adapt.npz``, the later ones as ``eval.npz``; a user
    with one session (your own files) falls back to ``within``. ``within``: the first half of
    each label's windows of the first session adapts, the rest (after ``gap`` windows that
    overlap the first half) evaluates. ``stream``: every window in recording order, cut into
    :data:`STREAM_CHUNKS` files ``chunk{i}.npz`` (each scoring chunk drops its first ``gap``
    windows, which overlap the previous chunk). Returns the paths, adapt/eval or chunks.
    """
    from edgetl.data.files import device_halves

    folder.mkdir(parents=True, exist_ok=True)
    u = w.users([user])
    first = u.session == u.session.min()
    if protocol == "stream":
        chunks = np.array_split(np.arange(len(u)), STREAM_CHUNKS)
        return tuple(_save(w, u.select(c if i == 0 else c[gap:]), folder / f"chunk{i}.npz")
                     for i, c in enumerate(chunks))
    if protocol == "odd":
        if first.all():
            raise ConfigError(f"the odd protocol needs users with more than one session; user "
                              f"{user} has one")
        a, e = u.select(first), u.select(~first)
        a = replace(a, x=turned(a.x, user))
        return _save(w, a, folder / "adapt.npz"), _save(w, e, folder / "eval.npz")
    if protocol == "sessions" and not first.all():
        parts = (first, ~first)
    else:
        ad, ev = device_halves(u.y[first], np.zeros(int(first.sum())), in_order=True, gap=gap)
        idx = np.flatnonzero(first)
        parts = tuple(np.isin(np.arange(len(u)), idx[i]) for i in (ad, ev))
    return tuple(_save(w, u.select(m), folder / f"{name}.npz")
                 for name, m in zip(("adapt", "eval"), parts, strict=True))


class Timeseries(RecipeKind):
    """(N, T, C) windows normalised with the server-training users' per-channel statistics."""

    name = "timeseries"
    protocols = tuple(PROTOCOLS)
    stress_protocols = tuple(STRESS)

    def load(self, recipe) -> ServerData:
        """Split the windows by user: server-train / server-val / held-out (device users)."""
        d = recipe.data
        w, split = load_windows(recipe)
        tr, va, ho = w.users(split.train), w.users(split.val), w.users(split.device)
        for part, s in (("server-training", tr), ("server-validation", va), ("device", ho)):
            if len(s) == 0:
                raise DataError(f"the {part} users hold no windows; check data.server_users / "
                                "server_val_users / device_users against the data")
        flat = tr.x.reshape(-1, tr.x.shape[2])
        mean, std = flat.mean(0), flat.std(0) + 1e-6

        def norm(s: hapt.Windows) -> Split:
            return Split(((s.x - mean) / std).astype(np.float32), s.y)

        rng = np.random.default_rng(0)  # seeded, reproducible picks for export and its gate
        pick = np.sort(rng.permutation(len(va))[:256])
        calib = tr.x[np.sort(rng.permutation(len(tr.x))[:recipe.export.calibration_windows])]
        rp = per_class(tr.y, REPLAY_POOL)
        check = CheckData(va.x[pick], calib, ho.x, ho.y, tuple(w.labels), tr.x[rp], tr.y[rp])
        what = f"{d.path}" if d.is_files else "HAPT"
        describe = (f"{len(tr)} train / {len(va)} val windows from server users of {what}, "
                    f"{len(ho)} from held-out users {[split.name(u) for u in split.device]}")
        sd = ServerData(self.name, norm(tr), norm(va), norm(ho), tuple(w.labels),
                        int(tr.x.shape[2]), check, describe, source=w, split=split,
                        note=split.note, heldout_name="held-out users", augment=augment)
        sd.cache["mean_std"] = (mean.astype(np.float32), std.astype(np.float32))
        return sd

    def checkpoint(self, model, recipe, net, sd: ServerData, meta: dict) -> Checkpoint:
        w, d = sd.source, recipe.data
        mean, std = sd.cache["mean_std"]
        rate = d.sample_rate_hz if d.is_files else hapt.SAMPLE_RATE_HZ
        return Checkpoint(model, net, recipe.head, tuple(w.labels), tuple(w.channels),
                          d.window, d.stride, float(rate), mean, std,
                          {"recipe": recipe.name, **meta})

    def devices(self, recipe, out: Path, sd: ServerData, *, users: tuple | None = None,
                protocol: str = "sessions") -> list[Device]:
        """One device per held-out user (or ``users``), its files cut by ``protocol``.

        :data:`PROTOCOLS`; ``stream`` devices carry their chunks, ``adapt``/``eval`` being
        the first two.

        Users the server trained on are refused (their numbers would be meaningless); the
        server-validation users are allowed, to tune adaptation without touching the
        held-out users.
        """
        split, w = sd.split, sd.source
        users = tuple(users or split.device)
        seen = set(split.train) & set(users)
        if seen:
            raise ConfigError(f"users {sorted(split.name(u) for u in seen)} trained the server "
                              f"model; pick device users {[split.name(u) for u in split.device]}"
                              f" or server-validation users {[split.name(u) for u in split.val]}")
        if protocol not in PROTOCOLS and protocol not in STRESS:
            raise ConfigError(f"unknown protocol {protocol!r}; known: "
                              f"{', '.join([*PROTOCOLS, *STRESS])}")
        d = recipe.data
        # windows that overlap across a cut: none between sessions of HAPT, else a few
        overlap = -(-d.window // d.stride) - 1
        gap = overlap if d.is_files or protocol not in ("sessions", "odd") else 0
        root = Path(out) / ("devices" if protocol == "sessions" else f"devices-{protocol}")
        devs = []
        for user in users:
            folder = root / split.folder(user)
            if folder.exists():
                shutil.rmtree(folder)  # a fresh phone each run
            paths = write_device_files(w, user, folder, gap=gap, protocol=protocol)
            with np.load(paths[0]) as a, np.load(paths[1]) as e:
                devs.append(Device(split.folder(user), paths[0], paths[1], len(a["y"]),
                                   len(e["y"]), tuple(sorted(set(a["y"].tolist()))),
                                   split.name(user), protocol,
                                   paths if protocol == "stream" else ()))
        return devs

    def check_users(self, recipe, sd: ServerData) -> tuple:
        """The users of ``[check] users`` (default the server-validation users)."""
        if recipe.data.is_files:
            return tuple(sd.split.val)
        return tuple(recipe.check.users or recipe.data.server_val_users)
