"""Baselines: the source model as it is, and plain fine-tuning on labelled target data."""

from __future__ import annotations

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, train_supervised


@register_method("source_only", "none", "source only (no target data)")
def source_only(model, data: TransferData, cfg):
    """The source model, unchanged: the baseline every method must beat."""
    return model.eval()


@register_method("finetune", "supervised", "fine-tune (all layers, target labels)")
def finetune(model, data: TransferData, cfg):
    """Every layer on the labelled target data, cross-entropy only."""
    return train_supervised(model, data.require("target", "finetune"), cfg)
