"""AdaBN (Li et al., 2016): re-estimate BatchNorm statistics on unlabelled target data.

No gradient step at all: the cheapest unsupervised baseline, and the one the alignment
methods (DANN, MMD, CORAL) must beat to be worth their cost. The device runner computes the
same statistics (``run.py recalibrate``; ``edgetl.export.adabn`` says how they must agree).
"""

from __future__ import annotations

import torch
from torch import nn

from edgetl.methods import register_method
from edgetl.methods.common import TransferData

#: Windows per forward pass; torch's cumulative average weighs every chunk equally.
CHUNK = 256


@torch.no_grad()
def recalibrate_bn(module: nn.Module, x: torch.Tensor, batch: int = CHUNK) -> nn.Module:
    """``module``'s BN running mean/var become those of ``x`` (cumulative average); eval mode.

    Only the BN layers run in training mode: dropout stays off, so the statistics are those
    of the network the device runs.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all target batches
        m.train()
    for i in range(0, len(x), batch):
        module(x[i : i + batch])
    return module.eval()


@register_method("adabn", "unsupervised", "AdaBN (target BatchNorm statistics)")
@torch.no_grad()
def adabn(model, data: TransferData, cfg):
    """BatchNorm running mean/var become the target data's (cumulative average)."""
    x = torch.from_numpy(data.require("unlabeled", "adabn"))
    recalibrate_bn(model.backbone, x)
    return model.eval()
