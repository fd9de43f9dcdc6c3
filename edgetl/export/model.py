"""Any PyTorch classifier as a device bundle: ``export_model(model, head="classifier", ...)``.

The *head* is one submodule, named by its attribute path (``classifier``, ``fc``,
``model.head``...), that maps a feature vector to class logits: an ``nn.Linear``, or an
``nn.Linear -> ReLU -> nn.Linear`` MLP, optionally after parameter-free modules such as
``Flatten`` or ``Dropout``. Everything the model computes before it becomes the frozen
backbone: :class:`HeadInput` runs the whole model with the head swapped for a probe that
records its input, so the backbone's output is exactly what the head would have seen
(pooling, CLS-token selection, projections included), and the graph ends there (what the
model does after its head is dead code, dropped by the exporters).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.checkpoint import Checkpoint
from edgetl.config import ExportConfig, HeadConfig
from edgetl.errors import ConfigError, DataError, EdgetlError
from edgetl.inputs import TensorInput
from edgetl.manifest import Manifest
from edgetl.nets import EdgeModel, LinearHead, MLPHead

log = logging.getLogger(__name__)

#: Attribute names a classifier's head usually has (torchvision: fc; transformers:
#: classifier; timm and many user models: head).
HEAD_NAMES = ("classifier", "fc", "head")
#: Modules without parameters that may stand before the head's first Linear.
PASSTHROUGH = (nn.Flatten, nn.Dropout, nn.Identity)


class ExportError(EdgetlError):
    """A model cannot be exported; the message names the module or operator and what to try."""


def _linear_of(mod: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` of ``mod`` (itself, or the last one of a Sequential)."""
    if isinstance(mod, nn.Linear):
        return mod
    if isinstance(mod, nn.Sequential):
        lins = [m for m in mod if isinstance(m, nn.Linear)]
        return lins[-1] if lins else None
    return None


def find_head(model: nn.Module, n_labels: int | None = None) -> str:
    """The attribute path of ``model``'s classifier head, or a clear error.

    Candidates are submodules named ``classifier``, ``fc`` or ``head`` that are (or end
    with) an ``nn.Linear``; with ``n_labels``, only those with that many outputs. Exactly one
    must remain (the label count only decides between several).
    """
    cands = []
    for path, mod in model.named_modules():
        if path.rsplit(".", 1)[-1] in HEAD_NAMES and (lin := _linear_of(mod)) is not None:
            cands.append((path, lin.out_features))
    if len(cands) == 1:  # the only candidate (a label-count mismatch is reported later)
        return cands[0][0]
    fitting = [p for p, k in cands if n_labels is None or k == n_labels]
    if len(fitting) == 1:
        return fitting[0]
    if not cands:
        lins = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"found no head: no submodule named {'/'.join(HEAD_NAMES)} that is an nn.Linear; "
            f"pass head=/--head with the attribute path of the classifier (the model's Linear "
            f"layers: {lins[-5:] or 'none'})")
    listed = ", ".join(f"{p} ({k} outputs)" for p, k in cands)
    if not fitting:
        raise ConfigError(f"no head candidate has {n_labels} outputs (one per label): {listed}; "
                          "pass head=/--head, or labels matching the classifier")
    raise ConfigError(f"the head is ambiguous: {listed}; pass head=/--head with one of them")


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [p for p, _ in model.named_children()]
        raise ConfigError(f"the model has no submodule {path!r}; its top-level submodules: "
                          f"{names}") from None


def split_head(mod: nn.Module, path: str) -> tuple[list[nn.Module], nn.Module, HeadConfig]:
    """``(pre, head, config)``: parameter-free modules before the head, and an edgetl head.

    The head's weights are copied into an edgetl :class:`LinearHead` / :class:`MLPHead`,
    whose analytic train step the device runs.
    """
    layers = list(mod) if isinstance(mod, nn.Sequential) else [mod]
    pre = []
    while layers and isinstance(layers[0], PASSTHROUGH):
        pre.append(layers.pop(0))
    core = [m for m in layers if not isinstance(m, nn.Dropout | nn.Identity)]  # eval: no-ops
    kinds = [type(m).__name__ for m in core]
    if len(core) == 1 and isinstance(core[0], nn.Linear):
        lin = core[0]
        head = LinearHead(lin.in_features, lin.out_features)
        head.fc.load_state_dict(_linear_state(lin))
        return pre, head, HeadConfig(kind="linear")
    if (len(core) == 3 and isinstance(core[0], nn.Linear) and isinstance(core[1], nn.ReLU)
            and isinstance(core[2], nn.Linear)):
        head = MLPHead(core[0].in_features, core[2].out_features, core[0].out_features)
        head.fc1.load_state_dict(_linear_state(core[0]))
        head.fc2.load_state_dict(_linear_state(core[2]))
        return pre, head, HeadConfig(kind="mlp", hidden=core[0].out_features)
    raise ConfigError(
        f"head {path!r} is {kinds}; the device can train an nn.Linear or Linear -> ReLU -> "
        "Linear head (after Flatten/Dropout). Pass --head with the final Linear inside it "
        f"(e.g. {path}.<name>) to train only that layer")


def _linear_state(lin: nn.Linear) -> dict:
    sd = {"weight": lin.weight.detach().float().clone()}
    sd["bias"] = (lin.bias.detach().float().clone() if lin.bias is not None
                  else torch.zeros(lin.out_features))
    return sd


class _Probe(nn.Module):
    """Stands in for the head: records its (pre-processed) input, returns zero logits."""

    def __init__(self, pre: list[nn.Module], out_features: int):
        super().__init__()
        self.pre = nn.Sequential(*pre)
        self.out_features = out_features
        self.seen: torch.Tensor | None = None

    def forward(self, f, *args, **kwargs):
        f = self.pre(f)
        self.seen = f
        return f.new_zeros((f.shape[0], self.out_features))


def call_positional(model: nn.Module, x: torch.Tensor):
    """Call the model with its input as the only positional argument."""
    return model(x)


class HeadInput(nn.Module):
    """A copy of ``model`` that returns what its head receives: the frozen backbone.

    Shape:
        x: (N, *dims), the model's own input (integer inputs are cast to int64 first, so a
            runtime that feeds int32 ids gets the same embedding lookups).
        output: (N, in_features) of the head.
    """

    def __init__(self, model: nn.Module, path: str, pre: list[nn.Module], in_features: int,
                 out_features: int, call: Callable = call_positional):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        parent, _, name = path.rpartition(".")
        self._probe = _Probe(copy.deepcopy(pre), out_features)
        setattr(_get(self.model, parent) if parent else self.model, name, self._probe)
        self.out_features = in_features
        self._call = call

    def fx_graph(self, sample: torch.Tensor | None = None):
        """The backbone as a ``torch.fx`` graph, for ``--trainable``'s cut.

        See :mod:`edgetl.trainable.headfx`.
        """
        from edgetl.trainable.headfx import trace_head_input

        return trace_head_input(self, sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.long()
        self._probe.seen = None
        self._call(self.model, x)
        f = self._probe.seen
        self._probe.seen = None
        if f is None:
            raise ExportError("the model never called its head module; pass --head with the "
                              "submodule its forward() uses for the logits")
        if f.ndim != 2:
            raise ExportError(f"the head receives shape {tuple(f.shape)}; the device trains heads"
                              " on one feature vector per sample (N, D). Choose a head whose "
                              "input is pooled (e.g. after the pooling layer)")
        return f


def _as_ids(y, labels: Sequence[str], what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{what} labels must be 1-D (one per sample), got shape {y.shape}")
    if y.dtype.kind in "US":
        index = {v: i for i, v in enumerate(labels)}
        bad = sorted({str(v) for v in y.tolist()} - set(index))
        if bad:
            raise DataError(f"{what} labels {bad[:5]} are not among the model's labels "
                            f"{list(labels)[:10]}")
        return np.array([index[str(v)] for v in y.tolist()], np.int64)
    if y.dtype.kind in "iu":
        if len(y) and (y.min() < 0 or y.max() >= len(labels)):
            raise DataError(f"{what} label ids must be in 0..{len(labels) - 1}, found "
                            f"{int(y.min())}..{int(y.max())}")
        return y.astype(np.int64)
    raise DataError(f"{what} labels must be label names or integer ids, got {y.dtype}")


def synthetic_inputs(spec: TensorInput, example: np.ndarray, n: int = 16,
                     seed: int = 0) -> np.ndarray:
    """Reference inputs when no data is given: the example plus noise (ids: reshuffled)."""
    rng = np.random.default_rng(seed)
    ex = np.broadcast_to(np.asarray(example)[:1], (n, *spec.shape))
    if spec.integer:
        lo, hi = int(example.min()), int(example.max())
        return rng.integers(lo, hi + 1, size=ex.shape).astype(np.int64)
    scale = float(np.std(example)) or 1.0
    return (ex + rng.normal(0, scale, ex.shape)).astype(np.float32)


def as_edge_model(model: nn.Module, *, head: str | None, labels: Sequence[str],
                  call: Callable = call_positional) -> tuple[EdgeModel, HeadConfig, str]:
    """``model`` split into an edgetl :class:`EdgeModel` (frozen backbone + trainable head)."""
    path = head or find_head(model, len(labels))
    pre, edge_head, cfg = split_head(_get(model, path), path)
    k = edge_head.fc.out_features if isinstance(edge_head, LinearHead) else \
        edge_head.fc2.out_features
    if k != len(labels):
        raise ConfigError(f"head {path!r} has {k} outputs but {len(labels)} labels were given; "
                          "pass one label per output, in logit order")
    in_features = (edge_head.fc.in_features if isinstance(edge_head, LinearHead)
                   else edge_head.fc1.in_features)
    backbone = HeadInput(model, path, pre, in_features, k, call)
    return EdgeModel(backbone, edge_head).eval(), cfg, path


def export_model(model: nn.Module, *, example: torch.Tensor | np.ndarray,
                 labels: Sequence[str], out: Path | str, head: str | None = None,
                 target: str = "onnx", precision: str = "fp32",
                 calibration: np.ndarray | None = None,
                 heldout: tuple[np.ndarray, np.ndarray] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 axis: int = 1, layout: str = "", name: str = "model",
                 head_config: HeadConfig | None = None, export: ExportConfig | None = None,
                 call: Callable = call_positional, sign_key: Path | None = None,
                 provenance: dict | None = None) -> Manifest:
    """Export any PyTorch classifier as a device bundle whose head trains on the device.

    Args:
        model: the classifier (``nn.Module``); it is copied, never modified.
        example: a batch of inputs, (N, *dims); its dims and dtype define the bundle's
            input (float32, or int64 token ids).
        labels: class names, one per head output, in logit order.
        out: bundle directory; replaced only when the export and every check succeed.
        head: attribute path of the trainable head; detected when omitted (see
            :func:`find_head`).
        target, precision: ``onnx``/``tflite``, ``fp32``/``int8``.
        calibration: (N, *dims) inputs that calibrate int8 activation ranges (int8 needs it).
        heldout: ``(x, y)`` with y label names or ids: the bundle's accuracy must stay within
            ``export.max_accuracy_drop`` points of the PyTorch model's.
        mean, std, axis: normalisation the model expects, applied on the device too; data
            (example, calibration, held-out, device) are then given before it.
        head_config: the device optimizer (lr, momentum...); the head kind comes from the
            model.
        export: export options (opset, train batch, test vectors...); target and precision
            arguments win.
        call: how to call the model with its input (default ``model(x)``).

    Returns:
        The bundle's manifest.

    Raises:
        ConfigError: no or an ambiguous head, labels that do not fit.
        DataError: data of the wrong shape or dtype.
        ExportError: an operator or module the target cannot export (named).
        ToleranceError, ShapeMismatchError: the exported graphs disagree with PyTorch.
    """
    from edgetl.export.bundle import export_bundle

    labels = tuple(str(v) for v in labels)
    if len(set(labels)) != len(labels) or not all(labels):
        raise ConfigError(f"labels must be distinct, non-empty names; got {list(labels)[:10]}")
    ex = example.detach().cpu().numpy() if isinstance(example, torch.Tensor) else np.asarray(
        example)
    dtype = "float32" if ex.dtype.kind == "f" else "int64"
    if ex.dtype.kind not in "fiu":
        raise DataError(f"example must be a float or integer tensor, got {ex.dtype}")
    if ex.ndim < 2:
        raise DataError(f"example must have a batch axis, e.g. torch.zeros(1, 3, 96, 96); got "
                        f"shape {ex.shape}")
    edge, cfg, path = as_edge_model(model, head=head, labels=labels, call=call)
    shape = tuple(ex.shape[1:])
    spec = TensorInput(shape, dtype, layout, None if mean is None else tuple(mean),
                       None if std is None else tuple(std), axis)
    ck = Checkpoint(edge, None, cfg, labels, meta={"recipe": name}, input=spec)
    ecfg = dataclasses.replace(export or ExportConfig(), target=target, precision=precision)
    eval_set = None
    if heldout is not None:
        hx, hy = heldout
        eval_set = (np.asarray(hx), _as_ids(hy, labels, "held-out"))
        if len(eval_set[0]) != len(eval_set[1]):
            raise DataError(f"held-out data has {len(eval_set[0])} samples but "
                            f"{len(eval_set[1])} labels")
    if calibration is not None:
        reference = np.asarray(calibration)
    elif eval_set is not None:
        reference = eval_set[0]
    else:
        reference = synthetic_inputs(spec, ex)
    reference = reference[:64]
    lr_note = "head_config"
    if head_config is not None:
        cfg = dataclasses.replace(head_config, kind=cfg.kind, hidden=cfg.hidden)
    else:
        cfg, lr_note = scaled_lr(cfg, edge, spec.normalize(reference))
    ck = dataclasses.replace(ck, head=cfg)
    prov = {"model": type(model).__name__, "head_path": path, "lr": lr_note,
            "reference": "calibration" if calibration is not None else (
                "held-out" if eval_set is not None else "synthetic (example + noise)"),
            **(provenance or {})}
    with _explained(target, precision):
        return export_bundle(ck, Path(out), ecfg, reference_x=reference,
                             calib_x=None if calibration is None else np.asarray(calibration),
                             eval_set=eval_set, provenance=prov, sign_key=sign_key)


def scaled_lr(cfg: HeadConfig, edge: EdgeModel, xn: np.ndarray) -> tuple[HeadConfig, str]:
    """The device learning rate for features of this model's scale.

    Features of a user's backbone can be of any size (1280 ReLU6 outputs: mean squared norm
    ~2,000). Softmax cross-entropy's curvature in the head's weights is at most half the
    features' mean squared norm ``E|f|^2``, and SGD with momentum 0.9 stays stable below
    ``lr = 3.8 / (0.5 E|f|^2)``; ``1 / E|f|^2`` keeps a factor ~8 of margin. The default
    (0.05) is kept when it is smaller. Measured on the reference inputs, never device data.
    """
    from edgetl.export.bundle import torch_features

    f = torch_features(edge.backbone, xn)
    sq = float(np.mean(np.sum(f.astype(np.float64) ** 2, axis=1))) if len(f) else 0.0
    if sq <= 0 or not np.isfinite(sq) or 1.0 / sq >= cfg.lr:
        return cfg, f"default {cfg.lr:g} (feature mean squared norm {sq:.3g})"
    lr = float(f"{1.0 / sq:.2g}")
    return dataclasses.replace(cfg, lr=lr), f"1 / E|f|^2 = {lr:g} (E|f|^2 = {sq:.3g})"


class _explained:
    """Turn exporter exceptions into an :class:`ExportError` naming the operator."""

    def __init__(self, target: str, precision: str):
        self.target, self.precision = target, precision

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, EdgetlError) or not isinstance(exc, Exception):
            return False
        raise ExportError(explain(exc, self.target, self.precision)) from exc


def explain(exc: BaseException, target: str, precision: str) -> str:
    """One message for an exporter failure: the operator or module if found, what to try."""
    import re

    text = f"{type(exc).__name__}: {exc}"
    ops = sorted(set(re.findall(r"aten[.:]{1,2}[A-Za-z_0-9]+(?:\.[a-z_]+)?", text)))
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    what = f" (operator {', '.join(ops[:3])})" if ops else ""
    other = "onnx" if target == "tflite" else "tflite"
    tries = [f"--target {other}"]
    if precision == "int8":
        tries.insert(0, "--precision fp32")
    if target == "onnx":
        tries.append("another --opset")
    return (f"cannot export the model to {target} {precision}{what}: {first}. Try "
            f"{' or '.join(tries)}, or replace that module; nothing was written")
