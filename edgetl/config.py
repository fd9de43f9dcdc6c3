"""Recipes: frozen, validated dataclasses read from ``models/<name>/recipe.toml``.

Every section is a dataclass whose ``__post_init__`` validates it; an unknown key is an error
that lists the known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
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
TRAINERS = ("stateless", "ort-training")
DATASETS = ("hapt", "fashion_mnist", "wordnet")
TRANSFER_METHODS = ("source_only", "finetune", "l2sp", "ewc", "adabn", "source_steps", "dann",
                    "mmd", "coral")
ARCHS = ("cnn1d", "cnn2d", "efficientnet_lite0", "minilm")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is prepared, and who plays server and devices.

    ``hapt`` (phone IMU windows): ``window``/``stride`` and the user splits apply.
    ``fashion_mnist`` (images): the server trains on ``source_subset`` Fashion-MNIST images
    (0 = all 60,000) at ``image_size`` px in ``image_mode``; ``device_count`` cameras each
    learn ``device_dataset`` (handwritten digits, new classes and a new domain) from
    ``device_shots`` images per class.
    ``wordnet`` (text): the server learns WordNet noun glosses' lexicographer categories
    (``source_subset`` glosses, 0 = all); ``device_count`` devices each learn
    ``device_topics`` (``fortunes`` topic files the server never saw) from ``device_shots``
    texts per topic; ``test_subset`` held-out glosses score the server models and gate the
    exports. Texts are tokenised to at most ``max_length`` word pieces.
    """

    dataset: str = "hapt"
    window: int = 128
    stride: int = 64
    server_users: tuple[int, ...] = tuple(range(1, 21))
    device_users: tuple[int, ...] = tuple(range(21, 31))
    server_val_users: tuple[int, ...] = (17, 18, 19, 20)
    image_size: int = 64
    image_mode: str = "RGB"
    source_subset: int = 0
    val_fraction: float = 0.1
    device_dataset: str = "digits"
    device_count: int = 3
    device_shots: int = 10
    max_length: int = 128
    test_subset: int = 1000
    device_topics: tuple[str, ...] = ("computers", "science", "food", "law", "medicine",
                                      "sports")

    def __post_init__(self):
        _check(self.dataset in DATASETS,
               f"data.dataset: expected one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "wordnet":
            _check(8 <= self.max_length <= 512,
                   f"data.max_length must be in 8..512 word pieces, got {self.max_length}")
            _check(self.device_dataset == "fortunes",
                   f"data.device_dataset: expected 'fortunes' for text, got "
                   f"{self.device_dataset!r}")
            _check(len(self.device_topics) >= 2 and len(set(self.device_topics)) == len(
                self.device_topics), "data.device_topics: at least two distinct topics")
            _check(self.device_count >= 1 and 1 <= self.device_shots <= 200,
                   "data: device_count >= 1 and device_shots in 1..200")
            _check(0.0 < self.val_fraction < 0.5,
                   f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
            return
        if self.dataset != "hapt":
            _check(16 <= self.image_size <= 512,
                   f"data.image_size must be in 16..512 px, got {self.image_size}")
            _check(self.image_mode in ("RGB", "L"),
                   f"data.image_mode: expected 'RGB' or 'L', got {self.image_mode!r}")
            _check(self.device_dataset == "digits",
                   f"data.device_dataset: expected 'digits', got {self.device_dataset!r}")
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
    def is_image(self) -> bool:
        """Whether the recipe's data are images."""
        return self.dataset == "fashion_mnist"

    @property
    def is_text(self) -> bool:
        """Whether the recipe's data are texts."""
        return self.dataset == "wordnet"


@dataclass(frozen=True)
class NetConfig:
    """A backbone.

    ``cnn1d`` (windows) and ``cnn2d`` (images): one conv block (conv, BN, ReLU, optional
    max-pool) per entry of ``channels``, then global average pooling. ``efficientnet_lite0``:
    the ImageNet network (``pretrained`` loads its weights); channels/kernels/pools unused.
    ``minilm``: the all-MiniLM-L6-v2 sentence encoder (mean pooling, L2 normalisation) with
    ``layers`` of its 6 transformer layers, evenly spaced (``pretrained`` loads its weights).
    """

    channels: tuple[int, ...] = (32, 64, 64)
    kernels: tuple[int, ...] = (7, 5, 3)
    pools: tuple[int, ...] = (2, 2, 1)
    dropout: float = 0.1
    arch: str = "cnn1d"
    pretrained: bool = False
    layers: int = 6

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
               f"net.pretrained: only efficientnet_lite0 has pretrained weights, not {self.arch}")


@dataclass(frozen=True)
class TrainConfig:
    """Supervised training of a network on server data (AdamW, cosine schedule)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0

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

    temperature: float = 4.0
    alpha: float = 0.7
    embedding_weight: float = 0.0

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

    kind: str = "linear"
    hidden: int = 32
    scale: float = 10.0
    learn_scale: bool = True
    l2sp: float = 0.0
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

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

    ``target`` / ``precision`` is what ``edgetl export`` writes by default; ``edgetl run``
    writes one bundle for every pair of ``targets`` x ``precisions``.
    """

    target: str = "onnx"
    precision: str = "fp32"
    targets: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] = ("fp32",)
    opset: int = 17
    n_test_vectors: int = 8
    train_batch: int = 32             # fixed-batch runtimes (TFLite) train on exactly this
    calibration_windows: int = 512    # int8: source windows the activation ranges come from
    max_accuracy_drop: float = MAX_ACCURACY_DROP_POINTS  # held-out points a bundle may lose
    trainer: str = "stateless"        # or "ort-training": also ONNX Runtime training artifacts
    class_capacity: int = 0           # fixed-class heads (TFLite): rows, spare ones for new labels

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
        _check(0 <= self.class_capacity <= 1024,
               f"export.class_capacity must be in 0..1024, got {self.class_capacity}")
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

    epochs: int = 30
    batch_size: int = 32
    val_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self):
        _check(self.epochs >= 1 and self.batch_size >= 1, "adapt: epochs and batch_size >= 1")
        _check(0.0 < self.val_fraction < 1.0,
               f"adapt.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class CheckConfig:
    """``edgetl check``: who plays the phones of the adaptation check, and how much it may lose.

    The adaptation check personalises the ``users`` (default: the server-validation users,
    never trained on and never the held-out device users) and requires the mean personalised
    accuracy to be no more than ``max_adaptation_loss`` points below the general head's.
    """

    users: tuple[int, ...] = ()
    max_adaptation_loss: float = MAX_ADAPTATION_LOSS_POINTS

    def __post_init__(self):
        _check(self.max_adaptation_loss >= 0,
               f"check.max_adaptation_loss is in points (>= 0), got {self.max_adaptation_loss}")


@dataclass(frozen=True)
class TransferConfig:
    """Server-side transfer methods (``edgetl methods``; see ``edgetl/methods/``).

    ``method`` is the one a pipeline applies, ``methods`` the ones ``edgetl methods``
    compares. The source model trains ``source_epochs`` (recipe's student net); supervised
    methods fine-tune ``epochs`` on labelled target data, alignment methods take
    ``uda_steps`` steps of ``batch_size`` source + target inputs; Adam at ``lr``. Vision:
    ``shots`` labelled digits per class, images at ``image_size`` px (0: data.image_size),
    one run per seed of ``seeds``. HAR: ``users`` (default data.device_users) are the targets.
    """

    method: str = "finetune"
    methods: tuple[str, ...] = TRANSFER_METHODS
    source_epochs: int = 6
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    uda_steps: int = 100
    l2sp_alpha: float = 0.1
    l2sp_beta: float = 0.01
    ewc_lambda: float = 100.0
    ewc_samples: int = 256
    dann_lambda: float = 1.0
    dann_hidden: int = 64
    mmd_lambda: float = 1.0
    coral_lambda: float = 1.0
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: int = 10
    image_size: int = 32
    users: tuple[int, ...] = ()

    def __post_init__(self):
        for m in (self.method, *self.methods):
            _check(m in TRANSFER_METHODS,
                   f"transfer.method(s): {m!r} unknown; known: {list(TRANSFER_METHODS)}")
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

    name: str = "har"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: NetConfig = field(default_factory=lambda: NetConfig((64, 128, 128), (7, 5, 3)))
    student: NetConfig = field(default_factory=lambda: NetConfig((16, 32, 48), (7, 5, 3)))
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    student_train: TrainConfig = field(default_factory=TrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), for run records."""
        return dataclasses.asdict(self)


def _build(base, raw: dict[str, Any], where: str):
    """Return ``base`` (a dataclass instance) with the keys of ``raw`` replaced, type-checked."""
    known = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(raw) - set(known))
    _check(not unknown, f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for k, v in raw.items():
        default = getattr(base, k)
        if dataclasses.is_dataclass(default):
            _check(isinstance(v, dict), f"{where}.{k}: expected a table, got {type(v).__name__}")
            kwargs[k] = _build(default, v, f"{where}.{k}")
        elif isinstance(default, tuple):
            _check(isinstance(v, list), f"{where}.{k}: expected a list, got {v!r}")
            kwargs[k] = tuple(v)
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            kwargs[k] = float(v)
        else:
            _check(default is None or isinstance(v, type(default)),
                   f"{where}.{k}: expected {type(default).__name__}, got {v!r}")
            kwargs[k] = v
    return dataclasses.replace(base, **kwargs)


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe TOML file.

    Raises:
        ConfigError: the file is missing, is not TOML, or has unknown or invalid keys.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "recipe.toml"
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist; try models/har/recipe.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    return _build(Recipe(), raw, path.name)
