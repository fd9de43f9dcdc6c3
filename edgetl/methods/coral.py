"""Deep CORAL (Sun & Saenko, 2016): match second-order statistics of the features.

``loss = CE_source + lambda * ||C_s - C_t||_F^2 / (4 d^2)`` with ``C`` the feature
covariances of a source and a target batch. Cheap: one d x d covariance per batch.
"""

from __future__ import annotations

import torch

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, train_aligned


def coral_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """CORAL distance between two (B, d) feature batches."""
    d = fs.shape[1]

    def cov(f):
        fc = f - f.mean(0, keepdim=True)
        return fc.t() @ fc / max(len(f) - 1, 1)

    return ((cov(fs) - cov(ft)) ** 2).sum() / (4.0 * d * d)


@register_method("coral", "unsupervised", "CORAL (feature covariance alignment)")
def coral(model, data: TransferData, cfg):
    """Source CE plus ``cfg.coral_lambda`` times the CORAL distance, unlabelled target."""
    return train_aligned(model, data, cfg, lambda fs, ft, _p: cfg.coral_lambda * coral_loss(fs, ft))
