"""Transfer methods: each beats source-only on a synthetic sensor shift; the device-side
additions (cosine head, head L2-SP, class-balanced weights) match torch autograd and run in
the device runner on both runtimes."""

import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from edgetl.config import (
    TRANSFER_METHODS,
    ConfigError,
    HeadConfig,
    NetConfig,
    TrainConfig,
    TransferConfig,
    load_recipe,
)
from edgetl.data.synthetic import make_windows
from edgetl.head import HeadSpec, TrainStep, head_forward, init_state
from edgetl.kinds.timeseries import augment
from edgetl.methods import get_method, methods
from edgetl.methods.common import TransferData
from edgetl.methods.compare import kd_gap_recovered, markdown, transfer, write_report
from edgetl.nets import build_model
from edgetl.train import Split, accuracy, train_classifier

from .conftest import (
    RUNNER,
    SHIFT,
    WINDOW,
    export_tiny,
    run_runner,
    tiny_checkpoint,
    write_device_npz,
)

sys.path.insert(0, str(RUNNER.parent))
from edgerun.adapt import class_balanced_weights  # noqa: E402

# ----------------------------------------------------------------- server methods, synthetic


@pytest.fixture(scope="module")
def shift():
    """A well-trained tiny source model on clean windows; target windows with conftest's
    per-channel gain/offset SHIFT (a two-layer net shrugs it off: nothing to beat there).

    The source model is trained to convergence (0.99 on held-out source windows), so a method
    cannot win by merely training the source model longer.
    """
    xs, ys = make_windows(600, window=WINDOW, seed=0)
    mean, std = xs.reshape(-1, 3).mean(0), xs.reshape(-1, 3).std(0)

    def norm(x):
        return ((x - mean) / std).astype(np.float32)

    xl, yl = make_windows(60, window=WINDOW, seed=11, **SHIFT)     # few labelled target
    xu, _ = make_windows(400, window=WINDOW, seed=12, **SHIFT)     # unlabelled target
    xe, ye = make_windows(400, window=WINDOW, seed=13, **SHIFT)    # scored target
    xv, yv = make_windows(300, window=WINDOW, seed=14)              # source, held out
    torch.manual_seed(0)
    model = build_model(3, 3, NetConfig((8,), (5,), (1,), 0.0), HeadConfig())
    train_classifier(model, Split(norm(xs), ys), None,
                     TrainConfig(epochs=20, batch_size=32, lr=0.01), show=False,
                     augment=augment)
    src = Split(norm(xs), ys)
    return {"model": model, "source": src, "labelled": Split(norm(xl), yl),
            "unlabelled": norm(xu), "eval": Split(norm(xe), ye), "source_val": Split(norm(xv), yv)}


CFG = TransferConfig(epochs=20, uda_steps=150, batch_size=32, lr=3e-3, ewc_samples=64)


def _fit(name, shift, cfg=CFG):
    kind = get_method(name).kind
    data = TransferData(source=shift["source"],
                        target=shift["labelled"] if kind == "supervised" else None,
                        unlabeled=shift["unlabelled"] if kind == "unsupervised" else None,
                        source_model=shift["model"])
    return transfer(name, shift["model"], data, cfg)


@pytest.mark.unit
def test_registry_covers_every_recipe_method_and_unknown_names_list_known_ones():
    assert tuple(methods()) == TRANSFER_METHODS
    with pytest.raises(ConfigError, match="known: .*'coral'"):
        get_method("tent")
    with pytest.raises(ConfigError, match="unknown; known"):
        TransferConfig(methods=("finetune", "nope"))


@pytest.mark.unit
def test_the_shift_hurts_the_source_model(shift):
    """Otherwise 'beats source-only' below would mean nothing."""
    src = accuracy(shift["model"], shift["source_val"])
    tgt = accuracy(shift["model"], shift["eval"])
    assert src > 0.95 and tgt < src - 0.15, (src, tgt)


CORAL_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "CORAL matches feature covariances, not means: on this gain/offset shift it stays at the "
    "source-only accuracy (0.367); on a channel-rotation shift it equalled its no-alignment "
    "control (0.925 both, source-only 0.900). No synthetic shift where its alignment helps "
    "was found; strict, so a fix that makes it pass shows up"))


# source_steps is not a method but the control of the alignment methods (tested below).
@pytest.mark.unit
@pytest.mark.parametrize("name", [pytest.param(m, marks=CORAL_XFAIL) if m == "coral" else m
                                  for m in TRANSFER_METHODS
                                  if m not in ("source_only", "source_steps")])
def test_each_method_beats_source_only_on_a_sensor_shift(name, shift):
    base = accuracy(_fit("source_only", shift), shift["eval"])
    acc = accuracy(_fit(name, shift), shift["eval"])
    assert acc >= base + 0.05, f"{name}: {acc:.3f} vs source-only {base:.3f}"
    before = {k: v.clone() for k, v in shift["model"].state_dict().items()}
    _fit(name, shift)
    for k, v in shift["model"].state_dict().items():  # the source model is never modified
        assert torch.equal(v, before[k]), k


@pytest.mark.unit
@pytest.mark.parametrize("name", ["dann", "mmd"])
def test_alignment_beats_its_own_loop_without_alignment(name, shift):
    """The gain of DANN/MMD is their alignment loss, not the extra source steps they take."""
    control = accuracy(_fit("source_steps", shift), shift["eval"])
    assert accuracy(_fit(name, shift), shift["eval"]) >= control + 0.05, control


def _distance(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return float(sum(((pa[n] - pb[n]).detach() ** 2).sum() for n in pa).sqrt())


@pytest.mark.unit
def test_l2sp_and_ewc_stay_closer_to_the_source_than_fine_tuning(shift):
    strong = dataclasses.replace(CFG, l2sp_alpha=10.0, ewc_lambda=1e4)
    d_ft = _distance(_fit("finetune", shift), shift["model"])
    assert _distance(_fit("l2sp", shift, strong), shift["model"]) < 0.5 * d_ft
    assert _distance(_fit("ewc", shift, strong), shift["model"]) < 0.8 * d_ft


@pytest.mark.unit
def test_method_without_its_data_says_what_it_needs(shift):
    with pytest.raises(ValueError, match="needs target"):
        transfer("l2sp", shift["model"], TransferData(source=shift["source"]), CFG)
    with pytest.raises(ValueError, match="needs unlabeled"):
        transfer("dann", shift["model"], TransferData(source=shift["source"]), CFG)


@pytest.mark.unit
def test_alignment_losses_and_gradient_reversal():
    from edgetl.methods.coral import coral_loss
    from edgetl.methods.dann import grad_reverse
    from edgetl.methods.mmd import mk_mmd

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    far = 3.0 * torch.randn(64, 8, generator=g) + 2.0
    assert float(mk_mmd(a, b)) < 0.2 * float(mk_mmd(a, far))
    assert float(coral_loss(a, a)) == 0.0 and float(coral_loss(a, far)) > float(coral_loss(a, b))
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))


@pytest.mark.unit
def test_kd_gap_recovered():
    assert kd_gap_recovered(0.9, 0.8, 0.85) == pytest.approx(0.5)
    assert kd_gap_recovered(0.9, 0.8, 0.75) == pytest.approx(-0.5)
    assert kd_gap_recovered(0.8, 0.8, 0.9) is None


@pytest.mark.unit
def test_report_is_written(tmp_path):
    row = {"method": "source_only", "title": "source only", "kind": "none", "n": 2,
           "target_mean": 0.5, "target_std": 0.1, "source_mean": 0.9, "source_std": 0.0,
           "seconds_mean": 0.0, "runs": []}
    res = [{"scenario": "har", "recipe": "t", "description": "d", "over": "users",
            "source_seconds": 1.0, "rows": [row], "wall_seconds": 2.0, "torch_threads": 1,
            "kd": {"teacher": 0.9, "scratch": 0.8, "kd": 0.85, "gap_recovered": 0.5,
                   "evaluated_on": "x"}}]
    j, m = write_report(res, tmp_path)
    assert json.loads(j.read_text())["scenarios"][0]["rows"][0]["target_mean"] == 0.5
    assert "| source only | — | 0.500 ± 0.100 |" in m.read_text() and "**0.50**" in markdown(res)


@pytest.mark.unit
def test_recipe_transfer_section(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[transfer]\nmethods = ["l2sp"]\nl2sp_alpha = 0.5\n')
    r = load_recipe(p)
    assert r.transfer.methods == ("l2sp",) and r.transfer.l2sp_alpha == 0.5
    p.write_text('[transfer]\nalpha = 0.5\n')
    with pytest.raises(ConfigError, match="known keys"):
        load_recipe(p)
    for name in ("har", "vision"):
        assert load_recipe(f"models/{name}/recipe.toml").transfer.methods


# -------------------------------------------------------- device side: parity with autograd

def _params(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {n: 0.5 * torch.randn(s, generator=g, dtype=torch.float64)
         for n, s in spec.param_shapes().items()}
    if "scale" in p:
        p["scale"] = torch.tensor([7.0], dtype=torch.float64)
    return p


def _batch(spec, seed, b=7, pad=2):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, spec.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (b,), generator=g)
    w = torch.rand(b, generator=g, dtype=torch.float64) + 0.5  # instance weights
    w[b - pad :] = 0.0
    return f, y, torch.nn.functional.one_hot(y, spec.num_classes).double(), w


SPECS = [HeadSpec("linear", 5, 3, l2sp=True), HeadSpec("mlp", 5, 3, hidden=4, l2sp=True),
         HeadSpec("cosine", 5, 3), HeadSpec("cosine", 5, 3, learn_scale=False),
         HeadSpec("cosine", 5, 3, learn_scale=False, l2sp=True)]


@pytest.mark.unit
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-l2sp{s.l2sp}-ls{s.learn_scale}")
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_train_step_matches_autograd_and_torch_optim(spec, opt):
    """Cosine head (learned or fixed scale) and head L2-SP vs autograd + torch.optim."""
    coef = 0.3
    hp = ({"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3} if opt == "sgd" else
          {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-3})
    if spec.l2sp:
        hp["l2sp"] = coef
    p0 = _params(spec)
    anchor = {n: v + 0.2 for n, v in p0.items()}  # not the start point: the pull shows
    leaves = {n: v.clone().requires_grad_(n not in spec.frozen_params) for n, v in p0.items()}
    opt_params = [v for v in leaves.values() if v.requires_grad]
    if opt == "sgd":
        ref = torch.optim.SGD(opt_params, lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
    else:
        ref = torch.optim.Adam(opt_params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                               eps=hp["eps"], weight_decay=hp["weight_decay"])
    step = TrainStep(spec, opt)
    assert step.input_names()[-len(spec.anchor_names) or len(step.input_names()):] == list(
        spec.anchor_names)
    params = list(p0.values())
    state = [v.double() for v in init_state(spec, opt, p0).values()]
    hps = [torch.tensor(hp[k], dtype=torch.float64) for k in spec.hparam_names(opt)]
    anchors = list(anchor.values()) if spec.l2sp else []
    for i in range(15):
        f, y, t, w = _batch(spec, 100 + i)
        ref.zero_grad()
        logits, _ = head_forward(spec, f, list(leaves.values()))
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        loss = (w * ce).sum() / w.sum()
        if spec.l2sp:
            loss = loss + 0.5 * coef * sum(((leaves[n] - anchor[n]) ** 2).sum() for n in leaves)
        loss.backward()
        ref.step()
        out = step(f, t, w, *hps, *params, *state, *anchors)
        assert torch.allclose(out[0], loss.detach(), atol=1e-10)
        params = list(out[1 : 1 + len(params)])
        state = list(out[1 + len(params) :])
    for name, a, b in zip(p0, params, leaves.values(), strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-9), name
    if spec.kind == "cosine":
        moved = not torch.equal(params[2], p0["scale"])
        assert moved == spec.learn_scale


@pytest.mark.unit
def test_cosine_logits_are_bounded_by_the_scale():
    spec = HeadSpec("cosine", 6, 4)
    p = _params(spec)
    f = 100 * torch.randn(9, 6, dtype=torch.float64)
    logits, emb = head_forward(spec, f, [p["weight"], torch.zeros(4, dtype=torch.float64),
                                         p["scale"]])
    assert float(logits.abs().max()) <= 7.0 + 1e-9
    assert torch.allclose(emb.norm(dim=1), torch.ones(9, dtype=torch.float64))


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=pytest.mark.unit), "tflite"])
@pytest.mark.parametrize("spec", [HeadSpec("cosine", 8, 4, learn_scale=False, l2sp=True),
                                  HeadSpec("linear", 8, 4, l2sp=True)],
                         ids=["cosine-fixed-l2sp", "linear-l2sp"])
def test_exported_l2sp_train_step_matches_torch(target, spec, tmp_path):
    """Anchor inputs and the l2sp hyper-parameter survive both exporters (20 padded steps)."""
    from edgetl.export.bundle import _check_train_step

    from .test_export import _head_session

    sess = _head_session(target, spec, "sgd", tmp_path, batch=6)
    g = torch.Generator().manual_seed(3)
    params = {n: 0.3 * torch.randn(s, generator=g).numpy() for n, s in spec.param_shapes().items()}
    hp = {**HeadConfig(kind=spec.kind, lr=0.05).hparams(), "l2sp": 0.5}
    assert _check_train_step(sess, spec, "sgd", hp, params, atol=1e-5, batch=6, steps=20) < 1e-5


# ------------------------------------------------------------------------ device side: runner

@pytest.mark.unit
def test_class_balanced_weights():
    y = np.array([0] * 8 + [1] * 2 + [2] * 2)
    w = class_balanced_weights(y)
    assert w.mean() == pytest.approx(1.0)
    totals = [w[y == c].sum() for c in range(3)]
    assert totals == pytest.approx([4.0, 4.0, 4.0])


@pytest.fixture(scope="module")
def cosine_ck():
    return tiny_checkpoint(HeadConfig(kind="cosine", lr=0.05, scale=10.0, l2sp=0.1), epochs=6)


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_cosine_head_exports_and_adapts_on_a_shift(cosine_ck, target, tmp_path):
    """Cosine head with L2-SP: exported, self-tested, adapted by the runner, accuracy up."""
    bundle = export_tiny(cosine_ck, tmp_path / "b", target, class_capacity=4)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["head"]["kind"] == "cosine" and [p["name"] for p in m["head"]["params"]] == [
        "weight", "bias", "scale"]
    assert m["train_step"]["anchor_inputs"] == {"anchor.weight": "weight",
                                                "anchor.bias": "bias", "anchor.scale": "scale"}
    assert m["optimizer"]["hparams"]["l2sp"] == 0.1
    train = write_device_npz(tmp_path / "a.npz", 240, seed=5, **SHIFT)
    test = write_device_npz(tmp_path / "e.npz", 200, seed=6, **SHIFT)
    p = run_runner("adapt", bundle, "--data", train, "--out", tmp_path / "s", "--epochs", "40",
                   "--class-balanced", "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["class_balanced"] and rep["head_kind"] == "cosine" and not rep["rolled_back"]
    general = json.loads(run_runner("infer", bundle, "--data", test, "--json", "--quiet",
                                    check=True).stdout)["accuracy"]
    personal = json.loads(run_runner("infer", bundle, "--data", test, "--head",
                                     tmp_path / "s" / "head.npz", "--json", "--quiet",
                                     check=True).stdout)["accuracy"]
    assert personal > general, (general, personal)


def test_l2sp_keeps_the_device_head_near_its_shipped_weights(cosine_ck, tmp_path):
    bundle = export_tiny(cosine_ck, tmp_path / "b")
    train = write_device_npz(tmp_path / "a.npz", 240, seed=5, **SHIFT)
    with np.load(bundle / "head_init.npz") as z:
        w0 = z["weight"]
    dist = {}
    for coef in ("0", "50"):
        out = tmp_path / f"s{coef}"
        run_runner("adapt", bundle, "--data", train, "--out", out, "--epochs", "30", "--l2sp",
                   coef, "--json", "--quiet", check=True)
        with np.load(out / "head.npz") as z:
            dist[coef] = float(np.linalg.norm(z["weight"] - w0))
    assert dist["50"] < 0.5 * dist["0"], dist
    plain = export_tiny(tiny_checkpoint(), tmp_path / "plain")
    p = run_runner("adapt", plain, "--data", train, "--out", tmp_path / "x", "--l2sp", "1")
    assert p.returncode == 1 and "head.l2sp" in p.stderr


def test_cosine_imprinting_uses_normalised_prototypes(cosine_ck, tmp_path):
    """A new label on a cosine head: its row is the normalised mean of unit embeddings."""
    bundle = export_tiny(cosine_ck, tmp_path / "b")
    labels = ("slow", "medium", "brisk")  # 'brisk' is new
    data = write_device_npz(tmp_path / "a.npz", 150, seed=7, labels=labels)
    run_runner("adapt", bundle, "--data", data, "--out", tmp_path / "s", "--epochs", "0",
               "--json", "--quiet", check=True)
    with np.load(tmp_path / "s" / "head.npz") as z:
        w = z["weight"]
        got_labels = [str(v) for v in z["__labels__"]]
    assert got_labels[-1] == "brisk"
    x, y = make_windows(150, window=WINDOW, seed=7)
    with torch.no_grad():
        f = cosine_ck.model.backbone.eval()(torch.from_numpy(cosine_ck.normalize(x))).numpy()
    e = f[y == 2] / np.linalg.norm(f[y == 2], axis=1, keepdims=True)
    proto = e.mean(0) / np.linalg.norm(e.mean(0))
    row = w[-1] / np.linalg.norm(w[-1])
    assert float(row @ proto) > 0.9999
    shutil.rmtree(tmp_path / "s")
