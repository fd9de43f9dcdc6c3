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

from edgetl.errors import require
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


@register_exporter("onnx")
class OnnxExporter(Exporter):
    """ONNX graphs for onnxruntime (any build: x86_64, aarch64, Android, iOS)."""

    suffix = ".onnx"
    atol = 1e-4

    def export_backbone(self, backbone, sample, path, *, opset):
        _export(backbone.eval(), (sample,), path, ["x"], ["features"],
                {"x": {0: "batch"}, "features": {0: "batch"}}, opset)
        return {"inputs": ["x"], "outputs": ["features"]}

    def export_head(self, spec: HeadSpec, optimizer, train_path, infer_path, *, opset, batch):
        step, infer = TrainStep(spec, optimizer), InferStep(spec)
        shapes = spec.param_shapes()
        params = [torch.randn(s) * 0.1 for s in shapes.values()]
        state = [torch.zeros(1) if n == "step" else torch.zeros(shapes[n.split(".", 1)[1]])
                 for n in spec.state_names(optimizer)]
        hp = [torch.tensor(0.1)] * (len(step.input_names()) - 3 - len(params) - len(state))
        f = torch.randn(batch, spec.in_features)
        t = torch.eye(spec.num_classes)[torch.arange(batch) % spec.num_classes]
        dyn = {"features": {0: "batch"}, "targets": {0: "batch", 1: "classes"},
               "sample_weight": {0: "batch"}}
        for n in spec.class_params:
            dyn[n] = {0: "classes"}
            dyn[f"new.{n}"] = {0: "classes"}
            for s in spec.state_names(optimizer):
                if s.endswith("." + n):
                    dyn[s] = dyn[f"new.{s}"] = {0: "classes"}
        _export(step, (f, t, torch.ones(batch), *hp, *params, *state), train_path,
                step.input_names(), step.output_names(), dyn, opset)
        dyn_i = {"features": {0: "batch"}, "logits": {0: "batch", 1: "classes"},
                 "embedding": {0: "batch"}}
        dyn_i.update({n: {0: "classes"} for n in spec.class_params})
        _export(infer, (f, *params), infer_path, infer.input_names(), infer.output_names(),
                dyn_i, opset)
        return {"train": {"inputs": step.input_names(), "outputs": step.output_names()},
                "infer": {"inputs": infer.input_names(), "outputs": infer.output_names()}}

    def session(self, bundle, files):
        return _OrtBundle(Path(bundle), files)

    def runtime_info(self) -> dict[str, Any]:
        import onnx

        ort = require("onnxruntime", "onnx")
        return {"onnx": onnx.__version__, "onnxruntime_validated": ort.__version__}


class _OrtBundle:
    def __init__(self, bundle: Path, files: dict[str, str]):
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        mk = lambda role: ort.InferenceSession(str(bundle / files[role]), opts,  # noqa: E731
                                               providers=["CPUExecutionProvider"])
        self._bb, self._train, self._infer = mk("backbone"), mk("head_train"), mk("head_infer")

    def features(self, x: np.ndarray) -> np.ndarray:
        return self._bb.run(None, {"x": x.astype(np.float32)})[0]

    def train_step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._train.get_outputs()]
        return dict(zip(names, self._train.run(None, feeds), strict=True))

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._infer.get_outputs()]
        return dict(zip(names, self._infer.run(None, feeds), strict=True))
