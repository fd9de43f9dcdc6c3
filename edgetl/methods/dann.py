"""DANN (Ganin et al., JMLR 2016): adversarial features through a gradient reversal layer.

A domain classifier learns to tell source from target features; the reversed gradient trains
the backbone to make them indistinguishable, while the source CE keeps them discriminative.
The reversal strength ramps up with Ganin's schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, lambda_schedule, train_aligned


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward, ``-coeff * grad`` backward."""
    return _Reverse.apply(x, coeff)


def domain_classifier(dim: int, hidden: int) -> nn.Module:
    """Features -> one logit (target vs source)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


@register_method("dann", "unsupervised", "DANN (gradient reversal, unlabelled target)")
def dann(model, data: TransferData, cfg):
    """Source CE plus the domain classifier's loss through the gradient reversal layer."""
    torch.manual_seed(cfg.seed)
    disc = domain_classifier(model.backbone.out_features, cfg.dann_hidden)

    def align(fs, ft, progress):
        coeff = cfg.dann_lambda * lambda_schedule(progress)
        logits = disc(grad_reverse(torch.cat([fs, ft]), coeff)).squeeze(1)
        dom = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))])
        return F.binary_cross_entropy_with_logits(logits, dom)

    return train_aligned(model, data, cfg, align, extra=list(disc.parameters()))
