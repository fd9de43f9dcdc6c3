"""Networks: a 1D-CNN backbone for IMU windows, trainable heads, and the EdgeModel split.

The backbone/head split is a type (:class:`EdgeModel`), not a convention: the device trains
exactly ``model.head``'s parameters and nothing else, and :meth:`EdgeModel.trainable_names`
is derived from it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from edgetl.config import HeadConfig, NetConfig
from edgetl.errors import ConfigError


def _conv_blocks(in_channels: int, cfg: NetConfig, conv, bn, pool) -> tuple[nn.Sequential, int]:
    """One (conv, BN, ReLU, optional max-pool) block per entry of ``cfg.channels``.

    ``conv``/``bn``/``pool`` pick the dimensionality (1d for windows, 2d for images); returns
    the blocks and their output channels.
    """
    layers: list[nn.Module] = []
    c_in = in_channels
    for c, k, p in zip(cfg.channels, cfg.kernels, cfg.pools, strict=True):
        layers += [conv(c_in, c, k, padding=k // 2, bias=False), bn(c), nn.ReLU()]
        if p > 1:
            layers.append(pool(p))
        c_in = c
    return nn.Sequential(*layers), c_in


def _block_params(blocks: nn.Sequential) -> list[list[str]]:
    """Parameter names (relative to the backbone) of each conv block: a conv starts one."""
    out: list[list[str]] = []
    for i, layer in enumerate(blocks):
        names = [f"blocks.{i}.{n}" for n, _ in layer.named_parameters()]
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) or not out:
            out.append([])
        out[-1] += names
    return out


class CNN1DBackbone(nn.Module):
    """Conv blocks over time, then global average pooling.

    Shape:
        x: (N, T, C) windows, time-major as recorded (layout ``NTC``).
        output: (N, channels[-1]) features.
    """

    def __init__(self, in_channels: int, cfg: NetConfig):
        super().__init__()
        self.blocks, self.out_features = _conv_blocks(in_channels, cfg, nn.Conv1d,
                                                      nn.BatchNorm1d, nn.MaxPool1d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x.transpose(1, 2))  # (N, C, T)
        return self.dropout(h.mean(dim=2))

    def block_params(self) -> list[list[str]]:
        """Parameter names of each conv block, first to last (``--trainable last:N``)."""
        return _block_params(self.blocks)


class CNN2DBackbone(nn.Module):
    """Conv blocks over an image, then global average pooling.

    Shape:
        x: (N, C, H, W) images (layout ``NCHW``), normalised as the manifest says.
        output: (N, channels[-1]) features.
    """

    def __init__(self, in_channels: int, cfg: NetConfig):
        super().__init__()
        self.blocks, self.out_features = _conv_blocks(in_channels, cfg, nn.Conv2d,
                                                      nn.BatchNorm2d, nn.MaxPool2d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.blocks(x).mean(dim=(2, 3)))

    def block_params(self) -> list[list[str]]:
        """Parameter names of each conv block, first to last (``--trainable last:N``)."""
        return _block_params(self.blocks)


class EfficientNetBackbone(nn.Module):
    """EfficientNet-Lite0 up to its 1280-d pooled features (the classifier is dropped).

    Shape:
        x: (N, 3, H, W) images normalised with the ImageNet constants of the weights.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        from edgetl.vision.effnet import EfficientNetLite0, load_imagenet

        net = load_imagenet() if cfg.pretrained else EfficientNetLite0()
        net._fc = nn.Identity()  # the 1000-way ImageNet classifier is not part of the backbone
        self.net = net
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_features = net.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.net.features(x))


def build_backbone(in_channels: int, net: NetConfig) -> nn.Module:
    """The backbone named by ``net.arch``."""
    if net.arch == "cnn1d":
        return CNN1DBackbone(in_channels, net)
    if net.arch == "cnn2d":
        return CNN2DBackbone(in_channels, net)
    if net.arch == "minilm":
        from edgetl.text.encoder import SentenceEncoder

        return SentenceEncoder(net.layers, pretrained=net.pretrained)
    if in_channels != 3:
        raise ConfigError(f"efficientnet_lite0 takes RGB images, got {in_channels} channels; "
                          "set data.image_mode = 'RGB'")
    return EfficientNetBackbone(net)


class LinearHead(nn.Module):
    """``logits = f @ weight.T + bias``. Its embedding is the features themselves."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)


class MLPHead(nn.Module):
    """``logits = fc2(relu(fc1(f)))``. Its embedding is ``relu(fc1(f))``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(f)))


class CosineHead(nn.Module):
    """``logits = scale * cos(f, weight_k) + bias_k`` (Gidaris & Komodakis, 2018).

    Normalised features and class rows make a new class's weight its normalised mean
    embedding (imprinting) and keep logits bounded by ``scale``. ``learn_scale`` False fixes
    the scale (a buffer-like parameter without gradient). Its embedding is the normalised
    features.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float, learn_scale: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.scale = nn.Parameter(torch.tensor([float(scale)]), requires_grad=learn_scale)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        from edgetl.head import COSINE_EPS

        fn = f / torch.sqrt((f * f).sum(1, keepdim=True) + COSINE_EPS)
        wn = self.weight / torch.sqrt((self.weight ** 2).sum(1, keepdim=True) + COSINE_EPS)
        return self.scale * (fn @ wn.t()) + self.bias


def make_head(in_features: int, num_classes: int, cfg: HeadConfig) -> nn.Module:
    """Build the head named by ``cfg.kind``."""
    if cfg.kind == "linear":
        return LinearHead(in_features, num_classes)
    if cfg.kind == "mlp":
        return MLPHead(in_features, num_classes, cfg.hidden)
    if cfg.kind == "cosine":
        return CosineHead(in_features, num_classes, cfg.scale, cfg.learn_scale)
    raise ConfigError(f"unknown head kind {cfg.kind!r}; known: linear, mlp, cosine")


class EdgeModel(nn.Module):
    """A frozen-on-device ``backbone`` followed by a device-trainable ``head``.

    ``forward`` always returns logits only, in train and eval mode alike, so export never
    depends on ``.training``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        overlap = {id(p) for p in backbone.parameters()} & {id(p) for p in head.parameters()}
        if overlap:
            raise ConfigError("a parameter is shared between backbone and head; "
                              "the device cannot both freeze and train it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def trainable_names(self) -> list[str]:
        """Names of the head parameters the device trains, in graph-input order."""
        return list(self.head_state().keys())

    def head_state(self) -> OrderedDict[str, torch.Tensor]:
        """Head parameters by device name (``weight``/``bias`` or ``fc1.weight``...)."""
        sd = self.head.state_dict()
        if isinstance(self.head, LinearHead):
            return OrderedDict([("weight", sd["fc.weight"]), ("bias", sd["fc.bias"])])
        return OrderedDict((k, v) for k, v in sd.items())


def build_model(in_channels: int, num_classes: int, net: NetConfig, head: HeadConfig) -> EdgeModel:
    """Backbone from ``net`` plus a head from ``head``."""
    bb = build_backbone(in_channels, net)
    return EdgeModel(bb, make_head(bb.out_features, num_classes, head))


def count_params(m: nn.Module) -> int:
    """Number of parameters (not buffers)."""
    return sum(p.numel() for p in m.parameters())
