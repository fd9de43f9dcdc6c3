"""The analytic head gradients and optimizer steps against torch autograd and torch.optim."""

import pytest
import torch

from edgetl.head import HeadSpec, TrainStep, head_forward, head_grads, init_state

pytestmark = pytest.mark.unit

SPECS = [HeadSpec("linear", 5, 3), HeadSpec("mlp", 5, 3, hidden=4), HeadSpec("cosine", 5, 3)]


def _params(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.5 * torch.randn(s, generator=g, dtype=torch.float64)
            for n, s in spec.param_shapes().items()}


def _batch(spec, b=7, seed=1, pad=2):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, spec.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (b,), generator=g)
    t = torch.nn.functional.one_hot(y, spec.num_classes).double()
    w = torch.ones(b, dtype=torch.float64)
    w[b - pad :] = 0.0  # padding rows must not contribute
    return f, y, t, w


def _autograd_loss(spec, f, y, w, params):
    logits, _ = head_forward(spec, f, params)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return (w * ce).sum() / w.sum()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_analytic_gradient_equals_autograd(spec):
    p = _params(spec)
    f, y, t, w = _batch(spec)
    leaves = [v.clone().requires_grad_(True) for v in p.values()]
    _autograd_loss(spec, f, y, w, leaves).backward()
    loss, grads = head_grads(spec, f, t, w, list(p.values()))
    assert torch.allclose(loss, _autograd_loss(spec, f, y, w, list(p.values())), atol=1e-12)
    for name, g, leaf in zip(p, grads, leaves, strict=True):
        assert torch.allclose(g, leaf.grad, atol=1e-12), name


def test_soft_targets_gradient_equals_autograd():
    spec = SPECS[0]
    p = _params(spec)
    f, _, _, w = _batch(spec)
    t = torch.softmax(torch.randn(len(f), spec.num_classes, dtype=torch.float64), 1)
    leaves = [v.clone().requires_grad_(True) for v in p.values()]
    logits, _ = head_forward(spec, f, leaves)
    ((-(t * torch.log_softmax(logits, 1)).sum(1) * w).sum() / w.sum()).backward()
    _, grads = head_grads(spec, f, t, w, list(p.values()))
    for g, leaf in zip(grads, leaves, strict=True):
        assert torch.allclose(g, leaf.grad, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_train_step_matches_torch_optim(spec, opt):
    hp = ({"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3} if opt == "sgd" else
          {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-3})
    p = _params(spec)
    leaves = [v.clone().requires_grad_(True) for v in p.values()]
    if opt == "sgd":
        ref = torch.optim.SGD(leaves, lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
    else:
        ref = torch.optim.Adam(leaves, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                               eps=hp["eps"], weight_decay=hp["weight_decay"])
    step = TrainStep(spec, opt)
    params = list(p.values())
    state = [v.double() for v in init_state(spec, opt, p).values()]
    hps = [torch.tensor(v, dtype=torch.float64) for v in hp.values()]
    for i in range(20):
        f, y, t, w = _batch(spec, seed=100 + i)
        ref.zero_grad()
        ref_loss = _autograd_loss(spec, f, y, w, leaves)
        ref_loss.backward()
        ref.step()
        out = step(f, t, w, *hps, *params, *state)
        assert torch.allclose(out[0], ref_loss.detach(), atol=1e-10)
        params = list(out[1 : 1 + len(params)])
        state = list(out[1 + len(params) :])
    for a, b in zip(params, leaves, strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-9)
    assert not torch.allclose(params[0], p[spec.param_names[0]])  # it did train
