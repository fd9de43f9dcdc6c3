"""AdaBN graphs: re-estimate a backbone's BatchNorm statistics on the device, without labels.

Two graphs per bundle, exported beside the frozen backbone (fp32 only):

* **stats** ``(x, mask) -> (mean_0, var_0, mean_1, var_1, ...)``: the backbone with every BN
  in *training* mode (each BN normalises with its own batch statistics, exactly as torch's
  ``model.train()`` forward), returning each BN's per-channel batch mean and *biased* variance
  of its input over the rows with ``mask == 1``. The mask lets a fixed-batch runtime (TFLite)
  pad a short chunk without the padding entering any statistic.
* **features** ``(x, mean_0, var_0, ...) -> features``: the backbone in eval mode with each
  BN's running mean and variance taken from graph inputs (every other weight constant).

The reference (:func:`torch_running_stats`) is torch's own: every BN reset, ``momentum=None``
(cumulative average), BNs in training mode, the windows fed in consecutive chunks of
``batch_size``. torch then holds, per BN, the mean over chunks of the chunk means and of the
chunk's *unbiased* variances; the runner (``edgerun.adabn``) combines the stats graph's
outputs the same way.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: Windows per chunk of the statistics pass (as ``edgetl.methods.adabn``); the TFLite stats
#: graph takes exactly this many rows (short chunks padded, masked out).
ADABN_BATCH = 256
#: What the device's statistics must equal (the manifest's ``adabn.reference``).
REFERENCE = ("torch BatchNorm, momentum=None (cumulative average), BN layers in train mode "
             "(dropout off), windows in consecutive chunks of batch_size: running_mean = mean "
             "of chunk means, running_var = mean of chunk unbiased variances")
#: Why an int8 bundle cannot recalibrate (the manifest's ``adabn.unsupported``).
INT8_REASON = ("int8 backbone: its BatchNorm layers are folded into the quantised convolutions "
               "(weights and activation ranges fixed at calibration), so their statistics are "
               "no longer separate values a device could replace; use the fp32 bundle for AdaBN")
NO_BN_REASON = "this backbone has no BatchNorm layers"
TAIL_REASON = ("the bundle trains backbone tensors (--trainable beyond head): its infer and "
               "train graphs start at the cut, not at the backbone's output the AdaBN features "
               "graph gives; export with --trainable head for AdaBN")


def bn_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm layer, in module order."""
    return [(n, m) for n, m in backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Ctx:
    """Values shared by the replaced BN layers during one forward (mask, stats in / out)."""

    mask: torch.Tensor | None = None
    given: tuple = ()
    out: list


class _BatchStatsBN(nn.Module):
    """Training-mode BN over the masked rows; records its input's batch mean and biased var."""

    def __init__(self, bn: nn.Module, ctx: _Ctx):
        super().__init__()
        self.bn, self.ctx = bn, ctx

    def forward(self, x):
        dims = [0, *range(2, x.dim())]
        shape = [-1] + [1] * (x.dim() - 1)
        w = self.ctx.mask.reshape(shape)
        per_window = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1  # fixed at export
        n = self.ctx.mask.sum() * per_window
        mean = (x * w).sum(dims, keepdim=True) / n
        d = x - mean
        var = (d * d * w).sum(dims, keepdim=True) / n
        self.ctx.out += [mean.reshape(-1), var.reshape(-1)]
        return _affine(self.bn, d / torch.sqrt(var + self.bn.eps))


class _GivenStatsBN(nn.Module):
    """Eval-mode BN whose running mean and variance are graph inputs (``ctx.given``)."""

    def __init__(self, bn: nn.Module, ctx: _Ctx, index: int):
        super().__init__()
        self.bn, self.ctx, self.index = bn, ctx, index

    def forward(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = self.ctx.given[2 * self.index].reshape(shape)
        var = self.ctx.given[2 * self.index + 1].reshape(shape)
        return _affine(self.bn, (x - mean) / torch.sqrt(var + self.bn.eps))


def _affine(bn: nn.Module, y):
    """``y * weight + bias`` per channel (dimension 1), for affine BNs."""
    shape = [1, -1] + [1] * (y.dim() - 2)
    if bn.weight is not None:
        y = y * bn.weight.reshape(shape)
    if bn.bias is not None:
        y = y + bn.bias.reshape(shape)
    return y


def _replaced(backbone: nn.Module, make) -> tuple[nn.Module, _Ctx]:
    """A deep copy of ``backbone`` (eval mode) with every BN replaced by ``make(bn, ctx, i)``."""
    model = copy.deepcopy(backbone).eval()
    ctx = _Ctx()
    for i, (name, bn) in enumerate(bn_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(bn, ctx, i))
    return model, ctx


class StatsGraph(nn.Module):
    """``(x, mask) -> mean_0, var_0, ...`` (see the module docstring)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.model, self.ctx = _replaced(backbone, lambda bn, ctx, i: _BatchStatsBN(bn, ctx))

    def forward(self, x, mask):
        self.ctx.mask, self.ctx.out = mask, []
        self.model(x)
        out, self.ctx.out = tuple(self.ctx.out), []
        return out


class FeatureGraph(nn.Module):
    """``(x, mean_0, var_0, ...) -> features`` (see the module docstring)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.model, self.ctx = _replaced(backbone, _GivenStatsBN)

    def forward(self, x, *stats):
        self.ctx.given = stats
        return self.model(x)


def stat_names(n_layers: int) -> list[str]:
    """Graph names of the statistics: ``mean_0, var_0, mean_1, var_1, ...``."""
    return [f"{k}_{i}" for i in range(n_layers) for k in ("mean", "var")]


def per_window(backbone: nn.Module, sample: torch.Tensor) -> list[int]:
    """Values per channel per window at each BN's input (the spatial size; 1 after pooling)."""
    sizes = []
    hooks = [bn.register_forward_hook(
        lambda m, inp, out: sizes.append(int(np.prod(inp[0].shape[2:])) if inp[0].dim() > 2
                                         else 1))
        for _, bn in bn_layers(backbone)]
    try:
        with torch.no_grad():
            backbone.eval()(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def torch_running_stats(backbone: nn.Module, xn: np.ndarray,
                        batch: int = ADABN_BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """The AdaBN statistics torch computes on ``xn`` (:data:`REFERENCE`).

    Returns ``[(running_mean, running_var)]``, one pair per BN layer.
    """
    from edgetl.methods.adabn import recalibrate_bn

    model = recalibrate_bn(copy.deepcopy(backbone), torch.from_numpy(np.ascontiguousarray(xn)),
                           batch)
    return [(bn.running_mean.numpy().copy(), bn.running_var.numpy().copy())
            for _, bn in bn_layers(model)]


def torch_features_with(backbone: nn.Module, stats, xn: np.ndarray) -> np.ndarray:
    """Features of ``xn`` from ``backbone`` (eval) with its BN running statistics ``stats``."""
    model = copy.deepcopy(backbone).eval()
    with torch.no_grad():
        for (_, bn), (mean, var) in zip(bn_layers(model), stats, strict=True):
            bn.running_mean.copy_(torch.from_numpy(np.asarray(mean, np.float32)))
            bn.running_var.copy_(torch.from_numpy(np.asarray(var, np.float32)))
        return model(torch.from_numpy(np.ascontiguousarray(xn))).numpy()


def export_onnx(backbone: nn.Module, sample: torch.Tensor, folder: Path, opset: int) -> dict:
    """``adabn_stats.onnx`` and ``adabn_features.onnx`` (any batch); their graph blocks."""
    from edgetl.export.onnx import _export

    n = len(bn_layers(backbone))
    names = stat_names(n)
    stats = StatsGraph(backbone)
    mask = torch.ones(len(sample))
    _export(stats, (sample, mask), folder / "adabn_stats.onnx", ["x", "mask"], names,
            {"x": {0: "batch"}, "mask": {0: "batch"}}, opset)
    given = [t for pair in zip(*_shipped(backbone), strict=True) for t in pair]
    _export(FeatureGraph(backbone), (sample, *given), folder / "adabn_features.onnx",
            ["x", *names], ["features"], {"x": {0: "batch"}, "features": {0: "batch"}}, opset)
    return {"files": {"adabn_stats": "adabn_stats.onnx", "adabn_features": "adabn_features.onnx"},
            "stats": {"file": "adabn_stats", "signature": None, "inputs": ["x", "mask"],
                      "outputs": names, "batch_size": None},
            "features": {"file": "adabn_features", "signature": None, "inputs": ["x", *names],
                         "outputs": ["features"], "batch_size": None}}


def _shipped(backbone: nn.Module) -> tuple[list, list]:
    bns = [bn for _, bn in bn_layers(backbone)]
    return ([bn.running_mean.detach().clone() for bn in bns],
            [bn.running_var.detach().clone() for bn in bns])


class _Kw(nn.Module):
    """Keyword inputs and a dict output, so the TFLite signature keeps the graph's names."""

    def __init__(self, graph: nn.Module, names_in: list[str], names_out: list[str]):
        super().__init__()
        self.inner, self.names_in, self.names_out = graph, names_in, names_out

    def forward(self, **kw):
        out = self.inner(*(kw[n] for n in self.names_in))  # not "graph": GraphModule has one
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.names_out, out, strict=True))


def export_tflite(backbone: nn.Module, sample: torch.Tensor, folder: Path,
                  batch: int = ADABN_BATCH) -> dict:
    """``adabn.tflite`` with signatures ``stats`` (``batch`` rows) and ``features`` (1 row)."""
    from edgetl.errors import require
    from edgetl.export.tflite import _quiet, check_builtin_only

    n = len(bn_layers(backbone))
    names = stat_names(n)
    x = sample[:1].contiguous()
    xb = x.expand(batch, *x.shape[1:]).contiguous()
    given = [t for pair in zip(*_shipped(backbone), strict=True) for t in pair]
    path = folder / "adabn.tflite"
    with _quiet():
        litert_torch = require("litert_torch", "tflite")
        stats_kw = {"x": xb, "mask": torch.ones(batch)}
        feat_kw = {"x": x, **dict(zip(names, given, strict=True))}
        (litert_torch.signature("stats", _Kw(StatsGraph(backbone), ["x", "mask"], names), (),
                                stats_kw)
         .signature("features", _Kw(FeatureGraph(backbone), ["x", *names], ["features"]), (),
                    feat_kw)
         .convert().export(str(path)))
    check_builtin_only(path)
    return {"files": {"adabn": path.name},
            "stats": {"file": "adabn", "signature": "stats", "inputs": ["x", "mask"],
                      "outputs": names, "batch_size": batch},
            "features": {"file": "adabn", "signature": "features", "inputs": ["x", *names],
                         "outputs": ["features"], "batch_size": 1}}


def block(backbone: nn.Module, sample: torch.Tensor, target: str, folder: Path, *,
          precision: str, modality: str, opset: int, tail: bool = False) -> tuple[dict, dict]:
    """The manifest's ``adabn`` block and the files it adds (``{role: name}``).

    Graphs are exported for fp32 time-series and tensor backbones with BatchNorm layers and a
    head-only train step (``tail``: the bundle trains backbone tensors, see TAIL_REASON);
    otherwise the block says why the bundle cannot recalibrate (``unsupported``).
    """
    bns = bn_layers(backbone)
    layers = [{"name": n, "channels": int(bn.num_features)} for n, bn in bns]
    base = {"batch_size": ADABN_BATCH, "reference": REFERENCE, "layers": layers}
    if not bns:
        return {**base, "unsupported": NO_BN_REASON}, {}
    if precision != "fp32":
        return {**base, "unsupported": INT8_REASON}, {}
    if tail:
        return {**base, "unsupported": TAIL_REASON}, {}
    if modality not in ("timeseries", "tensor") or not sample.is_floating_point():
        return {**base, "unsupported": f"AdaBN graphs are exported for time-series and tensor "
                                       f"bundles only, not {modality}"}, {}
    for entry, size in zip(layers, per_window(backbone, sample), strict=True):
        entry["per_window"] = size
    sig = (export_onnx(backbone, sample, folder, opset) if target == "onnx"
           else export_tflite(backbone, sample, folder))
    return {**base, "stats": sig["stats"], "features": sig["features"]}, sig["files"]


def check(staged, backbone: nn.Module, xn: np.ndarray, xn_tv: np.ndarray,
          target: str) -> tuple[dict, dict, dict]:
    """Parity of the exported AdaBN graphs, run by the device's own code, with torch.

    On the reference windows ``xn``: the runner's statistics (``edgerun.adabn``) vs
    :func:`torch_running_stats`, and its features with them vs torch's backbone holding those
    statistics, each within ``scaled_atol`` of the target (raises :class:`ToleranceError`).
    On the test-vector windows ``xn_tv``: the self-test's reference and its tolerances.

    Returns ``(checks, tolerances for the manifest block, test vectors)``.
    """
    from edgerun.adabn import Graphs, running_stats

    from edgetl.export.bundle import compare
    from edgetl.tolerances import SELFTEST_FP32_FACTOR, scaled_atol

    graphs = Graphs(staged)
    names = stat_names(len(bn_layers(backbone)))

    def flat(stats):
        return dict(zip(names, [a for pair in stats for a in pair], strict=True))

    ref_pairs = torch_running_stats(backbone, xn)
    ref = flat(ref_pairs)
    got, _ = running_stats(graphs, xn)
    err_s = max(compare(f"adabn.{k}", got[k], ref[k], scaled_atol(target, ref[k]))
                for k in names)
    want_f = torch_features_with(backbone, ref_pairs, xn)
    err_f = compare("adabn.features", graphs.features(xn, got), want_f,
                    scaled_atol(target, want_f))
    checks = {"adabn_stats_max_abs_err": err_s, "adabn_features_max_abs_err": err_f,
              "adabn_reference_windows": len(xn)}
    tv_stats = torch_running_stats(backbone, xn_tv)
    tv = {f"adabn.{k}": v for k, v in flat(tv_stats).items()}
    tv["adabn.xn"] = np.ascontiguousarray(xn_tv, np.float32)  # model input, preprocessed
    tv["adabn.features"] = torch_features_with(backbone, tv_stats, xn_tv)
    shipped = _shipped(backbone)
    tv.update({f"adabn.shipped.{k}": v.numpy() for k, v in
               zip(names, [t for pair in zip(*shipped, strict=True) for t in pair], strict=True)})
    tol = {"atol": SELFTEST_FP32_FACTOR * max(scaled_atol(target, v) for k, v in tv.items()
                                              if k.split(".")[1] in names),
           "features_atol": SELFTEST_FP32_FACTOR * scaled_atol(target, tv["adabn.features"])}
    return checks, tol, tv
