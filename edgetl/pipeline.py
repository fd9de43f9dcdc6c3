"""``edgetl run RECIPE``: every stage, then every held-out user personalises on-device.

Device simulation: each held-out user's first recording session is the local data the phone
adapts on; their later sessions are the evaluation data. Windows never cross sessions, so
nothing leaks between the two.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from edgetl import adapt as device
from edgetl import stages
from edgetl.check import release_gate
from edgetl.config import Recipe
from edgetl.data import hapt
from edgetl.errors import ConfigError
from edgetl.progress import console, progress_bar
from edgetl.summary import RunSummary


def write_device_files(w: hapt.Windows, user: int, folder: Path, *,
                       gap: int = 0) -> tuple[Path, Path]:
    """Write a user's first session as ``adapt.npz`` and later sessions as ``eval.npz``.

    A user with one session (your own files): the first half of each label's windows adapts,
    the second half (after ``gap`` windows that overlap the first half) evaluates.
    """
    from edgetl.data.files import device_halves

    folder.mkdir(parents=True, exist_ok=True)
    u = w.users([user])
    first = u.session.min()
    if len(np.unique(u.session)) > 1:
        parts = (u.session == first, u.session != first)
    else:
        ad, ev = device_halves(u.y, u.session, in_order=True, gap=gap)
        parts = tuple(np.isin(np.arange(len(u)), i) for i in (ad, ev))
    paths = []
    for name, mask in zip(("adapt", "eval"), parts, strict=True):
        s = u.select(mask)
        p = folder / f"{name}.npz"
        np.savez(p, x=s.x, y=np.array([w.labels[i] for i in s.y], dtype=str),
                 channels=np.array(w.channels, dtype=str))
        paths.append(p)
    return paths[0], paths[1]


def personalise_devices(recipe: Recipe, bundle: Path, out: Path, w: hapt.Windows, *,
                        split: stages.UserSplit | None = None,
                        users: tuple[int, ...] | None = None, name: str | None = None,
                        show: bool = True) -> list[dict]:
    """Adapt on each device user's first session, evaluate on the rest, via the runner.

    Args:
        split: the recipe's user split (default: HAPT's, from the recipe; your own files:
            made again from the data).
        name: the bundle's name in the rows and under ``out/devices/`` (default: its folder).
        users: which users play the phones; default the split's device users. Users the
            server trained on are refused (their numbers would be meaningless); the
            server-validation users are allowed, to tune adaptation without touching the
            held-out users.
    """
    if split is None:
        split = stages.load_windows(recipe)[1] if recipe.data.is_files else \
            stages.hapt_split(recipe)
    users = tuple(users or split.device)
    seen = set(split.train)
    if set(users) & seen:
        raise ConfigError(f"users {sorted(split.name(u) for u in set(users) & seen)} trained "
                          f"the server model; pick device users "
                          f"{[split.name(u) for u in split.device]} or server-validation "
                          f"users {[split.name(u) for u in split.val]}")
    gap = -(-recipe.data.window // recipe.data.stride) - 1 if recipe.data.is_files else 0
    rows = []
    a = recipe.adapt
    name = name or Path(bundle).name
    with progress_bar(show) as prog:
        task = prog.add_task(f"personalise devices ({name})", total=len(users), info="")
        for user in users:
            folder = Path(out) / "devices" / name / split.folder(user)
            if folder.exists():
                shutil.rmtree(folder)  # a fresh phone each run
            adapt_npz, eval_npz = write_device_files(w, user, folder, gap=gap)
            general = device.infer(bundle, eval_npz)
            rep = device.adapt(bundle, adapt_npz, folder / "state", epochs=a.epochs,
                               batch_size=a.batch_size, val_fraction=a.val_fraction, seed=a.seed)
            personal = device.infer(bundle, eval_npz, head=Path(rep["checkpoint"]))
            row = {"bundle": name, "user": split.name(user), "n_adapt": rep["n_windows"],
                   "n_eval": general["n_windows"],
                   "general_accuracy": general["accuracy"],
                   "personal_accuracy": personal["accuracy"],
                   "gain": personal["accuracy"] - general["accuracy"],
                   "val_before": rep["accuracy_before"], "val_after": rep["accuracy_after"],
                   "rolled_back": rep["rolled_back"], "feature_seconds": rep["feature_seconds"],
                   "train_seconds": rep["train_seconds"],
                   "adapt_seconds": rep["feature_seconds"] + rep["train_seconds"],
                   "peak_rss_mb": rep["peak_rss_mb"], "backend": rep["backend"],
                   "precision": rep["precision"]}
            rows.append(row)
            prog.update(task, advance=1, info=f"user {row['user']}: "
                                              f"{row['general_accuracy']:.3f} -> "
                                              f"{row['personal_accuracy']:.3f}")
    return rows


def run_recipe(recipe: Recipe, out: Path, *, show: bool = True) -> RunSummary:
    """Pretrain, distill (with a from-scratch baseline), export, personalise every device."""
    if recipe.data.kind == "text":
        from edgetl.text.pipeline import run_text

        return run_text(recipe, out, show=show)
    if recipe.data.kind == "image":
        from edgetl.vision.pipeline import run_vision

        return run_vision(recipe, out, show=show)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd = stages.server_data(recipe)
    if sd.split.note:
        console.log(f"split of {recipe.data.path}: {sd.split.note}")
    console.log(f"data: {len(sd.train.y)} train / {len(sd.val.y)} val windows from server "
                f"users, {len(sd.heldout.y)} from held-out users "
                f"{[sd.split.name(u) for u in sd.split.device]}")
    summ = RunSummary(recipe.name)
    teacher = stages.pretrain(recipe, out, data=sd, show=show)
    students = stages.distill_student(recipe, teacher.path, out, data=sd, show=show)
    for name, r in (("teacher", teacher), *students.items()):
        summ.server[name] = {"params": r.params, "val_accuracy": r.val_accuracy,
                             "heldout_accuracy": r.heldout_accuracy, "seconds": r.seconds,
                             "checkpoint": str(r.path)}
    summ.server["distill"] = {"temperature": recipe.distill.temperature,
                              "alpha": recipe.distill.alpha,
                              "param_ratio": students["student"].params / teacher.params}
    for target, precision in recipe.export.bundles():
        name = f"{target}-{precision}"
        path = out / "bundles" / name
        man = stages.export(students["student"].path, path, recipe, target=target,
                            precision=precision, data=sd)
        from edgetl.report import bundle_line

        console.log(bundle_line(path, man))
        gate = release_gate(path, checkpoint=students["student"].path,
                            **check_inputs(recipe, sd))
        summ.bundles.append({"name": name, "path": str(path), "target": target,
                             "precision": precision,
                             "bytes": sum(f.bytes for f in man.files.values()),
                             "files": {k: v.bytes for k, v in man.files.items()},
                             "checks": man.checks, "gate": gate})
        summ.devices += personalise_devices(recipe, path, out, sd.windows, split=sd.split,
                                            name=name, show=show)
    return _finish(summ, out, t0)


def check_inputs(recipe: Recipe, sd=None) -> dict:
    """:func:`edgetl.check.check_bundle` keyword arguments from a recipe's data.

    Held-out data and its threshold for every kind; for time series also the adaptation check
    (the users of ``[check] users``, default the server-validation users: never trained on,
    never the held-out device users) whose mean gain may not fall below
    ``-check.max_adaptation_loss`` points.
    """
    d = recipe.data
    timeseries = not (d.is_image or d.is_text)
    sd = sd if sd is not None or not timeseries else stages.server_data(recipe)
    cd = stages.check_data(recipe, sd)
    kw = {"reference_x": cd.reference,
          "heldout": (cd.heldout_x, np.array([cd.labels[i] for i in cd.heldout_y], dtype=str)),
          "max_drop": recipe.export.max_accuracy_drop}
    if timeseries:  # cameras'/text devices' adaptation runs in `edgetl run` (new classes)
        users = sd.split.val if d.is_files else (recipe.check.users or d.server_val_users)
        kw["adaptation"] = adaptation_check(recipe, sd.windows, tuple(users), sd.split)
    return kw


def adaptation_check(recipe: Recipe, windows, users: tuple, split=None):
    """``(bundle, work) -> Check``: personalise ``users`` through the runner."""
    from edgetl.check import Check

    limit = recipe.check.max_adaptation_loss

    def run(bundle: Path, work: Path) -> Check:
        rows = personalise_devices(recipe, bundle, work, windows, split=split, users=users,
                                   show=False)
        gain = 100 * float(np.mean([r["gain"] for r in rows]))
        per = ", ".join(f"{r['user']}: {100 * r['gain']:+.1f}" for r in rows)
        return Check("adaptation", gain >= -limit, gain, 0.0 - limit,
                     f"mean gain in points over users {[r['user'] for r in rows]} ({per})")

    return run


def _finish(summ: RunSummary, out: Path, t0: float) -> RunSummary:
    """Add device totals and wall time; write ``summary.json`` and ``personalisation.png``."""
    summ.totals = {"by_bundle": {n: device_totals([r for r in summ.devices if r["bundle"] == n])
                                 for n in summ.bundle_names()},
                   "wall_seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summ.to_dict(), indent=2))
    from edgetl.report import plot_personalisation

    plot_personalisation(summ, out / "personalisation.png")
    return summ


def device_totals(d: list[dict]) -> dict:
    """Means over devices: accuracies, gain, how many improved/worsened/rolled back, costs."""
    return {
        "mean_general_accuracy": float(np.mean([r["general_accuracy"] for r in d])),
        "mean_personal_accuracy": float(np.mean([r["personal_accuracy"] for r in d])),
        "mean_gain": float(np.mean([r["gain"] for r in d])),
        "users_improved": int(sum(r["gain"] > 0 for r in d)),
        "users_worse": int(sum(r["gain"] < 0 for r in d)),
        "rolled_back": int(sum(r["rolled_back"] for r in d)),
        "mean_adapt_seconds": float(np.mean([r["adapt_seconds"] for r in d])),
        "max_peak_rss_mb": float(np.max([r["peak_rss_mb"] for r in d])),
    }


def personalise(recipe: Recipe, bundle: Path, out: Path, *, users: tuple[int, ...] | None = None,
                show: bool = True) -> RunSummary:
    """Only the device stage of :func:`run_recipe`, on an existing bundle."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w, split = stages.load_windows(recipe)
    summ = RunSummary(recipe.name)
    summ.devices = personalise_devices(recipe, Path(bundle), out, w, split=split, users=users,
                                       show=show)
    return _finish(summ, out, t0)
