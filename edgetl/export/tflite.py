"""TFLite / LiteRT target: ``backbone.tflite`` plus ``head.tflite`` with ``train`` / ``infer``.

Converted with litert-torch. The head's train step is an ordinary stateless graph (parameters
and optimizer state in, updated ones out), so it runs on any LiteRT build with built-in ops
only: no Flex delegate, no ``tf.raw_ops.Save/Restore`` variables. LiteRT specialises batch
sizes at conversion: the backbone takes one window per call and the head a fixed batch that
the runner pads with ``sample_weight = 0`` rows.

int8 backbones use PyTorch 2 export quantization (PT2E, static, per-channel symmetric
weights) calibrated on source windows. With ``int8_io="int8"`` their input and output tensors
are int8, with the (scale, zero point) recorded in the manifest for the runner; with
``"float32"`` the graph takes and returns float32 and (de)quantises inside
(:func:`edgetl.export.tflite_passes.float_io`). After conversion every model goes through the
flatbuffer passes of :mod:`edgetl.export.tflite_passes`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetl.errors import BundleError, require
from edgetl.export.registry import Exporter, register_exporter
from edgetl.export.tflite_passes import HEAD_PASSES, float_io, rewrite
from edgetl.head import HeadSpec, InferStep, TrainStep

log = logging.getLogger(__name__)

#: Operator codes that mean "not a built-in op" (Flex ops are CUSTOM ops named ``Flex*``).
NOT_BUILTIN = ("CUSTOM", "DELEGATE", "PLACEHOLDER_FOR_GREATER_OP_CODES")


def _safe(name: str) -> str:
    # torch.export forbids '.' in placeholder names ("momentum.weight"); '__' round-trips
    # because no contract name contains it.
    return name.replace(".", "__")


class _Named(nn.Module):
    """Keyword inputs and a dict output, so the TFLite signature keeps the contract's names."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, **kw):
        outs = self.step(*(kw[_safe(n)] for n in self.step.input_names()))
        return dict(zip(map(_safe, self.step.output_names()), outs, strict=True))


def operator_codes(path: Path | str) -> list[tuple[str, str | None]]:
    """Every operator code of a ``.tflite`` as (builtin name, custom code or None).

    Read straight from the flatbuffer schema, so it needs neither TensorFlow nor a runtime.
    """
    from ai_edge_litert import schema_py_generated as schema

    buf = Path(path).read_bytes()
    model = schema.Model.GetRootAs(buf, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())  # schema 3a: larger one wins
        custom = oc.CustomCode()
        out.append((names.get(code, str(code)), custom.decode() if custom else None))
    return out


def check_builtin_only(path: Path | str) -> list[str]:
    """Sorted built-in op names of a model; raise :class:`BundleError` on any custom/Flex op."""
    ops = operator_codes(path)
    bad = [f"{n}:{c}" if c else n for n, c in ops if n in NOT_BUILTIN or c is not None]
    if bad:
        raise BundleError(f"{Path(path).name} uses non-built-in ops {bad}; a stock LiteRT "
                          "runtime cannot run it (Flex ops are not shipped)")
    return sorted(n for n, _ in ops)


@contextlib.contextmanager
def _quiet():
    """Keep the converter's chatter (absl, XLA, torchao, warnings) off the user's terminal.

    Output of C++ code goes to file descriptors 1 and 2 directly, so those are redirected to
    a temporary file; if the conversion fails, its tail is logged for the bug report.
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+b") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        ok = False
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
                    io.StringIO()):
                yield
            ok = True
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if not ok:
                sink.seek(0)
                tail = sink.read().decode(errors="replace")[-4000:]
                log.error("converter output before the failure:\n%s", tail)


def _relu6_aware_quantizer():
    """litert-torch's PT2E quantizer, plus conv -> ReLU6 (hardtanh) annotated as one op.

    The stock quantizer lets hardtanh share its quantization range with the convolution's
    *unclipped* output: on EfficientNet-Lite0 the output scale came out 0.17 (range -18..26
    for values in [0, 6]) and int8 features had cosine 0.77 to fp32. Annotating the pair like
    conv -> ReLU (the range observed after the clip) gives cosine 0.99.
    """
    from litert_torch.quantize import pt2e_quantizer_utils as qutils
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    convs = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default,
             torch.ops.aten.conv1d.default}
    clips = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}

    class Relu6AwarePT2EQuantizer(PT2EQuantizer):
        def annotate(self, model):
            cfg = self.global_config
            for n in model.graph.nodes:
                if n.op != "call_function" or n.target not in clips:
                    continue
                conv = n.args[0]
                if (not isinstance(conv, torch.fx.Node) or conv.target not in convs
                        or len(conv.users) != 1):
                    continue
                qmap = {conv.args[0]: qutils.get_input_act_qspec(cfg),
                        conv.args[1]: qutils.get_weight_qspec(cfg)}
                if len(conv.args) > 2 and isinstance(conv.args[2], torch.fx.Node):
                    qmap[conv.args[2]] = qutils.get_bias_qspec(cfg)
                conv.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=qmap, _annotated=True)
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    output_qspec=qutils.get_output_act_qspec(cfg), _annotated=True)
            return super().annotate(model)

    return Relu6AwarePT2EQuantizer()


def _convert_backbone_int8(backbone: nn.Module, x1: torch.Tensor, calib: np.ndarray, path: Path):
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _relu6_aware_quantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    gm = prepare_pt2e(torch.export.export(backbone, (x1,)).module(), quantizer)
    with torch.no_grad():
        for w in torch.from_numpy(calib.astype(np.float32 if calib.dtype.kind == "f"
                                               else np.int64)):  # batch fixed at 1, as exported
            gm(w[None])
    gm = convert_pt2e(gm, fold_quantize=False)
    litert_torch.convert(gm, (x1,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
        str(path))


def _io_quant(details: dict) -> dict[str, Any] | None:
    if details["dtype"] not in (np.int8, np.uint8):  # float, or token ids (int32)
        return None
    scale, zero = details["quantization"]
    return {"dtype": np.dtype(details["dtype"]).name, "scale": float(scale),
            "zero_point": int(zero)}


#: int8 for text encoders: litert-torch's dynamic-range recipe (ai-edge-quantizer) instead of
#: PT2E static, which calibrates float inputs, not token ids: weights int8 per channel, each
#: call's activations quantised from their own range (as onnxruntime's dynamic int8).
TEXT_INT8 = ("dynamic-range int8 (litert-torch full_dynamic_recipe, ai-edge-quantizer): "
             "per-channel int8 weights, activations quantised per call")


def text_lengths(max_length: int) -> list[int]:
    """Sequence lengths a TFLite text backbone gets a signature for: 32, 64, ... and the max.

    LiteRT fixes shapes at conversion; one graph at ``max_length`` would run every short text
    padded to full length. The runner feeds each text to the shortest signature that holds
    it (the padding is masked, so the features are the same); the signatures share one copy
    of the weights in the flatbuffer.
    """
    return [n for n in (32, 64, 128, 256) if n < max_length] + [max_length]


@register_exporter("tflite")
class TFLiteExporter(Exporter):
    """Built-in-op TFLite models for LiteRT (ai-edge-litert, Android, Raspberry Pi)."""

    suffix = ".tflite"
    backbone_batch = 1
    fixed_head_batch = True
    dynamic_classes = False
    #: the unrolled K-step graph is an optimisation: a converter or runtime that cannot take
    #: it (or the export check refusing it) leaves one step per call, never a broken graph
    fused_optional = True

    def export_backbone(self, backbone, sample, path, *, opset, precision, calib=None,
                        int8_io="int8"):
        x1 = sample[:1].contiguous()
        text = getattr(backbone, "is_text", False)
        lengths: list[int] = []
        in_graph: dict = {}
        with _quiet():
            litert_torch = require("litert_torch", "tflite")

            if text:  # one signature per sequence length, sharing the weights (see below)
                x1 = x1.to(torch.int32)  # TFLite's native index type; the encoder casts
                lengths = text_lengths(int(x1.shape[-1]))
                builder = None
                for n in lengths:
                    args = (x1[:, :, :n].contiguous(),)
                    builder = (litert_torch.signature(f"len{n}", backbone.eval(), args)
                               if builder is None
                               else builder.signature(f"len{n}", backbone.eval(), args))
                qc = None
                if precision == "int8":  # dynamic-range int8, no calibration (see TEXT_INT8)
                    from litert_torch.generative.quantize import quant_recipes

                    qc = quant_recipes.full_dynamic_recipe()
                builder.convert(quant_config=qc).export(str(path))
            elif precision == "fp32":
                litert_torch.convert(backbone.eval(), (x1,)).export(str(path))
            elif not x1.is_floating_point():  # token ids: dynamic-range int8 (see TEXT_INT8)
                from litert_torch.generative.quantize import quant_recipes

                litert_torch.convert(backbone.eval(), (x1,), quant_config=(
                    quant_recipes.full_dynamic_recipe())).export(str(path))
            else:
                if calib is None or len(calib) == 0:
                    raise BundleError("int8 export needs calibration windows from source data")
                _convert_backbone_int8(backbone.eval(), x1, calib, path)
                if int8_io == "float32":
                    in_graph, = rewrite(path, float_io)
            run = _runner(path, f"len{lengths[-1]}" if text else None)
        check_builtin_only(path)
        (name_in, d_in), = run.get_input_details().items()
        (name_out, d_out), = run.get_output_details().items()
        sig = {"inputs": [name_in], "outputs": [name_out], "batch_size": 1,
               "signature": f"len{lengths[-1]}" if text else "serving_default"}
        if _io_quant(d_in) is None:  # what the graph takes (token ids: int32 or int64)
            sig["dtype"] = np.dtype(d_in["dtype"]).name
        if text:
            sig.update(dtype="int32", length_signatures={str(n): f"len{n}" for n in lengths})
        if precision == "fp32":
            return sig
        scheme = TEXT_INT8 if text or not x1.is_floating_point() else (
            "PT2E static int8, per-channel symmetric weights, int8 activations (litert-torch "
            "PT2EQuantizer)")
        quant = {"scheme": scheme, "input": _io_quant(d_in), "output": _io_quant(d_out)}
        if in_graph:  # float32 graph I/O: nothing for the runner to do, scales for people
            quant.update(graph_io="float32", in_graph={
                "input": in_graph.get(name_in), "output": in_graph.get(name_out)})
        return {**sig, "quantization": quant}

    def export_head(self, spec: HeadSpec, optimizer, folder, *, opset, batch):
        step, infer = TrainStep(spec, optimizer), InferStep(spec)
        g = torch.Generator().manual_seed(0)
        shapes = spec.param_shapes()
        params = [torch.randn(s, generator=g) * 0.1 for s in shapes.values()]
        state = [torch.zeros(1) if n == "step" else torch.zeros(shapes[n.split(".", 1)[1]])
                 for n in spec.state_names(optimizer)]
        anchors = [p.clone() for p in params] if spec.l2sp else []
        n_hp = len(step.hparam_names)
        f = torch.randn(batch, spec.in_features, generator=g)
        t = torch.eye(spec.num_classes)[torch.arange(batch) % spec.num_classes]
        train_args = [f, t, torch.ones(batch), *_distinct_hparams(n_hp), *params, *state,
                      *anchors]
        train_kw = {_safe(n): a for n, a in zip(step.input_names(), train_args, strict=True)}
        infer_kw = {_safe(n): a for n, a in zip(infer.input_names(), [f, *params], strict=True)}
        path = Path(folder) / "head.tflite"
        with _quiet():
            litert_torch = require("litert_torch", "tflite")
            model = (litert_torch.signature("train", _Named(step), (), train_kw)
                     .signature("infer", _Named(infer), (), infer_kw).convert())
            model.export(str(path))
        rewrite(path, *HEAD_PASSES)
        check_builtin_only(path)
        return {"files": {"head": path.name}, "trace": (step, train_args),
                "train": {"file": "head", "signature": "train", "inputs": step.input_names(),
                          "outputs": step.output_names(), "batch_size": batch,
                          "hparam_shape": list(HPARAM_SHAPE)},
                "infer": {"file": "head", "signature": "infer", "inputs": infer.input_names(),
                          "outputs": infer.output_names(), "batch_size": batch}}

    def export_fused(self, folder, train, files, *, shared, trace=None, steps=None):
        """``<train file>_train_k.tflite``: :data:`FUSED_STEPS` steps unrolled (``train_k``).

        :class:`~edgetl.export.fused.KSteps` over the one-step module of ``trace`` (the
        module and its example inputs), converted by litert-torch like the one-step graph:
        the head models' flatbuffer passes, built-in ops only, loaded once by LiteRT. A graph
        that fails any of these is not shipped: the bundle trains one step per call and
        ``unsupported`` says why (the caller records it).
        """
        from edgetl.export.fused import KSteps

        k = FUSED_STEPS if steps is None else int(steps)
        role = f"{train['file']}_train_k"
        path = Path(folder) / f"{role}{self.suffix}"
        if trace is None:
            return {"files": {}, "unsupported": "no one-step module to unroll (trace)"}
        step, args = trace
        g = torch.Generator().manual_seed(1)
        # distinct batches per step; values matter only for tracing
        stacked = [torch.stack([a + 0.01 * i * torch.rand(a.shape, generator=g)
                                for i in range(k)]) for a in args[:3]]
        kargs = [*stacked, *(a.clone() for a in args[3:])]
        fused = KSteps(step, k).eval()
        kw = {_safe(n): a for n, a in zip(fused.input_names(), kargs, strict=True)}
        try:
            with _quiet():
                litert_torch = require("litert_torch", "tflite")
                litert_torch.signature("train_k", _Named(fused).eval(), (), kw).convert(
                ).export(str(path))
            rewrite(path, *HEAD_PASSES)
            check_builtin_only(path)
            _runner(path, "train_k", 1)  # LiteRT loads it, or it is not shipped
        except Exception as e:  # noqa: BLE001 - the bundle ships without it, saying why
            path.unlink(missing_ok=True)
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            log.warning("the fused %d-step train graph was not shipped (%s); the bundle trains "
                        "one step per call", k, why)
            return {"files": {}, "unsupported": why}
        return {"files": {role: path.name},
                "fused": {"file": role, "signature": "train_k", "inputs": train["inputs"],
                          "outputs": train["outputs"], "batch_size": train["batch_size"],
                          "steps": k, "loss_output": "loss"}}

    def runtime_info(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"litert_torch": version("litert-torch"),
                "ai_edge_litert_validated": version("ai-edge-litert")}


def _runner(path: Path, signature: str | None, threads: int = 2):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=threads).get_signature_runner(signature)


#: Train steps per call of a TFLite bundle's fused train graph (``train_step.fused.steps``).
#: LiteRT graphs have fixed shapes and litert-torch emits no loop, so the steps are unrolled
#: (:class:`~edgetl.export.fused.KSteps`): the graph grows K-fold, and the runner fuses only
#: groups of K full batches (the rest of an epoch runs one step per call). Measured on the HAR
#: student's head (ai-edge-litert, 1 thread, batch 32; docs/bundle.md): ~42 µs per one-step
#: call, 29 / 22 / 19 / 14 / 12 µs per step fused at K = 2 / 3 / 4 / 8 / 16: most of the
#: per-call overhead is gone by K = 4, while the HAR devices' epochs hold 3-5 full batches
#: (K = 8 would fuse none of them).
FUSED_STEPS = 4


#: Shape of the head's hyper-parameter inputs in TFLite graphs (manifest
#: ``train_step.hparam_shape``): (1,), not 0-d. Every LiteRT flavour then takes what it is
#: fed without a resize: ai-edge-litert 2.3.0 segfaults on Linux aarch64 when it resizes an
#: input to 0-d, and LiteRT.js refuses any shape but the graph's own.
HPARAM_SHAPE = (1,)


def _distinct_hparams(n: int) -> list[torch.Tensor]:
    # One tensor object per input: torch.export aliases inputs that are the *same* object,
    # which silently bakes one hyper-parameter into another's place.
    return [torch.full(HPARAM_SHAPE, 0.1 + 0.01 * i) for i in range(n)]
