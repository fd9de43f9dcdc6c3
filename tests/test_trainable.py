"""``--trainable SPEC``: selection, the cut, the autodiff train step, and parity with torch.

The oracle: 20 train steps of a tail bundle in onnxruntime and in LiteRT (``tail.tflite``,
built-in ops only), run by the device runner's own code (``edgerun.backends`` +
``edgerun.adapt._step``) on the features its backbone graph caches, against the same 20 steps
of ``torch.optim.SGD`` / ``Adam`` on the whole PyTorch student (eval mode: BatchNorm
statistics frozen). int8 bundles quantise only the frozen prefix (the backbone graph): the
export's accuracy gate and train-step check, and the runner's ``selftest`` / ``adapt``.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgetl.config import HeadConfig, NetConfig
from edgetl.errors import BundleError, ConfigError
from edgetl.trainable.spec import check_spec, select
from tests.conftest import (
    SHIFT,
    WINDOW,
    adapt_json,
    export_tiny,
    tiny_checkpoint,
    write_device_npz,
)

#: Max abs difference allowed after 20 steps (loss and every parameter), float32.
PARITY_ATOL = 1e-4
STEPS = 20


@pytest.mark.unit
def test_select_specs(tiny_ck):
    bb = tiny_ck.model.backbone
    assert select(bb, "head") == []
    assert select(bb, "bias") == ["blocks.1.weight", "blocks.1.bias"]  # conv has no bias
    assert select(bb, "all") == ["blocks.0.weight", "blocks.1.weight", "blocks.1.bias"]
    assert select(bb, "last:1") == select(bb, "all")  # one conv block
    assert select(bb, "backbone.blocks.1.*") == ["blocks.1.weight", "blocks.1.bias"]
    with pytest.raises(ConfigError, match="blocks.0.weight"):
        select(bb, "nope.*")
    with pytest.raises(ConfigError, match="1 block"):
        select(bb, "last:2")
    for bad in ("last:0", "last:x", "", "a,,b", "foo:1"):
        with pytest.raises(ConfigError):
            check_spec(bad)


@pytest.mark.unit
def test_conv_backward_decomposition_matches_autograd():
    from edgetl.trainable.decomp import convolution_backward

    torch.manual_seed(0)
    aten = torch.ops.aten
    # (nd, N, Cin, Cout, L, k, stride, pad, dilation, groups, bias)
    for nd, n, ci, co, size, k, s, p, d, g, b in [
            (1, 3, 6, 8, 20, 5, 1, 2, 1, 1, True), (1, 2, 4, 6, 17, 3, 2, 1, 1, 1, True),
            (1, 2, 4, 4, 17, 3, 2, 1, 2, 4, False), (2, 2, 16, 16, 9, 3, 2, 1, 1, 16, False),
            (2, 2, 8, 12, 9, 3, 2, 1, 1, 2, True), (2, 2, 8, 8, 11, 3, 2, 0, 2, 1, True)]:
        x = torch.randn(n, ci, *[size] * nd, dtype=torch.float64, requires_grad=True)
        w = torch.randn(co, ci // g, *[k] * nd, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(co, dtype=torch.float64, requires_grad=True) if b else None
        y = aten.convolution(x, w, bias, [s] * nd, [p] * nd, [d] * nd, False, [0] * nd, g)
        go = torch.randn_like(y)
        want = torch.autograd.grad(y, [x, w] + ([bias] if b else []), go)
        got = convolution_backward(go, x.detach(), w.detach(), [co] if b else None, [s] * nd,
                                   [p] * nd, [d] * nd, False, [0] * nd, g, [True, True, b])
        for a, e in zip(got, want, strict=False):
            assert (a - e).abs().max().item() < 1e-10


def test_max_pool_backward_decomposition_matches_autograd():
    """Non-overlapping pools (the argmax-compare-select form, a remainder cell included; ties
    after a ReLU go to the first maximum, as torch's indices say) and an overlapping one
    (scatter_add), 2-D and 1-D (lowered to 2-D with a unit height)."""
    from edgetl.trainable.decomp import max_pool2d_with_indices_backward

    torch.manual_seed(0)
    aten = torch.ops.aten
    for shape, k, s in [((2, 3, 8, 9), [2, 2], [2, 2]), ((2, 3, 1, 21), [1, 2], [1, 2]),
                        ((2, 4, 7, 7), [3, 3], [2, 2]), ((3, 5, 1, 16), [1, 2], [1, 2])]:
        x = torch.randn(*shape, dtype=torch.float64)
        if shape[0] == 3:  # ties: many windows of zeros
            x = x.clamp(min=0)
        x.requires_grad_(True)
        y, idx = aten.max_pool2d_with_indices(x, k, s)
        go = torch.randn_like(y)
        want, = torch.autograd.grad(y, [x], go)
        got = max_pool2d_with_indices_backward(go, x.detach(), k, s, [0, 0], [1, 1], False, idx)
        assert got.shape == x.shape and (got - want).abs().max().item() < 1e-12


@pytest.mark.unit
def test_avg_pool_backward_decomposition_matches_autograd():
    """Padding, ceil mode, count_include_pad off, a divisor override, a 3-D input, and one
    window over the whole input (HF EfficientNet's pooler: a broadcast)."""
    from edgetl.trainable.decomp import avg_pool2d_backward

    torch.manual_seed(0)
    aten = torch.ops.aten
    for shape, k, s, p, ceil, cip, div in [
            ((2, 3, 8, 9), [2, 2], [2, 2], [0, 0], False, True, None),
            ((2, 3, 7, 7), [3, 3], [2, 2], [1, 1], True, True, None),
            ((2, 3, 7, 7), [3, 3], [2, 2], [1, 1], True, False, None),
            ((1, 2, 5, 6), [3, 2], [1, 2], [1, 0], False, False, None),
            ((2, 3, 6, 6), [2, 2], [], [0, 0], False, True, 3),
            ((3, 5, 5), [2, 2], [2, 2], [0, 0], True, True, None),
            ((2, 4, 3, 2), [320, 320], [320, 320], [0, 0], True, True, None)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = aten.avg_pool2d(x, k, s, p, ceil, cip, div)
        go = torch.randn_like(y)
        want, = torch.autograd.grad(y, [x], go)
        got = avg_pool2d_backward(go, x.detach(), k, s, p, ceil, cip, div)
        assert got.shape == x.shape and (got - want).abs().max().item() < 1e-12


def _two_block_checkpoint():
    """Two conv blocks (8 then 8 channels, pool 2 between): ``last:1`` cuts mid-network."""
    import tests.conftest as c

    orig = c.NetConfig
    c.NetConfig = lambda *a: orig((8, 8), (5, 3), (2, 1), 0.0)
    try:
        return tiny_checkpoint(epochs=2)
    finally:
        c.NetConfig = orig


@pytest.fixture(scope="module")
def two_block_ck():
    return _two_block_checkpoint()


def _torch_steps(ck, names, feats_x, targets, weights, backbone_lr_scale=1.0):
    """``STEPS`` steps of torch.optim on the whole student; losses and final params.

    The backbone tensors are their own parameter group, at ``lr * backbone_lr_scale``.
    """
    m = copy.deepcopy(ck.model).eval()
    bp = dict(m.backbone.named_parameters())
    for p in m.parameters():
        p.requires_grad_(False)
    head = m.head_state()  # device names -> tensors sharing storage with the head
    hparams = dict(m.head.named_parameters())
    train = [bp[n] for n in names] + list(hparams.values())
    for p in train:
        p.requires_grad_(True)
    h = ck.head
    groups = [{"params": list(hparams.values())}]
    if names:
        groups.append({"params": [bp[n] for n in names], "lr": h.lr * backbone_lr_scale})
    opt = (torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
           if h.optimizer == "sgd" else
           torch.optim.Adam(groups, lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps,
                            weight_decay=h.weight_decay))
    losses = []
    for i in range(STEPS):
        opt.zero_grad()
        logp = torch.log_softmax(m(feats_x[i]), 1)
        w = weights[i] / weights[i].sum()
        loss = -(w[:, None] * targets[i] * logp).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = {f"backbone.{n}": bp[n].detach().numpy() for n in names}
    final.update({k: v.detach().numpy() for k, v in head.items()})
    return losses, final


def _runner_steps(bundle, x, targets, weights, fused=False):
    """The same steps through the device runner's backend and ``adapt._step``.

    ``fused``: through the bundle's fused graph (``adapt._steps``): three calls of any size
    (ONNX), or calls of the graph's fixed K and the rest one step per call (TFLite).
    """
    from edgerun import adapt as ad
    from edgerun.bundle import Bundle

    from edgetl.export.bundle import device_session

    b = Bundle(str(bundle))
    m = b.manifest
    sess = device_session(bundle, m)
    with np.load(bundle / m["files"]["head_init"]["path"]) as z:
        params = {p["name"]: z[p["name"]].copy() for p in m["head"]["params"]}
    state = ad._zero_state(m, params)
    losses = []
    f = np.stack([sess.features(x[i]) for i in range(STEPS)])  # the runner caches these
    hp = m["optimizer"]["hparams"]
    if fused:
        k = m["train_step"]["fused"]["steps"]
        calls = ((0, 8), (8, 9), (9, STEPS)) if k is None else [
            (a, a + k) for a in range(0, STEPS - k + 1, k)]
        for a, z in calls:
            losses += ad._steps(sess, m["train_step"], hp, f[a:z], targets[a:z].numpy(),
                                weights[a:z].numpy(), params, state)
        for i in range(calls[-1][1], STEPS):
            losses.append(ad._step(sess, m["train_step"], hp, f[i], targets[i].numpy(),
                                   weights[i].numpy(), params, state))
        return losses, params
    for i in range(STEPS):
        losses.append(ad._step(sess, m["train_step"], hp, f[i], targets[i].numpy(),
                               weights[i].numpy(), params, state))
    return losses, params


def _parity_data(ck):
    """``STEPS`` batches of 16 windows, one-hot targets and weights (3 padding rows each)."""
    from edgetl.data.synthetic import make_windows

    g = torch.Generator().manual_seed(3)
    xs, _ = make_windows(STEPS * 16, window=WINDOW, seed=11)
    x = torch.from_numpy(ck.normalize(xs).astype(np.float32)).reshape(STEPS, 16, WINDOW, 3)
    targets = torch.eye(3)[torch.randint(0, 3, (STEPS, 16), generator=g)]
    weights = torch.rand(STEPS, 16, generator=g) + 0.5
    weights[:, -3:] = 0.0  # padding rows
    return x, targets, weights


def _parity(ck, spec, tmp_path, target="onnx", backbone_lr_scale=1.0):
    bundle = export_tiny(ck, tmp_path / spec.replace(":", "_").replace("*", "x"), target,
                         trainable=spec, backbone_lr_scale=backbone_lr_scale)
    m = json.loads((bundle / "manifest.json").read_text())
    names = [p["name"].removeprefix("backbone.") for p in m["trainable"]["params"]]
    x, targets, weights = _parity_data(ck)
    want_l, want_p = _torch_steps(ck, names, x, targets, weights, backbone_lr_scale)
    assert m["train_step"]["fused"]["file"] == "tail_train_k"
    for fused in (False, True):  # one step per call, then the fused K-step graph
        got_l, got_p = _runner_steps(bundle, x.numpy(), targets, weights, fused)
        err_l = max(abs(a - b) for a, b in zip(got_l, want_l, strict=True))
        err_p = max(float(np.abs(got_p[k] - v).max()) for k, v in want_p.items())
        print(f"parity {target} {spec} {ck.head.optimizer} fused={fused}: loss {err_l:.2e}, "
              f"params {err_p:.2e}")
        assert sorted(got_p) == sorted(want_p)
        assert err_l < PARITY_ATOL and err_p < PARITY_ATOL
    return bundle, m


@pytest.mark.parametrize("spec", ["bias", "last:1", "all", "blocks.1.weight"])
def test_parity_tiny(tiny_ck, tmp_path, spec):
    _, m = _parity(tiny_ck, spec, tmp_path)
    assert m["train_step"]["file"] == "tail_train" and "adabn" in m
    assert m["checks"]["train_step_max_abs_err"] < m["checks"]["atol"]


def test_parity_two_blocks_last1(two_block_ck, tmp_path):
    _, m = _parity(two_block_ck, "last:1", tmp_path)
    assert m["trainable"]["cut"]["node"] != "x"  # the first block stays cached
    assert [p["name"] for p in m["trainable"]["params"]] == [
        "backbone.blocks.4.weight", "backbone.blocks.5.weight", "backbone.blocks.5.bias"]


def test_parity_two_blocks_bias_through_a_pool(two_block_ck, tmp_path):
    """``bias`` trains the first block's BN too: its gradient crosses the max pool."""
    _, m = _parity(two_block_ck, "bias", tmp_path)
    assert "backbone.blocks.1.bias" in [p["name"] for p in m["trainable"]["params"]]


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_parity_adam(tmp_path, target):
    ck = tiny_checkpoint(HeadConfig(optimizer="adam", lr=0.01), epochs=2)
    _parity(ck, "bias", tmp_path, target)


@pytest.mark.parametrize("target,optimizer", [("onnx", "sgd"), ("tflite", "adam")])
def test_backbone_tensors_step_at_their_own_lr(tmp_path, target, optimizer):
    """``export.backbone_lr_scale``: torch.optim with the backbone as its own param group."""
    ck = tiny_checkpoint(HeadConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd"
                                    else 0.01), epochs=2)
    _, m = _parity(ck, "all", tmp_path, target, backbone_lr_scale=0.1)
    assert m["optimizer"]["hparams"]["backbone_lr_scale"] == pytest.approx(0.1)
    assert "backbone_lr_scale" in m["train_step"]["hparam_inputs"]
    # the scale is an input, not a constant: a different scale trains differently
    want_l, _ = _torch_steps(ck, [p["name"].removeprefix("backbone.")
                                  for p in m["trainable"]["params"]], *_parity_data(ck))
    got_l, _ = _torch_steps(ck, [p["name"].removeprefix("backbone.")
                                 for p in m["trainable"]["params"]], *_parity_data(ck),
                            backbone_lr_scale=0.1)
    assert max(abs(a - b) for a, b in zip(got_l, want_l, strict=True)) > 10 * PARITY_ATOL


@pytest.mark.parametrize("ck_name,spec", [("tiny_ck", "bias"), ("tiny_ck", "last:1"),
                                          ("two_block_ck", "bias"), ("two_block_ck", "last:1")])
def test_parity_tflite(request, tmp_path, ck_name, spec):
    """The same 20 steps through ``tail.tflite`` (signatures ``train`` / ``infer``)."""
    from edgetl.export import tflite
    from edgetl.export.tflite import check_builtin_only

    bundle, m = _parity(request.getfixturevalue(ck_name), spec, tmp_path, "tflite")
    ts = m["train_step"]
    assert (ts["file"], ts["signature"], ts["hparam_shape"]) == ("tail", "train", [1])
    assert m["infer"]["signature"] == "infer"
    assert (ts["fused"]["signature"], ts["fused"]["steps"], ts["fused"]["batch_size"]) == (
        "train_k", tflite.FUSED_STEPS, 16) and m["checks"]["fused_train_checked"]
    assert m["files"]["tail"]["path"] == "tail.tflite"
    assert m["files"]["tail_train_k"]["path"] == "tail_train_k.tflite"
    check_builtin_only(bundle / "tail.tflite")
    check_builtin_only(bundle / "tail_train_k.tflite")
    assert m["checks"]["train_step_max_abs_err"] < m["checks"]["atol"]


def _adapts(bundle, tmp_path, fused=True):
    data = write_device_npz(tmp_path / "dev.npz", 120, 7, **SHIFT)
    p = adapt_json(bundle, data, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["gate"] and rep["steps"] > 0 and (rep["steps_fused"] > 0) == fused
    with np.load(tmp_path / "out" / "head.npz") as z:
        assert {"backbone.blocks.1.weight", "backbone.blocks.1.bias", "weight"} <= set(z.files)


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_runner_adapts_tail_bundle(tiny_ck, tmp_path, target):
    _adapts(export_tiny(tiny_ck, tmp_path / "b", target, trainable="bias"), tmp_path)


def test_runner_overrides_the_backbone_lr_scale(tiny_ck, tiny_bundle, tmp_path):
    """``--backbone-lr-scale``: fed to the step (a tiny scale leaves the backbone tensors
    where they started, the head still trains); a head-only bundle refuses it, naming why."""
    bundle = export_tiny(tiny_ck, tmp_path / "b", trainable="bias")
    data = write_device_npz(tmp_path / "dev.npz", 120, 7, **SHIFT)
    m = json.loads((bundle / "manifest.json").read_text())
    with np.load(bundle / m["files"]["head_init"]["path"]) as z:
        init = {k: z[k] for k in z.files}
    moved = {}
    for scale in ("1", "1e-9"):
        out = tmp_path / f"out{scale}"
        p = adapt_json(bundle, data, out, "--backbone-lr-scale", scale, "--no-gate")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["hparams"]["backbone_lr_scale"] == float(scale)
        with np.load(out / "head.npz") as z:
            moved[scale] = {k: float(np.abs(z[k] - init[k]).max()) for k in init}
    assert moved["1"]["backbone.blocks.1.bias"] > 1e-4 and moved["1"]["weight"] > 1e-4
    assert moved["1e-9"]["backbone.blocks.1.bias"] < 1e-6 and moved["1e-9"]["weight"] > 1e-4
    p = adapt_json(tiny_bundle, data, tmp_path / "h", "--backbone-lr-scale", "0.5")
    assert p.returncode != 0 and "trains the head only: use --lr" in p.stderr
    p = adapt_json(bundle, data, tmp_path / "z", "--backbone-lr-scale", "0")
    assert p.returncode != 0 and "--backbone-lr-scale" in p.stderr


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_int8_prefix_fp32_tail(tiny_ck, tmp_path, target):
    """int8 backbone graph (the frozen prefix) + fp32 tail graphs: the export's accuracy gate
    and train-step check pass, the runner's selftest and adapt work."""
    from tests.conftest import run_runner

    bundle = export_tiny(tiny_ck, tmp_path / "b", target, "int8", trainable="bias")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["quantization"]["backbone"] == "int8"
    assert m["quantization"]["tail"].startswith("fp32")
    assert m["trainable"]["cut"]["node"] != "x"
    assert m["checks"]["accuracy"]["drop_points"] <= 5.0
    assert m["checks"]["train_step_max_abs_err"] < m["checks"]["atol"]
    p = run_runner("selftest", bundle)
    assert p.returncode == 0 and "self-test passed" in p.stdout + p.stderr, p.stderr
    _adapts(bundle, tmp_path)


def test_int8_needs_a_frozen_prefix(tiny_ck, tmp_path):
    """``all`` trains the first layer: nothing is left to quantise, so int8 is refused."""
    with pytest.raises(ConfigError, match="no frozen prefix"):
        export_tiny(tiny_ck, tmp_path / "q", "onnx", "int8", trainable="all")


def test_l2sp_tail_loss_is_a_scalar_when_hparams_come_as_vectors(tmp_path):
    """An L2-SP head's tail step: the export feeds hyper-parameters as (1,) arrays (as
    runners do); the loss stays () as without L2-SP (was (1,): ShapeMismatchError), and
    every trainable tensor, backbone ones included, has an ``anchor.*`` graph input."""
    import onnx

    ck = tiny_checkpoint(HeadConfig(lr=0.1, l2sp=0.05), epochs=1)
    bundle = export_tiny(ck, tmp_path / "b", trainable="bias")
    m = json.loads((bundle / "manifest.json").read_text())
    ts = m["train_step"]
    params = [*(p["name"] for p in m["trainable"]["params"]), "weight", "bias"]
    assert ts["anchor_inputs"] == {f"anchor.{n}": n for n in params}
    assert ts["hparam_inputs"][-1] == "l2sp"
    g = onnx.load(str(bundle / "tail_train.onnx")).graph
    assert [i.name for i in g.input][-len(params):] == list(ts["anchor_inputs"])
    assert m["checks"]["train_step_max_abs_err"] < m["checks"]["atol"]


@pytest.mark.parametrize("learn_scale", [True, False])
def test_cosine_tail_with_spare_class_rows(tmp_path, learn_scale):
    """A cosine head with spare rows (zero weights, UNUSED_BIAS): the tail graphs keep the
    head's ``COSINE_EPS`` (the exporter's optimizer took ``+ 1e-8`` for ``+ 0``: 0/0 = NaN
    logits), so spare logits sit at UNUSED_BIAS as in torch; a fixed scale passes through
    the train graph under its own names."""
    import onnxruntime as ort

    from edgetl.export.bundle import UNUSED_BIAS

    ck = tiny_checkpoint(HeadConfig(kind="cosine", lr=0.1, learn_scale=learn_scale), epochs=1)
    bundle = export_tiny(ck, tmp_path / "b", trainable="bias", class_capacity=5)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["head"]["capacity"] == 5
    with np.load(bundle / m["files"]["head_init"]["path"]) as z:
        params = {p["name"]: z[p["name"]] for p in m["head"]["params"]}
    assert not params["weight"][3:].any()
    feats = np.random.default_rng(0).standard_normal((4, m["features"]["dim"]), np.float32)
    s = ort.InferenceSession(str(bundle / "tail_infer.onnx"))
    logits = s.run(["logits"], {"features": feats, **params})[0]
    assert np.isfinite(logits).all() and np.allclose(logits[:, 3:], UNUSED_BIAS)
    assert m["checks"]["train_step_max_abs_err"] < m["checks"]["atol"]


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_check_parity_covers_tail(tiny_ck, tmp_path, target):
    from edgetl.check import parity
    from edgetl.checkpoint import save_checkpoint
    from edgetl.manifest import Manifest

    bundle = export_tiny(tiny_ck, tmp_path / "b", target, trainable="blocks.1.*")
    ckp = tmp_path / "ck.pt"
    save_checkpoint(tiny_ck, ckp)
    res = parity(bundle, Manifest.read(bundle), ckp, None)
    assert res.ok, res.detail


@pytest.mark.unit
def test_unlowered_backward_op_fails_naming_it(tiny_ck, monkeypatch):
    import edgetl.trainable.decomp as dec
    from edgetl.export.bundle import head_spec
    from edgetl.export.tail import example_args, prepare

    real = dec.table

    def without_conv(**kw):
        t = real(**kw)
        del t[torch.ops.aten.convolution_backward.default]
        return t

    monkeypatch.setattr(dec, "table", without_conv)
    hp = {k: v.numpy() for k, v in tiny_ck.model.head_state().items()}
    tail = prepare(tiny_ck.model.backbone, head_spec(tiny_ck), "sgd", "all", hp,
                   torch.zeros(2, WINDOW, 3))
    with pytest.raises(BundleError, match="convolution_backward.*smaller SPEC"):
        tail.train.trace(example_args(tail, 4, 3))


def test_tflite_non_builtin_op_fails_naming_it(tiny_ck, tmp_path, monkeypatch):
    """A tail graph that needs a non-built-in (Flex) op fails the export naming it, suggesting
    a smaller SPEC; nothing is silently frozen."""
    import edgetl.export.tflite as tfl

    real = tfl.check_builtin_only

    def flex(path):
        if not str(path).endswith("tail.tflite"):
            return real(path)
        raise BundleError("tail.tflite uses non-built-in ops ['CUSTOM:FlexConv2DBackpropInput']")

    monkeypatch.setattr(tfl, "check_builtin_only", flex)
    with pytest.raises(BundleError, match="FlexConv2DBackpropInput.*smaller SPEC"):
        export_tiny(tiny_ck, tmp_path / "t", "tflite", trainable="bias")
    assert NetConfig  # imported for the two-block model


def test_permute_of_expand_rewrite():
    """litert-torch lowers ``bmm(r, permute(expand(W)))`` as a reshape of W (wrong numbers):
    the rewrite permutes before the expand, same values in torch and in LiteRT."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from edgetl.trainable.decomp import fix_permute_of_expand

    def f(r, w):
        return torch.bmm(r, w.expand(4, 6, 5).permute(0, 2, 1))

    r, w = torch.randn(4, 3, 5), torch.randn(6, 5)
    gm = make_fx(f)(r, w)
    assert fix_permute_of_expand(gm, (r, w)) == 1
    assert torch.allclose(gm(r, w), f(r, w))
    aten = torch.ops.aten
    assert not any(n.target == aten.permute.default and n.args[0].target == aten.expand.default
                   for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("kind,optimizer", [("linear", "sgd"), ("cosine", "adam")])
def test_hand_written_head_equals_its_autodiff_twin(tmp_path, kind, optimizer):
    """Issue 18 item 6: the head's hand-written train graph and the autodiff one traced by
    the --trainable route (an identity tail) take the same steps (tools/head_autodiff.py
    measures their speed)."""
    from tools.head_autodiff import measure

    r = measure(kind, optimizer, dim=12, classes=4, batch=8, steps=5, rounds=1, work=tmp_path)
    assert r["err"] < 1e-5, r


@pytest.mark.unit
def test_eager_loop_trains_the_subset_with_or_without_a_cached_prefix(two_block_ck, tmp_path):
    """``edgetl.baselines torch --trainable SPEC [--cache-prefix]`` (tools/trainable_bench.py):
    the same subset trains, and caching the frozen prefix changes the time, not the result."""
    from edgetl.baselines import torch_eager
    from edgetl.checkpoint import save_checkpoint
    from edgetl.data.synthetic import make_windows

    ck = save_checkpoint(two_block_ck, tmp_path / "ck.pt")
    x, y = make_windows(80, window=WINDOW, seed=3)
    x = ((x - two_block_ck.mean) / two_block_ck.std).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:60], y_train=y[:60], x_eval=x[60:], y_eval=y[60:],
             n_classes=np.int64(3), feature_dim=np.int64(4))
    kw = {"epochs": 2, "batch": 16, "threads": 1, "optimizer": "sgd",
          "hparams": {"lr": 0.1, "momentum": 0.9}}
    head = torch_eager(ck, tmp_path / "d.npz", **kw)
    runs = {c: torch_eager(ck, tmp_path / "d.npz", trainable="last:1", cache_prefix=c, **kw)
            for c in (False, True)}
    n_last = sum(p.numel() for n, p in two_block_ck.model.backbone.named_parameters()
                 if n in select(two_block_ck.model.backbone, "last:1"))
    assert runs[True]["n_trainable"] == runs[False]["n_trainable"] == head["n_trainable"] + n_last
    assert runs[True]["steps"] == runs[False]["steps"] == head["steps"] == 8
    assert runs[True]["accuracy_after"] == runs[False]["accuracy_after"]
    assert runs[True]["prefix_seconds"] > 0 and runs[False]["prefix_seconds"] < 1e-3


@pytest.mark.unit
def test_trainable_bench_pairs_ratios_within_a_round():
    """tools/trainable_bench.py: every ratio pairs the cells of one round."""
    from tools.trainable_bench import markdown, summarise

    def loop(t, rss):
        return {"train_seconds": t, "peak_rss_mb": rss, "steps": 4, "n_trainable": 10}

    rows = {"A": [{"feature_seconds": 0.5, "train_seconds": 0.5, "peak_rss_mb": 50.0,
                   "steps": 4, "n_train": 9}, {"feature_seconds": 1.0, "train_seconds": 1.0,
                                               "peak_rss_mb": 50.0, "steps": 4, "n_train": 9}],
            "B": [loop(4.0, 200.0), loop(4.0, 200.0)], "Bc": [loop(1.0, 100.0), loop(3.0, 100.0)],
            "C": [{"seconds": 0.5}, {"seconds": 1.0}]}
    s = summarise(rows)
    assert s["adapt_vs_inference"] == [2.0, 2.0]
    assert s["B.speedup"] == [4.0, 2.0] and s["Bc.speedup"] == [1.0, 1.5]
    assert s["B.rss_ratio"] == [0.25, 0.25] and s["Bc.rss_ratio"] == [0.5, 0.5]
    res = {"args": {"epochs": 2, "threads": 1, "rounds": 2},
           "specs": {"bias": {**s, "graph": {"file": "tail_train.onnx", "bytes": 2048,
                                             "nodes": 7}}}}
    assert "| `bias` | 10 | tail_train.onnx: 2 KiB, 7 nodes | 2.000 (2.000–2.000)× | " \
           "3.000 (2.000–4.000)× |" in markdown(res)


class _Exact:
    """A "runtime" whose train step is the tail's float64 step (``lr_error``: a wrong graph
    that scales the learning rate)."""

    fused = None

    def __init__(self, tail, lr_error: float = 1.0):
        self.twin, self.names = tail.train.float64(), tail.train.input_names()
        self.lr_error = lr_error

    def train_step(self, feeds):
        args = [torch.from_numpy(np.asarray(feeds[n], np.float64)) for n in self.names]
        args[3] = args[3] * self.lr_error  # the first hyper-parameter: lr
        with torch.no_grad():
            out = self.twin(*args)
        return {n: o.numpy().astype(np.float32)
                for n, o in zip(self.twin.output_names(), out, strict=True)}


def _tiny_tail(ck, spec="all"):
    from edgetl.data.synthetic import make_windows
    from edgetl.export.bundle import head_spec, torch_features
    from edgetl.export.tail import prepare

    x, _ = make_windows(64, window=WINDOW, seed=1)
    xn = ck.normalize(x).astype(np.float32)
    hp = {k: v.detach().numpy() for k, v in ck.model.head_state().items()}
    tail = prepare(ck.model.backbone.eval(), head_spec(ck), "sgd", spec, hp,
                   torch.from_numpy(xn[:2]))
    return tail, torch_features(tail.cut.prefix, xn)


@pytest.mark.unit
def test_tail_train_step_check_judges_against_the_float64_step(tiny_ck):
    """The export's train-step check of a tail compares with the float64 torch step, within
    ``max(atol * max(1, |v|), 4 x torch float32's own distance to it)``: an exact runtime
    passes, a graph with a learning rate 2 % off fails naming the output."""
    from edgetl.errors import ToleranceError
    from edgetl.export.bundle import _check_train_step, head_spec
    from edgetl.tolerances import TRAIN_STEP_NOISE_FACTOR, train_step_bound

    assert train_step_bound(1e-4, np.array([5.0, -0.1])) == pytest.approx(5e-4)
    assert train_step_bound(1e-4, np.array([0.5]), noise=3e-3) == pytest.approx(
        TRAIN_STEP_NOISE_FACTOR * 3e-3)
    assert train_step_bound(1e-4, np.array([0.5]), noise=1e-9) == pytest.approx(1e-4)
    tail, feats = _tiny_tail(tiny_ck)
    spec, hps = head_spec(tiny_ck), {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    err = _check_train_step(_Exact(tail), spec, "sgd", hps, tail.params, 1e-4, 16,
                            ref=tail.train, features=feats)
    assert err < 1e-6  # the float64 step against itself, up to float32 output rounding
    with pytest.raises(ToleranceError, match=r"train_step\[\d+\]\.new\..*vs the float64 step"):
        _check_train_step(_Exact(tail, lr_error=1.02), spec, "sgd", hps, tail.params, 1e-4, 16,
                          ref=tail.train, features=feats)


@pytest.mark.unit
def test_train_step_check_forgives_one_kink_step_not_two():
    """One step of the checked 20 may break an output's bound by up to
    TRAIN_STEP_OUTLIER_FACTOR (a ReLU / max-pool input rounded to the other side of its kink
    reroutes one gradient term at one step); a second such step, or one step further off,
    fails, naming the worst output and what to do."""
    from edgetl.errors import ToleranceError
    from edgetl.export.bundle import _judge_steps
    from edgetl.tolerances import TRAIN_STEP_OUTLIER_FACTOR, TRAIN_STEP_OUTLIER_STEPS

    assert TRAIN_STEP_OUTLIER_STEPS == 1
    want = np.ones(4, np.float32)

    def run(offs):  # step -> how far the runtime is off at that step (else exact)
        return _judge_steps([(i, f"train_step[{i}].w", want + offs.get(i, 0.0), want, 1e-4)
                             for i in range(20)])

    assert run({}) == 0.0
    assert run({14: 3e-4}) == pytest.approx(3e-4, rel=1e-3)  # one kink step, 3 x its bound: kept
    with pytest.raises(ToleranceError, match=r"train_step\[7\].*step\(s\) 3, 7.*--trainable head"):
        run({3: 2e-4, 7: 3e-4})
    with pytest.raises(ToleranceError, match=r"train_step\[14\]"):
        run({14: 1.1e-4 * TRAIN_STEP_OUTLIER_FACTOR})
    with pytest.raises(ToleranceError):  # NaN is never within a bound
        run({5: float("nan")})


@pytest.mark.unit
def test_train_step_check_draws_real_features_and_names_a_diverging_reference(tiny_ck):
    """Check batches are rows of the reference features (the tail's own input scale); a torch
    reference that diverges on them is reported as such, not as a graph error."""
    from edgetl.errors import DataError
    from edgetl.export.bundle import _check_features, _check_train_step, head_spec

    tail, feats = _tiny_tail(tiny_ck)
    g = torch.Generator().manual_seed(0)
    f = _check_features(16, feats.shape[1], g, feats).numpy()
    assert all((feats == row).all(1).any() for row in f)  # every row is a reference row
    assert _check_features(4, 7, g, None).shape == (4, 7)  # the head's N(0, 1) default
    with pytest.raises(DataError, match=r"PyTorch reference itself diverged at step \d+ .* "
                                        r"64 reference inputs"):
        _check_train_step(_Exact(tail), head_spec(tiny_ck), "sgd",
                          {"lr": 1e6, "momentum": 0.9, "weight_decay": 0.0}, tail.params, 1e-4,
                          16, ref=tail.train, features=feats * 1e3)


@pytest.mark.unit
def test_a_user_models_backbone_traces_for_the_cut():
    """``export_model``'s backbone (the model with its head swapped for a probe) becomes an fx
    graph ending at the head's input, with the parameter names the SPEC selects from; an
    ``nn.LSTM`` stays one node (fx's torch.nn leaves), token ids are cast to int64."""
    from torch import nn

    from edgetl.export.model import as_edge_model
    from edgetl.trainable.cut import split, trace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 3))

        def forward(self, ids):
            h, _ = self.rnn(self.embed(ids))
            return self.out(self.norm(h[:, -1]))

    torch.manual_seed(0)
    edge, _, _ = as_edge_model(Net().eval(), head="out", labels=["a", "b", "c"])
    x = torch.randint(1, 20, (4, 6), dtype=torch.int32)
    gm = trace(edge.backbone, x)
    assert torch.equal(gm(x), edge.backbone(x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "model.embed", "model.rnn", "model.norm", "model.out.pre"]
    names = select(edge.backbone, "bias")
    assert names == ["model.rnn.bias_ih_l0", "model.rnn.bias_hh_l0", "model.norm.weight",
                     "model.norm.bias"]
    cut = split(edge.backbone, names, x)
    assert cut.node == "model_embed" and cut.shape == (6, 8) and cut.parts == ()
    # ``all`` trains the embedding table: the cut caches the ids (int64, cast back in the tail)
    cut = split(edge.backbone, select(edge.backbone, "all"), x)
    assert (cut.node, cut.shape) == ("long", (6,))
    assert [(p.node, p.shape, p.dtype) for p in cut.parts] == [("long", (6,), torch.int64)]
    with torch.no_grad():
        f = cut.prefix(x)
        assert f.dtype == torch.float32 and torch.equal(f, x.double().float())
        assert torch.equal(cut.tail(f), edge.backbone(x))


def _masked_tokens():
    from edgetl.export.model import as_edge_model
    from tests.user_models import nets

    edge, _, _ = as_edge_model(nets.masked_tokens().eval(), head="head", labels=["a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    return edge.backbone, torch.randint(0, nets.VOCAB, (7, nets.LENGTH), generator=g), nets


@pytest.mark.unit
def test_a_cut_caches_several_tensors_when_the_single_one_would_be_the_ids():
    """``bias`` of a token model whose trained layers also read the padding mask (``ids !=
    0``): no single float tensor crosses the cut, so the cut caches the mask and the token
    embeddings side by side as float32 columns; the position embeddings (no input in them)
    are recomputed in the tail, not cached. Prefix then tail is the backbone, exactly, at
    another batch size than the sample's."""
    from edgetl.trainable.cut import Part, split

    backbone, x, nets = _masked_tokens()
    n, dim = nets.LENGTH, 16
    cut = split(backbone, select(backbone, "bias"), x[:2])
    assert cut.parts == (Part("ne", (n,), torch.bool), Part("model_embed", (n, dim),
                                                            torch.float32))
    assert cut.node == "ne + model_embed" and cut.shape == (n + n * dim,) == (cut.dim,)
    assert [p.block() for p in cut.parts] == [
        {"node": "ne", "shape": [n], "dtype": "bool"},
        {"node": "model_embed", "shape": [n, dim], "dtype": "float32"}]
    assert "model_pos" in cut.tail.code and "model_pos" not in cut.prefix.code
    with torch.no_grad():
        f = cut.prefix(x)
        assert f.shape == (len(x), cut.dim) and f.dtype == torch.float32
        assert torch.equal(f[:, :n], (x != 0).float())  # the mask's columns, then the rest
        assert torch.equal(f[:, n:], backbone.model.embed(x).flatten(1))
        assert torch.equal(cut.tail(f), backbone(x))
    # last:1 (the Linear after the norm): the mask and the normed sum, still two tensors
    cut = split(backbone, select(backbone, "last:1"), x[:2])
    assert [p.node for p in cut.parts] == ["ne", "add"]
    with torch.no_grad():
        assert torch.equal(cut.tail(cut.prefix(x)), backbone(x))


@pytest.mark.unit
def test_single_tensor_cuts_of_float_models_are_unchanged(tiny_ck, two_block_ck):
    """A float tensor that alone crosses the cut is cached as it was (no parts, no casts)."""
    from edgetl.data.synthetic import make_windows
    from edgetl.trainable.cut import split

    x, _ = make_windows(4, window=WINDOW, seed=1)
    want = {("tiny", "bias"): ("blocks_0", (8, 32)), ("tiny", "last:1"): ("transpose", (3, 32)),
            ("tiny", "all"): ("transpose", (3, 32)), ("two", "bias"): ("blocks_0", (8, 32)),
            ("two", "last:1"): ("blocks_3", (8, 16)), ("two", "all"): ("transpose", (3, 32))}
    for (name, spec), (node, shape) in want.items():
        ck = tiny_ck if name == "tiny" else two_block_ck
        xn = torch.from_numpy(ck.normalize(x).astype(np.float32))
        bb = ck.model.backbone.eval()
        cut = split(bb, select(bb, spec), xn[:2])
        assert (cut.node, cut.shape, cut.parts) == (node, shape, ()), (name, spec)
        assert ".to(" not in cut.prefix.code and ".to(" not in cut.tail.code
        with torch.no_grad():
            assert torch.equal(cut.tail(cut.prefix(xn)), bb(xn))


@pytest.mark.unit
def test_an_integer_part_float32_would_round_is_refused():
    """Integer parts are exact as float32 columns below 2**24: larger sample values (or an
    embedding table with more rows) are refused, not rounded on the device."""
    from torch import nn

    from edgetl.trainable.cut import EXACT_INT, split

    class Net(nn.Module):  # the ids cross the cut beside a float tensor
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, ids):
            return self.fc(ids.float() * 1e-7) + (ids % 3).float()

    net = Net().eval()
    ok = torch.tensor([[1, 2, 3, EXACT_INT - 1]] * 2)
    cut = split(net, ["fc.weight", "fc.bias"], ok)
    assert [(p.node, p.dtype) for p in cut.parts] == [("x", torch.int64), ("mul", torch.float32)]
    with torch.no_grad():
        assert torch.equal(cut.tail(cut.prefix(ok)), net(ok))
    with pytest.raises(ConfigError, match=r"integer tensor x .*exact only below 2\*\*24, but it "
                                          r"reaches 16777216"):
        split(net, ["fc.weight", "fc.bias"], ok + 1)


@pytest.mark.unit
def test_embedding_backward_as_a_one_hot_matmul_matches_autograd():
    """LiteRT's train step takes the embedding gradient as a one-hot matmul (no scatter):
    repeated ids summed, the padding row zero, ``scale_grad_by_freq`` per id count."""
    from edgetl.trainable.decomp import embedding_dense_backward

    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 2, 0], [3, 2, 0, 0]])
    for pad, freq in [(-1, False), (0, False), (0, True), (2, True)]:
        w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.embedding(ids, w, padding_idx=None if pad < 0 else pad,
                                          scale_grad_by_freq=freq)
        go = torch.randn_like(y)
        (want,) = torch.autograd.grad(y, [w], go)
        got = embedding_dense_backward(go, ids, 5, pad, freq)
        assert (got - want).abs().max().item() < 1e-12, (pad, freq)
    # a vocabulary whose one-hot would not fit a device step: refused before it is built
    from edgetl.errors import BundleError
    from edgetl.trainable.decomp import ONE_HOT_MAX_BYTES

    big = ONE_HOT_MAX_BYTES // (ids.numel() * 4) + 1
    with pytest.raises(BundleError, match=r"embedding table of \d+ rows .*--target onnx"):
        embedding_dense_backward(torch.zeros(2, 4, 3), ids, big, -1, False)
    assert embedding_dense_backward(torch.zeros(2, 4, 3), ids, big - 1, -1, False).shape == (
        big - 1, 3)


@pytest.mark.unit
@pytest.mark.parametrize("shapes", [True, False])
def test_an_inner_value_named_like_a_graph_output_is_renamed(tmp_path, shapes):
    """The dynamo exporter can name an inner value (``aten.embedding``) like the infer graph's
    ``embedding`` output: not SSA. The inner one and its readers are renamed; same values."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from edgetl.export.tail import _unclash

    f = helper.make_tensor_value_info
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["embedding"]),  # inner, same name as the output
         helper.make_node("Neg", ["embedding"], ["logits"]),
         helper.make_node("Abs", ["logits"], ["embedding"])], "g",
        [f("x", TensorProto.FLOAT, [2])],
        [f("logits", TensorProto.FLOAT, [2]), f("embedding", TensorProto.FLOAT, [2])],
        value_info=[f("embedding", TensorProto.FLOAT, [2])] if shapes else [])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(onnx.checker.ValidationError, match="SSA"):
        onnx.checker.check_model(str(path))
    _unclash(path)
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path))
    assert [list(n.output) for n in m.graph.node] == [["embedding__inner0"], ["logits"],
                                                      ["embedding"]]
    assert list(m.graph.node[1].input) == ["embedding__inner0"] and not m.graph.value_info
    x = np.array([-1.0, 2.0], np.float32)
    logits, emb = ReferenceEvaluator(m).run(None, {"x": x})
    assert np.array_equal(logits, [0.0, -2.0]) and np.array_equal(emb, [0.0, 2.0])


@pytest.mark.unit
def test_an_unlowered_op_is_named_from_the_exporters_cause_chain():
    """The dynamo exporter's top error is generic; the op sits in a cause."""
    from edgetl.export.tail import failing_ops

    try:
        try:
            raise KeyError("No ONNX function found for <OpOverload(op='aten.mkldnn_rnn_layer', "
                           "overload='default')>")
        except KeyError as k:
            raise RuntimeError("Failed to convert the exported program to an ONNX model") from k
    except RuntimeError as e:
        assert failing_ops(e).startswith("no lowering for aten.mkldnn_rnn_layer")
    assert failing_ops(ValueError("bad\nthing")) == "ValueError: bad thing"


@pytest.mark.unit
def test_a_parameter_the_forward_never_reads_is_named_not_trained():
    """``all`` leaves out (and names, in the manifest block) a parameter no gradient reaches
    (wav2vec2's training-only ``masked_spec_embed``); a glob naming only it is refused."""
    from torch import nn

    from edgetl.export.bundle import head_spec
    from edgetl.export.model import as_edge_model
    from edgetl.export.tail import prepare

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3)
            self.mask_embed = nn.Parameter(torch.zeros(4))  # used in training only
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean(-1))

    torch.manual_seed(0)
    edge, _, _ = as_edge_model(Net().eval(), head="fc", labels=["a", "b", "c"])
    ck = type("Ck", (), {"model": edge, "head": HeadConfig(), "labels": ("a", "b", "c")})
    hp = {k: v.detach().numpy() for k, v in edge.head_state().items()}
    x = torch.randn(2, 3, 8)
    tail = prepare(edge.backbone, head_spec(ck), "sgd", "all", hp, x)
    assert tail.backbone_params == ["model.conv.weight", "model.conv.bias"]
    assert tail.block()["unread"] == ["backbone.model.mask_embed"]
    with pytest.raises(ConfigError, match="never read"):
        prepare(edge.backbone, head_spec(ck), "sgd", "model.mask_embed", hp, x)
