"""What every method shares: the data it sees and two training loops.

:func:`train_supervised` fine-tunes on labelled target data with an optional penalty (L2-SP,
EWC); :func:`train_aligned` trains on labelled source plus unlabelled target batches with an
alignment loss on the backbone features (DANN, MMD, CORAL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetl.config import TransferConfig
from edgetl.errors import DataError
from edgetl.train import Split


@dataclass(frozen=True)
class TransferData:
    """The data a method may use.

    source: labelled source windows/images (normalised); target: labelled target data
    (supervised methods) or None; unlabeled: (N, ...) unlabelled target inputs
    (unsupervised methods) or None; shared: prefixes of the parameter names that came from
    the source model (L2-SP and EWC pull these toward their source values); source_model: the
    untouched source model with its source head (EWC's Fisher information); cache: shared
    by the runs of one scenario for what depends only on the source (the Fisher diagonal).
    """

    source: Split
    target: Split | None = None
    unlabeled: np.ndarray | None = None
    shared: tuple[str, ...] = ("",)
    source_model: nn.Module | None = None
    cache: dict = field(default_factory=dict, compare=False)

    def require(self, what: str, method: str):
        """The named field, or a DataError saying the method needs it."""
        v = getattr(self, what)
        if v is None or len(v.y if isinstance(v, Split) else v) == 0:
            raise DataError(f"method {method!r} needs {what} target data; the scenario gave none")
        return v


def shared_params(model: nn.Module, data: TransferData) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``model`` that came from the source (by name prefix)."""
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and any(n.startswith(s) for s in data.shared)}


def new_params(model: nn.Module, data: TransferData) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``model`` that did not come from the source (a new head)."""
    shared = shared_params(model, data)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n not in shared}


def train_supervised(model: nn.Module, target: Split, cfg: TransferConfig, penalty=None,
                     *, weight_decay: float = 0.0) -> nn.Module:
    """Fine-tune every parameter on labelled target data: CE (+ ``penalty(model)``), Adam."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.from_numpy(target.x), torch.from_numpy(target.y)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=weight_decay)
    bs = min(cfg.batch_size, len(y))
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - bs + 1, bs):  # full batches only (BatchNorm)
            b = perm[i : i + bs]
            loss = F.cross_entropy(model(x[b]), y[b])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def train_aligned(model: nn.Module, data: TransferData, cfg: TransferConfig, align,
                  extra: list[nn.Parameter] | None = None) -> nn.Module:
    """Labelled source CE + ``align(f_source, f_target, progress)`` on backbone features.

    Each of ``cfg.uda_steps`` steps draws ``cfg.batch_size`` source and as many unlabelled
    target inputs and runs them through the backbone together (BatchNorm sees both
    domains). ``extra``: parameters of the alignment loss itself (DANN's domain classifier).
    """
    xt_all = data.require("unlabeled", "alignment")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    xs_all, ys_all = torch.from_numpy(data.source.x), torch.from_numpy(data.source.y)
    xt_all = torch.from_numpy(np.ascontiguousarray(xt_all))
    params = [p for p in model.parameters() if p.requires_grad] + list(extra or [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    bs = cfg.batch_size
    model.train()
    for step in range(cfg.uda_steps):
        i = torch.randint(0, len(ys_all), (bs,), generator=gen)
        j = torch.randint(0, len(xt_all), (bs,), generator=gen)
        f = model.backbone(torch.cat([xs_all[i], xt_all[j]]))
        fs, ft = f[:bs], f[bs:]
        loss = F.cross_entropy(model.head(fs), ys_all[i]) + align(fs, ft, step / cfg.uda_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def lambda_schedule(progress: float) -> float:
    """Ganin et al.'s ramp ``2 / (1 + exp(-10 p)) - 1``: 0 at the start, ~1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0
