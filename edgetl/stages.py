"""Server stages as typed functions: data, pretrain, distill, export.

Each writes its artifact into ``out`` and returns a small result record; the CLI's commands
and :func:`edgetl.pipeline.run_recipe` call exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetl.check import CheckData
from edgetl.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgetl.config import Recipe
from edgetl.data import hapt
from edgetl.distributed import is_main
from edgetl.errors import ConfigError, DataError
from edgetl.export import export_bundle
from edgetl.manifest import Manifest
from edgetl.nets import build_model, count_params
from edgetl.train import Split, accuracy, distill, train_classifier


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


@dataclass(frozen=True)
class ServerData:
    """User-disjoint splits of the source data, normalised with server-train statistics.

    Shape:
        mean, std: (C,); splits hold (N, T, C) normalised windows.
    """

    train: Split
    val: Split
    heldout: Split
    mean: np.ndarray
    std: np.ndarray
    windows: hapt.Windows
    split: UserSplit


def load_windows(recipe: Recipe) -> tuple[hapt.Windows, UserSplit]:
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


def hapt_split(recipe: Recipe) -> UserSplit:
    """The HAPT recipe's user split, as its ``[data]`` names it."""
    d = recipe.data
    return UserSplit(tuple(sorted(set(d.server_users) - set(d.server_val_users))),
                     tuple(d.server_val_users), tuple(d.device_users))


def server_data(recipe: Recipe, *, windows: hapt.Windows | None = None) -> ServerData:
    """Split the recipe's windows by user: train / server-val / held-out (device users)."""
    d = recipe.data
    if d.is_text:
        raise ConfigError(f"recipe {recipe.name!r} is a text recipe: train it with `edgetl "
                          "run` (its training stages run together); pretrain and distill take "
                          "time-series recipes")
    if d.is_image:
        raise ConfigError(f"recipe {recipe.name!r} is an image recipe: train it with `edgetl "
                          "run` (its training stages run together); pretrain and distill take "
                          "time-series recipes")
    if windows is not None:
        w, split = windows, hapt_split(recipe)
    else:
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

    return ServerData(norm(tr), norm(va), norm(ho), mean.astype(np.float32),
                      std.astype(np.float32), w, split)


def _checkpoint(model, recipe: Recipe, net, sd: ServerData, meta: dict) -> Checkpoint:
    w, d = sd.windows, recipe.data
    rate = d.sample_rate_hz if d.is_files else hapt.SAMPLE_RATE_HZ
    return Checkpoint(model, net, recipe.head, tuple(w.labels), tuple(w.channels),
                      d.window, d.stride, float(rate), sd.mean, sd.std,
                      {"recipe": recipe.name, **meta})


@dataclass(frozen=True)
class StageResult:
    """A written checkpoint and what it scored."""

    path: Path
    params: int
    val_accuracy: float
    heldout_accuracy: float
    seconds: float
    history: list


def pretrain(recipe: Recipe, out: Path, *, data: ServerData | None = None,
             show: bool = True) -> StageResult:
    """Train the teacher on server users; write ``out/teacher.pt``."""
    torch.manual_seed(recipe.pretrain.seed)
    sd = data or server_data(recipe)
    model = build_model(sd.train.x.shape[2], len(sd.windows.labels), recipe.teacher, recipe.head)
    res = train_classifier(model, sd.train, sd.val, recipe.pretrain, desc="pretrain teacher",
                           show=show)
    ho = accuracy(model, sd.heldout)
    path = Path(out) / "teacher.pt"
    if is_main():  # under torchrun every rank holds the same weights; rank 0 writes them
        save_checkpoint(_checkpoint(model, recipe, recipe.teacher, sd,
                                    {"role": "teacher", "heldout_accuracy": ho}), path)
    return StageResult(path, count_params(model), res.val_accuracy or 0.0, ho, res.seconds,
                       res.history)


def distill_student(recipe: Recipe, teacher_path: Path, out: Path, *,
                    data: ServerData | None = None, baseline: bool = True,
                    show: bool = True) -> dict[str, StageResult]:
    """Distill the teacher into the student (``out/student.pt``).

    With ``baseline``, also train the same student from scratch (``out/student_scratch.pt``) so
    the gain of distillation is measured, not assumed.
    """
    sd = data or server_data(recipe)
    teacher = load_checkpoint(teacher_path).model
    results = {}
    runs = [("student", True)] + ([("student_scratch", False)] if baseline else [])
    for name, kd in runs:
        torch.manual_seed(recipe.student_train.seed)
        model = build_model(sd.train.x.shape[2], len(sd.windows.labels), recipe.student,
                            recipe.head)
        if kd:
            res = distill(teacher, model, sd.train, sd.val, recipe.student_train, recipe.distill,
                          show=show)
        else:
            res = train_classifier(model, sd.train, sd.val, recipe.student_train,
                                   desc="student from scratch", show=show)
        ho = accuracy(model, sd.heldout)
        meta = {"role": name, "heldout_accuracy": ho, "distilled": kd,
                "temperature": recipe.distill.temperature if kd else None,
                "alpha": recipe.distill.alpha if kd else None}
        path = Path(out) / f"{name}.pt"
        if is_main():
            save_checkpoint(_checkpoint(model, recipe, recipe.student, sd, meta), path)
        results[name] = StageResult(path, count_params(model), res.val_accuracy or 0.0, ho,
                                    res.seconds, res.history)
    return results


def check_data(recipe: Recipe, data: ServerData | None = None) -> CheckData:
    """Seeded, reproducible picks of reference and calibration windows, plus held-out data.

    Image recipes: reference images from the validation split, calibration images from the
    training subset, the Fashion-MNIST test subset as held-out data (as ``edgetl run``).
    """
    rng = np.random.default_rng(0)
    if recipe.data.is_text:  # the picks `edgetl run` makes for the text scenario
        from edgetl.text.pipeline import check_picks, text_splits

        return check_picks(recipe, text_splits(recipe))
    if recipe.data.is_image:
        from edgetl.vision.pipeline import raw_splits

        r = raw_splits(recipe)
        ref = r["x_val"][np.sort(rng.permutation(len(r["x_val"]))[:64])]
        calib = r["x_train"][np.sort(rng.permutation(len(r["x_train"]))[
            : recipe.export.calibration_windows])]
        return CheckData(ref, calib, r["x_test"], r["y_test"], r["labels"])
    sd = data or server_data(recipe)
    w = sd.windows
    ref, src, ho = w.users(sd.split.val), w.users(sd.split.train), w.users(sd.split.device)
    pick = np.sort(rng.permutation(len(ref))[:256])
    n_cal = recipe.export.calibration_windows
    calib = src.x[np.sort(rng.permutation(len(src.x))[:n_cal])]
    return CheckData(ref.x[pick], calib, ho.x, ho.y, tuple(w.labels))


def export(checkpoint: Path, out: Path, recipe: Recipe, *, target: str | None = None,
           precision: str | None = None, trainer: str | None = None,
           data: ServerData | None = None, sign_key: Path | None = None) -> Manifest:
    """Export a student checkpoint as a device bundle in ``out``.

    Reference windows (parity checks, test vectors) come from the server-validation users,
    int8 calibration windows from the server's training users, and the accuracy gate runs on
    the held-out users (the same numbers as the server table).
    """
    import dataclasses

    cfg = dataclasses.replace(recipe.export, target=target or recipe.export.target,
                              precision=precision or recipe.export.precision,
                              trainer=trainer or recipe.export.trainer)
    ck = load_checkpoint(checkpoint)
    cd = check_data(recipe, data)
    return export_bundle(ck, Path(out), cfg, reference_x=cd.reference, calib_x=cd.calibration,
                         eval_set=(cd.heldout_x, cd.heldout_y),
                         provenance={"checkpoint": str(checkpoint), "recipe": recipe.name,
                                     "student_heldout_accuracy": ck.meta.get("heldout_accuracy")},
                         sign_key=sign_key, adapt=recipe.adapt)


def quantize(bundle: Path, out: Path, recipe: Recipe, *,
             data: ServerData | None = None) -> Manifest:
    """int8 copy of an fp32 ONNX bundle, calibrated and gated on the recipe's data."""
    from edgetl.quantize import quantize_bundle

    cd = check_data(recipe, data)
    return quantize_bundle(Path(bundle), Path(out), calib_x=cd.calibration,
                           eval_set=(cd.heldout_x, cd.heldout_y),
                           max_drop=recipe.export.max_accuracy_drop)
