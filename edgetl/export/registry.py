"""The exporter registry: a plain dict from target name to :class:`Exporter` class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetl.errors import ConfigError
from edgetl.head import HeadSpec

EXPORTERS: dict[str, type[Exporter]] = {}


def register_exporter(target: str):
    """Class decorator registering an :class:`Exporter` under ``target``."""

    def deco(cls):
        if target in EXPORTERS:
            raise ConfigError(f"exporter {target!r} registered twice")
        cls.target = target
        EXPORTERS[target] = cls
        return cls

    return deco


def get_exporter(target: str) -> Exporter:
    """An instance of the exporter for ``target``; unknown targets list the known ones."""
    _load_builtin()
    try:
        return EXPORTERS[target]()
    except KeyError:
        raise ConfigError(f"unknown export target {target!r}; known targets: "
                          f"{sorted(EXPORTERS)}") from None


def _load_builtin() -> None:
    # Importing the module runs its @register_exporter; the backend library itself
    # (onnx, onnxruntime) is imported only inside the methods that use it.
    from edgetl.export import onnx as _onnx  # noqa: F401
    from edgetl.export import tflite as _tflite  # noqa: F401


class Exporter:
    """A target runtime: writes graphs and runs them for the parity check.

    Attributes:
        target: registry key (set by :func:`register_exporter`).
        suffix: file suffix of its graphs.
        backbone_batch: fixed batch of the backbone graph, or ``None`` for dynamic batches.
        fixed_head_batch: the head graphs take exactly the batch given at export.
        dynamic_classes: the head graphs accept any number of classes (devices may add some).
        fused_optional: a fused train graph that fails to build or its export check is left
            out (the bundle trains one step per call and ``checks.fused_train_unsupported``
            says why) instead of failing the export.
    """

    target = ""
    suffix = ""
    backbone_batch: int | None = None
    fixed_head_batch = False
    dynamic_classes = True
    fused_optional = False

    def export_backbone(self, backbone: nn.Module, sample: torch.Tensor, path: Path, *,
                        opset: int, precision: str,
                        calib: np.ndarray | None = None,
                        int8_io: str = "int8") -> dict[str, Any]:
        """Write the frozen backbone (int8: calibrated on ``calib``, normalised windows).

        ``int8_io``: an int8 graph's input/output type where the target has a choice
        (TFLite: ``int8``, or ``float32`` with (de)quantisation inside the graph).

        Returns its input/output names, ``batch_size`` and, for int8, ``quantization``.
        """
        raise NotImplementedError

    def export_head(self, spec: HeadSpec, optimizer: str, folder: Path, *, opset: int,
                    batch: int) -> dict[str, Any]:
        """Write the head's train step and infer graphs into ``folder``.

        Returns ``{"files": {role: name}, "train": {...}, "infer": {...}}`` where each
        signature names its file role, runtime signature, inputs, outputs and batch size.
        """
        raise NotImplementedError

    def export_fused(self, folder: Path, train: dict[str, Any], files: dict[str, str], *,
                     shared: list[str], trace: tuple | None = None) -> dict[str, Any] | None:
        """Write the fused K-step train graph beside the one-step ``train`` graph.

        ``train``: the one-step graph's signature; ``files``: file roles written so far;
        ``shared``: the inputs every step reads unchanged (hyper-parameters, anchors);
        ``trace``: the one-step torch module and its example inputs, for targets that
        convert the steps again (TFLite) rather than rewrite the written graph (ONNX).
        Returns ``{"files": {role: name}, "fused": <train_step.fused block>}``;
        ``{"files": {}, "unsupported": why}`` when the graph could not be built (the bundle
        ships without it); ``None`` for a target without one (:mod:`edgetl.export.fused`).
        """
        return None

    def export_run(self, folder: Path, fused: dict[str, Any], infer: dict[str, Any],
                   files: dict[str, str]) -> dict[str, Any] | None:
        """Write the whole-run train graph beside the fused one.

        Epochs and their validation logits in one call (:func:`edgetl.export.fused.run_graph`).
        ``fused``: the ``train_step.fused`` block; ``infer``: the infer graph's signature.
        Returns ``{"files": {role: name}, "run": <train_step.run block>}``, or ``None`` for
        a target without one.
        """
        return None

    def runtime_info(self) -> dict[str, Any]:
        """Version facts recorded in the manifest's provenance."""
        return {}


def as_feeds(names: list[str], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Zip names and arrays into a feed dict, as contiguous numpy arrays."""
    return {n: np.ascontiguousarray(a) for n, a in zip(names, arrays, strict=True)}
