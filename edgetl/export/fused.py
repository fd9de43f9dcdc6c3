"""Several train steps per runtime call: the fused K-step train graph.

A small head's train step costs less than the runtime call that runs it (~50 µs of feeds,
session dispatch and output copies per call), so the runner's 20 epochs are bound by call
overhead. The fused graph applies K train steps in one call::

    train_k(features (K, N, D), targets (K, N, C), sample_weight (K, N), <hparams>,
            <params>, <opt state>, <anchors>) -> (loss (K,), <new params>, <new opt state>)

Same input and output names as the one-step graph (:mod:`edgetl.head`), the first three
inputs stacked on a leading step axis, ``loss`` one value per step.

ONNX (:func:`scan_graph`): an ONNX ``Scan`` whose body is the one-step graph itself (head or
``--trainable`` tail), so any number of steps per call and no second trace. Measured in
onnxruntime against :class:`KSteps` unrolled (docs/bundle.md): faster for an epoch's worth of
steps, and the unrolled graph grows K-fold. :class:`KSteps` is the fixed-K form a target
without loops needs: TFLite (``TFLiteExporter.export_fused`` converts it with litert-torch,
K = ``edgetl.export.tflite.FUSED_STEPS``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgetl.errors import BundleError

#: Suffix of the fused graph's file role and file name (``head_train_k.onnx``).
ROLE_SUFFIX = "_k"


class KSteps(nn.Module):
    """``step`` applied ``k`` times in sequence (unrolled), one batch per step.

    ``step`` is a one-step module with ``input_names()``, ``output_names()`` and
    ``hparam_names`` (:class:`edgetl.head.TrainStep` or
    :class:`edgetl.trainable.step.TailTrain`); parameters and optimizer state are carried
    from step to step, hyper-parameters and anchors are shared.

    Shape:
        features (K, N, D), targets (K, N, C), sample_weight (K, N) -> loss (K,), new params
        and state shaped as the inputs.
    """

    def __init__(self, step: nn.Module, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"a fused train graph needs k >= 1 steps, got {k}")
        self.step, self.k = step, int(k)
        self.hparam_names = step.hparam_names

    def input_names(self) -> list[str]:
        """Graph input names, in order (the one-step graph's)."""
        return self.step.input_names()

    def output_names(self) -> list[str]:
        """Graph output names, in order (the one-step graph's; ``loss`` has shape (K,))."""
        return self.step.output_names()

    def forward(self, features, targets, sample_weight, *rest):
        nh, nc = len(self.hparam_names), len(self.output_names()) - 1
        hp, carry, anchors = rest[:nh], list(rest[nh : nh + nc]), rest[nh + nc :]
        losses = []
        for i in range(self.k):
            out = self.step(features[i], targets[i], sample_weight[i], *hp, *carry, *anchors)
            losses.append(out[0].reshape(()))
            carry = list(out[1:])
        return (torch.stack(losses), *carry)


def scan_graph(one_step: Path, out: Path, *, shared: list[str]) -> None:
    """Write ``out``: an ONNX ``Scan`` over the one-step train graph ``one_step``.

    The one-step graph becomes the Scan body unchanged (its values renamed into their own
    scope): ``features``, ``targets`` and ``sample_weight`` are scanned along a leading step
    axis, parameters and optimizer state (the inputs matching the ``new.*`` outputs) are the
    loop-carried state, ``shared`` inputs (hyper-parameters, L2-SP anchors) are read from the
    outer graph by every step. The step count is the leading axis: any number per call.

    Raises:
        BundleError: the one-step graph is not a train step of the contract (names), or holds
            subgraphs this rewrite does not rename.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(one_step), load_external_data=False)
    g = model.graph
    names_in = [i.name for i in g.input]
    names_out = [o.name for o in g.output]
    carried = [n.removeprefix("new.") for n in names_out[1:]]
    scanned = names_in[:3]
    if (names_out[0] != "loss" or not all(n.startswith("new.") for n in names_out[1:])
            or sorted(names_in) != sorted([*scanned, *carried, *shared])):
        raise BundleError(f"{one_step.name}: inputs {names_in} / outputs {names_out} are not a "
                          "train step's (features, targets, sample_weight, hparams, params, "
                          "state -> loss, new.*); cannot fuse it")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in g.node for a in n.attribute):
        raise BundleError(f"{one_step.name} holds subgraphs; the fused train graph cannot "
                          "be built from it")
    keep = set(shared)

    def rn(x: str) -> str:
        return x if x in keep or x == "" else "step/" + x

    def renamed(proto, name):
        c = type(proto)()
        c.CopyFrom(proto)
        c.name = name
        return c

    nodes = []
    for nd in g.node:
        c = onnx.NodeProto()
        c.CopyFrom(nd)
        c.ClearField("input")
        c.input.extend(rn(x) for x in nd.input)
        c.ClearField("output")
        c.output.extend(rn(x) for x in nd.output)
        c.name = rn(nd.name) if nd.name else ""
        nodes.append(c)
    vin, vout = {i.name: i for i in g.input}, {o.name: o for o in g.output}
    body = helper.make_graph(
        nodes, "train_step",
        [renamed(vin[n], rn(n)) for n in carried + scanned],
        [renamed(vout[n], rn(n)) for n in names_out[1:] + names_out[:1]],
        [renamed(i, rn(i.name)) for i in g.initializer],
        value_info=[renamed(v, rn(v.name)) for v in g.value_info])
    node = helper.make_node("Scan", carried + scanned, names_out[1:] + names_out[:1],
                            name="train_k", num_scan_inputs=len(scanned), body=body)

    def stacked(name):
        v = renamed(vin[name], name)
        dims = v.type.tensor_type.shape.dim
        old = [onnx.TensorShapeProto.Dimension() for _ in dims]
        for o, d in zip(old, dims, strict=True):
            o.CopyFrom(d)
        v.type.tensor_type.shape.ClearField("dim")
        v.type.tensor_type.shape.dim.add().dim_param = "steps"
        v.type.tensor_type.shape.dim.extend(old)
        return v

    inputs = [stacked(n) if n in scanned else vin[n] for n in names_in]
    loss = helper.make_tensor_value_info(names_out[0], onnx.TensorProto.FLOAT, ["steps"])
    graph = helper.make_graph([node], "train_k", inputs,
                              [loss, *(vout[n] for n in names_out[1:])])
    fused = helper.make_model(graph, opset_imports=model.opset_import,
                              ir_version=model.ir_version, producer_name="edgetl")
    fused.functions.extend(model.functions)
    onnx.checker.check_model(fused)
    onnx.save(fused, str(out))


def check_fused(sess, names: list[str], out_names: list[str], n_hparams: int,
                steps: list[tuple[list, tuple]], atol: float) -> float:
    """The fused graph of ``sess`` against the one-step graph in the same runtime; max diff.

    ``steps``: per step the one-step inputs (``names`` order) and the torch step's outputs
    (``out_names`` order), in sequence. The fused graph runs the batches in two or more calls
    (the state carried from call to call, as the runner does), and so does a chain of
    one-step calls from the same start: the per-step losses and the parameters and state
    after each call must agree within ``atol * max(1, max|value|)``, and the first step's
    loss must match torch's. The one-step graph itself is checked against torch step by step
    by the caller; comparing the *fused* chain with torch over many carried steps would
    measure the float drift of the chain (large on wide random features), not the graph.
    """
    import numpy as np

    from edgetl.export.bundle import compare
    from edgetl.export.registry import as_feeds

    n, nc = len(steps), len(out_names) - 1
    k = sess.fused_steps or max(1, (n + 1) // 2)
    groups = [(i, min(i + k, n)) for i in range(0, n, k) if sess.fused_steps is None
              or i + k <= n]
    carry = [np.asarray(a) for a in steps[0][0][3 + n_hparams : 3 + n_hparams + nc]]
    w0 = np.asarray(steps[0][1][0])
    worst = 0.0
    for a, b in groups:
        first = [np.asarray(x) for x in steps[a][0]]
        hp, rest = first[3 : 3 + n_hparams], first[3 + n_hparams + nc :]
        stacked = [np.stack([np.asarray(steps[i][0][j]) for i in range(a, b)]) for j in range(3)]
        got = sess.train_steps(as_feeds(names, [*stacked, *hp, *carry, *rest]))
        one, losses = list(carry), []
        for i in range(a, b):  # the same steps, one call each
            batch = [np.asarray(steps[i][0][j]) for j in range(3)]
            out = sess.train_step(as_feeds(names, [*batch, *hp, *one, *rest]))
            losses.append(np.asarray(out[out_names[0]]).reshape(()))
            one = [np.asarray(out[o]) for o in out_names[1:]]
        want = {out_names[0]: np.stack(losses), **dict(zip(out_names[1:], one, strict=True))}
        for o, w in want.items():
            bound = atol * max(1.0, float(np.abs(w).max()) if w.size else 1.0)
            worst = max(worst, compare(f"train_k[{a}:{b}].{o}", got[o], w, bound))
        if a == 0:  # the chain starts where torch starts
            loss0 = np.asarray(got[out_names[0]]).reshape(-1)[0]
            worst = max(worst, compare("train_k[0].loss vs torch", loss0, w0,
                                       atol * max(1.0, float(np.abs(w0).max()))))
        carry = [got[o] for o in out_names[1:]]
    return worst
