"""The coverage cases: architectures written outside edgetl, with small random configs.

``CASES`` maps a case name to a factory returning a :class:`Case`: the model (eval mode), how
to call it, its labels, a data generator with a learnable class structure for its input
kind, a note on the input spec and where the architecture comes from. Models keep their
library's initialisation unless its features collapse to ~0 (see :func:`check_init`); every
change is written into ``Case.notes`` and so into the coverage table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# how edgetl's own Hugging Face loader calls these models: one implementation
from edgetl.export.load import _hf_call, _hf_text_call

#: The server-side labels of every case; the device adapts to new ones (:data:`DEVICE_LABELS`).
LABELS = ("cat", "dog", "bird")
DEVICE_LABELS = ("red", "green", "blue")
#: Features whose root-mean-square is below this count as collapsed (HF's std-0.02 init
#: through many conv + BN layers); the model's convs are then re-initialised.
COLLAPSED_RMS = 1e-3

Data = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class Case:
    """A model to cover and what the coverage run needs to export and adapt it."""

    model: nn.Module
    data: Data  # (n, seed, class names, hard=False) -> (x (n, *dims), y (n,) class names)
    spec: str  # the input, for people: dtype, shape, layout, normalisation
    source: str  # "transformers <Class>" or "user module"
    labels: tuple[str, ...] = LABELS
    call: Callable | None = None  # how to call the model (None: model(x))
    head: str | None = None  # attribute path of the head (None: detected)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = ""
    hf: bool = False  # a transformers model: also save_pretrained + edgetl's load_model
    notes: list[str] = field(default_factory=list)

    @property
    def example(self) -> np.ndarray:
        return self.data(1, 0, self.labels)[0]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None or x.dtype.kind != "f":
            return x
        shape = [1, -1] + [1] * (x.ndim - 2)
        return ((x - np.asarray(self.mean, np.float32).reshape(shape))
                / np.asarray(self.std, np.float32).reshape(shape)).astype(np.float32)


# -- data: one generator per input kind, each class learnable from pooled features -----------
# ``hard=True`` (the device's data) makes the class signal weaker, so that training on the
# device has something to do after the new labels are imprinted.

def _classes(rng, n: int, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(classes), n)
    return y, np.asarray(classes)[y]


def images(size: int, channels: int = 3) -> Data:
    """Float pixels 0..255 (N, C, H, W): each class is mostly its own colour channel."""

    def make(n, seed, classes, hard=False):
        rng = np.random.default_rng(seed)
        y, names = _classes(rng, n, classes)
        x = rng.normal(60, 25 if not hard else 60, (n, channels, size, size))
        for c in range(len(classes)):
            x[y == c, c % channels] += 140 if not hard else 25
        return np.clip(x, 0, 255).astype(np.float32), names

    return make


def tokens(length: int, vocab: int) -> Data:
    """Token ids (N, L) int64, never 0 (padding): class c draws most ids from its own range."""

    def make(n, seed, classes, hard=False):
        rng = np.random.default_rng(seed)
        y, names = _classes(rng, n, classes)
        span = (vocab - 1) // len(classes)
        own = 1 + rng.integers(0, span, (n, length)) + (y * span)[:, None]
        noise = rng.integers(1, vocab, (n, length))
        x = np.where(rng.random((n, length)) < (0.7 if not hard else 0.25), own, noise)
        return x.astype(np.int64), names

    return make


def audio(samples: int, rate: float = 16000.0) -> Data:
    """Raw audio (N, S) float32: a tone per class (random phase) in noise."""

    def make(n, seed, classes, hard=False):
        rng = np.random.default_rng(seed)
        y, names = _classes(rng, n, classes)
        t = np.arange(samples) / rate
        f = 300.0 * 2.0 ** y  # 300, 600, 1200 Hz...
        x = 0.5 * np.sin(2 * np.pi * f[:, None] * t + rng.uniform(0, 2 * np.pi, (n, 1)))
        noise = rng.normal(0, 0.1 if not hard else 1.0, x.shape)
        return (x + noise).astype(np.float32), names

    return make


def windows(length: int, channels: int) -> Data:
    """Sensor windows (N, T, C) float32: class c oscillates at c + 1 cycles, offset on c."""

    def make(n, seed, classes, hard=False):
        rng = np.random.default_rng(seed)
        y, names = _classes(rng, n, classes)
        t = np.arange(length) / length
        phase = rng.uniform(0, 2 * np.pi, (n, 1, channels))
        x = np.sin(2 * np.pi * (y + 1)[:, None, None] * t[None, :, None] + phase)
        x[np.arange(n), :, y % channels] += 1.0
        noise = rng.normal(0, 0.3 if not hard else 1.5, x.shape)
        return (x + noise).astype(np.float32), names

    return make


# -- transformers models ------------------------------------------------------------------------

def _hf_config(cls_name: str, **kw):
    import transformers

    cfg = getattr(transformers, cls_name)(**kw)
    cfg.num_labels = len(LABELS)
    cfg.id2label = dict(enumerate(LABELS))
    cfg.label2id = {v: i for i, v in enumerate(LABELS)}
    return cfg


def _hf(model_cls: str, cfg, kind: str, *, size: int = 32, length: int = 16, vocab: int = 100,
        samples: int = 2000) -> Case:
    import transformers

    torch.manual_seed(0)
    kw = {"attn_implementation": "eager"} if kind in ("text", "audio") else {}
    model = getattr(transformers, model_cls)._from_config(cfg, **kw).eval()
    src = f"transformers {model_cls}"
    if kind == "image":
        return Case(model, images(size), f"float32 (3, {size}, {size}) NCHW pixels 0..255, "
                    "mean/std 127.5 (HF processor)", src, call=_hf_call("pixel_values"),
                    mean=(127.5,) * 3, std=(127.5,) * 3, layout="NCHW", hf=True)
    if kind == "text":
        return Case(model, tokens(length, vocab), f"int64 ({length},) token ids, vocab {vocab},"
                    " mask = ids != 0", src, call=_hf_text_call(0), layout="NL", hf=True)
    return Case(model, audio(samples), f"float32 ({samples},) raw audio at 16 kHz", src,
                call=_hf_call("input_values"), layout="NS", hf=True)


def mobilenet_v2() -> Case:
    """MobileNetV2, depth multiplier 0.35, 32 px."""
    cfg = _hf_config("MobileNetV2Config", image_size=32, depth_multiplier=0.35)
    return _hf("MobileNetV2ForImageClassification", cfg, "image")


def mobilevit() -> Case:
    """MobileViT (3 transformer stages), hidden 32-64, 32 px, 1 px patches."""
    cfg = _hf_config("MobileViTConfig", image_size=32, patch_size=1, hidden_sizes=[32, 48, 64],
                     neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96], num_attention_heads=2,
                     expand_ratio=2.0)
    return _hf("MobileViTForImageClassification", cfg, "image")


def resnet() -> Case:
    """ResNet, basic blocks, one per stage, 16-128 channels, 32 px."""
    cfg = _hf_config("ResNetConfig", embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                     depths=[1, 1, 1, 1], layer_type="basic")
    return _hf("ResNetForImageClassification", cfg, "image")


def efficientnet() -> Case:
    """EfficientNet, width and depth 0.25, 32 px."""
    cfg = _hf_config("EfficientNetConfig", image_size=32, width_coefficient=0.25,
                     depth_coefficient=0.25, hidden_dim=320)
    return _hf("EfficientNetForImageClassification", cfg, "image")


def convnext() -> Case:
    """ConvNeXt, one block per stage, 16-128 channels, 32 px."""
    cfg = _hf_config("ConvNextConfig", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                     image_size=32)
    return _hf("ConvNextForImageClassification", cfg, "image")


def _vit_kw() -> dict:
    return {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64}


def vit() -> Case:
    """ViT, 2 layers, hidden 32, 8 px patches of 32 px images."""
    return _hf("ViTForImageClassification", _hf_config("ViTConfig", **_vit_kw()), "image")


def deit() -> Case:
    """DeiT (CLS + distillation tokens), 2 layers, hidden 32, 8 px patches."""
    return _hf("DeiTForImageClassification", _hf_config("DeiTConfig", **_vit_kw()), "image")


def bert() -> Case:
    """BERT, 2 layers, hidden 32, 16 token ids."""
    cfg = _hf_config("BertConfig", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return _hf("BertForSequenceClassification", cfg, "text")


def distilbert() -> Case:
    """DistilBERT, 2 layers, dim 32, 16 token ids."""
    cfg = _hf_config("DistilBertConfig", vocab_size=100, dim=32, n_layers=2, n_heads=2,
                     hidden_dim=64, max_position_embeddings=64)
    return _hf("DistilBertForSequenceClassification", cfg, "text")


def wav2vec2() -> Case:
    """Wav2Vec2 sequence (audio) classifier, 3 conv + 2 transformer layers, 2000 samples."""
    cfg = _hf_config("Wav2Vec2Config", hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16, 16),
                     conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=8,
                     num_conv_pos_embedding_groups=2, classifier_proj_size=16)
    return _hf("Wav2Vec2ForSequenceClassification", cfg, "audio")


# -- modules a user would write -----------------------------------------------------------------

class RNNClassifier(nn.Module):
    """(N, T, C) windows -> LSTM or GRU (2 layers) -> last hidden state -> Linear ``head``."""

    def __init__(self, channels: int, hidden: int = 32, classes: int = 3, cell: str = "lstm"):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(channels, hidden, num_layers=2,
                                                          batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


class TokenGRU(nn.Module):
    """Token ids (N, L) -> embedding -> GRU -> mean over time -> Linear ``head``."""

    def __init__(self, vocab: int, dim: int = 32, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h, _ = self.gru(self.embed(ids))
        return self.head(h.mean(dim=1))


class TransformerTS(nn.Module):
    """(N, T, C) windows -> embedding + positions -> 2 encoder layers -> mean -> ``classifier``."""

    def __init__(self, channels: int, length: int, dim: int = 32, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x):
        return self.classifier(self.encoder(self.embed(x) + self.pos).mean(dim=1))


class SeparableCNN(nn.Module):
    """Depthwise-separable CNN (MobileNet-style blocks) on (N, 3, 32, 32) images; ``fc``."""

    def __init__(self, classes: int = 3):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU6())

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.blocks = nn.Sequential(block(16, 32, 1), block(32, 64, 2), block(64, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _user(model: nn.Module, data: Data, spec: str, **kw) -> Case:
    return Case(model.eval(), data, spec, "user module", **kw)


def user_lstm() -> Case:
    """A 2-layer LSTM on sensor windows."""
    torch.manual_seed(0)
    return _user(RNNClassifier(3, cell="lstm"), windows(32, 3),
                 "float32 (32, 3) sensor windows NTC", layout="NTC")


def user_gru_tokens() -> Case:
    """A GRU on token ids (int64 input)."""
    torch.manual_seed(0)
    return _user(TokenGRU(60), tokens(12, 60), "int64 (12,) token ids, vocab 60", layout="NL")


def user_transformer() -> Case:
    """An nn.TransformerEncoder time-series classifier."""
    torch.manual_seed(0)
    return _user(TransformerTS(3, 32), windows(32, 3), "float32 (32, 3) sensor windows NTC",
                 layout="NTC")


def user_dwsep_cnn() -> Case:
    """A depthwise-separable CNN on images."""
    torch.manual_seed(0)
    return _user(SeparableCNN(), images(32), "float32 (3, 32, 32) NCHW pixels 0..255, "
                 "mean/std 127.5", mean=(127.5,) * 3, std=(127.5,) * 3, layout="NCHW")


#: name -> factory. Every case runs for every registered exporter x precision.
CASES: dict[str, Callable[[], Case]] = {
    "mobilenet_v2": mobilenet_v2,
    "mobilevit": mobilevit,
    "resnet": resnet,
    "efficientnet": efficientnet,
    "convnext": convnext,
    "vit": vit,
    "deit": deit,
    "bert": bert,
    "distilbert": distilbert,
    "wav2vec2": wav2vec2,
    "user_lstm": user_lstm,
    "user_gru_tokens": user_gru_tokens,
    "user_transformer": user_transformer,
    "user_dwsep_cnn": user_dwsep_cnn,
}


# -- preparing a case: initialisation check and a server-side head ------------------------------

def features(case: Case, x: np.ndarray) -> np.ndarray:
    """What the case's head receives for raw inputs ``x`` (edgetl's own backbone split)."""
    from edgetl.export.model import as_edge_model, call_positional

    edge, _, _ = as_edge_model(case.model, head=case.head, labels=case.labels,
                               call=case.call or call_positional)
    with torch.no_grad():
        return edge.backbone(torch.from_numpy(case.normalize(x))).numpy()


def _rms(f: np.ndarray) -> float:
    return float(np.sqrt(np.mean(f.astype(np.float64) ** 2)))


def check_init(case: Case, x: np.ndarray) -> None:
    """Re-initialise convs when the library's init collapses features to ~0.

    First Kaiming (fan-in) conv weights with BN scale 1 / shift 0; if features still
    collapse, BN running statistics measured on ``x`` too (as training would leave them;
    deep random nets with calibrated BN are chaotic: pixel noise dominates their features,
    so this is the second resort).
    """
    before = _rms(features(case, x))
    if before >= COLLAPSED_RMS:
        case.notes.append(f"library init kept (feature rms {before:.3g})")
        return
    torch.manual_seed(0)
    bns = []
    for mod in case.model.modules():
        if isinstance(mod, nn.Conv2d | nn.Conv1d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
            bns.append(mod)
    after = _rms(features(case, x))
    what = "convs re-initialised Kaiming fan-in, BN scale 1"
    if after < COLLAPSED_RMS and bns:
        for mod in bns:
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the batches below
        case.model.train()
        with torch.no_grad():
            xn = torch.from_numpy(case.normalize(x))
            for i in range(0, len(xn), 64):
                (case.call or (lambda m, v: m(v)))(case.model, xn[i:i + 64])
        case.model.eval()
        what += f" (rms {after:.2g}, still collapsed), BN statistics from {len(x)} server samples"
        after = _rms(features(case, x))
    case.notes.append(f"library init collapses features (rms {before:.2g}): {what} "
                      f"(rms {after:.3g})")


def head_linear(case: Case) -> nn.Linear:
    """The ``nn.Linear`` the device trains (the head, or its last Linear)."""
    from edgetl.export.model import find_head

    mod = case.model.get_submodule(case.head or find_head(case.model, len(case.labels)))
    if isinstance(mod, nn.Sequential):
        mod = [m for m in mod if isinstance(m, nn.Linear)][-1]
    return mod


def fit_head(case: Case, x: np.ndarray, y: np.ndarray, steps: int = 300) -> float:
    """Train the head on frozen features of "server" data (a linear probe); return accuracy.

    A random head has near-tied logits, so int8's held-out gate would measure noise; a fitted
    head gives the accuracy gate a real decision to keep. Adam on the raw features, as a
    user would train it (weights stay of the size training makes them).
    """
    f = torch.from_numpy(features(case, x))
    index = {v: i for i, v in enumerate(case.labels)}
    t = torch.tensor([index[str(v)] for v in y])
    lin = head_linear(case)
    if lin.bias is None:
        raise ValueError("the head has no bias")
    params = [lin.weight, lin.bias]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, 0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(f), t).backward()
        opt.step()
    for p, w in zip(params, was, strict=True):
        p.requires_grad_(w)
        p.grad = None
    with torch.no_grad():
        acc = float((lin(f).argmax(1) == t).float().mean())
    case.notes.append(f"head fitted on frozen features of {len(x)} server samples "
                      f"(train accuracy {acc:.2f})")
    return acc


def build(name: str, n_server: int = 192) -> Case:
    """The case ``name``, initialisation checked and its head fitted on server data."""
    case = CASES[name]()
    x, y = case.data(n_server, 100, case.labels)
    check_init(case, x)
    fit_head(case, x, y)
    return case

