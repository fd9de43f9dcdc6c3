"""Server stages as typed functions: data, pretrain, distill, export, quantize.

Each writes its artifact into ``out`` and returns a small result record; the CLI's commands
and :func:`edgetl.pipeline.run_recipe` call exactly these, for every input kind: the recipe's
kind (:mod:`edgetl.kinds`) loads and splits its data, names its checkpoints' input contract
and may bring its own training (text: a frozen encoder's head, then an embedding-distilled
student).
"""

from __future__ import annotations

from pathlib import Path

from edgetl import kinds
from edgetl.check import CheckData
from edgetl.checkpoint import load_checkpoint
from edgetl.config import Recipe
from edgetl.export import export_bundle
from edgetl.kinds.base import ServerData, StageResult
from edgetl.manifest import Manifest


def server_data(recipe: Recipe) -> ServerData:
    """The recipe's data, loaded and split by its input kind (:meth:`RecipeKind.load`)."""
    return kinds.of(recipe).load(recipe)


def pretrain(recipe: Recipe, out: Path, *, data: ServerData | None = None,
             show: bool = True) -> StageResult:
    """Train the teacher on the server-training data; write ``out/teacher.pt``."""
    kind = kinds.of(recipe)
    return kind.pretrain(recipe, Path(out), data or kind.load(recipe), show=show)


def distill_student(recipe: Recipe, teacher_path: Path, out: Path, *,
                    data: ServerData | None = None, baseline: bool = True,
                    show: bool = True) -> dict[str, StageResult]:
    """Distill the teacher into the student (``out/student.pt``).

    With ``baseline``, also train the same student from scratch (``out/student_scratch.pt``) so
    the gain of distillation is measured, not assumed (kinds whose student is costly to train
    from scratch — text — skip it).
    """
    kind = kinds.of(recipe)
    return kind.distill(recipe, Path(teacher_path), Path(out), data or kind.load(recipe),
                        baseline=baseline, show=show)


def check_data(recipe: Recipe, data: ServerData | None = None) -> CheckData:
    """Seeded, reproducible picks of reference and calibration inputs, plus held-out data.

    Reference inputs come from the server-validation data, calibration inputs from the
    server-training data, held-out data from what no server stage saw (the kind decides
    which: device users, or the source test set).
    """
    return (data or server_data(recipe)).check


def export(checkpoint: Path, out: Path, recipe: Recipe, *, target: str | None = None,
           precision: str | None = None, trainer: str | None = None,
           data: ServerData | None = None, sign_key: Path | None = None,
           trainable: str | None = None, int8_io: str | None = None,
           backbone_lr_scale: float | None = None) -> Manifest:
    """Export a student checkpoint as a device bundle in ``out``.

    ``trainable``: ``--trainable SPEC`` (default the recipe's ``export.trainable``);
    ``backbone_lr_scale``: its backbone tensors' lr over the head's (default
    ``export.backbone_lr_scale``);
    ``int8_io``: a TFLite int8 backbone's graph I/O type (default ``export.int8_io``).

    Reference inputs (parity checks, test vectors) come from the server-validation data,
    int8 calibration inputs from the server-training data, and the accuracy gate runs on the
    held-out data (the same numbers as the server table).
    """
    import dataclasses

    cfg = dataclasses.replace(recipe.export, target=target or recipe.export.target,
                              precision=precision or recipe.export.precision,
                              trainer=trainer or recipe.export.trainer,
                              trainable=trainable or recipe.export.trainable,
                              int8_io=int8_io or recipe.export.int8_io,
                              backbone_lr_scale=recipe.export.backbone_lr_scale
                              if backbone_lr_scale is None else backbone_lr_scale)
    ck = with_device_optimizer(load_checkpoint(checkpoint), recipe)
    cd = check_data(recipe, data)
    return export_bundle(ck, Path(out), cfg, reference_x=cd.reference, calib_x=cd.calibration,
                         eval_set=(cd.heldout_x, cd.heldout_y),
                         provenance={"checkpoint": str(checkpoint), "recipe": recipe.name,
                                     "student_heldout_accuracy": ck.meta.get("heldout_accuracy")},
                         sign_key=sign_key, adapt=recipe.adapt,
                         replay=None if cd.replay_x is None else (cd.replay_x, cd.replay_y))


#: ``[head]`` fields that only the device's train step reads: the recipe's apply at export.
DEVICE_OPTIMIZER_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "beta1", "beta2",
                           "eps", "l2sp")


def with_device_optimizer(ck, recipe: Recipe):
    """``ck`` with the recipe's on-device optimizer (``[head]`` optimizer, lr, momentum, ...).

    The server never trains with them (the head's server-side training has its own
    ``student_train`` settings), so a recipe variant that changes ``head.lr`` changes the
    bundle exported from an existing checkpoint, as its ``[export]`` table does. The head's
    architecture (kind, hidden, scale, learn_scale) is the checkpoint's: a recipe that asks
    for another one gets a warning (train a new checkpoint for that).
    """
    import dataclasses
    import logging

    log = logging.getLogger(__name__)
    old, new = ck.head, recipe.head
    diff = {f: (getattr(old, f), getattr(new, f)) for f in DEVICE_OPTIMIZER_FIELDS
            if getattr(old, f) != getattr(new, f)}
    if diff:
        log.info("on-device optimizer from recipe %s: %s (the checkpoint had %s)", recipe.name,
                 ", ".join(f"head.{f} = {b}" for f, (_, b) in diff.items()),
                 ", ".join(f"{a}" for a, _ in diff.values()))
    arch = [f for f, kinds in (("kind", None), ("hidden", "mlp"), ("scale", "cosine"),
                               ("learn_scale", "cosine"))
            if getattr(old, f) != getattr(new, f) and kinds in (None, old.kind)
            and (f == "kind" or old.kind == new.kind)]
    if arch:
        log.warning("recipe %s asks for a head with %s; the checkpoint's head has %s and keeps "
                    "it (retrain the student to change the head's architecture)", recipe.name,
                    ", ".join(f"{f} = {getattr(new, f)}" for f in arch),
                    ", ".join(f"{f} = {getattr(old, f)}" for f in arch))
    ck.head = dataclasses.replace(old, **{f: getattr(new, f) for f in DEVICE_OPTIMIZER_FIELDS})
    return ck


def quantize(bundle: Path, out: Path, recipe: Recipe, *,
             data: ServerData | None = None) -> Manifest:
    """int8 copy of an fp32 ONNX bundle, calibrated and gated on the recipe's data."""
    from edgetl.quantize import quantize_bundle

    cd = check_data(recipe, data)
    return quantize_bundle(Path(bundle), Path(out), calib_x=cd.calibration,
                           eval_set=(cd.heldout_x, cd.heldout_y),
                           max_drop=recipe.export.max_accuracy_drop)
