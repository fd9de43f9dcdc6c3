"""Bundles that train more than the head: the cut prefix as backbone, the tail's graphs.

:func:`prepare` turns a checkpoint and ``--trainable SPEC`` into a :class:`Tail` (the cut,
the torch reference train and infer steps, the starting parameters); :func:`export_onnx`
writes ``tail_train.onnx`` (the autodiff step traced by :meth:`TailTrain.trace`, exported
by the dynamo exporter at the bundle's train batch and class rows) and ``tail_infer.onnx``
(the tail's forward, dynamic batch). Graph names and feeds are the head graphs' (see
:mod:`edgetl.head`), so the device runner trains a tail like a head.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetl.errors import BundleError, ConfigError, require
from edgetl.head import HeadSpec
from edgetl.trainable.cut import Cut, split
from edgetl.trainable.spec import select
from edgetl.trainable.step import TailInfer, TailModel, TailTrain

GRADIENTS = "torch autograd at export time (torch.func + make_fx, core-ATen decompositions)"


@dataclass
class Tail:
    """Everything a tail bundle is built from; ``params`` in graph-input order."""

    spec: str
    cut: Cut
    backbone_params: list[str]
    train: TailTrain
    infer: TailInfer
    params: dict[str, np.ndarray]

    def block(self) -> dict:
        """The manifest's ``trainable`` block."""
        return {"spec": self.spec, "cut": {"node": self.cut.node, "shape": list(self.cut.shape)},
                "params": [{"name": n, "shape": list(self.params[n].shape)}
                           for n in self.train.param_names[: len(self.backbone_params)]],
                "gradients": GRADIENTS}


def prepare(backbone: torch.nn.Module, spec: HeadSpec, optimizer: str, trainable: str,
            head_params: dict[str, np.ndarray], sample: torch.Tensor) -> Tail:
    """The :class:`Tail` of ``backbone`` + head for ``--trainable trainable`` (not ``head``).

    Raises:
        ConfigError: a bad SPEC, an untraceable backbone, a text backbone.
    """
    if getattr(backbone, "is_text", False):
        raise ConfigError("--trainable beyond head is not supported for text models yet; "
                          "use --trainable head")
    names = select(backbone, trainable)
    cut = split(backbone, names, sample)
    model = TailModel(cut.tail, spec, names, cut.dim)
    bp = dict(backbone.named_parameters())
    params = {f"backbone.{n}": bp[n].detach().numpy().astype(np.float32).copy() for n in names}
    params.update(head_params)
    return Tail(trainable, cut, names, TailTrain(model, optimizer), TailInfer(model), params)


def example_args(tail: Tail, batch: int, rows: int) -> tuple:
    """Distinct example inputs of the train step (values matter only for tracing)."""
    g = torch.Generator().manual_seed(0)
    step = tail.train
    f = torch.randn(batch, tail.cut.dim, generator=g)
    t = torch.eye(rows)[torch.arange(batch) % rows]
    hp = [torch.tensor(0.1 + 0.01 * i) for i in range(len(step.hparam_names))]
    p = [torch.from_numpy(tail.params[n]) for n in step.param_names]
    s = list(step.init_state(dict(zip(step.param_names, p, strict=True))).values())
    return (f, t, torch.ones(batch), *hp, *p, *s, *[q.clone() for q in p][
        : len(step.anchor_names())])


def _quiet() -> None:
    import logging

    # the dynamo exporter warns once per missing torchvision op it would register
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_onnx(tail: Tail, folder: Path, *, opset: int, batch: int, rows: int) -> dict:
    """Write the tail's train and infer graphs; return their files and signatures."""
    require("onnx", "onnx")
    _quiet()
    import onnx

    folder = Path(folder)
    step, infer = tail.train, tail.infer
    args = example_args(tail, batch, rows)
    gm = step.trace(args)
    ep = torch.export.export(gm, args)
    path = folder / "tail_train.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ep, args, str(path), dynamo=True, input_names=step.input_names(),
                              output_names=step.output_names(), external_data=False,
                              opset_version=max(opset, 18), verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter's errors name the op
        raise BundleError(f"--trainable {tail.spec}: the train step does not export to ONNX "
                          f"({type(e).__name__}: {str(e)[:300]}); choose a smaller SPEC "
                          "that leaves the failing layer frozen") from None
    onnx.checker.check_model(str(path))
    have = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    if have != step.input_names():
        raise BundleError(f"tail_train.onnx inputs {have} are not {step.input_names()}")
    p = args[3 + len(step.hparam_names) : 3 + len(step.hparam_names) + len(step.param_names)]
    _export_infer(infer, (args[0], *p), folder / "tail_infer.onnx", opset)
    return {"files": {"tail_train": "tail_train.onnx", "tail_infer": "tail_infer.onnx"},
            "train": {"file": "tail_train", "signature": None, "inputs": step.input_names(),
                      "outputs": step.output_names(), "batch_size": batch},
            "infer": {"file": "tail_infer", "signature": None, "inputs": infer.input_names(),
                      "outputs": infer.output_names(), "batch_size": None}}


def _export_infer(infer: TailInfer, args: tuple, path: Path, opset: int) -> None:
    """The tail's forward with a dynamic batch (dynamo: functional_call is not scriptable)."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(infer, args, dynamic_shapes=({0: batch}, (None,) * (len(args) - 1)),
                             strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, args, str(path), dynamo=True, input_names=infer.input_names(),
                          output_names=infer.output_names(), external_data=False,
                          opset_version=max(opset, 18), verbose=False)
    onnx.checker.check_model(str(path))
