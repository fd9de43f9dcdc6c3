"""AdaBN (Li et al., 2016): re-estimate BatchNorm statistics on unlabelled target data.

No gradient step at all: the cheapest unsupervised baseline, and the one the alignment
methods (DANN, MMD, CORAL) must beat to be worth their cost.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetl.methods import register_method
from edgetl.methods.common import TransferData


@register_method("adabn", "unsupervised", "AdaBN (target BatchNorm statistics)")
@torch.no_grad()
def adabn(model, data: TransferData, cfg):
    """BatchNorm running mean/var become the target data's (cumulative average)."""
    x = torch.from_numpy(data.require("unlabeled", "adabn"))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all target batches
    model.train()
    for i in range(0, len(x), 256):
        model.backbone(x[i : i + 256])
    return model.eval()
