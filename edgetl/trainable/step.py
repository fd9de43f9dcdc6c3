"""The tail's train and infer steps: same graph contract as :mod:`edgetl.head`, any subset.

``TailTrain.forward(features, targets, sample_weight, *hparams, *params, *state, *anchors)
-> (loss, *new_params, *new_state)`` with ``features`` the flattened cut tensor and
``params`` the trainable backbone tensors (``backbone.<name>``) then the head's, as in the
manifest. Gradients come from ``torch.func.grad_and_value`` (the frozen rest are constants,
BatchNorm in eval mode: statistics frozen); the update is ``torch.optim.SGD`` (momentum,
dampening 0, L2 weight decay) or ``torch.optim.Adam`` (bias-corrected, L2 weight decay); the
loss is the head's weighted cross-entropy (``sample_weight`` 0 = padding) plus the L2-SP
term when the head has one (anchors for every trainable tensor). A step with backbone tensors
takes one more hyper-parameter, ``backbone_lr_scale`` (after the optimizer's, before
``l2sp``): the backbone tensors step at ``lr * backbone_lr_scale`` (``torch.optim``'s
per-group lr; SGD's momentum buffers and Adam's moments do not depend on the lr).

:meth:`TailTrain.trace` turns the step into an aten graph (``make_fx`` with core-ATen
decompositions plus :func:`~edgetl.trainable.decomp.convolution_backward`, under the MATH
SDPA backend: the flash-attention backward's decomposition gives silently wrong gradients).
A backward op left undecomposed raises :class:`BundleError` naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetl.errors import BundleError
from edgetl.head import HeadSpec, head_forward

#: The tail step's hyper-parameter that scales the backbone tensors' learning rate.
BACKBONE_LR_SCALE = "backbone_lr_scale"


class TailModel(nn.Module):
    """``forward(features, *params) -> (logits, embedding)``: the cut tail, then the head.

    ``features``: (B, tail_dim), the flattened cut tensor.
    """

    def __init__(self, tail: nn.Module, spec: HeadSpec, backbone_params: list[str],
                 tail_dim: int):
        super().__init__()
        self.tail, self.spec, self.tail_dim = tail.eval(), spec, int(tail_dim)
        self.backbone_params = list(backbone_params)
        self.frozen = {k: v.detach() for k, v in tail.named_parameters()
                       if k not in backbone_params}
        self.frozen.update({k: v.detach() for k, v in tail.named_buffers()})

    @property
    def param_names(self) -> list[str]:
        """Graph parameter inputs: ``backbone.<name>`` ones, then the head's."""
        return [f"backbone.{n}" for n in self.backbone_params] + list(self.spec.param_names)

    def forward(self, features, *params):
        k = len(self.backbone_params)
        tensors = {**self.frozen, **dict(zip(self.backbone_params, params[:k], strict=True))}
        f = torch.func.functional_call(self.tail, tensors, (features,))
        return head_forward(self.spec, f, list(params[k:]))


class TailInfer(nn.Module):
    """``forward(features, *params) -> (logits, embedding)`` with names, like ``InferStep``."""

    def __init__(self, model: TailModel):
        super().__init__()
        self.model = model

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return ["features", *self.model.param_names]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return ["logits", "embedding"]

    def forward(self, features, *params):
        return self.model(features, *params)


def _weighted_ce(logits, targets, weight):
    """The head's loss: ``sum_i w_i CE_i / max(sum_i w_i, 1e-12)`` with probability targets."""
    logp = torch.log_softmax(logits, dim=1)
    wn = (weight / torch.clamp(weight.sum(), min=1e-12)).unsqueeze(1)
    return -(wn * targets * logp).sum()


class TailTrain(nn.Module):
    """One optimizer step of the tail and head, as a pure function (module docstring)."""

    def __init__(self, model: TailModel, optimizer: str):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.spec = model.spec
        names = list(self.spec.hparam_names(optimizer))
        if model.backbone_params:  # before l2sp, which forward pops first
            names.insert(len(names) - self.spec.l2sp, BACKBONE_LR_SCALE)
        self.hparam_names = tuple(names)

    @property
    def param_names(self) -> list[str]:
        return self.model.param_names

    def state_names(self) -> list[str]:
        """Optimizer state names, as :meth:`HeadSpec.state_names` for every parameter."""
        p = self.param_names
        if self.optimizer == "sgd":
            return [f"momentum.{n}" for n in p]
        return [f"exp_avg.{n}" for n in p] + [f"exp_avg_sq.{n}" for n in p] + ["step"]

    def anchor_names(self) -> list[str]:
        """``anchor.<param>`` inputs of an L2-SP step (empty without L2-SP)."""
        return [f"anchor.{n}" for n in self.param_names] if self.spec.l2sp else []

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return ["features", "targets", "sample_weight", *self.hparam_names, *self.param_names,
                *self.state_names(), *self.anchor_names()]

    def output_names(self) -> list[str]:
        """Graph output names, in order; ``loss`` first."""
        return ["loss", *(f"new.{n}" for n in [*self.param_names, *self.state_names()])]

    def init_state(self, params: dict) -> dict:
        """Zero optimizer state for ``params`` (Adam's ``step``: shape (1,))."""
        return {n: torch.zeros(1) if n == "step" else torch.zeros_like(
            torch.as_tensor(params[n.split(".", 1)[1]])) for n in self.state_names()}

    def forward(self, features, targets, sample_weight, *rest):
        names, nh = self.param_names, len(self.hparam_names)
        hp, rest = list(rest[:nh]), rest[nh:]
        params, rest = list(rest[: len(names)]), list(rest[len(names) :])
        na = len(self.anchor_names())
        state, anchors = rest[: len(rest) - na], rest[len(rest) - na :]
        frozen = set(self.spec.frozen_params)  # a fixed cosine scale: passed through
        learn = [n for n in names if n not in frozen]
        given = dict(zip(names, params, strict=True))
        coef = hp.pop() if self.spec.l2sp else None
        scale = hp.pop() if BACKBONE_LR_SCALE in self.hparam_names else None

        def loss_fn(tp):
            ps = [tp.get(n, given[n]) for n in names]
            loss = _weighted_ce(self.model(features, *ps)[0], targets, sample_weight)
            if coef is not None:
                pen = torch.stack([((p - a) * (p - a)).sum()
                                   for p, a in zip(ps, anchors, strict=True)])
                # a real reduction over the per-tensor terms: the loss stays () when a
                # runtime feeds coef as (1,) (a sum of a 0-d product is traced away)
                loss = loss + 0.5 * (coef * pen).sum()
            return loss

        grads, loss = torch.func.grad_and_value(loss_fn)({n: given[n] for n in learn})
        lr_scales = [scale if scale is not None and n.startswith("backbone.") else None
                     for n in names]
        new = _update(self.optimizer, hp, params, [grads.get(n) for n in names], state,
                      lr_scales)
        return (loss, *new)

    def float64(self) -> TailTrain:
        """A copy of this step computing in float64 (feed it float64 inputs).

        The parity checks' truth (:data:`edgetl.tolerances.TRAIN_STEP_NOISE_FACTOR` says why).
        """
        import copy

        twin = copy.deepcopy(self)
        twin.model.tail.double()
        twin.model.frozen = {k: v.double() if v.is_floating_point() else v
                             for k, v in twin.model.frozen.items()}
        return twin

    def trace(self, args: tuple, *, scatter: bool = True) -> torch.fx.GraphModule:
        """The step as a decomposed aten graph (see module docstring).

        ``scatter=False``: an embedding table's gradient as a one-hot matmul, not a
        scatter-add (LiteRT; :func:`~edgetl.trainable.decomp.embedding_dense_backward`).
        """
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from edgetl.trainable.decomp import table

        # oneDNN off: on CPU, aten.lstm would pick mkldnn_rnn_layer, which no exporter
        # lowers; without it the LSTM decomposes into matmuls and pointwise ops
        with sdpa_kernel(SDPBackend.MATH), torch.backends.mkldnn.flags(enabled=False):
            gm = make_fx(self.forward, decomposition_table=table(scatter=scatter))(*args)
        left = sorted({str(n.target) for n in gm.graph.nodes
                       if n.op == "call_function" and "backward" in str(n.target)})
        if left:
            raise BundleError(f"--trainable: the backward op(s) {left} have no decomposition "
                              "into forward ops, so no runtime can run this train step; "
                              "choose a smaller SPEC that leaves their layers frozen "
                              "(e.g. last:1 or bias)")
        return gm


def param_groups(head: list, backbone: list, hparams: dict) -> list[dict]:
    """``torch.optim`` parameter groups training what a tail step trains, at its lrs.

    The head's tensors at ``hparams["lr"]``, the backbone's at ``lr * backbone_lr_scale``
    (default 1): the reference loops the exported step is compared and benchmarked against.
    """
    groups = [{"params": list(head)}]
    if backbone:
        groups.append({"params": list(backbone),
                       "lr": hparams["lr"] * hparams.get(BACKBONE_LR_SCALE, 1.0)})
    return groups


def _update(optimizer: str, hp, params, grads, state, lr_scales) -> list:
    """New params then new state; a ``None`` gradient passes its parameter through.

    ``lr_scales``: per parameter, a 0-d tensor multiplying the lr, or ``None`` (the lr).
    """
    if optimizer == "sgd":
        lr, mom, wd = hp
        new_p, new_s = [], []
        for p, g, buf, k in zip(params, grads, state, lr_scales, strict=True):
            if g is None:
                new_p.append(p)
                new_s.append(buf)
                continue
            buf = mom * buf + (g + wd * p)
            new_s.append(buf)
            new_p.append(p - (lr if k is None else lr * k) * buf)
        return [*new_p, *new_s]
    lr, b1, b2, eps, wd = hp
    n = len(params)
    m, v, step = state[:n], state[n : 2 * n], state[2 * n] + 1.0
    bc1, bc2 = 1.0 - torch.pow(b1, step), 1.0 - torch.pow(b2, step)
    new_p, new_m, new_v = [], [], []
    for p, g, mi, vi, k in zip(params, grads, m, v, lr_scales, strict=True):
        if g is not None:
            g = g + wd * p
            mi = b1 * mi + (1.0 - b1) * g
            vi = b2 * vi + (1.0 - b2) * g * g
            p = p - ((lr if k is None else lr * k) / bc1) * mi / (
                torch.sqrt(vi) / torch.sqrt(bc2) + eps)
        new_p.append(p)
        new_m.append(mi)
        new_v.append(vi)
    return [*new_p, *new_m, *new_v, step]
