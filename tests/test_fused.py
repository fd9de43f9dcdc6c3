"""The fused K-step train graph (``edgetl.export.fused``): parity and the runner's use of it.

The oracle is PyTorch: K steps of ``torch.optim.SGD`` / ``Adam`` on the head's weighted
cross-entropy (autograd), against K calls of the one-step ONNX graph and the same steps in
calls of the fused graph, for every head kind and optimizer edgetl ships. The runner must
give the same head with and without the fused graph (a bundle without it is an older one).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from edgetl.export.fused import KSteps
from edgetl.head import HEAD_KINDS, HPARAMS, HeadSpec, TrainStep, head_forward, init_state
from tests.conftest import SHIFT, adapt_json, export_tiny, refused, run_runner, write_device_npz

#: torch.optim vs the runtime after STEPS steps (loss and every parameter), float32.
TORCH_ATOL = 1e-4
#: The fused graph vs the one-step graph (the same float32 kernels, so ~0).
GRAPH_ATOL = 1e-5
STEPS, N, D, C = 12, 16, 10, 4
HP = {"sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
      "adam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-3}}
SPECS = [HeadSpec("linear", D, C), HeadSpec("mlp", D, C, hidden=8), HeadSpec("cosine", D, C),
         HeadSpec("cosine", D, C, learn_scale=False), HeadSpec("linear", D, C, l2sp=True)]
assert {s.kind for s in SPECS} == set(HEAD_KINDS)


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(STEPS, N, D, generator=g)
    t = torch.eye(C)[torch.randint(0, C, (STEPS, N), generator=g)]
    w = torch.rand(STEPS, N, generator=g) + 0.5
    w[:, -3:] = 0.0  # padding rows
    return f, t, w


def _params(spec, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = {n: 0.3 * torch.randn(s, generator=g) for n, s in spec.param_shapes().items()}
    if spec.kind == "cosine":
        p["scale"] = torch.tensor([5.0])
    return p


def _torch_optim(spec, opt, p0, f, t, w, l2sp=0.0):
    """STEPS steps of torch.optim with autograd gradients: losses, final parameters."""
    leaves = {n: v.clone().requires_grad_(n not in spec.frozen_params) for n, v in p0.items()}
    train = [v for v in leaves.values() if v.requires_grad]
    h = HP[opt]
    o = (torch.optim.SGD(train, lr=h["lr"], momentum=h["momentum"],
                         weight_decay=h["weight_decay"]) if opt == "sgd" else
         torch.optim.Adam(train, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                          weight_decay=h["weight_decay"]))
    losses = []
    for i in range(STEPS):
        o.zero_grad()
        logp = torch.log_softmax(head_forward(spec, f[i], list(leaves.values()))[0], 1)
        loss = -((w[i] / w[i].sum())[:, None] * t[i] * logp).sum()
        if l2sp:
            loss = loss + 0.5 * l2sp * sum(((v - p0[n]) ** 2).sum() for n, v in leaves.items())
        loss.backward()
        o.step()
        losses.append(loss.item())
    return np.asarray(losses), {n: v.detach().numpy() for n, v in leaves.items()}


@pytest.mark.unit
@pytest.mark.parametrize("opt", sorted(HPARAMS))
def test_unrolled_ksteps_equal_k_one_steps(opt):
    spec = HeadSpec("mlp", D, C, hidden=8)
    step, p = TrainStep(spec, opt), _params(spec)
    f, t, w = _batches()
    hp = [torch.tensor(HP[opt][k]) for k in step.hparam_names]
    carry = [*p.values(), *init_state(spec, opt, p).values()]
    got = KSteps(step, 5)(f[:5], t[:5], w[:5], *hp, *carry)
    losses = []
    for i in range(5):
        out = step(f[i], t[i], w[i], *hp, *carry)
        losses.append(out[0])
        carry = list(out[1:])
    assert torch.equal(got[0], torch.stack(losses))
    assert all(torch.equal(a, b) for a, b in zip(got[1:], carry, strict=True))
    with pytest.raises(ValueError, match="k >= 1"):
        KSteps(step, 0)


def _session(path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opt", sorted(HPARAMS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{'-l2sp' if s.l2sp else ''}"
                         f"{'-fixed' if not s.learn_scale else ''}")
def test_fused_graph_matches_one_step_graph_and_torch_optim(spec, opt, tmp_path):
    from edgetl.export.onnx import OnnxExporter

    ex = OnnxExporter()
    sig = ex.export_head(spec, opt, tmp_path, opset=17, batch=N)
    l2sp = 0.05 if spec.l2sp else 0.0
    shared = [*spec.hparam_names(opt), *spec.anchor_names]
    fz = ex.export_fused(tmp_path, sig["train"], sig["files"], shared=shared)
    assert fz["fused"]["steps"] is None and fz["fused"]["inputs"] == sig["train"]["inputs"]
    one = _session(tmp_path / "head_train.onnx")
    fused = _session(tmp_path / fz["files"]["head_train_k"])
    p0 = _params(spec)
    f, t, w = _batches()
    want_l, want_p = _torch_optim(spec, opt, p0, f, t, w, l2sp)
    hp = {k: np.array(HP[opt].get(k, l2sp), np.float32) for k in spec.hparam_names(opt)}
    anchors = {f"anchor.{n}": v.numpy() for n, v in p0.items()} if spec.l2sp else {}
    outs = [o.name for o in one.get_outputs()]

    def run(sess, groups):
        params = {n: v.numpy() for n, v in p0.items()}
        state = {n: v.numpy() for n, v in init_state(spec, opt, p0).items()}
        losses, i = [], 0
        for g in groups:
            sl = slice(i, i + g) if sess is fused else i
            feeds = {"features": f[sl].numpy(), "targets": t[sl].numpy(),
                     "sample_weight": w[sl].numpy(), **hp, **params, **state, **anchors}
            out = dict(zip(outs, sess.run(outs, feeds), strict=True))
            losses += np.reshape(out["loss"], -1).tolist()
            params = {n: out["new." + n] for n in params}
            state = {n: out["new." + n] for n in state}
            i += g
        return np.asarray(losses), params

    one_l, one_p = run(one, [1] * STEPS)
    fz_l, fz_p = run(fused, [5, 1, 6])  # state carried across calls, as the runner does
    assert np.abs(fz_l - one_l).max() <= GRAPH_ATOL
    for n in want_p:
        assert np.abs(fz_p[n] - one_p[n]).max() <= GRAPH_ATOL, n
        assert np.abs(fz_p[n] - want_p[n]).max() <= TORCH_ATOL, n
    assert np.abs(fz_l - want_l).max() <= TORCH_ATOL


def _without_fused(src, dst):
    """A copy of bundle ``src`` as an older export wrote it: no fused (or whole-run) graph."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for block in ("fused", "run"):
        fz = m["train_step"].pop(block, None)  # TFLite bundles have no whole-run graph
        if fz:
            (dst / m["files"].pop(fz["file"])["path"]).unlink()
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def tflite_tail_bundle(tiny_ck, tmp_path_factory):
    """The tiny model's ``--trainable bias`` TFLite bundle (``tail_train_k.tflite``)."""
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfltail") / "bundle", "tflite",
                       trainable="bias")


@pytest.mark.parametrize("which", ["onnx", "tflite", "tflite_tail"])
def test_runner_same_head_with_and_without_fused_graph(which, request, tmp_path):
    """ONNX (a Scan, any steps per call) and TFLite (K unrolled steps; groups of K full
    batches, the rest one step per call), head and ``--trainable bias`` tail bundles."""
    bundle = request.getfixturevalue({"onnx": "tiny_bundle", "tflite": "tiny_tflite_bundle",
                                      "tflite_tail": "tflite_tail_bundle"}[which])
    k = json.loads((bundle / "manifest.json").read_text())["train_step"]["fused"]["steps"]
    assert (k is None) == (which == "onnx")
    old = _without_fused(bundle, tmp_path / "old")
    data = write_device_npz(tmp_path / "dev.npz", 300, 7, **SHIFT)
    reps, heads = {}, {}
    for name, b in (("fused", bundle), ("one", old)):
        p = adapt_json(b, data, tmp_path / name, "--epochs", "6", "--patience", "0")
        assert p.returncode == 0, p.stderr
        reps[name] = json.loads(p.stdout)
        with np.load(tmp_path / name / "head.npz") as z:
            heads[name] = {k: z[k] for k in z.files if not k.startswith("__")}
    assert reps["fused"]["steps"] == reps["one"]["steps"]
    assert reps["fused"]["steps_fused"] > reps["fused"]["steps"] // 2
    if k:  # 225 training windows, batch 16: 14 full batches an epoch, K-step groups of them
        assert reps["fused"]["steps_fused"] == 6 * (14 // k) * k
    assert reps["one"]["steps_fused"] == 0
    for k, v in heads["one"].items():
        assert np.abs(heads["fused"][k] - v).max() <= GRAPH_ATOL, k
    for a, b in zip(reps["fused"]["history"], reps["one"]["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= GRAPH_ATOL
        assert abs(a["val_loss"] - b["val_loss"]) <= GRAPH_ATOL


def _double_loss(path):
    """Rewrite the Scan graph at ``path`` to report twice its loss."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    scan = model.graph.node[0]
    k = list(scan.output).index("loss")
    scan.output[k] = "loss_raw"
    two = helper.make_tensor("two", onnx.TensorProto.FLOAT, [], [2.0])
    model.graph.initializer.append(two)
    model.graph.node.append(helper.make_node("Mul", ["loss_raw", "two"], ["loss"]))
    onnx.save(model, str(path))


def test_selftest_checks_the_fused_graph(bundle):
    from tests.test_runner_errors import edit, rehash

    assert run_runner("selftest", bundle).returncode == 0
    m = json.loads((bundle / "manifest.json").read_text())
    path = bundle / m["files"]["head_train_k"]["path"]
    _double_loss(path)  # a graph that runs but trains wrong
    rehash(bundle, "head_train_k")
    refused(run_runner("selftest", bundle), "self-test failed.*reference train steps")
    edit(bundle, "train_step.fused.file", "nope")
    refused(run_runner("selftest", bundle), r"train_step\.fused\.file")
    edit(bundle, "train_step.fused.file", "head_train_k")
    edit(bundle, "train_step.fused.inputs", m["train_step"]["inputs"][:-1])
    refused(run_runner("selftest", bundle), r"train_step\.fused\.inputs")


@pytest.mark.parametrize("opt", sorted(HPARAMS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{'-l2sp' if s.l2sp else ''}"
                         f"{'-fixed' if not s.learn_scale else ''}")
def test_run_graph_equals_fused_and_infer_calls(spec, opt, tmp_path):
    """The whole-run graph: 3 epochs of 4 steps and their validation logits in one call give
    the fused graph's losses, parameters and state and the infer graph's logits, epoch by
    epoch (the same kernels, so bit for bit on onnxruntime)."""
    from edgetl.export.onnx import OnnxExporter

    ex = OnnxExporter()
    sig = ex.export_head(spec, opt, tmp_path, opset=17, batch=N)
    l2sp = 0.05 if spec.l2sp else 0.0
    fz = ex.export_fused(tmp_path, sig["train"], sig["files"],
                         shared=[*spec.hparam_names(opt), *spec.anchor_names])
    files = {**sig["files"], **fz["files"]}
    rb = ex.export_run(tmp_path, fz["fused"], sig["infer"], files)["run"]
    fused, infer, run = (_session(tmp_path / files.get(r, f"{r}.onnx"))
                         for r in (fz["fused"]["file"], sig["infer"]["file"], rb["file"]))
    p0 = _params(spec)
    f, t, w = _batches()  # 12 steps: 3 epochs of 4
    val = f[0, :7].numpy()
    hp = {k: np.array(HP[opt].get(k, l2sp), np.float32) for k in spec.hparam_names(opt)}
    anchors = {f"anchor.{n}": v.numpy() for n, v in p0.items()} if spec.l2sp else {}
    carry = {**{n: v.numpy() for n, v in p0.items()},
             **{n: v.numpy() for n, v in init_state(spec, opt, p0).items()}}
    stacked = {"features": f.numpy(), "targets": t.numpy(), "sample_weight": w.numpy()}
    names = [o.name for o in run.get_outputs()]
    got = dict(zip(names, run.run(None, {**{k: v.reshape(3, 4, *v.shape[1:])
                                            for k, v in stacked.items()},
                                         **hp, **carry, **anchors, rb["val_input"]: val})))
    assert got["loss"].shape == (3, 4) and got["val_logits"].shape == (3, 7, C)
    for e in range(3):
        out = dict(zip([o.name for o in fused.get_outputs()], fused.run(None, {
            **{k: v[4 * e : 4 * e + 4] for k, v in stacked.items()}, **hp, **carry,
            **anchors})))
        carry = {n: out["new." + n] for n in carry}
        logits = infer.run(["logits"], {"features": val, **{
            n: carry[n] for n in sig["infer"]["inputs"][1:]}})[0]
        assert np.array_equal(got["loss"][e], out["loss"])
        assert np.array_equal(got["val_logits"][e], logits)
        for n, v in carry.items():
            assert np.array_equal(got[rb["epoch_prefix"] + n][e], v), n
    for n, v in carry.items():
        assert np.array_equal(got["new." + n], v), n


def _without_run(src, dst):
    """A copy of bundle ``src`` as the export before the whole-run graph wrote it."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    rb = m["train_step"].pop("run")
    (dst / m["files"].pop(rb["file"])["path"]).unlink()
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("flags", [["--epochs", "6", "--patience", "0"],
                                   ["--epochs", "12", "--patience", "2", "--lr", "2",
                                    "--checkpoint-every", "0", "--batch-size", "7"]],
                         ids=["plain", "early_stop"])
def test_runner_same_run_with_and_without_run_graph(tiny_bundle, tmp_path, flags):
    """The whole-run graph changes how many calls train, not the training: the same steps,
    epochs, early stop and gate decisions as the per-epoch path, heads and history within
    float32 rounding (bit for bit here; other batch sizes can round a sum differently)."""
    old = _without_run(tiny_bundle, tmp_path / "old")
    data = write_device_npz(tmp_path / "dev.npz", 300, 7, **SHIFT)
    reps, heads = {}, {}
    for name, b in (("run", tiny_bundle), ("epoch", old)):
        p = adapt_json(b, data, tmp_path / name, *flags)
        assert p.returncode == 0, p.stderr
        reps[name] = json.loads(p.stdout)
        for f in ("head.npz", "head.rejected.npz"):
            if (tmp_path / name / f).exists():
                with np.load(tmp_path / name / f) as z:
                    heads[name, f] = {k: z[k] for k in z.files if not k.startswith("__")}
    R, E = reps["run"], reps["epoch"]
    for k in ("steps", "steps_fused", "early_stop", "rolled_back", "accuracy_after",
              "epochs_run"):
        assert R[k] == E[k], k
    assert {k: v for k, v in R["gate"].items() if not k.startswith("val_loss")} == {
        k: v for k, v in E["gate"].items() if not k.startswith("val_loss")}
    for a, b in zip(R["history"], E["history"], strict=True):
        assert a["epoch"] == b["epoch"] and a["val_accuracy"] == b["val_accuracy"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["val_loss"] - b["val_loss"]) <= 1e-6
    assert R["steps_fused"] == R["steps"] > 0
    if "--patience" in flags and flags[flags.index("--patience") + 1] != "0":
        assert R["early_stop"], R["history"]
    assert {k[1] for k in heads if k[0] == "run"} == {k[1] for k in heads if k[0] == "epoch"}
    for (name, f), h in heads.items():
        if name == "run":
            for k, v in h.items():
                assert np.abs(v - heads["epoch", f][k]).max() <= 1e-6, (f, k)


def test_selftest_checks_the_run_graph(bundle):
    from tests.test_runner_errors import edit, rehash

    m = json.loads((bundle / "manifest.json").read_text())
    path = bundle / m["files"]["head_train_run"]["path"]
    _double_loss(path)  # a graph that runs but trains wrong
    rehash(bundle, "head_train_run")
    refused(run_runner("selftest", bundle), "self-test failed.*reference train steps")
    edit(bundle, "train_step.run.val_input", "nope")
    refused(run_runner("selftest", bundle), r"train_step\.run\.inputs")
# --- TFLite: a fixed K of unrolled steps (KSteps converted by litert-torch) ---------------

TFL_CASES = [(HeadSpec("linear", D, C), "sgd"), (HeadSpec("cosine", D, C, learn_scale=False),
                                                   "adam"),
             (HeadSpec("mlp", D, C, hidden=8, l2sp=True), "sgd")]


def _litert(path, signature):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1).get_signature_runner(signature)


@pytest.mark.parametrize(("spec", "opt"), TFL_CASES, ids=lambda c: getattr(c, "kind", c))
def test_tflite_fused_graph_matches_one_step_graph_and_torch_optim(spec, opt, tmp_path):
    """``head_train_k.tflite`` (signature ``train_k``): STEPS steps in calls of K and the
    rest one step per call give the one-step graph's losses and parameters, and torch.optim's."""
    from edgetl.export.tflite import FUSED_STEPS, TFLiteExporter, operator_codes

    ex = TFLiteExporter()
    sig = ex.export_head(spec, opt, tmp_path, opset=17, batch=N)
    shared = [*spec.hparam_names(opt), *spec.anchor_names]
    fz = ex.export_fused(tmp_path, sig["train"], sig["files"], shared=shared,
                         trace=sig.pop("trace"))
    k = fz["fused"]["steps"]
    assert fz["files"] == {"head_train_k": "head_train_k.tflite"} and k == FUSED_STEPS > 1
    assert (fz["fused"]["signature"], fz["fused"]["batch_size"]) == ("train_k", N)
    assert fz["fused"]["inputs"] == sig["train"]["inputs"]
    assert all(c is None for _, c in operator_codes(tmp_path / "head_train_k.tflite"))
    one = _litert(tmp_path / "head.tflite", "train")
    fused = _litert(tmp_path / "head_train_k.tflite", "train_k")
    assert list(fused.get_input_details()["features"]["shape"]) == [k, N, D]
    p0 = _params(spec)
    f, t, w = _batches()
    l2sp = 0.05 if spec.l2sp else 0.0
    want_l, want_p = _torch_optim(spec, opt, p0, f, t, w, l2sp)
    hp = {n: np.full(1, HP[opt].get(n, l2sp), np.float32) for n in spec.hparam_names(opt)}
    anchors = {f"anchor.{n}": v.numpy() for n, v in p0.items()} if spec.l2sp else {}

    def run(groups):
        params = {n: v.numpy() for n, v in p0.items()}
        state = {n: v.numpy() for n, v in init_state(spec, opt, p0).items()}
        losses, i = [], 0
        for g in groups:
            sl = slice(i, i + g) if g > 1 else i
            out = (fused if g > 1 else one)(
                features=f[sl].numpy(), targets=t[sl].numpy(), sample_weight=w[sl].numpy(),
                **hp, **params, **state, **anchors)
            losses += np.reshape(out["loss"], -1).tolist()
            params = {n: out["new." + n] for n in params}
            state = {n: out["new." + n] for n in state}
            i += g
        return np.asarray(losses), params

    one_l, one_p = run([1] * STEPS)
    groups = [k] * (STEPS // k - 1) + [1] * (STEPS % k + k)  # the last K one step per call
    fz_l, fz_p = run(groups)
    assert np.abs(fz_l - one_l).max() <= GRAPH_ATOL
    assert np.abs(fz_l - want_l).max() <= TORCH_ATOL
    for n in want_p:
        assert np.abs(fz_p[n] - one_p[n]).max() <= GRAPH_ATOL, n
        assert np.abs(fz_p[n] - want_p[n]).max() <= TORCH_ATOL, n


def test_tflite_export_checks_the_fused_graph_and_ships_none_that_fails(
        tiny_ck, tiny_tflite_bundle, monkeypatch, tmp_path):
    """The export replays its 20 checked steps through the fused graph (``check_fused``); a
    fused graph that fails the check, or does not convert to built-in ops, is left out and the
    manifest says why; the bundle then trains one step per call."""
    from edgetl.errors import BundleError
    from edgetl.export import fused as fused_mod
    from edgetl.export import tflite

    m = json.loads((tiny_tflite_bundle / "manifest.json").read_text())
    ts = m["train_step"]
    assert ts["fused"] == {"file": "head_train_k", "signature": "train_k",
                           "inputs": ts["inputs"], "outputs": ts["outputs"], "batch_size": 16,
                           "steps": tflite.FUSED_STEPS, "loss_output": "loss"}
    assert m["checks"]["fused_train_checked"] and "fused_train_unsupported" not in m["checks"]

    class Wrong(KSteps):  # runs, converts, and reports doubled losses
        def forward(self, *args):
            out = super().forward(*args)
            return (out[0] * 2, *out[1:])

    monkeypatch.setattr(fused_mod, "KSteps", Wrong)
    wrong = export_tiny(tiny_ck, tmp_path / "wrong", "tflite")
    # the same wrong graph slipped into a good bundle: the device self-test replays it
    from edgetl.export.bundle import head_spec
    from tests.test_runner_errors import rehash

    ex, spec = tflite.TFLiteExporter(), head_spec(tiny_ck)
    sig = ex.export_head(spec, tiny_ck.head.optimizer, tmp_path, opset=17, batch=16)
    ex.export_fused(tmp_path, sig["train"], sig["files"], shared=[], trace=sig.pop("trace"))
    monkeypatch.setattr(fused_mod, "KSteps", KSteps)
    slipped = tmp_path / "slipped"
    shutil.copytree(tiny_tflite_bundle, slipped)
    assert run_runner("selftest", slipped).returncode == 0
    shutil.copy(tmp_path / "head_train_k.tflite", slipped / "head_train_k.tflite")
    rehash(slipped, "head_train_k")
    p = run_runner("selftest", slipped)  # (LiteRT logs its XNNPACK line on stderr too)
    assert p.returncode == 1 and re.search("error: self-test failed.*reference train steps",
                                           p.stderr), p.stderr
    builtin = tflite.check_builtin_only

    def flex(path):
        if "train_k" in str(path):
            raise BundleError(f"{path.name} uses non-built-in ops ['CUSTOM:FlexFoo']")
        return builtin(path)

    monkeypatch.setattr(tflite, "check_builtin_only", flex)
    custom = export_tiny(tiny_ck, tmp_path / "custom", "tflite")
    for b, why in ((wrong, r"failed the export check: train_k\[0:\d+\]\.loss"),
                   (custom, r"non-built-in ops \['CUSTOM:FlexFoo'\]")):
        m = json.loads((b / "manifest.json").read_text())
        assert "fused" not in m["train_step"] and "head_train_k" not in m["files"]
        assert not list(b.glob("*_train_k*")) and not m["checks"]["fused_train_checked"]
        assert re.search(why, m["checks"]["fused_train_unsupported"]), m["checks"]
        p = adapt_json(b, write_device_npz(tmp_path / "d.npz", 120, 7, **SHIFT),
                       tmp_path / f"out_{b.name}", "--epochs", "2")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["steps_fused"] == 0


@pytest.mark.parametrize(("field", "value"), [("steps", 1), ("steps", None),
                                              ("batch_size", 8), ("signature", "train")])
def test_runner_refuses_a_fused_tflite_block_that_is_not_its_graph(
        tiny_tflite_bundle, tmp_path, field, value):
    """A manifest whose fused block names another K, batch or signature than the graph's is
    refused at load, naming the field (LiteRT would otherwise resize the unrolled graph's
    inputs, or feed the one-step signature K batches)."""
    from tests.test_runner_errors import edit

    b = tmp_path / "b"
    shutil.copytree(tiny_tflite_bundle, b)
    edit(b, f"train_step.fused.{field}", value)
    p = run_runner("selftest", b)
    want = {"signature": r"has no signature|cannot be loaded"}.get(
        field, r"train_step\.fused\.steps and \.batch_size .* must be the fixed \(steps, "
        r"batch\) of head_train_k\.tflite")
    assert p.returncode == 1 and re.search(want, p.stderr), p.stderr
    assert "Traceback" not in p.stderr
