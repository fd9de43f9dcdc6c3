"""The device-trainable head as stateless graphs with analytic gradients.

On-device training runs on plain inference runtimes (see DESIGN.md), so a train step is an
ordinary graph::

    train_step(features, targets, sample_weight, <hparams>, <params>, <opt state>)
        -> (loss, <new params>, <new opt state>)

Gradients are written out by hand in torch ops (tested against autograd), optimizer state is
explicit tensors, and ``sample_weight`` (0 for padding rows) makes fixed batch sizes and
instance weighting free. Nothing mutates a buffer, so every exporter sees a pure function.

Names are the contract: params ``weight``/``bias`` (linear), ``fc1.weight``... (mlp) or
``weight``/``bias``/``scale`` (cosine); state ``momentum.<param>`` (sgd) or
``exp_avg.<param>``, ``exp_avg_sq.<param>``, ``step`` (shape (1,)) (adam);
outputs ``loss``, ``new.<param>``, ``new.<state>``.

Head L2-SP (Li et al., 2018, applied to the head): with ``HeadSpec.l2sp`` the step takes an
extra hyper-parameter ``l2sp`` and one ``anchor.<param>`` input per parameter (after the
state; the shipped weights, held fixed by the runner) and minimises
``CE + l2sp / 2 * sum_p ||p - anchor.p||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgetl.errors import ConfigError

HPARAMS = {"sgd": ("lr", "momentum", "weight_decay"),
           "adam": ("lr", "beta1", "beta2", "eps", "weight_decay")}
HEAD_KINDS = ("linear", "mlp", "cosine")
#: Added to squared norms before the square root in the cosine head (zero rows stay zero).
COSINE_EPS = 1e-8


@dataclass(frozen=True)
class HeadSpec:
    """Shapes and names of a head: ``kind`` linear, mlp or cosine, ``in_features`` -> classes.

    ``cosine``: ``logits = scale * cos(f, weight_k) + bias_k`` (normalised features and class
    rows; the bias lets fixed-capacity heads park spare rows, 0 for real classes);
    ``learn_scale`` False keeps ``scale`` fixed in the train step. ``l2sp``: the train step
    pulls the head toward anchor inputs (see the module docstring).
    """

    kind: str
    in_features: int
    num_classes: int
    hidden: int = 0
    learn_scale: bool = True
    l2sp: bool = False

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"head kind {self.kind!r} unknown; known: {', '.join(HEAD_KINDS)}")
        if self.kind == "mlp" and self.hidden <= 0:
            raise ConfigError("an mlp head needs hidden > 0")

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names, in graph-input order."""
        if self.kind == "linear":
            return ("weight", "bias")
        if self.kind == "cosine":
            return ("weight", "bias", "scale")
        return ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

    @property
    def frozen_params(self) -> tuple[str, ...]:
        """Parameters the train step passes through unchanged (a fixed cosine scale)."""
        return ("scale",) if self.kind == "cosine" and not self.learn_scale else ()

    @property
    def class_params(self) -> tuple[str, ...]:
        """Parameters whose dim 0 is the class axis (grown when a device adds labels)."""
        return ("fc2.weight", "fc2.bias") if self.kind == "mlp" else ("weight", "bias")

    def hparam_names(self, optimizer: str) -> tuple[str, ...]:
        """The train step's hyper-parameter inputs, in order."""
        if optimizer not in HPARAMS:
            raise ConfigError(f"optimizer {optimizer!r} unknown; known: {sorted(HPARAMS)}")
        return HPARAMS[optimizer] + (("l2sp",) if self.l2sp else ())

    @property
    def anchor_names(self) -> tuple[str, ...]:
        """``anchor.<param>`` inputs of an L2-SP train step (empty without L2-SP)."""
        return tuple(f"anchor.{p}" for p in self.param_names) if self.l2sp else ()

    @property
    def embedding_dim(self) -> int:
        """Width of the last layer's input (what weight imprinting averages)."""
        return self.hidden if self.kind == "mlp" else self.in_features  # cosine: the features

    def param_shapes(self, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter, for ``num_classes`` classes (default the spec's)."""
        c = num_classes or self.num_classes
        if self.kind == "linear":
            return {"weight": (c, self.in_features), "bias": (c,)}
        if self.kind == "cosine":
            return {"weight": (c, self.in_features), "bias": (c,), "scale": (1,)}
        return {"fc1.weight": (self.hidden, self.in_features), "fc1.bias": (self.hidden,),
                "fc2.weight": (c, self.hidden), "fc2.bias": (c,)}

    def state_names(self, optimizer: str) -> tuple[str, ...]:
        """Optimizer state tensor names for ``optimizer``."""
        if optimizer == "sgd":
            return tuple(f"momentum.{p}" for p in self.param_names)
        if optimizer == "adam":
            return (tuple(f"exp_avg.{p}" for p in self.param_names)
                    + tuple(f"exp_avg_sq.{p}" for p in self.param_names) + ("step",))
        raise ConfigError(f"optimizer {optimizer!r} unknown; known: {sorted(HPARAMS)}")


def head_forward(spec: HeadSpec, f: torch.Tensor, params: list[torch.Tensor]):
    """Logits and embedding (input of the last layer).

    Shape:
        f: (B, D) features -> logits (B, K), embedding (B, D or hidden).
    """
    if spec.kind == "linear":
        w, b = params
        return nn.functional.linear(f, w, b), f  # one Gemm (transB) in ONNX
    if spec.kind == "cosine":
        w, b, scale = params
        fn = _unit_rows(f)
        return scale * (fn @ _unit_rows(w).t()) + b, fn
    w1, b1, w2, b2 = params
    h = torch.relu(nn.functional.linear(f, w1, b1))
    return nn.functional.linear(h, w2, b2), h


def _unit_rows(a: torch.Tensor) -> torch.Tensor:
    """Rows divided by ``sqrt(|row|^2 + COSINE_EPS)`` (a zero row stays zero)."""
    return a / torch.sqrt((a * a).sum(dim=1, keepdim=True) + COSINE_EPS)


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor):
    """Weighted cross-entropy and its gradient w.r.t. the logits.

    ``loss = sum_i w_i * CE(logits_i, targets_i) / max(sum_i w_i, 1e-12)``; ``targets`` are
    probability rows (one-hot or soft).

    Shape:
        logits, targets: (B, K); weight: (B,) -> loss (), dlogits (B, K).
    """
    # LogSoftmax and Softmax: one graph node each (the written-out max/exp/sum/log was six)
    logp = torch.log_softmax(logits, dim=1)
    p = torch.softmax(logits, dim=1)
    denom = torch.clamp(weight.sum(), min=1e-12)
    q = (weight / denom).unsqueeze(1) * targets  # normalised weight times target, (B, K)
    loss = -(q * logp).sum()
    # d/dlogits of -sum_k q_k log p_k = p * sum_k q_k - q  (= wn * (p - t) for one-hot targets)
    dlogits = p * q.sum(dim=1, keepdim=True) - q
    return loss, dlogits


def head_grads(spec: HeadSpec, f: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
               params: list[torch.Tensor]):
    """Loss and analytic gradients of every head parameter (same order as ``params``)."""
    logits, emb = head_forward(spec, f, params)
    loss, g = weighted_ce(logits, targets, weight)
    if spec.kind == "linear":
        return loss, [g.t() @ f, g.sum(dim=0)]
    if spec.kind == "cosine":
        w, _, scale = params
        n = torch.sqrt((w * w).sum(dim=1, keepdim=True) + COSINE_EPS)
        wn = w / n
        dwn = scale * (g.t() @ emb)  # d loss / d (normalised rows)
        # d(w/n)/dw = I/n - w w^T / n^3
        dw = dwn / n - w * ((w * dwn).sum(dim=1, keepdim=True) / (n * n * n))
        dscale = (g * (emb @ wn.t())).sum().reshape(1)
        return loss, [dw, g.sum(dim=0), dscale]
    _, _, w2, _ = params
    dh = (g @ w2) * (emb > 0).to(emb.dtype)
    return loss, [dh.t() @ f, dh.sum(dim=0), g.t() @ emb, g.sum(dim=0)]


class TrainStep(nn.Module):
    """One optimizer step on a batch, as a pure function (see module docstring).

    ``forward(features, targets, sample_weight, *hparams, *params, *state)`` returns
    ``(loss, *new_params, *new_state)``; hparams are 0-d tensors named by :data:`HPARAMS`.
    Matches ``torch.optim.SGD`` (momentum, dampening 0, L2 ``weight_decay``) and
    ``torch.optim.Adam`` (L2 ``weight_decay``, bias-corrected) on the weighted CE loss.
    """

    def __init__(self, spec: HeadSpec, optimizer: str):
        super().__init__()
        self.hparam_names = spec.hparam_names(optimizer)  # validates the optimizer
        self.spec, self.optimizer = spec, optimizer
        self.n_params = len(spec.param_names)

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return (["features", "targets", "sample_weight", *self.hparam_names,
                 *self.spec.param_names, *self.spec.state_names(self.optimizer),
                 *self.spec.anchor_names])

    def output_names(self) -> list[str]:
        """Graph output names, in order; ``loss`` first."""
        names = [*self.spec.param_names, *self.spec.state_names(self.optimizer)]
        return ["loss", *(f"new.{n}" for n in names)]

    def forward(self, features, targets, sample_weight, *rest):
        nh, n = len(self.hparam_names), self.n_params
        hp, rest = rest[:nh], rest[nh:]
        params, rest = list(rest[:n]), list(rest[n:])
        n_anchor = len(self.spec.anchor_names)
        state, anchors = (rest[: len(rest) - n_anchor], rest[len(rest) - n_anchor :])
        loss, grads = head_grads(self.spec, features, targets, sample_weight, params)
        if self.spec.l2sp:
            coef = hp[-1]
            hp = hp[:-1]
            pen = torch.stack([((p - a) * (p - a)).sum()
                               for p, a in zip(params, anchors, strict=True)]).sum()
            loss = loss + 0.5 * (coef * pen).sum()  # () even if a runtime feeds coef as (1,)
            grads = [g + coef * (p - a) for g, p, a in zip(grads, params, anchors, strict=True)]
        frozen = [name in self.spec.frozen_params for name in self.spec.param_names]
        if self.optimizer == "sgd":
            lr, mom, wd = hp
            new_p, new_s = [], []
            for p, g, buf, fz in zip(params, grads, state, frozen, strict=True):
                if fz:  # not an optimised parameter: passed through, state untouched
                    new_p.append(p)
                    new_s.append(buf)
                    continue
                g = g + wd * p
                buf = mom * buf + g
                new_s.append(buf)
                new_p.append(p - lr * buf)
            return (loss, *new_p, *new_s)
        lr, b1, b2, eps, wd = hp
        m, v, step = state[:n], state[n : 2 * n], state[2 * n]
        step = step + 1.0
        bc1 = 1.0 - torch.pow(b1, step)
        bc2 = 1.0 - torch.pow(b2, step)
        new_p, new_m, new_v = [], [], []
        for p, g, mi, vi, fz in zip(params, grads, m, v, frozen, strict=True):
            if fz:
                new_p.append(p)
                new_m.append(mi)
                new_v.append(vi)
                continue
            g = g + wd * p
            mi = b1 * mi + (1.0 - b1) * g
            vi = b2 * vi + (1.0 - b2) * g * g
            denom = torch.sqrt(vi) / torch.sqrt(bc2) + eps
            new_p.append(p - (lr / bc1) * mi / denom)
            new_m.append(mi)
            new_v.append(vi)
        return (loss, *new_p, *new_m, *new_v, step)


class InferStep(nn.Module):
    """``forward(features, *params) -> (logits, embedding)``, params as inputs.

    One infer graph serves every head checkpoint the device ever writes.
    """

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec

    def input_names(self) -> list[str]:
        """Graph input names, in order."""
        return ["features", *self.spec.param_names]

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        return ["logits", "embedding"]

    def forward(self, features, *params):
        return head_forward(self.spec, features, list(params))


def init_state(spec: HeadSpec, optimizer: str, params: dict[str, torch.Tensor]) -> dict:
    """Zero optimizer state shaped like ``params``; Adam's ``step`` is shape (1,).

    (A 0-d counter comes back as (1,) from onnxruntime's ConstantOfShape path; a 1-element
    vector is the same on every runtime.)
    """
    out = {}
    for name in spec.state_names(optimizer):
        if name == "step":
            out[name] = torch.zeros(1)
        else:
            out[name] = torch.zeros_like(params[name.split(".", 1)[1]])
    return out
