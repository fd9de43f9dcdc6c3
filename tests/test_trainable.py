"""``--trainable SPEC``: selection, the cut, the autodiff train step, and parity with torch.

The oracle: 20 train steps of a tail bundle in onnxruntime, run by the device runner's own
code (``edgerun.backends`` + ``edgerun.adapt._step``) on the features its backbone graph
caches, against the same 20 steps of ``torch.optim.SGD`` / ``Adam`` on the whole PyTorch
student (eval mode: BatchNorm statistics frozen).
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
    """Non-overlapping pools (the compare-and-select form, a remainder cell included) and an
    overlapping one (scatter_add), 2-D and 1-D (lowered to 2-D with a unit height)."""
    from edgetl.trainable.decomp import max_pool2d_with_indices_backward

    torch.manual_seed(0)
    aten = torch.ops.aten
    for shape, k, s in [((2, 3, 8, 9), [2, 2], [2, 2]), ((2, 3, 1, 21), [1, 2], [1, 2]),
                        ((2, 4, 7, 7), [3, 3], [2, 2])]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y, idx = aten.max_pool2d_with_indices(x, k, s)
        go = torch.randn_like(y)
        want, = torch.autograd.grad(y, [x], go)
        got = max_pool2d_with_indices_backward(go, x.detach(), k, s, [0, 0], [1, 1], False, idx)
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


def _torch_steps(ck, names, feats_x, targets, weights):
    """``STEPS`` steps of torch.optim on the whole student; losses and final params."""
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
    opt = (torch.optim.SGD(train, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
           if h.optimizer == "sgd" else
           torch.optim.Adam(train, lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps,
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

    ``fused``: through the bundle's fused graph (``adapt._steps``), in three calls.
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
        for a, z in ((0, 8), (8, 9), (9, STEPS)):
            losses += ad._steps(sess, m["train_step"], hp, f[a:z], targets[a:z].numpy(),
                                weights[a:z].numpy(), params, state)
        return losses, params
    for i in range(STEPS):
        losses.append(ad._step(sess, m["train_step"], hp, f[i], targets[i].numpy(),
                               weights[i].numpy(), params, state))
    return losses, params


def _parity(ck, spec, tmp_path):
    bundle = export_tiny(ck, tmp_path / spec.replace(":", "_").replace("*", "x"),
                         trainable=spec)
    m = json.loads((bundle / "manifest.json").read_text())
    names = [p["name"].removeprefix("backbone.") for p in m["trainable"]["params"]]
    g = torch.Generator().manual_seed(3)
    from edgetl.data.synthetic import make_windows

    xs, _ = make_windows(STEPS * 16, window=WINDOW, seed=11)
    x = torch.from_numpy(ck.normalize(xs).astype(np.float32)).reshape(STEPS, 16, WINDOW, 3)
    targets = torch.eye(3)[torch.randint(0, 3, (STEPS, 16), generator=g)]
    weights = torch.rand(STEPS, 16, generator=g) + 0.5
    weights[:, -3:] = 0.0  # padding rows
    want_l, want_p = _torch_steps(ck, names, x, targets, weights)
    assert m["train_step"]["fused"]["file"] == "tail_train_k"
    for fused in (False, True):  # one step per call, then the fused K-step graph
        got_l, got_p = _runner_steps(bundle, x.numpy(), targets, weights, fused)
        err_l = max(abs(a - b) for a, b in zip(got_l, want_l, strict=True))
        err_p = max(float(np.abs(got_p[k] - v).max()) for k, v in want_p.items())
        print(f"parity {spec} {ck.head.optimizer} fused={fused}: loss {err_l:.2e}, "
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


def test_parity_adam(tmp_path):
    ck = tiny_checkpoint(HeadConfig(optimizer="adam", lr=0.01), epochs=2)
    _parity(ck, "bias", tmp_path)


def test_runner_adapts_tail_bundle(tiny_ck, tmp_path):
    bundle = export_tiny(tiny_ck, tmp_path / "b", trainable="bias")
    data = write_device_npz(tmp_path / "dev.npz", 120, 7, **SHIFT)
    p = adapt_json(bundle, data, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["gate"] and rep["steps"] > 0 and rep["steps_fused"] > 0
    with np.load(tmp_path / "out" / "head.npz") as z:
        assert {"backbone.blocks.1.weight", "backbone.blocks.1.bias", "weight"} <= set(z.files)


def test_check_parity_covers_tail(tiny_ck, tmp_path):
    from edgetl.check import parity
    from edgetl.checkpoint import save_checkpoint
    from edgetl.manifest import Manifest

    bundle = export_tiny(tiny_ck, tmp_path / "b", trainable="bias")
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

    def without_conv():
        t = real()
        del t[torch.ops.aten.convolution_backward.default]
        return t

    monkeypatch.setattr(dec, "table", without_conv)
    hp = {k: v.numpy() for k, v in tiny_ck.model.head_state().items()}
    tail = prepare(tiny_ck.model.backbone, head_spec(tiny_ck), "sgd", "all", hp,
                   torch.zeros(2, WINDOW, 3))
    with pytest.raises(BundleError, match="convolution_backward.*smaller SPEC"):
        tail.train.trace(example_args(tail, 4, 3))


def test_tail_refuses_tflite_and_int8(tiny_ck, tmp_path):
    with pytest.raises(ConfigError, match="onnx"):
        export_tiny(tiny_ck, tmp_path / "t", "tflite", trainable="bias")
    with pytest.raises(ConfigError, match="fp32"):
        export_tiny(tiny_ck, tmp_path / "q", "onnx", "int8", trainable="bias")
    assert NetConfig  # imported for the two-block model


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
