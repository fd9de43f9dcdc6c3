"""Recipes: frozen, validated dataclasses read from ``models/<name>/recipe.toml``.

Every section is a dataclass whose ``__post_init__`` validates it; an unknown key is an error
that lists the known ones, so a typo never silently falls back to a default. Every key carries
its description and unit in ``field(metadata=...)``: ``python -m edgetl.config --markdown``
writes the recipe reference (``docs/recipe.md``) from them, so the page cannot drift.

``[data]`` is a tagged union: ``dataset = "hapt" | "fashion_mnist" | "wordnet"`` picks a
built-in dataset (:class:`DataConfig`); ``kind = "timeseries" | "image" | "text"`` with a
``path`` reads your own files (:class:`TimeseriesFiles`, :class:`ImageFiles`,
:class:`TextFiles`). Either way ``recipe.data.kind`` names the input kind, which picks the
scenario pipeline.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError
from edgetl.tolerances import MAX_ACCURACY_DROP_POINTS, MAX_ADAPTATION_LOSS_POINTS

HEAD_KINDS = ("linear", "mlp", "cosine")
OPTIMIZERS = ("sgd", "adam")
TARGETS = ("onnx", "tflite")
PRECISIONS = ("fp32", "int8")
#: Graph I/O types of an int8 TFLite backbone (``export.int8_io``).
INT8_IO = ("int8", "float32")
TRAINERS = ("stateless", "ort-training")
DATASETS = {"hapt": "timeseries", "fashion_mnist": "image", "wordnet": "text"}
INPUT_KINDS = ("timeseries", "image", "text")
TRANSFER_METHODS = ("source_only", "finetune", "l2sp", "ewc", "adabn", "source_steps", "dann",
                    "mmd", "coral")
ARCHS = ("cnn1d", "cnn2d", "efficientnet_lite0", "minilm")
KIND_ARCHS = {"timeseries": ("cnn1d",), "image": ("cnn2d", "efficientnet_lite0"),
              "text": ("minilm",)}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _f(default, doc: str, unit: str = ""):
    """A recipe key: its default, a one-line description and its unit (for docs/recipe.md)."""
    return field(default=default, metadata={"doc": doc, "unit": unit})


def _section(factory, doc: str):
    return field(default_factory=factory, metadata={"doc": doc, "unit": ""})


class _InputKind:
    """``is_image`` / ``is_text`` from a data section's ``kind``."""

    @property
    def is_image(self) -> bool:
        """Whether the recipe's data are images."""
        return self.kind == "image"

    @property
    def is_text(self) -> bool:
        """Whether the recipe's data are texts."""
        return self.kind == "text"


@dataclass(frozen=True)
class DataConfig(_InputKind):
    """A built-in dataset (``dataset = ...``) and who plays server and devices.

    ``hapt`` (phone IMU windows): ``window``/``stride`` and the user splits apply.
    ``fashion_mnist`` (images): the server trains on ``source_subset`` Fashion-MNIST images
    at ``image_size`` px in ``image_mode``; ``device_count`` cameras each learn the
    handwritten digits (new classes, a new domain) from ``device_shots`` images per class.
    ``wordnet`` (text): the server learns WordNet noun glosses' lexicographer categories;
    ``device_count`` devices each learn ``device_topics`` (``fortunes`` topic files the
    server never saw) from ``device_shots`` texts per topic; ``test_subset`` held-out glosses
    score the server models and gate the exports.
    """

    dataset: str = _f("hapt", "built-in dataset: hapt (IMU windows), fashion_mnist (images -> "
                      "digits on cameras), wordnet (glosses -> fortune topics on devices)")
    window: int = _f(128, "hapt: samples per window (2.56 s at 50 Hz)", "samples")
    stride: int = _f(64, "hapt: hop between windows", "samples")
    server_users: tuple[int, ...] = _f(tuple(range(1, 21)),
                                       "hapt: users the server trains on (with the val users)",
                                       "user ids")
    device_users: tuple[int, ...] = _f(tuple(range(21, 31)),
                                       "hapt: held-out users that play the phones", "user ids")
    server_val_users: tuple[int, ...] = _f((17, 18, 19, 20),
                                           "hapt: server users kept for validation", "user ids")
    image_size: int = _f(64, "fashion_mnist: model input side", "px")
    image_mode: str = _f("RGB", "fashion_mnist: RGB or L (grayscale)")
    source_subset: int = _f(0, "fashion_mnist/wordnet: stratified source samples (0 = all)",
                            "samples")
    val_fraction: float = _f(0.1, "fashion_mnist/wordnet: share of the source samples kept "
                             "for validation", "fraction")
    device_count: int = _f(3, "fashion_mnist/wordnet: simulated devices (disjoint data)",
                           "devices")
    device_shots: int = _f(10, "fashion_mnist/wordnet: samples per class on each device",
                           "samples")
    max_length: int = _f(128, "wordnet: word pieces per text incl. [CLS]/[SEP]; longer texts "
                         "are truncated", "word pieces")
    test_subset: int = _f(1000, "wordnet: held-out glosses that score the server models",
                          "texts")
    device_topics: tuple[str, ...] = _f(("computers", "science", "food", "law", "medicine",
                                         "sports"),
                                        "wordnet: fortunes topic files the devices learn")

    def __post_init__(self):
        _check(self.dataset in DATASETS,
               f"data.dataset: expected one of {tuple(DATASETS)}, got {self.dataset!r} (your "
               f"own files: set data.kind to one of {INPUT_KINDS} and data.path)")
        if self.kind == "text":
            _check(8 <= self.max_length <= 512,
                   f"data.max_length must be in 8..512 word pieces, got {self.max_length}")
            _check(len(self.device_topics) >= 2 and len(set(self.device_topics)) == len(
                self.device_topics), "data.device_topics: at least two distinct topics")
            _check(self.device_count >= 1 and 1 <= self.device_shots <= 200,
                   "data: device_count >= 1 and device_shots in 1..200")
            _check(0.0 < self.val_fraction < 0.5,
                   f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
            return
        if self.kind == "image":
            _check_image(self.image_size, self.image_mode)
            _check(self.device_count >= 1 and 1 <= self.device_shots <= 50,
                   "data: device_count >= 1 and device_shots in 1..50")
            _check(0.0 < self.val_fraction < 0.5,
                   f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
            return
        _check(self.window >= 8 and self.stride >= 1,
               f"data.window must be >= 8 and data.stride >= 1, got {self.window}, {self.stride}")
        overlap = set(self.server_users) & set(self.device_users)
        _check(not overlap, f"data: users {sorted(overlap)} are both server and device users; "
               "splits must be user-disjoint")
        _check(set(self.server_val_users) <= set(self.server_users),
               "data.server_val_users must be a subset of data.server_users")
        _check(len(set(self.server_users) - set(self.server_val_users)) > 0,
               "data: no server users left for training after server_val_users")

    @property
    def kind(self) -> str:
        """The input kind of the dataset: ``timeseries``, ``image`` or ``text``."""
        return DATASETS[self.dataset]

    @property
    def is_files(self) -> bool:
        """Whether the data are the user's own files (never, for a built-in dataset)."""
        return False



def _check_image(size: int, mode: str) -> None:
    _check(16 <= size <= 512, f"data.image_size must be in 16..512 px, got {size}")
    _check(mode in ("RGB", "L"), f"data.image_mode: expected 'RGB' or 'L', got {mode!r}")


@dataclass(frozen=True)
class FilesData(_InputKind):
    """Your own files (``kind`` + ``path``): the keys every input kind shares.

    Who plays server and devices: with a ``user`` column (or user folders) the users are
    split user-disjoint: ``device_users`` (default: ``device_fraction`` of the users, seeded)
    play the devices, the rest train the server, ``server_val_users`` (default:
    ``val_fraction`` of the server users) validate it. Without users, every label's samples
    are split by the same fractions (in file order for time series) and the device share is
    dealt to ``device_count`` simulated devices; the run says so. Each device adapts on the
    first half of its samples (its first session, when it has several) and is scored on the
    rest.
    """

    kind: str = _f("", "input kind of your files: timeseries, image or text")
    path: str = _f("", "your data: a file or folder (relative to the current directory)")
    server_users: tuple[int | str, ...] = _f((), "users the server trains on (default: every "
                                             "user that is not a device user)", "user names")
    server_val_users: tuple[int | str, ...] = _f((), "server users kept for validation "
                                                 "(default: val_fraction of them)",
                                                 "user names")
    device_users: tuple[int | str, ...] = _f((), "held-out users that play the devices "
                                             "(default: device_fraction of the users)",
                                             "user names")
    val_fraction: float = _f(0.2, "share of the server users (no users: of each label's "
                             "samples) kept for validation", "fraction")
    device_fraction: float = _f(0.25, "share of the users (no users: of each label's samples) "
                                "held out for the devices", "fraction")
    device_count: int = _f(2, "without users: simulated devices the device share is dealt to",
                           "devices")
    seed: int = _f(0, "seed of the user/sample split")

    def __post_init__(self):
        _check(self.kind in INPUT_KINDS,
               f"data.kind: expected one of {INPUT_KINDS}, got {self.kind!r}")
        _check(bool(self.path), f"data.path: required with data.kind = {self.kind!r}: the file "
               "or folder holding your data")
        for key in ("server_users", "server_val_users", "device_users"):
            ids = getattr(self, key)
            _check(all(isinstance(u, int | str) and not isinstance(u, bool) for u in ids),
                   f"data.{key}: expected user names (strings or integers), got {list(ids)}")
        names = {k: {str(u) for u in getattr(self, k)}
                 for k in ("server_users", "server_val_users", "device_users")}
        overlap = names["device_users"] & (names["server_users"] | names["server_val_users"])
        _check(not overlap, f"data: users {sorted(overlap)} are both server and device users; "
               "splits must be user-disjoint")
        _check(not names["server_users"] or names["server_val_users"] <= names["server_users"],
               "data.server_val_users must be a subset of data.server_users")
        _check(0.0 < self.val_fraction < 0.5 and 0.0 < self.device_fraction < 0.5,
               f"data.val_fraction and data.device_fraction must be in (0, 0.5), got "
               f"{self.val_fraction}, {self.device_fraction}")
        _check(1 <= self.device_count <= 100,
               f"data.device_count must be in 1..100, got {self.device_count}")

    @property
    def is_files(self) -> bool:
        """Whether the data are the user's own files."""
        return True



@dataclass(frozen=True)
class TimeseriesFiles(FilesData):
    """``kind = "timeseries"``: sensor windows in ``.npz`` or sensor logs in ``.csv``.

    ``.npz``: ``x`` (N, T, C) windows, ``y`` (N,) label names, optional ``user``/``session``
    (N,) and ``channels`` (C,) names. ``.csv`` (a file, or a folder of them): one sample per
    row at ``sample_rate_hz``, the ``channels`` columns, ``label``, and optional ``user`` and
    ``session`` columns; windows are cut inside runs of one label (and user, session, file),
    exactly as the device runner cuts them. A folder's files without a ``session`` column are
    sessions of their own.
    """

    channels: tuple[str, ...] = _f((), "channel columns / names, in model order (empty: every "
                                   "CSV column except label, user, session; .npz: its own)")
    window: int = _f(128, "samples per window (.npz windows must have this length)", "samples")
    stride: int = _f(64, "hop between the windows cut from a CSV log", "samples")
    sample_rate_hz: float = _f(50.0, "rate of the CSV samples (recorded in the bundle)", "Hz")

    def __post_init__(self):
        super().__post_init__()
        _check(self.window >= 8 and self.stride >= 1,
               f"data.window must be >= 8 and data.stride >= 1, got {self.window}, {self.stride}")
        _check(self.sample_rate_hz > 0, f"data.sample_rate_hz must be > 0, got "
               f"{self.sample_rate_hz}")
        _check(len(set(self.channels)) == len(self.channels),
               f"data.channels: names must be distinct, got {list(self.channels)}")


@dataclass(frozen=True)
class ImageFiles(FilesData):
    """``kind = "image"``: a folder with one sub-folder of PNG/JPEG files per label.

    With ``by_user``, ``path/<user>/<label>/*.png``: one folder per user (or device) first.
    Images are converted and resized exactly as the device runner does.
    """

    image_size: int = _f(64, "model input side (a multiple of 32 for efficientnet_lite0)", "px")
    image_mode: str = _f("RGB", "RGB or L (grayscale)")
    by_user: bool = _f(False, "path holds one folder per user, each with one folder per label")

    def __post_init__(self):
        super().__post_init__()
        _check_image(self.image_size, self.image_mode)


@dataclass(frozen=True)
class TextFiles(FilesData):
    """``kind = "text"``: a ``.csv`` with ``text`` and ``label`` columns, optional ``user``."""

    max_length: int = _f(128, "word pieces per text incl. [CLS]/[SEP]; longer texts are "
                         "truncated", "word pieces")

    def __post_init__(self):
        super().__post_init__()
        _check(8 <= self.max_length <= 512,
               f"data.max_length must be in 8..512 word pieces, got {self.max_length}")


#: ``[data] kind = ...`` -> its section; without ``kind`` the section is a :class:`DataConfig`.
DATA_KINDS = {"timeseries": TimeseriesFiles, "image": ImageFiles, "text": TextFiles}
Data = DataConfig | TimeseriesFiles | ImageFiles | TextFiles


@dataclass(frozen=True)
class NetConfig:
    """A backbone.

    ``cnn1d`` (windows) and ``cnn2d`` (images): one conv block (conv, BN, ReLU, optional
    max-pool) per entry of ``channels``, then global average pooling. ``efficientnet_lite0``:
    the ImageNet network (``pretrained`` loads its weights); channels/kernels/pools unused.
    ``minilm``: the all-MiniLM-L6-v2 sentence encoder (mean pooling, L2 normalisation) with
    ``layers`` of its 6 transformer layers, evenly spaced (``pretrained`` loads its weights).
    """

    channels: tuple[int, ...] = _f((32, 64, 64), "cnn1d/cnn2d: output channels of each conv "
                                   "block", "channels")
    kernels: tuple[int, ...] = _f((7, 5, 3), "cnn1d/cnn2d: odd kernel size of each block",
                                  "samples or px")
    pools: tuple[int, ...] = _f((2, 2, 1), "cnn1d/cnn2d: max-pool factor after each block "
                                "(1 = none)")
    dropout: float = _f(0.1, "dropout before the head", "probability")
    arch: str = _f("cnn1d", "cnn1d, cnn2d, efficientnet_lite0 or minilm")
    pretrained: bool = _f(False, "efficientnet_lite0/minilm: start from the packaged weights")
    layers: int = _f(6, "minilm: transformer layers kept of 6, evenly spaced", "layers")

    def __post_init__(self):
        _check(self.arch in ARCHS, f"net.arch: expected one of {ARCHS}, got {self.arch!r}")
        n = len(self.channels)
        _check(n > 0 and len(self.kernels) == n and len(self.pools) == n,
               f"net: channels, kernels and pools need the same length, got "
               f"{len(self.channels)}, {len(self.kernels)}, {len(self.pools)}")
        _check(all(c > 0 for c in self.channels) and all(k % 2 == 1 for k in self.kernels),
               "net: channels must be positive and kernels odd")
        _check(0.0 <= self.dropout < 1.0, f"net.dropout must be in [0, 1), got {self.dropout}")
        _check(1 <= self.layers <= 6, f"net.layers must be in 1..6, got {self.layers}")
        _check(not self.pretrained or self.arch in ("efficientnet_lite0", "minilm"),
               f"net.pretrained: only efficientnet_lite0 and minilm have pretrained weights, "
               f"not {self.arch}")


@dataclass(frozen=True)
class TrainConfig:
    """Supervised training of a network on server data (AdamW, cosine schedule)."""

    epochs: int = _f(12, "passes over the training data", "epochs")
    batch_size: int = _f(64, "samples per step", "samples")
    lr: float = _f(3e-3, "peak learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    seed: int = _f(0, "seed of initialisation and shuffling")

    def __post_init__(self):
        _check(self.epochs >= 1 and self.batch_size >= 1, "train: epochs and batch_size >= 1")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class DistillConfig:
    """Hinton distillation: ``alpha * T^2 * KL(teacher_T || student_T) + (1-alpha) * CE``.

    ``embedding_weight`` (text encoders): plus that weight times ``1 - cos`` between the
    student's and the teacher's sentence embeddings, so the student's *features* (what the
    device's head trains on) follow the teacher's, not only its logits.
    """

    temperature: float = _f(4.0, "softmax temperature T of the soft targets")
    alpha: float = _f(0.7, "weight of the KD term (1 - alpha: cross-entropy on labels)",
                      "fraction")
    embedding_weight: float = _f(0.0, "text: weight of 1 - cos(student, teacher embedding)")

    def __post_init__(self):
        _check(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")
        _check(0.0 <= self.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class HeadConfig:
    """The trainable head the device fine-tunes, and its on-device optimizer.

    ``cosine`` heads start at ``scale`` (learned on the device unless ``learn_scale`` is
    false). ``l2sp`` > 0 exports a train step that pulls the head toward its shipped weights
    with that coefficient (L2-SP on the head).
    """

    kind: str = _f("linear", "linear, mlp or cosine")
    hidden: int = _f(32, "mlp: hidden units", "units")
    scale: float = _f(10.0, "cosine: initial logit scale")
    learn_scale: bool = _f(True, "cosine: the device learns the scale")
    l2sp: float = _f(0.0, "L2-SP pull toward the shipped head (0 = off)")
    optimizer: str = _f("sgd", "on-device optimizer: sgd or adam")
    lr: float = _f(0.05, "on-device learning rate")
    momentum: float = _f(0.9, "sgd momentum")
    weight_decay: float = _f(1e-4, "on-device weight decay")
    beta1: float = _f(0.9, "adam beta1")
    beta2: float = _f(0.999, "adam beta2")
    eps: float = _f(1e-8, "adam epsilon")

    def __post_init__(self):
        _check(self.kind in HEAD_KINDS,
               f"head.kind: expected one of {HEAD_KINDS}, got {self.kind!r}")
        _check(self.optimizer in OPTIMIZERS,
               f"head.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.lr > 0 and self.hidden > 0, "head.lr and head.hidden must be > 0")
        _check(self.scale > 0 and self.l2sp >= 0, "head.scale must be > 0 and head.l2sp >= 0")
        _check(0 <= self.momentum < 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               "head: momentum, beta1 and beta2 must be in [0, 1)")

    def hparams(self) -> dict[str, float]:
        """The optimizer's hyper-parameters, as fed to the train-step graph."""
        extra = {"l2sp": self.l2sp} if self.l2sp > 0 else {}
        if self.optimizer == "sgd":
            return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                    **extra}
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay, **extra}


@dataclass(frozen=True)
class ExportConfig:
    """How the student becomes device bundles.

    ``edgetl run`` writes one bundle for every pair of ``targets`` x ``precisions``;
    ``target`` / ``precision`` / ``trainer`` are the defaults of :func:`edgetl.stages.export`
    when its caller passes none.
    """

    target: str = _f("onnx", "stages.export's default runtime: onnx or tflite")
    precision: str = _f("fp32", "stages.export's default backbone precision: fp32 or int8")
    targets: tuple[str, ...] = _f(("onnx",), "edgetl run: runtimes to export (onnx, tflite)")
    precisions: tuple[str, ...] = _f(("fp32",), "edgetl run: backbone precisions (fp32, int8)")
    opset: int = _f(17, "ONNX opset", "opset")
    n_test_vectors: int = _f(8, "reference inputs shipped for the device self-test", "samples")
    train_batch: int = _f(32, "fixed-batch runtimes (TFLite) train on exactly this, padded",
                          "samples")
    calibration_windows: int = _f(512, "int8: source samples the activation ranges come from",
                                  "samples")
    max_accuracy_drop: float = _f(MAX_ACCURACY_DROP_POINTS, "held-out accuracy a bundle may "
                                  "lose vs the PyTorch student", "points")
    trainer: str = _f("stateless", "stateless, or ort-training (also ONNX Runtime training "
                      "artifacts)")
    class_capacity: int = _f(0, "fixed-class heads (TFLite): rows, spare ones for new labels "
                             "(0 = the labels)", "classes")
    trainable: str = _f("head", "what the device trains: head, bias (biases + norm affine + "
                        "head), last:N (last N backbone blocks + head), all, or parameter-name "
                        "globs (docs/bundle.md, Training more than the head)")
    backbone_lr_scale: float = _f(0.1, "trainable beyond the head: the backbone tensors step at "
                                  "head.lr x this (the device can override it; 0.1 chosen on "
                                  "HAR's server-validation users, docs/trainable.md)")
    int8_io: str = _f("float32", "tflite int8 backbones: graph input/output type, float32 "
                      "(QUANTIZE/DEQUANTIZE inside the graph; every LiteRT flavour, LiteRT.js "
                      "too) or int8 (the runner quantises; docs/tflite-notes.md)")

    def __post_init__(self):
        for t in (self.target, *self.targets):
            _check(t in TARGETS, f"export.target(s): expected one of {TARGETS}, got {t!r}")
        for p in (self.precision, *self.precisions):
            _check(p in PRECISIONS,
                   f"export.precision(s): expected one of {PRECISIONS}, got {p!r}")
        _check(len(self.targets) > 0 and len(self.precisions) > 0,
               "export.targets and export.precisions must not be empty")
        _check(13 <= self.opset <= 21, f"export.opset must be in 13..21, got {self.opset}")
        _check(self.trainer in TRAINERS,
               f"export.trainer: expected one of {TRAINERS}, got {self.trainer!r}")
        _check(self.trainer == "stateless" or self.target == "onnx",
               f"export.trainer {self.trainer!r} is an ONNX flavour; got target {self.target!r}")
        _check(self.int8_io in INT8_IO,
               f"export.int8_io: expected one of {INT8_IO}, got {self.int8_io!r}")
        _check(0 <= self.class_capacity <= 1024,
               f"export.class_capacity must be in 0..1024, got {self.class_capacity}")
        from edgetl.trainable.spec import check_spec

        object.__setattr__(self, "trainable", check_spec(self.trainable))
        _check(0 < self.backbone_lr_scale <= 100,
               f"export.backbone_lr_scale must be in (0, 100], got {self.backbone_lr_scale}")
        _check(1 <= self.train_batch <= 4096,
               f"export.train_batch must be in 1..4096, got {self.train_batch}")
        _check(self.calibration_windows >= 16,
               f"export.calibration_windows must be >= 16, got {self.calibration_windows}")
        _check(0 <= self.max_accuracy_drop <= 100,
               f"export.max_accuracy_drop is in points (0..100), got {self.max_accuracy_drop}")

    def bundles(self) -> list[tuple[str, str]]:
        """Every (target, precision) pair ``edgetl run`` exports, in recipe order."""
        return [(t, p) for t in self.targets for p in self.precisions]


@dataclass(frozen=True)
class AdaptConfig:
    """On-device adaptation: epochs over cached features, validation split and the gate."""

    epochs: int = _f(30, "head training passes over the device's cached features", "epochs")
    batch_size: int = _f(32, "samples per on-device step", "samples")
    val_fraction: float = _f(0.25, "share of the device data that gates the new head",
                             "fraction")
    seed: int = _f(0, "seed of the device's split and shuffling")
    gate_alpha: float = _f(0.05, "the device keeps an adapted head only if it beats the current "
                           "one on its validation windows with one-sided exact McNemar p <= "
                           "this (chosen on the server-validation users: docs/personalisation.md)",
                           "level")
    patience: int = _f(8, "stop after this many epochs without a lower validation loss (0: "
                       "never); the epoch of lowest validation loss is kept", "epochs")
    mix: tuple[float, ...] = _f((0.25, 0.5, 0.75, 1.0), "weights of the adapted head mixed "
                                "with the shipped one (WiSE-FT); the lowest validation loss "
                                "wins", "weights")

    class_balanced: bool = _f(False, "weight the device's windows so every local label counts "
                              "the same")
    freeze_absent: bool = _f(False, "labels the device's data lacks keep their shipped class "
                             "rows while the rest trains")
    replay_per_class: int = _f(0, "latent replay: the bundle ships backbone features of this "
                               "many server-training windows per class, trained beside the "
                               "device's windows (0: no replay set)", "windows")
    replay_inputs_mb: float = _f(1.0, "bundles with AdaBN graphs also ship up to this much of "
                                 "the replay windows themselves (float16), so the gate can "
                                 "judge recalibrated BN statistics on the server's data (0: "
                                 "none)", "MiB")
    replay_weight: float = _f(0.0, "total weight of the replay set relative to the device's "
                              "training windows (0: the set only checks forgetting)", "ratio")
    calibrate_gate: bool = _f(False, "edgetl run chooses gate_alpha and gate_max_forget on the "
                              "server-validation users for the bundles it exports (stress "
                              "protocols included) and writes them into each bundle; the "
                              "recipe's values stand where there are no such users")
    gate_folds: int = _f(1, "the gate pools its evidence over this many validation folds, each "
                         "from another training run on the device (1: one split)", "folds")
    gate_max_forget: float = _f(-1.0, "with a replay set: the gate also refuses a head that "
                                "loses more than this many points of accuracy on it (< 0: no "
                                "check)", "points")

    def __post_init__(self):
        _check(self.epochs >= 1 and self.batch_size >= 1, "adapt: epochs and batch_size >= 1")
        _check(0.0 < self.val_fraction < 1.0,
               f"adapt.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(0.0 <= self.gate_alpha <= 1.0,
               f"adapt.gate_alpha must be in [0, 1], got {self.gate_alpha}")
        _check(1 <= self.gate_folds <= 20,
               f"adapt.gate_folds must be an integer from 1 to 20, got {self.gate_folds}")
        _check(self.patience >= 0, f"adapt.patience must be >= 0, got {self.patience}")
        _check(self.replay_inputs_mb >= 0, f"adapt.replay_inputs_mb must be >= 0, got "
               f"{self.replay_inputs_mb}")
        _check(self.replay_per_class >= 0 and self.replay_weight >= 0,
               f"adapt.replay_per_class and replay_weight must be >= 0, got "
               f"{self.replay_per_class}, {self.replay_weight}")
        _check(len(self.mix) > 0 and all(0.0 < w <= 1.0 for w in self.mix),
               f"adapt.mix: weights in (0, 1], got {list(self.mix)}")


@dataclass(frozen=True)
class CheckConfig:
    """``edgetl check``: who plays the phones of the adaptation check, and how much it may lose.

    The adaptation check personalises the ``users`` (default: the server-validation users,
    never trained on and never the held-out device users) and requires the mean personalised
    accuracy to be no more than ``max_adaptation_loss`` points below the general head's.
    """

    users: tuple[int, ...] = _f((), "hapt: users of the adaptation check (default: the "
                                "server-validation users)", "user ids")
    max_adaptation_loss: float = _f(MAX_ADAPTATION_LOSS_POINTS, "mean personalised accuracy "
                                    "may fall this far below the general head's", "points")

    def __post_init__(self):
        _check(self.max_adaptation_loss >= 0,
               f"check.max_adaptation_loss is in points (>= 0), got {self.max_adaptation_loss}")


@dataclass(frozen=True)
class TransferConfig:
    """Server-side transfer methods (``edgetl methods``; see ``edgetl/methods/``).

    ``methods`` are the ones ``edgetl methods`` compares. The source model trains
    ``source_epochs`` (recipe's student net); supervised methods fine-tune ``epochs`` on
    labelled target data, alignment methods take ``uda_steps`` steps of ``batch_size`` source
    + target inputs; Adam at ``lr``. Vision: ``shots`` labelled digits per class, images at
    ``image_size`` px (0: data.image_size), one run per seed of ``seeds``. HAR: ``users``
    (default data.device_users) are the targets.
    """

    methods: tuple[str, ...] = _f(TRANSFER_METHODS, "methods edgetl methods compares")
    source_epochs: int = _f(6, "training of the source model (the student net)", "epochs")
    epochs: int = _f(10, "supervised methods: fine-tuning on labelled target data", "epochs")
    lr: float = _f(1e-3, "Adam learning rate of every method")
    batch_size: int = _f(32, "source (and target) samples per step", "samples")
    uda_steps: int = _f(100, "alignment methods: steps", "steps")
    l2sp_alpha: float = _f(0.1, "L2-SP: pull of the shared weights toward the source's")
    l2sp_beta: float = _f(0.01, "L2-SP: weight decay of the new weights")
    ewc_lambda: float = _f(100.0, "EWC: Fisher-weighted penalty")
    ewc_samples: int = _f(256, "EWC: source samples of the Fisher estimate", "samples")
    dann_lambda: float = _f(1.0, "DANN: weight of the domain loss")
    dann_hidden: int = _f(64, "DANN: hidden units of the domain classifier", "units")
    mmd_lambda: float = _f(1.0, "MMD: weight of the feature discrepancy")
    coral_lambda: float = _f(1.0, "CORAL: weight of the covariance discrepancy")
    seed: int = _f(0, "seed of the HAR comparison")
    seeds: tuple[int, ...] = _f((0, 1, 2), "vision: one run per seed")
    shots: int = _f(10, "vision: labelled digits per class", "samples")
    image_size: int = _f(32, "vision: image side for the comparison (0 = data.image_size)",
                         "px")
    users: tuple[int, ...] = _f((), "HAR: target users (default data.device_users)",
                                "user ids")

    def __post_init__(self):
        for m in self.methods:
            _check(m in TRANSFER_METHODS,
                   f"transfer.methods: {m!r} unknown; known: {list(TRANSFER_METHODS)}")
        _check(len(self.methods) > 0 and len(self.seeds) > 0,
               "transfer.methods and transfer.seeds must not be empty")
        _check(min(self.source_epochs, self.epochs, self.uda_steps, self.batch_size,
                   self.ewc_samples, self.dann_hidden, self.shots) >= 1,
               "transfer: epochs, steps, batch size, samples, hidden and shots must be >= 1")
        _check(self.lr > 0, f"transfer.lr must be > 0, got {self.lr}")
        _check(min(self.l2sp_alpha, self.l2sp_beta, self.ewc_lambda, self.dann_lambda,
                   self.mmd_lambda, self.coral_lambda) >= 0,
               "transfer: method coefficients must be >= 0")
        _check(self.image_size == 0 or 16 <= self.image_size <= 512,
               f"transfer.image_size must be 0 or 16..512 px, got {self.image_size}")


@dataclass(frozen=True)
class Recipe:
    """A whole scenario: data, teacher, student, distillation, head, export and adaptation."""

    name: str = _f("har", "the recipe's name (in summaries and bundle provenance)")
    description: str = _f("", "one line for people")
    data: Data = _section(DataConfig, "the data and who plays server and devices")
    teacher: NetConfig = _section(lambda: NetConfig((64, 128, 128), (7, 5, 3)),
                                  "the big network pretrained on the server")
    student: NetConfig = _section(lambda: NetConfig((16, 32, 48), (7, 5, 3)),
                                  "the small network distilled from it: the bundle's backbone")
    pretrain: TrainConfig = _section(TrainConfig, "training of the teacher")
    distill: DistillConfig = _section(DistillConfig, "distillation of the student")
    student_train: TrainConfig = _section(TrainConfig, "training of the student")
    head: HeadConfig = _section(HeadConfig, "the trainable head and its on-device optimizer")
    export: ExportConfig = _section(ExportConfig, "device bundles")
    adapt: AdaptConfig = _section(AdaptConfig, "on-device adaptation")
    check: CheckConfig = _section(CheckConfig, "the release gate")
    transfer: TransferConfig = _section(TransferConfig, "edgetl methods")

    def __post_init__(self):
        archs = KIND_ARCHS[self.data.kind]
        for role in ("teacher", "student"):
            arch = getattr(self, role).arch
            _check(arch in archs, f"{role}.arch: {self.data.kind} data need one of {archs}, got "
                   f"{arch!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), for run records."""
        return dataclasses.asdict(self)


def _build(cls, raw: dict[str, Any], where: str, base=None):
    """An instance of dataclass ``cls`` from ``raw``, type-checked.

    Keys absent from ``raw`` keep ``base``'s values (or the field defaults); ``[data]`` picks
    its class by ``kind``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    _check(not unknown, f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values = {n: getattr(base, n) if base is not None else
              (f.default_factory() if f.default_factory is not dataclasses.MISSING
               else f.default) for n, f in fields.items()}
    for k, v in raw.items():
        default = values[k]
        if cls is Recipe and k == "data" and isinstance(v, dict) and "kind" in v:
            _check("dataset" not in v, f"{where}.data: set either dataset (a built-in dataset) "
                   "or kind + path (your own files), not both")
            _check(v["kind"] in DATA_KINDS, f"{where}.data.kind: expected one of "
                   f"{tuple(DATA_KINDS)}, got {v['kind']!r}")
            values[k] = _build(DATA_KINDS[v["kind"]], v, f"{where}.data")
        elif dataclasses.is_dataclass(default):
            _check(isinstance(v, dict), f"{where}.{k}: expected a table, got {type(v).__name__}")
            values[k] = _build(type(default), v, f"{where}.{k}", default)
        elif isinstance(default, tuple):
            _check(isinstance(v, list), f"{where}.{k}: expected a list, got {v!r}")
            _check_items(v, default, f"{where}.{k}")
            values[k] = tuple(v)
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
        else:
            _check(default is None or isinstance(v, type(default)),
                   f"{where}.{k}: expected {type(default).__name__}, got {v!r}")
            values[k] = v
    return cls(**values)


def _check_items(v: list, default: tuple, where: str) -> None:
    """A list whose default holds one scalar type (user ids, sizes, names) holds only that.

    ``server_users = ["a", 2]`` otherwise failed later with a misleading message ("must be a
    subset") or selected no data at all.
    """
    kinds = {type(e) for e in default}
    if len(kinds) != 1 or next(iter(kinds)) not in (int, float, str, bool):
        return
    t = kinds.pop()

    def ok(e) -> bool:
        if isinstance(e, bool):
            return t is bool
        return isinstance(e, t) or (t is float and isinstance(e, int))

    bad = [e for e in v if not ok(e)]
    _check(not bad, f"{where}: expected a list of {t.__name__}, found {bad[:3]!r}")


#: A recipe is a page of TOML; anything larger is not one.
MAX_RECIPE_BYTES = 1 << 20


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe TOML file.

    Raises:
        ConfigError: the file is missing, not a regular file (a FIFO, a device), larger than
            :data:`MAX_RECIPE_BYTES`, not TOML, or has unknown or invalid keys.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "recipe.toml"
    return _build(Recipe, _read_toml(path, ()), path.name)


#: Most recipes one recipe may stack through ``base`` keys.
MAX_BASE_DEPTH = 4


def _read_toml(path: Path, seen: tuple[Path, ...]) -> dict:
    """The recipe at ``path`` as a dict, merged over its ``base`` recipe if it names one.

    ``base = "recipe.toml"`` (a path relative to the recipe's folder) makes a recipe a
    variant: its tables' keys replace the base's, the rest is the base's.
    """
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist; try models/har/recipe.toml")
    from edgerun import RunnerError
    from edgerun.files import open_regular

    try:  # a regular file of sane size: a FIFO or /dev/zero must not hang the command
        with open_regular(path, "recipe", MAX_RECIPE_BYTES) as f:
            raw = tomllib.loads(f.read().decode("utf-8-sig"))
    except RunnerError as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path} is not UTF-8 text ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a recipe path (a string), got {base!r}")
    at = (path.parent / base).resolve()
    chain = (*seen, path.resolve())
    if at in chain or len(chain) > MAX_BASE_DEPTH:
        raise ConfigError(f"recipe {path}: base {base!r} makes a loop or a chain longer than "
                          f"{MAX_BASE_DEPTH} ({' -> '.join(p.name for p in (*chain, at))})")
    merged = _read_toml(at, chain)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------ the recipe reference page

def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def _table(cls, base=None, skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| key | type | default | unit | description |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        doc = f.metadata.get("doc")
        if not doc:
            raise ConfigError(f"{cls.__name__}.{f.name} has no description: add "
                              "metadata={'doc': ...} (edgetl.config._f)")
        default = getattr(base, f.name) if base is not None else f.default
        cells = [f"`{f.name}`", f"`{f.type}`", f"`{_toml(default)}`",
                 f.metadata.get("unit") or "", doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _summary(cls) -> str:
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")


def recipe_markdown() -> str:
    """The recipe reference (``docs/recipe.md``): every section and key of :class:`Recipe`."""
    out = ["# Recipe reference", "",
           "Generated from the dataclasses of `edgetl/config.py` by "
           "`python -m edgetl.config --markdown > docs/recipe.md` (`make docs`); "
           "`tests/test_recipe_doc.py` fails when this page is stale. An unknown key is an "
           "error that lists the known ones.", "",
           "A recipe can be a variant of another: `base = \"recipe.toml\"` at the top (a path "
           "relative to the recipe's folder) takes every value from that recipe, and the "
           "keys this one sets replace the base's, table by table (e.g. "
           "`models/vision/trainable.toml`).", ""]
    top = [f for f in dataclasses.fields(Recipe) if f.default_factory is dataclasses.MISSING]
    out += ["## Top level", "", *_table(Recipe, skip=tuple(
        f.name for f in dataclasses.fields(Recipe) if f not in top)), ""]
    for f in dataclasses.fields(Recipe):
        if f in top:
            continue
        default = f.default_factory()
        if f.name == "data":
            out += [f"## `[data]`: {f.metadata['doc']}", "",
                    "A tagged union: `dataset = ...` picks a built-in dataset, `kind = ...` "
                    "with `path` reads your own files (see `docs/own-data.md`).", "",
                    "### Built-in datasets (`dataset = \"hapt\" | \"fashion_mnist\" | "
                    "\"wordnet\"`)", "", _summary(DataConfig), "", *_table(DataConfig), ""]
            out += ["### Your files: keys of every kind", "", _summary(FilesData), "",
                    *_table(FilesData, skip=("kind",)), ""]
            common = {g.name for g in dataclasses.fields(FilesData)}
            for kind, cls in DATA_KINDS.items():
                own = tuple(g.name for g in dataclasses.fields(cls) if g.name in common)
                out += [f"### Your files: `kind = \"{kind}\"`", "", _summary(cls), "",
                        *_table(cls, skip=own), ""]
            continue
        out += [f"## `[{f.name}]`: {f.metadata['doc']}", "", _summary(type(default)), "",
                *_table(type(default), default), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":  # python -m edgetl.config --markdown > docs/recipe.md
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m edgetl.config --markdown > docs/recipe.md")
    sys.stdout.write(recipe_markdown())
