"""DAN (Long et al., ICML 2015): multi-kernel MMD between source and target features.

``loss = CE_source + lambda * MMD^2_k(f_s, f_t)`` with ``k`` a sum of Gaussian kernels whose
bandwidths are ``2^{-2..2}`` times the batch's mean squared distance (the usual multi-kernel
family; equal kernel weights instead of DAN's learned ones).
"""

from __future__ import annotations

import torch

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, lambda_schedule, train_aligned

BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def mk_mmd(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Biased multi-kernel MMD^2 estimate between (B, d) and (B', d) feature batches."""
    f = torch.cat([fs, ft])
    d2 = torch.cdist(f, f).pow(2)
    base = d2.detach().sum() / max(len(f) * (len(f) - 1), 1)
    k = sum(torch.exp(-d2 / (base * m + 1e-12)) for m in BANDWIDTH_FACTORS)
    n = len(fs)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


@register_method("mmd", "unsupervised", "MMD / DAN (multi-kernel, unlabelled target)")
def mmd(model, data: TransferData, cfg):
    """Source CE plus ``cfg.mmd_lambda`` (ramped up) times the multi-kernel MMD."""
    return train_aligned(model, data, cfg,
                         lambda fs, ft, p: cfg.mmd_lambda * lambda_schedule(p) * mk_mmd(fs, ft))
