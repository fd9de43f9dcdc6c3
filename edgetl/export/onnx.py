"""ONNX target: ``backbone.onnx`` plus ``head_train.onnx`` / ``head_infer.onnx``.

The train step is exported with dynamic batch *and* class dimensions, so one graph serves any
batch size and a device that grows the head with its own labels.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetl.errors import BundleError, require
from edgetl.export.registry import Exporter, register_exporter
from edgetl.head import HeadSpec, InferStep, TrainStep


def _export(module: nn.Module, args: tuple, path: Path, names_in: list[str],
            names_out: list[str], dynamic: dict[str, dict[int, str]], opset: int) -> None:
    require("onnx", "onnx")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but gives plain, small graphs
        # with named dynamic axes; the dynamo exporter works too (see DESIGN.md).
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path))


#: 7-bit int8 weights: x86-64 CPUs without VNNI (AVX2 only) run U8S8 through VPMADDUBSW,
#: whose int16 pair sums saturate with full-range weights (onnxruntime's quantization docs
#: name ``reduce_range`` as the remedy). Measured here on an AVX2-only EPYC: the vision
#: student's int8 bundle lost 5.25 pt with 8-bit weights (the export gate refused it).
REDUCE_RANGE = True
#: Layer precision rules (measured on EfficientNet-Lite0, docs/bundle.md "ONNX int8"): the
#: 7-bit weights, not the uint8 activations, cost its accuracy (16-bit activations: no better;
#: 16-bit weights: lossless). Depthwise convolutions run onnxruntime's depthwise kernel, which
#: accumulates in int32 without VPMADDUBSW, so they keep full 8-bit weights (fused = emulated
#: output, no saturation). In networks with at least ``EDGE_LAYERS_MIN_CONVS`` convolutions the
#: first and the last convolution get 16-bit weights (they run in float, between the same
#: uint8 activations): excluding them instead changed the fused graph and saturated later layers.
EDGE_LAYERS_MIN_CONVS = 8
STATIC_SCHEME = ("QDQ static, per-channel symmetric int8 weights (7-bit range: reduce_range; "
                 "depthwise convolutions 8-bit; first and last convolution of deep networks "
                 "16-bit: quantization.weights_int16), uint8 activations (MinMax)")


def _precision_overrides(model_path: Path) -> tuple[dict, list[str], list[str]]:
    """``TensorQuantOverrides`` for the layer rules above, and the node names they touch."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name: tuple(i.dims) for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv" and len(n.input) > 1
             and n.input[1] in inits]

    def group(n):
        return next((a.i for a in n.attribute if a.name == "group"), 1)

    depthwise = [n for n in convs if group(n) > 1 and inits[n.input[1]][1] == 1]
    edges = [convs[0], convs[-1]] if len(convs) >= EDGE_LAYERS_MIN_CONVS else []
    from onnxruntime.quantization import QuantType

    over = {n.input[1]: [{"axis": 0, "reduce_range": False}] for n in depthwise}
    over.update({n.input[1]: [{"axis": 0, "quant_type": QuantType.QInt16}] for n in edges})
    return over, [n.name for n in depthwise if n not in edges], [n.name for n in edges]


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, input_name: str) -> dict[str, Any]:
    """Static int8 QDQ model: per-channel symmetric int8 weights, uint8 activations (MinMax).

    uint8 activations × int8 weights (U8S8) is onnxruntime's fast integer path on x86-64
    (VPMADDUBSW / VNNI) and is supported on ARM64; with int8 activations (S8S8) onnxruntime
    ran EfficientNet-Lite0 slower than fp32 here (README, "Benchmarks"). Layer rules: see
    :data:`EDGE_LAYERS_MIN_CONVS`.

    Returns:
        The manifest's quantization facts: ``scheme``, ``weights_int16`` and
        ``weights_8bit_depthwise`` (node names), ``backbone_opset`` (the quantized graph's).
    """
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        over, dw8, w16 = _precision_overrides(pre)
        dtype = np.float32 if calib.dtype.kind == "f" else np.int64  # token ids stay ids
        batches = iter([{input_name: np.ascontiguousarray(calib[i : i + 64], dtype)}
                        for i in range(0, len(calib), 64)])

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(batches, None)

        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE,
                        extra_options={"TensorQuantOverrides": over} if over else {})
    finally:
        pre.unlink(missing_ok=True)
    import onnx

    opset = next(o.version for o in onnx.load(str(out), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    # 16-bit weights need opset 21 (onnxruntime >= 1.18 on the device): the quantizer upgrades
    return {"scheme": STATIC_SCHEME, "weights_int16": w16, "weights_8bit_depthwise": dw8,
            "backbone_opset": int(opset)}


@register_exporter("onnx")
class OnnxExporter(Exporter):
    """ONNX graphs for onnxruntime (any build: x86_64, aarch64, Android, iOS)."""

    suffix = ".onnx"

    def export_backbone(self, backbone, sample, path, *, opset, precision, calib=None,
                        int8_io="int8"):  # QDQ graphs take and return float32 anyway
        if getattr(backbone, "is_text", False):  # transformers go through optimum
            from edgetl.text.export import export_onnx

            return export_onnx(backbone.eval(), path, opset=opset, precision=precision,
                               max_length=int(sample.shape[-1]))
        dyn = {"x": {0: "batch"}, "features": {0: "batch"}}
        sig = {"inputs": ["x"], "outputs": ["features"], "batch_size": None}
        if precision == "fp32":
            _export(backbone.eval(), (sample,), path, ["x"], ["features"], dyn, opset)
            return sig
        ids = not sample.is_floating_point()  # token ids: dynamic int8, as text models
        if not ids and (calib is None or len(calib) == 0):
            raise BundleError("int8 export needs calibration windows from source data")
        fp32 = path.with_name(path.stem + ".fp32.onnx")
        try:
            _export(backbone.eval(), (sample,), fp32, ["x"], ["features"], dyn, opset)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if ids:
                    from edgetl.text.export import quantize_dynamic_int8

                    return {**sig, "quantization": quantize_dynamic_int8(fp32, path)}
                facts = quantize_int8(fp32, path, calib, "x")
        finally:
            fp32.unlink(missing_ok=True)
        return {**sig, "quantization": facts}

    def export_head(self, spec: HeadSpec, optimizer, folder, *, opset, batch):
        step, infer = TrainStep(spec, optimizer), InferStep(spec)
        shapes = spec.param_shapes()
        params = [torch.randn(s) * 0.1 for s in shapes.values()]
        state = [torch.zeros(1) if n == "step" else torch.zeros(shapes[n.split(".", 1)[1]])
                 for n in spec.state_names(optimizer)]
        anchors = [p.clone() for p in params] if spec.l2sp else []
        n_hp = len(step.hparam_names)
        hp = [torch.tensor(0.1 + 0.01 * i) for i in range(n_hp)]  # distinct objects
        f = torch.randn(batch, spec.in_features)
        t = torch.eye(spec.num_classes)[torch.arange(batch) % spec.num_classes]
        dyn = {"features": {0: "batch"}, "targets": {0: "batch", 1: "classes"},
               "sample_weight": {0: "batch"}}
        for n in spec.class_params:
            dyn[n] = {0: "classes"}
            dyn[f"new.{n}"] = {0: "classes"}
            if spec.l2sp:
                dyn[f"anchor.{n}"] = {0: "classes"}
            for s in spec.state_names(optimizer):
                if s.endswith("." + n):
                    dyn[s] = dyn[f"new.{s}"] = {0: "classes"}
        folder = Path(folder)
        _export(step, (f, t, torch.ones(batch), *hp, *params, *state, *anchors),
                folder / "head_train.onnx",
                step.input_names(), step.output_names(), dyn, opset)
        dyn_i = {"features": {0: "batch"}, "logits": {0: "batch", 1: "classes"},
                 "embedding": {0: "batch"}}
        dyn_i.update({n: {0: "classes"} for n in spec.class_params})
        _export(infer, (f, *params), folder / "head_infer.onnx", infer.input_names(),
                infer.output_names(), dyn_i, opset)
        return {"files": {"head_train": "head_train.onnx", "head_infer": "head_infer.onnx"},
                "train": {"file": "head_train", "signature": None, "inputs": step.input_names(),
                          "outputs": step.output_names(), "batch_size": None},
                "infer": {"file": "head_infer", "signature": None,
                          "inputs": infer.input_names(), "outputs": infer.output_names(),
                          "batch_size": None}}

    def export_fused(self, folder, train: dict, files: dict, *, shared: list[str],
                     trace=None):
        """``<train graph>_k.onnx``: a Scan over the one-step graph (any steps per call)."""
        from edgetl.export.fused import ROLE_SUFFIX, scan_graph

        role = train["file"] + ROLE_SUFFIX
        name = Path(files[train["file"]]).stem + ROLE_SUFFIX + self.suffix
        scan_graph(Path(folder) / files[train["file"]], Path(folder) / name, shared=shared)
        return {"files": {role: name},
                "fused": {"file": role, "signature": None, "inputs": train["inputs"],
                          "outputs": train["outputs"], "batch_size": train["batch_size"],
                          "steps": None, "loss_output": "loss"}}

    def export_run(self, folder, fused: dict, infer: dict, files: dict):
        """``<train graph>_run.onnx``: epochs of the fused graph and their validation logits.

        :func:`edgetl.export.fused.run_graph`; dynamic batches only.
        """
        from edgetl.export.fused import EPOCH_PREFIX, RUN_SUFFIX, VAL_INPUT, VAL_LOGITS, run_graph

        if fused["steps"] is not None or fused["batch_size"] or infer["batch_size"]:
            return None  # fixed shapes: the validation windows would have to fit them
        role = fused["file"].removesuffix("_k") + RUN_SUFFIX
        name = Path(files[fused["file"]]).stem.removesuffix("_k") + RUN_SUFFIX + self.suffix
        run_graph(Path(folder) / files[fused["file"]], Path(folder) / files[infer["file"]],
                  Path(folder) / name, infer_inputs=infer["inputs"])
        carried = [o.removeprefix("new.") for o in fused["outputs"] if o.startswith("new.")]
        return {"files": {role: name},
                "run": {"file": role, "signature": None,
                        "inputs": [*fused["inputs"], VAL_INPUT],
                        "outputs": [*fused["outputs"], *(EPOCH_PREFIX + n for n in carried),
                                    VAL_LOGITS],
                        "batch_size": None, "loss_output": "loss", "val_input": VAL_INPUT,
                        "val_logits_output": VAL_LOGITS, "epoch_prefix": EPOCH_PREFIX}}

    def runtime_info(self) -> dict[str, Any]:
        import onnx

        ort = require("onnxruntime", "onnx")
        return {"onnx": onnx.__version__, "onnxruntime_validated": ort.__version__}
