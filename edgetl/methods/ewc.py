"""EWC (Kirkpatrick et al., PNAS 2017): fine-tuning with a Fisher-weighted pull to the source.

``loss = CE + lambda/2 * sum_i F_i (w_i - w_source_i)^2`` where ``F`` is the diagonal of the
empirical Fisher information of the *source* task (squared per-sample gradients of the
log-likelihood of the true source label), estimated on ``cfg.ewc_samples`` source inputs.
Weights the source task relies on move less than plain L2-SP would let them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, shared_params, train_supervised


def fisher_diagonal(model, x: torch.Tensor, y: torch.Tensor, names: set[str]) -> dict:
    """Mean squared per-sample gradient of ``log p(y|x)`` for the parameters in ``names``.

    Eval mode (BatchNorm uses its running statistics), one sample per backward pass.
    """
    model.eval()
    params = {n: p for n, p in model.named_parameters() if n in names}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
    return {n: f / max(len(y), 1) for n, f in fisher.items()}


@register_method("ewc", "supervised", "EWC (fine-tune, Fisher-weighted pull to source)")
def ewc(model, data: TransferData, cfg):
    """Fine-tune with the EWC penalty (``cfg.ewc_lambda``), Fisher from source data."""
    target = data.require("target", "ewc")
    if data.source_model is None:
        raise ValueError("ewc needs data.source_model (the model with its source head)")
    shared = shared_params(model, data)
    key = ("ewc_fisher", id(data.source_model), cfg.ewc_samples, cfg.seed, tuple(shared))
    if key not in data.cache:  # depends on the source only: once per scenario
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(data.source.y), generator=g)[: cfg.ewc_samples]
        xs = torch.from_numpy(data.source.x)[pick]
        ys = torch.from_numpy(data.source.y)[pick]
        data.cache[key] = fisher_diagonal(data.source_model, xs, ys, set(shared))
    fisher = data.cache[key]
    anchor = {n: p.detach().clone() for n, p in shared.items()}

    def penalty(_model):
        return 0.5 * cfg.ewc_lambda * sum((fisher[n] * (shared[n] - a) ** 2).sum()
                                          for n, a in anchor.items() if n in fisher)

    return train_supervised(model, target, cfg, penalty)
