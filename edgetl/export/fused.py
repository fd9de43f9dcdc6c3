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

    nodes = [_renamed(nd, rn, rn(nd.name) if nd.name else "") for nd in g.node]
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


#: Suffix of the whole-run graph's file role and file name (``head_train_run.onnx``).
RUN_SUFFIX = "_run"
#: The whole-run graph's extra input and outputs (see :func:`run_graph`).
VAL_INPUT, VAL_LOGITS, EPOCH_PREFIX = "val_features", "val_logits", "epoch."


def run_graph(fused: Path, infer: Path, out: Path, *, infer_inputs: list[str]) -> None:
    """Write ``out``: epochs of the fused graph ``fused``, each followed by ``infer``.

    An ONNX ``Scan`` over epochs whose body is the fused K-step ``Scan`` (one epoch's
    batches) and then the infer graph on ``val_features`` with the epoch's new parameters:
    the runner's whole training in one call. Inputs: the fused graph's, ``features``,
    ``targets`` and ``sample_weight`` stacked on one more leading axis (epochs, steps, N,
    ...), plus ``val_features`` (M, D). Outputs: ``loss`` (epochs, steps), the final ``new.*``
    values, ``epoch.<name>`` (every parameter and optimizer state after each epoch, stacked)
    and ``val_logits`` (epochs, M, rows). ``infer_inputs``: the infer graph's inputs
    (features first, then parameters that the train step carries).

    Raises:
        BundleError: the graphs are not a fused train graph and an infer graph of one head,
            or the infer graph holds subgraphs.
    """
    import onnx
    from onnx import helper

    fk, inf = (onnx.load(str(p), load_external_data=False) for p in (fused, infer))
    if len(fk.graph.node) != 1 or fk.graph.node[0].op_type != "Scan":
        raise BundleError(f"{fused.name} is not a fused train graph (one Scan)")
    scan = fk.graph.node[0]
    vin = {i.name: i for i in fk.graph.input}
    vout = {o.name: o for o in fk.graph.output}
    carried = [n.removeprefix("new.") for n in scan.output[:-1]]
    scanned = list(scan.input[len(carried):])
    if (scan.output[-1] != "loss" or list(scan.input[: len(carried)]) != carried
            or not set(infer_inputs[1:]) <= set(carried)):
        raise BundleError(f"{fused.name} / {infer.name}: not a fused train graph and an infer "
                          "graph of the same parameters; cannot build the whole-run graph")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in inf.graph.node for a in n.attribute):
        raise BundleError(f"{infer.name} holds subgraphs; the whole-run graph cannot use it")
    e = "epoch/"
    inner = onnx.NodeProto()
    inner.CopyFrom(scan)
    inner.name = "train_epoch"
    inner.ClearField("input")
    inner.input.extend(e + n for n in [*carried, *scanned])
    inner.ClearField("output")
    inner.output.extend([*(e + "new." + n for n in carried), e + "loss"])
    # the infer graph's nodes that the logits need, on the epoch's new parameters
    need, nodes_inf = {"logits"}, []
    for nd in reversed(inf.graph.node):
        if need & set(nd.output):
            need |= set(nd.input)
            nodes_inf.append(nd)
    feats, params = infer_inputs[0], set(infer_inputs[1:])

    def rn(x: str) -> str:
        if x in ("", feats):
            return VAL_INPUT if x else x
        return e + "new." + x if x in params else "infer/" + x

    nodes = [inner] + [_renamed(nd, rn, "infer/" + nd.name if nd.name else "")
                       for nd in reversed(nodes_inf)]
    # per-epoch snapshots: a body value is either carried or scanned out, so copied once
    nodes += [helper.make_node("Identity", [e + "new." + n], [e + "snap." + n]) for n in carried]
    nodes.append(helper.make_node("Identity", [rn("logits")], [e + VAL_LOGITS]))

    def typed(proto, name, lead: tuple = ()):
        c = type(proto)()
        c.CopyFrom(proto)
        c.name = name
        dims = list(c.type.tensor_type.shape.dim)
        c.type.tensor_type.shape.ClearField("dim")
        for d in lead:
            c.type.tensor_type.shape.dim.add().dim_param = d
        for d in dims:
            c.type.tensor_type.shape.dim.add().CopyFrom(d)
        return c

    logits = next(o for o in inf.graph.output if o.name == "logits")
    body = helper.make_graph(
        nodes, "train_epoch",
        [typed(vin[n], e + n) for n in [*carried, *scanned]],  # an epoch: (steps, N, ...)
        [*(typed(vout["new." + n], e + "new." + n) for n in carried),
         helper.make_tensor_value_info(e + "loss", onnx.TensorProto.FLOAT, ["steps"]),
         *(typed(vout["new." + n], e + "snap." + n) for n in carried),
         typed(logits, e + VAL_LOGITS)],
        [_renamed_tensor(i, "infer/" + i.name) for i in inf.graph.initializer])
    outs = [*("new." + n for n in carried), "loss", *(EPOCH_PREFIX + n for n in carried),
            VAL_LOGITS]
    node = helper.make_node("Scan", [*carried, *scanned], outs, name="train_run",
                            num_scan_inputs=len(scanned), body=body)
    val = next(i for i in inf.graph.input if i.name == feats)
    graph = helper.make_graph(
        [node], "train_run",
        [*(typed(vin[i.name], i.name, ("epochs",)) if i.name in scanned else i
           for i in fk.graph.input), typed(val, VAL_INPUT)],
        [*(vout["new." + n] for n in carried),
         helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, ["epochs", "steps"]),
         *(typed(vout["new." + n], EPOCH_PREFIX + n, ("epochs",)) for n in carried),
         typed(logits, VAL_LOGITS, ("epochs",))])
    opsets: dict[str, int] = {}
    for o in [*fk.opset_import, *inf.opset_import]:
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets.items()],
                              ir_version=max(fk.ir_version, inf.ir_version),
                              producer_name="edgetl")
    model.functions.extend([*fk.functions, *inf.functions])
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _renamed(nd, rn, name: str):
    """A copy of ONNX node ``nd`` named ``name``, its inputs and outputs renamed by ``rn``."""
    import onnx

    c = onnx.NodeProto()
    c.CopyFrom(nd)
    c.ClearField("input")
    c.input.extend(rn(x) for x in nd.input)
    c.ClearField("output")
    c.output.extend(rn(x) for x in nd.output)
    c.name = name
    return c


def _renamed_tensor(t, name: str):
    c = type(t)()
    c.CopyFrom(t)
    c.name = name
    return c


def check_run(sess, names: list[str], out_names: list[str], n_hparams: int,
              steps: list[tuple[list, tuple]], infer_names: list[str], atol: float) -> float:
    """The whole-run graph of ``sess`` against the fused and infer graphs; max difference.

    ``steps`` as :func:`check_fused` takes them (an even number of them), run as two epochs:
    in one call of the whole-run graph, and as one fused call and one infer call (the
    validation logits of the epoch's parameters) per epoch from the same start. Losses, the
    per-epoch and final parameters and state, and the validation logits must agree within
    ``atol * max(1, max|value|)`` (the same kernels: ~0).
    """
    import numpy as np

    from edgetl.export.bundle import compare
    from edgetl.export.registry import as_feeds

    rb, nc = sess.run_graph, len(out_names) - 1
    k = len(steps) // 2
    first = [np.asarray(x) for x in steps[0][0]]
    hp, carry, rest = (first[3 : 3 + n_hparams], first[3 + n_hparams : 3 + n_hparams + nc],
                       first[3 + n_hparams + nc :])
    stacked = [np.stack([np.asarray(steps[i][0][j]) for i in range(2 * k)]) for j in range(3)]
    val = stacked[0][0]
    got = sess.train_run({**as_feeds(names, [*(a.reshape(2, k, *a.shape[1:]) for a in stacked),
                                             *hp, *carry, *rest]), rb["val_input"]: val})
    worst, carried = 0.0, [o.removeprefix("new.") for o in out_names[1:]]
    for e in range(2):
        out = sess.train_steps(as_feeds(names, [*(a[e * k : (e + 1) * k] for a in stacked),
                                                *hp, *carry, *rest]))
        carry = [out[o] for o in out_names[1:]]
        params = dict(zip(carried, carry, strict=True))
        logits = sess.infer(as_feeds(infer_names, [val, *(params[n] for n in infer_names[1:])]))
        want = {rb["loss_output"]: out[out_names[0]], rb["val_logits_output"]: logits["logits"],
                **{rb["epoch_prefix"] + n: v for n, v in params.items()},
                **({f"new.{n}": v for n, v in params.items()} if e else {})}
        for name, w in want.items():
            g = got[name] if name.startswith("new.") else got[name][e]
            bound = atol * max(1.0, float(np.abs(w).max()) if w.size else 1.0)
            worst = max(worst, compare(f"train_run[epoch {e}].{name}", g, w, bound))
    return worst
