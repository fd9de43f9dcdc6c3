"""Bundles that train more than the head: the cut prefix as backbone, the tail's graphs.

:func:`prepare` turns a checkpoint and ``--trainable SPEC`` into a :class:`Tail` (the cut,
the torch reference train and infer steps, the starting parameters); :func:`export_onnx`
writes ``tail_train.onnx`` (the autodiff step traced by :meth:`TailTrain.trace`, exported
by the dynamo exporter at the bundle's train batch and class rows) and ``tail_infer.onnx``
(the tail's forward, dynamic batch); :func:`export_tflite` writes ``tail.tflite`` with the
same step as its ``train`` signature and the forward as ``infer`` (fixed batch, built-in ops
only, checked), and returns the traced step for the fused K-step graph
(``TFLiteExporter.export_fused``). Graph names and feeds are the head graphs' (see
:mod:`edgetl.head`), so the device runner trains a tail like a head.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

GRADIENTS = "torch autograd at export time (torch.func + make_fx, core-ATen decompositions)"
#: The dynamo exporter's onnxscript optimizer stays off for the tail graphs: its no-op rule
#: takes ``x + c`` with ``|c| <= 1e-8`` for ``x + 0`` and drops the cosine head's
#: ``COSINE_EPS``, so a zero class row (a spare row of ``class_capacity``) or a zero feature
#: row divides 0 by 0 (NaN logits). onnxruntime optimises the graph when it loads it.
OPTIMIZE = False


@dataclass
class Tail:
    """Everything a tail bundle is built from; ``params`` in graph-input order."""

    spec: str
    cut: Cut
    backbone_params: list[str]
    train: TailTrain
    infer: TailInfer
    params: dict[str, np.ndarray]
    #: (n, dim) features of real inputs, for tracing a cut that holds integer parts (ids
    #: cast back from N(0, 1) values would index out of range); ``None``: N(0, 1) suffices
    example: torch.Tensor | None = None

    def block(self) -> dict:
        """The manifest's ``trainable`` block."""
        cut = {"node": self.cut.node, "shape": list(self.cut.shape),
               **({"parts": [p.block() for p in self.cut.parts]} if self.cut.parts else {})}
        return {"spec": self.spec, "cut": cut,
                "params": [{"name": n, "shape": list(self.params[n].shape)}
                           for n in self.train.param_names[: len(self.backbone_params)]],
                **({"unread": [f"backbone.{n}" for n in self.cut.unread],
                    "unread_note": "selected by the SPEC but never read by the forward (no "
                                   "gradient reaches them): left out of the train step"}
                   if self.cut.unread else {}),
                "gradients": GRADIENTS}


def prepare(backbone: torch.nn.Module, spec: HeadSpec, optimizer: str, trainable: str,
            head_params: dict[str, np.ndarray], sample: torch.Tensor) -> Tail:
    """The :class:`Tail` of ``backbone`` + head for ``--trainable trainable`` (not ``head``).

    Raises:
        ConfigError: a bad SPEC, an untraceable backbone, an edgetl text student (its
            device graphs take variable-length texts), an integer tensor at the cut that
            float32 may round (:func:`~edgetl.trainable.cut.split`).
    """
    if getattr(backbone, "is_text", False):
        # its backbone graph (optimum's ONNX, one TFLite signature per sequence length) takes
        # texts trimmed to their batch's longest: a cut inside the encoder would cache
        # (length x hidden) values per text, a width that changes from batch to batch
        raise ConfigError("--trainable beyond head is not supported for edgetl's text "
                          "students: the device trims each batch to its longest text, so a "
                          "cut inside the encoder has no fixed feature width; use --trainable "
                          "head (a transformers text model exported with edgetl export "
                          "MODEL takes --trainable)")
    names = select(backbone, trainable)
    # a kind SPEC (bias, last:N, all) may select parameters the forward never reads; named
    # globs may not (a typo would train nothing)
    kind = trainable in ("bias", "all") or trainable.startswith("last:")
    cut = split(backbone, names, sample, allow_unread=kind)
    if cut.unread:
        log.warning("--trainable %s: %s are never read by the forward (no gradient); left out "
                    "of the train step (manifest trainable.unread)", trainable,
                    list(cut.unread))
        names = [n for n in names if n not in cut.unread]
    model = TailModel(cut.tail, spec, names, cut.dim)
    bp = dict(backbone.named_parameters())
    params = {f"backbone.{n}": bp[n].detach().numpy().astype(np.float32).copy() for n in names}
    params.update(head_params)
    example = None
    if cut.parts:  # token ids / masks at the cut: trace on real values, not N(0, 1)
        with torch.no_grad():
            example = cut.prefix(sample).detach()
    return Tail(trainable, cut, names, TailTrain(model, optimizer), TailInfer(model), params,
                example)


def example_args(tail: Tail, batch: int, rows: int, hparam_shape: tuple = ()) -> tuple:
    """Distinct example inputs of the train step (values matter only for tracing).

    ``hparam_shape``: of every hyper-parameter (``()`` for ONNX, ``(1,)`` for TFLite).
    """
    g = torch.Generator().manual_seed(0)
    step = tail.train
    f = torch.randn(batch, tail.cut.dim, generator=g)
    if tail.example is not None:
        f = tail.example[torch.arange(batch) % len(tail.example)].clone()
    t = torch.eye(rows)[torch.arange(batch) % rows]
    hp = [torch.full(hparam_shape, 0.1 + 0.01 * i) for i in range(len(step.hparam_names))]
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
    _copy_passed_through(gm)
    ep = torch.export.export(gm, args)
    path = folder / "tail_train.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ep, args, str(path), dynamo=True, input_names=step.input_names(),
                              output_names=step.output_names(), external_data=False,
                              opset_version=max(opset, 18), verbose=False, optimize=OPTIMIZE)
    except Exception as e:  # noqa: BLE001 - the exporter's errors name the op
        raise BundleError(f"--trainable {tail.spec}: the train step does not export to ONNX "
                          f"({failing_ops(e)}); choose a smaller SPEC that leaves the "
                          "failing layer frozen (e.g. last:1, bias or head)") from None
    _unclash(path)
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


def _copy_passed_through(gm: torch.fx.GraphModule) -> None:
    """Outputs that are inputs (a fixed cosine scale, its state) become copies of them.

    Without the exporter's optimizer (:data:`OPTIMIZE`) such an output would take the
    input's place under its own name (``new.scale`` for ``scale``).
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = list(out.args[0])
    with gm.graph.inserting_before(out):
        vals = [gm.graph.call_function(torch.ops.aten.clone.default, (v,))
                if isinstance(v, torch.fx.Node) and v.op == "placeholder" else v for v in vals]
    out.args = (tuple(vals),)
    gm.recompile()


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
                          opset_version=max(opset, 18), verbose=False, optimize=OPTIMIZE)
    _unclash(path)
    onnx.checker.check_model(str(path))


def _unclash(path: Path) -> None:
    """Rename inner values that bear a graph output's name (the file stays SSA).

    The dynamo exporter names ONNX values after fx nodes, then gives the graph outputs the
    contract's names: a tail that starts at an embedding table has an inner ``aten.embedding``
    value named ``embedding`` besides the ``embedding`` output, which the checker refuses.
    Nodes are in topological order: an inner producer's readers come before the next one.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    outs = {o.name for o in m.graph.output}
    last = {o: i for i, n in enumerate(m.graph.node) for o in n.output if o in outs}
    alias: dict[str, str] = {}
    renamed = False
    for i, n in enumerate(m.graph.node):
        for j, name in enumerate(n.input):
            n.input[j] = alias.get(name, name)
        for j, o in enumerate(n.output):
            if o in outs and last[o] != i:
                alias[o] = n.output[j] = f"{o}__inner{i}"
                renamed = True
            else:
                alias.pop(o, None)
    if renamed:  # the inner value's shape, recorded under the output's name, goes too
        keep = [v for v in m.graph.value_info if v.name not in outs]
        del m.graph.value_info[:]
        m.graph.value_info.extend(keep)
        onnx.save(m, str(path))


class _Graph(torch.nn.Module):
    """A traced step with the contract's names, for :class:`edgetl.export.tflite._Named`."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: list[str], outputs: list[str],
                 hparam_names: tuple = ()):
        super().__init__()
        self.gm, self._in, self._out = gm, list(inputs), list(outputs)
        self.hparam_names = tuple(hparam_names)  # for KSteps (the fused graph)

    def input_names(self) -> list[str]:
        return self._in

    def output_names(self) -> list[str]:
        return self._out

    def forward(self, *args):
        return tuple(self.gm(*args))


def failing_ops(e: BaseException) -> str:
    """What an exporter's exception chain says failed: the aten ops it names, else its text.

    The dynamo exporter's top message is generic ("Failed to convert the exported program");
    the op is in a cause (``No ONNX function found for <OpOverload(op='aten.X'...)``).
    """
    import re

    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(c) for c in chain)
    ops = re.findall(r"op='(aten\.[A-Za-z_0-9]+)", text) or [
        f"aten.{o}" for o in re.findall(r"(?<![A-Za-z_])aten[.:]{1,2}([A-Za-z_0-9]+)", text)]
    ops = sorted(set(ops))
    first = " ".join(str(chain[-1]).split())[:200]
    head = f"{type(chain[0]).__name__}: " + " ".join(str(chain[0]).split())[:120]
    if ops:
        return f"no lowering for {', '.join(ops[:4])}: {type(chain[-1]).__name__}: {first}"
    return head


def _smaller(tail: Tail, what: str) -> BundleError:
    return BundleError(f"--trainable {tail.spec}: {what}; choose a smaller SPEC that leaves "
                       "the failing layer frozen (e.g. last:1 or bias), or --target onnx")


def export_tflite(tail: Tail, folder: Path, *, batch: int, rows: int) -> dict:
    """Write ``tail.tflite`` (signatures ``train`` and ``infer``, fixed ``batch``).

    The train signature is the step :meth:`TailTrain.trace` writes for ONNX (hyper-parameters
    of shape :data:`~edgetl.export.tflite.HPARAM_SHAPE`), the infer one the tail's forward
    traced the same way; both get :func:`~edgetl.trainable.decomp.fix_permute_of_expand`
    (a silent litert-torch mis-lowering), the head models' flatbuffer passes and the
    built-in-op check. A graph that does not lower to built-in ops fails naming the op.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from edgetl.export.tflite import (
        HEAD_PASSES,
        HPARAM_SHAPE,
        _Named,
        _quiet,
        _safe,
        check_builtin_only,
        rewrite,
    )
    from edgetl.trainable.decomp import fix_permute_of_expand, pool_indices_used, table

    step, infer = tail.train, tail.infer
    args = example_args(tail, batch, rows, HPARAM_SHAPE)
    gm = step.trace(args, scatter=False)  # LiteRT cannot run a scatter-add
    if pool_indices_used(gm):
        raise _smaller(tail, "the backward of an overlapping or padded max pool reads "
                             "max_pool2d_with_indices' indices, which litert-torch lowers as "
                             "zeros (aten.max_pool2d_with_indices_backward)")
    fixes = fix_permute_of_expand(gm, args)
    nh, npar = len(step.hparam_names), len(step.param_names)
    iargs = (args[0], *args[3 + nh : 3 + nh + npar])
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # see TailTrain.trace
        igm = make_fx(infer, decomposition_table=table())(*iargs)
    fixes += fix_permute_of_expand(igm, iargs)
    train = _Graph(gm, step.input_names(), step.output_names(), step.hparam_names).eval()
    inf = _Graph(igm, infer.input_names(), infer.output_names()).eval()
    train_kw = {_safe(n): a for n, a in zip(train.input_names(), args, strict=True)}
    infer_kw = {_safe(n): a for n, a in zip(inf.input_names(), iargs, strict=True)}
    path = Path(folder) / "tail.tflite"
    try:
        with _quiet():
            litert_torch = require("litert_torch", "tflite")
            (litert_torch.signature("train", _Named(train).eval(), (), train_kw)
             .signature("infer", _Named(inf).eval(), (), infer_kw).convert().export(str(path)))
    except Exception as e:  # noqa: BLE001 - the converter's errors name the op
        raise _smaller(tail, f"the train step does not convert to TFLite built-in ops "
                             f"({failing_ops(e)})") from None
    rewrite(path, *HEAD_PASSES)
    try:
        check_builtin_only(path)
    except BundleError as e:
        raise _smaller(tail, str(e)) from None
    hshape = list(HPARAM_SHAPE)
    return {"files": {"tail": path.name}, "permute_expand_rewrites": fixes,
            "trace": (train, args),
            "train": {"file": "tail", "signature": "train", "inputs": step.input_names(),
                      "outputs": step.output_names(), "batch_size": batch,
                      "hparam_shape": hshape},
            "infer": {"file": "tail", "signature": "infer", "inputs": infer.input_names(),
                      "outputs": infer.output_names(), "batch_size": batch}}
