"""The recipe-kind protocol and the records every kind shares (see :mod:`edgetl.kinds`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetl.check import CheckData
from edgetl.checkpoint import load_checkpoint, save_checkpoint
from edgetl.distributed import is_main
from edgetl.nets import build_model, count_params
from edgetl.train import accuracy, distill, train_classifier


@dataclass
class ServerData:
    """The recipe's data as the server stages use it.

    Shape:
        train / val / heldout: :class:`edgetl.train.Split` of model inputs, (N, T, C) windows
        or (N, C, H, W) images (text: (N, 2, L) ids + mask in ``source``).

    ``heldout`` is the data no server stage trained or chose anything on: the device users'
    windows (time series, your files) or the source test set (Fashion-MNIST, glosses).
    ``check``: the seeded reference / calibration / held-out picks the export and its gate
    use, in raw form (what a device feeds). ``source``: the kind's own loaded data (windows
    and user split, raw images, texts and tokens); ``split``: who trains / validates / plays
    the phones, where the data has users. ``note``: how the split was made, for the log;
    ``heldout_name``: what ``heldout`` is, for tables; ``info``: data statistics for
    ``summary.json``.
    """

    kind: str
    train: Any
    val: Any
    heldout: Any
    labels: tuple[str, ...]
    in_channels: int
    check: CheckData
    describe: str
    source: Any = None
    split: Any = None
    note: str = ""
    heldout_name: str = "held-out data"
    augment: Callable | None = None
    info: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Device:
    """One simulated device's local data: what it adapts on and what scores it.

    ``adapt`` / ``eval``: paths in the kind's device format (``.npz``, a folder of images per
    label, a ``text,label`` CSV), read by the runner as a device would. ``labels``: the
    labels of its adaptation data; those the bundle does not know are imprinted first.
    """

    name: str
    adapt: Path
    eval: Path
    n_adapt: int
    n_eval: int
    labels: tuple[str, ...]
    user: str | int | None = None
    protocol: str = "sessions"
    chunks: tuple[Path, ...] = ()  # the ``stream`` protocol's chunks, in time order

    @property
    def folder(self) -> str:
        """A file-system-safe folder name for the device's state."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)



class RecipeKind:
    """What a recipe's input kind does for the server stages; see the module docstring.

    Subclasses set ``name`` and implement :meth:`load`, :meth:`checkpoint` and
    :meth:`devices`; :meth:`pretrain` / :meth:`distill` default to supervised training of
    ``recipe.teacher`` and Hinton distillation into ``recipe.student`` (with a from-scratch
    twin of the student, so the gain of distillation is measured, not assumed).
    """

    name: str = ""

    def load(self, recipe) -> ServerData:
        raise NotImplementedError

    def checkpoint(self, model, recipe, net, sd: ServerData, meta: dict):
        """A :class:`edgetl.checkpoint.Checkpoint` carrying this kind's input contract."""
        raise NotImplementedError

    #: Personalisation protocols :meth:`devices` can write (``edgetl run`` reports each);
    #: the first is the main one.
    protocols: tuple[str, ...] = ("sessions",)

    def devices(self, recipe, out: Path, sd: ServerData, *, users: tuple | None = None,
                protocol: str = "sessions") -> list[Device]:
        """Write every simulated device's ``adapt`` / ``eval`` data under ``out/devices``."""
        raise NotImplementedError

    def check_users(self, recipe, sd: ServerData) -> tuple | None:
        """Users for the release gate's adaptation check (never the held-out ones), or None.

        Default: none; kinds whose data has server-validation users return theirs, and
        :meth:`devices` accepts them as ``users``.
        """
        return None

    def roles(self, recipe) -> dict[str, str]:
        """Checkpoint role -> bundle name prefix, for every role ``edgetl run`` exports."""
        return {"student": ""}

    def model_name(self, role: str, recipe) -> str:
        """How the server table names ``role``."""
        net = recipe.teacher if role == "teacher" else recipe.student
        how = {"teacher": "pretrained, fine-tuned" if getattr(net, "pretrained", False)
               else "trained", "student": "distilled", "student_scratch": "from scratch",
               "student_distilled": "distilled, not shipped"}
        return f"{role.split('_')[0]} {net.arch} ({how.get(role, role)})"

    def pretrain(self, recipe, out: Path, sd: ServerData, *,
                 show: bool = True) -> StageResult:
        return train_teacher(self, recipe, out, sd, show=show)

    def distill(self, recipe, teacher_path: Path, out: Path, sd: ServerData, *,
                baseline: bool = True, show: bool = True) -> dict[str, StageResult]:
        return train_students(self, recipe, teacher_path, out, sd, baseline=baseline,
                              show=show)


@dataclass(frozen=True)
class StageResult:
    """A written checkpoint and what it scored."""

    path: Path
    params: int
    val_accuracy: float
    heldout_accuracy: float
    seconds: float
    history: list
    backbone_params: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The server table's row (``summary.json``)."""
        return {"params": self.params, "backbone_params": self.backbone_params,
                "val_accuracy": self.val_accuracy, "heldout_accuracy": self.heldout_accuracy,
                "seconds": self.seconds, "checkpoint": str(self.path), **self.extra}


def record(kind, model, recipe, net, sd: ServerData, path: Path, meta: dict,
           val_accuracy: float, seconds: float, history: list, *,
           heldout: float | None = None, extra: dict | None = None) -> StageResult:
    """Score ``model`` on the held-out data, save it as ``path`` with the kind's contract."""
    model.eval()
    ho = accuracy(model, sd.heldout) if heldout is None else heldout
    if is_main():  # under torchrun every rank holds the same weights; rank 0 writes them
        save_checkpoint(kind.checkpoint(model, recipe, net, sd,
                                        {**meta, "heldout_accuracy": ho}), path)
    return StageResult(path, count_params(model), val_accuracy or 0.0, ho, seconds, history,
                       count_params(model.backbone), extra or {})


def train_teacher(kind, recipe, out: Path, sd: ServerData, *,
                  show: bool = True) -> StageResult:
    """Supervised training of ``recipe.teacher`` (fine-tuning when pretrained)."""
    torch.manual_seed(recipe.pretrain.seed)
    model = build_model(sd.in_channels, len(sd.labels), recipe.teacher, recipe.head)
    pre = getattr(recipe.teacher, "pretrained", False)
    desc = f"fine-tune {recipe.teacher.arch}" if pre else "pretrain teacher"
    res = train_classifier(model, sd.train, sd.val, recipe.pretrain, desc=desc, show=show,
                           augment=sd.augment)
    meta = {"role": "teacher", **({"pretrained": True} if pre else {})}
    return record(kind, model, recipe, recipe.teacher, sd, Path(out) / "teacher.pt", meta,
                  res.val_accuracy, res.seconds, res.history)


def train_students(kind, recipe, teacher_path: Path, out: Path, sd: ServerData, *,
                   baseline: bool = True, show: bool = True) -> dict[str, StageResult]:
    """Distill the teacher into ``recipe.student``; with ``baseline`` also from scratch.

    Distillation must never hurt: with ``baseline``, the student that ships (``student``,
    ``out/student.pt``, what ``edgetl export`` and ``edgetl run`` take) is the better of the
    two on the server-validation data (ties: the distilled one). When the from-scratch twin
    wins, the distilled student stays as ``student_distilled`` and ``student`` records why
    (``extra["shipped"]``, ``extra["why"]``); both are in the server table.
    """
    teacher = load_checkpoint(teacher_path).model
    results, models = {}, {}
    runs = [("student", True)] + ([("student_scratch", False)] if baseline else [])
    for name, kd in runs:
        torch.manual_seed(recipe.student_train.seed)
        model = build_model(sd.in_channels, len(sd.labels), recipe.student, recipe.head)
        if kd:
            res = distill(teacher, model, sd.train, sd.val, recipe.student_train, recipe.distill,
                          show=show, augment=sd.augment)
        else:
            res = train_classifier(model, sd.train, sd.val, recipe.student_train,
                                   desc="student from scratch", show=show, augment=sd.augment)
        meta = {"role": name, "distilled": kd,
                "temperature": recipe.distill.temperature if kd else None,
                "alpha": recipe.distill.alpha if kd else None}
        results[name] = record(kind, model, recipe, recipe.student, sd,
                               Path(out) / f"{name}.pt", meta, res.val_accuracy, res.seconds,
                               res.history)
        models[name] = (model, meta, res)
    if not baseline:
        return results
    kd, scratch = results["student"], results["student_scratch"]
    if scratch.val_accuracy <= kd.val_accuracy:
        why = (f"distilled {kd.val_accuracy:.4f} >= from scratch {scratch.val_accuracy:.4f} "
               "on the server-validation data")
        results["student"] = dataclasses.replace(kd, extra={**kd.extra, "shipped": "distilled",
                                                             "why": why})
        return results
    why = (f"from scratch {scratch.val_accuracy:.4f} > distilled {kd.val_accuracy:.4f} on the "
           "server-validation data: distillation would have hurt, the from-scratch twin ships")
    if is_main():  # only rank 0 wrote checkpoints (torchrun)
        (Path(out) / "student.pt").replace(Path(out) / "student_distilled.pt")
    results["student_distilled"] = dataclasses.replace(kd, path=Path(out) /
                                                       "student_distilled.pt")
    model, meta, res = models["student_scratch"]
    results["student"] = record(kind, model, recipe, recipe.student, sd,
                                Path(out) / "student.pt",
                                {**meta, "role": "student", "shipped_over": "distilled"},
                                res.val_accuracy, res.seconds, res.history,
                                heldout=scratch.heldout_accuracy,
                                extra={"shipped": "from scratch", "why": why})
    return results
