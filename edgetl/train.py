"""Server-side training: supervised pretraining and Hinton knowledge distillation.

Both stages are one typed function each (:func:`train_classifier`, :func:`distill`) returning a
:class:`TrainResult`; the CLI, the pipeline and the tests call the same functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetl.config import DistillConfig, TrainConfig
from edgetl.errors import DataError
from edgetl.progress import progress_bar

#: ``augment(x_batch, generator) -> x_batch``: the input kind's training augmentation
#: (:mod:`edgetl.kinds`), drawn from the seeded generator so runs repeat exactly.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Split:
    """Normalised arrays for one stage.

    Shape:
        x: (N, T, C) float32 normalised windows or (N, C, H, W) images; y: (N,) int64 ids.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        if self.x.ndim not in (3, 4) or len(self.x) != len(self.y):
            raise DataError(f"expected x (N, T, C) or (N, C, H, W) and y (N,), got "
                            f"{self.x.shape} and {self.y.shape}")
        if len(self.y) == 0:
            raise DataError("empty split: no windows selected; check the recipe's user lists")


@dataclass
class TrainResult:
    """What a training stage produced."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    val_accuracy: float | None = None


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Eval-mode logits for normalised windows ``x`` (N, T, C)."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(torch.from_numpy(x[i : i + batch]).to(dev)).cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    return float((predict_logits(model, split.x).argmax(1) == split.y).mean())


def _fit(model: nn.Module, train: Split, val: Split | None, cfg: TrainConfig, desc: str,
         loss_fn, show: bool, augment: Augment | None) -> TrainResult:
    from edgetl import distributed

    # Under torchrun: every rank draws the same permutation and augmentation for the global
    # batch and trains on its rows of it (edgetl.distributed); one process: the rows are all.
    info = distributed.current()
    distributed.check_batch(cfg.batch_size, info)
    show = show and info.is_main
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    idx_all = torch.arange(len(y))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, pct_start=0.2,
                                                total_steps=cfg.epochs * steps_per_epoch)
    res = TrainResult(model)
    t0 = time.perf_counter()
    with progress_bar(show) as prog, distributed.data_parallel(model, info) as (net, batch):
        task = prog.add_task(desc, total=cfg.epochs * steps_per_epoch, info="")
        for epoch in range(cfg.epochs):
            net.train()
            perm = idx_all[torch.randperm(len(y), generator=gen)]
            total, n = 0.0, 0
            for i in range(0, len(y), cfg.batch_size):
                b = perm[i : i + cfg.batch_size]
                xb = augment(x[b], gen) if augment is not None else x[b]
                if info.enabled:
                    rows = batch.rows(len(b))
                    b, xb = b[rows], xb[rows].to(info.device)
                logits = net(xb)
                loss = loss_fn(logits, b, y[b].to(logits.device)) if len(b) else logits.sum()
                step_loss = loss * batch.weight(len(b)) if info.enabled else loss
                opt.zero_grad(set_to_none=True)
                step_loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
                n += len(b)
                prog.advance(task)
            total, n = distributed.all_reduce_sum([total, n], info)
            rec = {"epoch": epoch + 1, "loss": total / n}
            if val is not None and info.is_main:
                rec["val_accuracy"] = accuracy(model, val)
                res.val_accuracy = rec["val_accuracy"]
            res.history.append(rec)
            info_text = f"loss {rec['loss']:.3f}" + (
                f" val {rec['val_accuracy']:.3f}" if "val_accuracy" in rec else "")
            prog.update(task, info=info_text)
    res.seconds = time.perf_counter() - t0
    model.eval()
    return res


def train_classifier(model: nn.Module, train: Split, val: Split | None, cfg: TrainConfig, *,
                     desc: str = "train", show: bool = True,
                     augment: Augment | None = None) -> TrainResult:
    """Supervised training with cross-entropy, AdamW and a one-cycle schedule.

    Args:
        model: maps (N, T, C) windows to (N, K) logits.
        train: training windows; val: optional held-out windows scored after each epoch.
        cfg: epochs, batch size, learning rate, weight decay and seed.
        augment: the input kind's batch augmentation (``ServerData.augment``); None: none.
    """
    return _fit(model, train, val, cfg, desc, lambda logits, _b, yb: F.cross_entropy(logits, yb),
                show, augment)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
            cfg: DistillConfig) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss.

    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; the ``T^2``
    keeps the soft-target gradients on the scale of the hard-label ones.

    Shape:
        student_logits, teacher_logits: (N, K); y: (N,).
    """
    t = cfg.temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True)
    return cfg.alpha * t * t * soft + (1 - cfg.alpha) * F.cross_entropy(student_logits, y)


def distill(teacher: nn.Module, student: nn.Module, train: Split, val: Split | None,
            cfg: TrainConfig, kd: DistillConfig, *, show: bool = True,
            augment: Augment | None = None) -> TrainResult:
    """Train ``student`` to match ``teacher``'s temperature-softened outputs.

    The teacher is frozen, so its logits on the (un-augmented) training windows are computed
    once; each batch then costs one student pass.
    """
    with torch.no_grad():
        # Teacher targets on the clean windows; the student sees augmented ones, which
        # acts as consistency regularisation.
        t_logits = torch.from_numpy(predict_logits(teacher, train.x))
    return _fit(student, train, val, cfg, "distill",
                lambda logits, b, yb: kd_loss(logits, t_logits[b].to(logits.device), yb, kd),
                show, augment)
