"""Baselines: source-only, plain fine-tuning, and the control of the alignment methods.

The control is the alignment methods' training loop with the alignment loss switched off.
"""

from __future__ import annotations

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, train_aligned, train_supervised


@register_method("source_only", "none", "source only (no target data)")
def source_only(model, data: TransferData, cfg):
    """The source model, unchanged: the baseline every method must beat."""
    return model.eval()


@register_method("finetune", "supervised", "fine-tune (all layers, target labels)")
def finetune(model, data: TransferData, cfg):
    """Every layer on the labelled target data, cross-entropy only."""
    return train_supervised(model, data.require("target", "finetune"), cfg)


@register_method("source_steps", "unsupervised", "control: DANN/MMD/CORAL loop, no alignment")
def source_steps(model, data: TransferData, cfg):
    """The alignment methods' loop with a zero alignment loss.

    ``uda_steps`` more steps of source CE on batches that also carry unlabelled target
    inputs through BatchNorm.
    What DANN, MMD and CORAL gain over *this* is what their alignment loss buys; what this
    gains over source-only comes from the extra source training and the mixed BatchNorm
    statistics.
    """
    return train_aligned(model, data, cfg, lambda fs, ft, _p: fs.sum() * 0.0)
