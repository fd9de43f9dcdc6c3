"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): fine-tuning pulled toward the source weights.

``loss = CE + alpha/2 * ||w_shared - w_source||^2 + beta/2 * ||w_new||^2``: parameters that
came from the source stay near it instead of near 0 (plain weight decay), new ones (a head
for new labels) get ordinary L2.
"""

from __future__ import annotations

from edgetl.methods import register_method
from edgetl.methods.common import TransferData, new_params, shared_params, train_supervised


@register_method("l2sp", "supervised", "L2-SP (fine-tune, pulled to source weights)")
def l2sp(model, data: TransferData, cfg):
    """Fine-tune with the L2-SP penalty (``cfg.l2sp_alpha``, ``cfg.l2sp_beta``)."""
    target = data.require("target", "l2sp")
    shared = shared_params(model, data)
    anchor = {n: p.detach().clone() for n, p in shared.items()}
    new = list(new_params(model, data).values())

    def penalty(_model):
        sp = sum(((shared[n] - a) ** 2).sum() for n, a in anchor.items())
        l2 = sum((p ** 2).sum() for p in new) if new else 0.0
        return 0.5 * cfg.l2sp_alpha * sp + 0.5 * cfg.l2sp_beta * l2

    return train_supervised(model, target, cfg, penalty)
