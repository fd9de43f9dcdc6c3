"""``manifest.json``: the whole contract between server and device, as one typed schema.

One ``TypedDict`` per block. :func:`check` validates a parsed manifest against these types
(every required key present, every value of its type, unknown ``schema_version`` refused),
so a damaged or foreign manifest fails here with the field's path, never deep in the runner.
The server (``edgetl``) writes manifests with these same types and checks them with the same
function; ``docs/bundle-format.md`` is generated from this module.

Standard library only: this file runs on the device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, List, Optional, TypedDict, Union

from edgerun import RunnerError
from edgerun.files import open_regular

#: Version of this schema; bumped whenever a block changes. A runner refuses others.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
#: A manifest is a few KiB; anything much larger is not one (and is not read whole).
MAX_MANIFEST_BYTES = 4 << 20


class FileEntry(TypedDict):
    """One bundle file: path relative to the bundle folder, sha256, size in bytes."""

    path: str
    sha256: str
    bytes: int


class Quant(TypedDict):
    """Affine int8 quantisation of a graph input or output: ``real = (q - zero) * scale``."""

    dtype: str
    scale: float
    zero_point: int


class QuantIO(TypedDict, total=False):
    """The affine maps a float-I/O int8 graph applies inside (``quantization.in_graph``)."""

    input: Optional[Quant]
    output: Optional[Quant]


class QuantBlock(TypedDict, total=False):
    """How the backbone was quantised; ``input``/``output``: the int8 graph's affine maps.

    The runner quantises what it feeds with ``input`` and dequantises what it reads with
    ``output``; null or absent: the graph takes / returns float32. ``graph_io`` ``float32``
    (TFLite ``export.int8_io``): an int8 graph that quantises its input and dequantises its
    output itself, with the maps in ``in_graph`` (a record; the self-test tolerance is
    chosen from ``in_graph.output.scale``). Other keys (scheme, calibration, ...) are a
    record for people and not read by a runner.
    """

    input: Optional[Quant]
    output: Optional[Quant]
    scheme: str
    graph_io: str
    in_graph: QuantIO


class _Input(TypedDict):
    name: str
    shape: List[Optional[int]]
    batch_size: Optional[int]
    signature: Optional[str]
    dtype: str
    modality: str
    layout: str


class InputBlock(_Input, total=False):
    """What the backbone takes and how raw data becomes it (``modality`` picks the kind).

    ``dtype`` is the graph's input type; ``shape[0]`` / ``batch_size`` is the fixed batch of
    the graph, or null for any batch. Kind-specific keys: timeseries ``channels``, ``window``,
    ``stride``, ``sample_rate_hz``, ``preprocess``; image ``image``; text ``text``,
    ``names``, ``length_signatures``; tensor ``data_dtype``, ``preprocess``.
    """

    channels: List[str]
    window: int
    stride: int
    sample_rate_hz: float
    preprocess: Dict[str, Any]
    image: Dict[str, Any]
    text: Dict[str, Any]
    names: List[str]
    length_signatures: Dict[str, str]
    data_dtype: str


class FeaturesBlock(TypedDict):
    """The backbone's output: graph output name and feature dimension."""

    name: str
    dim: int


class ParamSpec(TypedDict):
    """One trainable head parameter."""

    name: str
    shape: List[int]


class _Head(TypedDict):
    kind: str
    hidden: int
    embedding_dim: int
    params: List[ParamSpec]
    class_params: List[str]
    init_file: str
    capacity: int
    unused_bias: float


class HeadBlock(_Head, total=False):
    """The trainable head: kind, parameters (initial values in ``init_file``), class rows.

    ``capacity`` class rows exist in fixed-shape graphs; spare rows have bias
    ``unused_bias`` until a device imprints a new label into them.
    """

    learn_scale: bool
    l2sp: float


class StateSpec(TypedDict):
    """One optimizer state tensor (``like``: the parameter it has the shape of)."""

    name: str
    like: Optional[str]
    shape: List[int]


class OptimizerBlock(TypedDict):
    """The device optimizer: name, hyper-parameters (fed as graph inputs) and its state.

    ``hparams``: the optimizer's (``lr``, ``momentum``, ``weight_decay`` for sgd; ``lr``,
    ``beta1``, ``beta2``, ``eps``, ``weight_decay`` for adam), ``l2sp`` with an L2-SP head, and
    ``backbone_lr_scale`` when the train step updates backbone tensors (``trainable``): they
    step at ``lr * backbone_lr_scale``, the head at ``lr``.
    """

    name: str
    hparams: Dict[str, float]
    state: List[StateSpec]


class GraphBlock(TypedDict):
    """One graph (file role + signature) with its input and output names."""

    file: str
    signature: Optional[str]
    inputs: List[str]
    outputs: List[str]
    batch_size: Optional[int]


class _TrainStep(GraphBlock):
    loss_output: str
    targets_input: str
    targets_encoding: str
    sample_weight_input: str
    hparam_inputs: List[str]
    dynamic_classes: bool
    trainer: str


class FusedStepBlock(GraphBlock):
    """Several train steps in one runtime call (``edgetl.export.fused``).

    The one-step graph's inputs and outputs (same names), with the features, targets and
    sample weights of ``steps`` batches stacked on a leading axis and ``loss_output`` one
    loss per step; parameters and optimizer state are carried from step to step. ``steps``
    null: any number of steps per call (an ONNX ``Scan``); a number: exactly that many (TFLite:
    the steps unrolled, at the fixed ``batch_size``; the runner fuses groups of ``steps`` full
    batches and runs the rest of an epoch one step per call).
    """

    steps: Optional[int]
    loss_output: str


class RunBlock(GraphBlock):
    """A whole adaptation's epochs in one runtime call (``edgetl.export.fused.run_graph``).

    The fused graph's inputs with ``features``, ``targets`` and ``sample_weight`` stacked on
    one more leading axis (epochs, steps, N, ...), plus ``val_input`` (the validation
    features, (M, D)). Per epoch: its steps as the fused graph takes them, then the infer
    graph on ``val_input`` with the epoch's new parameters. Outputs: ``loss_output``
    (epochs, steps), the final ``new.*`` values, ``<epoch_prefix><name>`` (every parameter
    and optimizer state after each epoch, stacked on a leading epochs axis) and
    ``val_logits_output`` (epochs, M, rows).
    """

    loss_output: str
    val_input: str
    val_logits_output: str
    epoch_prefix: str


class TrainStepBlock(_TrainStep, total=False):
    """The stateless train step: which inputs carry targets, weights, hyper-parameters.

    ``hparam_shape`` (optional): the shape of every ``hparam_inputs`` tensor in the graph;
    absent: 0-d (``[]``). TFLite heads take ``[1]``: every LiteRT flavour then runs them
    without resizing an input (see docs/tflite-notes.md, Scalars).

    ``fused`` (optional; absent in older bundles, for targets without one, and where the
    export could not build or check it: ``checks.fused_train_unsupported`` then says why): the
    K-step train graph a runner may use instead of K calls of this one. ``run`` (optional; ONNX
    heads with dynamic batches): epochs of the fused graph with their validation logits, a
    runner may use instead of one fused and one infer call per epoch.
    """

    anchor_inputs: Dict[str, str]
    ort_training: Dict[str, Any]
    fused: FusedStepBlock
    run: RunBlock
    hparam_shape: List[int]


class _TestVectors(TypedDict):
    file: str
    count: int
    atol: float
    train_steps: int
    train_atol: float


class TestVectorsBlock(_TestVectors, total=False):
    """Reference inputs/outputs for the device self-test, with their tolerances.

    ``atol`` bounds the backbone's features; ``logits_atol`` (when given) the head's logits,
    which the device computes from the *shipped* features, so the backbone's error does not
    reach them. Without it ``atol`` bounds both. int8 bundles with an int8 output set
    ``atol`` to a few steps of ``quantization.output.scale`` (``checks.selftest_tolerance``
    says how each bundle's tolerances were chosen).
    """

    logits_atol: float


class _Gate(TypedDict):
    rule: str
    alpha: float
    chosen_on: str


class GateBlock(_Gate, total=False):
    """The adaptation gate (``edgerun.gate``).

    ``rule`` ``mcnemar`` (keep an adapted head only if it beats the current one on the
    validation windows with one-sided exact McNemar ``p <= alpha``) or ``none``;
    ``chosen_on`` says where ``alpha`` was chosen. Optional ``max_forget``: with a replay set,
    a head that loses more than this many points of accuracy on it is refused too. Optional
    ``folds`` (default 1): the test pools the paired predictions of this many validation
    folds, each from another run of the same training on the rest of the data.
    """

    max_forget: float
    folds: int


class _Adapt(TypedDict):
    epochs: int
    batch_size: int
    val_fraction: float


class _Replay(TypedDict):
    weight: float
    count: int


class ReplayBlock(_Replay, total=False):
    """Latent replay (``edgerun.replay``): server features trained beside the device's.

    ``files.replay`` holds ``count`` server-training windows' backbone features and label
    ids; they train beside the device's windows with total weight ``weight`` relative to them
    (``per_class``, ``min_per_class``: windows per label; ``source``: where they came from).
    ``inputs``: bundles with AdaBN graphs also hold that many of the windows themselves
    (preprocessed, float16), on which the gate judges recalibrated BN statistics.
    """

    per_class: int
    min_per_class: int
    inputs: int
    source: str


class AdaptBlock(_Adapt, total=False):
    """Adaptation defaults of this bundle (the recipe's ``[adapt]``); flags override them.

    Optional (absent in older bundles: the runner's defaults apply): ``gate``,
    ``patience`` (epochs without a lower validation loss before stopping; 0: never) and
    ``mix`` (weights of the adapted head mixed with the starting one; the lowest validation
    loss wins), ``class_balanced`` (weight windows so every local label counts the same) and
    ``freeze_absent`` (labels the local data lacks keep their class rows), ``replay`` (a
    latent-replay set ships in ``files.replay``).
    """

    gate: GateBlock
    patience: int
    mix: List[float]
    class_balanced: bool
    freeze_absent: bool
    replay: ReplayBlock


class Parent(TypedDict):
    """The bundle version this one was made from (``edgetl.versioning``)."""

    version: int
    manifest_sha256: str
    backbone_sha256: str


class _BNLayer(TypedDict):
    name: str
    channels: int


class BNLayer(_BNLayer, total=False):
    """One BatchNorm layer of the backbone: module name and channels.

    ``per_window``: values per channel per window at its input (the spatial size; 1 after
    pooling).
    """

    per_window: int


class _AdaBN(TypedDict):
    batch_size: int
    reference: str
    layers: List[BNLayer]


class AdaBNBlock(_AdaBN, total=False):
    """Unsupervised on-device adaptation: re-estimated BatchNorm statistics (``edgerun.adabn``).

    ``stats`` (inputs ``x``, ``mask`` -> per layer ``mean_i``, ``var_i``: batch mean and biased
    variance over the rows with mask 1, every BN in training mode) and ``features`` (``x`` and
    the running ``mean_i``, ``var_i`` -> features, eval mode). The device's statistics must
    match ``reference`` (torch) within ``atol`` and the features with them within
    ``features_atol`` (the self-test checks both). ``unsupported`` (instead of the graphs) says
    why this bundle cannot recalibrate: no BatchNorm layers, or int8.
    """

    stats: GraphBlock
    features: GraphBlock
    atol: float
    features_atol: float
    unsupported: str


class CutPart(TypedDict):
    """One tensor of a multi-part cut: its graph node, per-sample shape and dtype.

    ``dtype`` as torch names it (``float32``, ``int64``, ``bool``); integer values are exact
    in the float32 features below 2**24 (the export refuses larger ones).
    """

    node: str
    shape: List[int]
    dtype: str


class _Cut(TypedDict):
    node: str
    shape: List[int]


class CutBlock(_Cut, total=False):
    """Where the frozen prefix ends: the cached tensor (``features``, flattened to ``dim``).

    ``parts`` (optional): the features hold these tensors side by side, in column order,
    each flattened and cast to float32 (token ids and a mask derived from them, say, when no
    single float tensor is all the trained layers need); with more than one part, ``node``
    joins their names with `` + `` and ``shape`` is ``[dim]``. The train and infer graphs
    split and cast them back themselves: a runner caches and feeds the features as opaque
    ``(N, dim)`` float32 either way, and bundles without ``parts`` (one float tensor) are
    read as before.
    """

    parts: List[CutPart]


class TrainableBlock(TypedDict):
    """What the train step updates beyond the head (``edgetl export --trainable SPEC``).

    ``spec`` as given; ``params`` the trainable backbone tensors (``backbone.<name>``, also
    listed in ``head.params`` and held by the head checkpoint); ``cut``: the backbone graph
    is the frozen prefix up to ``cut.node``, whose output (per-sample ``cut.shape``) the
    runner caches as features; the train and infer graphs run the rest, then the head.
    """

    spec: str
    cut: CutBlock
    params: List[ParamSpec]
    gradients: str


class _Manifest(TypedDict):

    schema_version: int
    edgetl_version: str
    name: str
    version: int
    parent: Optional[Parent]
    target: str
    precision: str
    files: Dict[str, FileEntry]
    input: InputBlock
    features: FeaturesBlock
    labels: List[str]
    head: HeadBlock
    optimizer: OptimizerBlock
    train_step: TrainStepBlock
    infer: GraphBlock
    test_vectors: TestVectorsBlock
    adapt: AdaptBlock
    quantization: QuantBlock
    checks: Dict[str, Any]
    provenance: Dict[str, Any]


class Manifest(_Manifest, total=False):
    """``manifest.json``; its optional blocks.

    ``adabn`` is absent in bundles exported before AdaBN support; ``trainable`` is present
    only in bundles that train more than the head.
    """

    adabn: AdaBNBlock
    trainable: TrainableBlock


def _hints(td) -> dict:
    import typing

    return typing.get_type_hints(td)


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _conform(value, tp, where: str) -> None:
    """Raise :class:`RunnerError` unless ``value`` has type ``tp`` (recursively)."""
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return
    if origin is Union:
        if value is None and type(None) in args:
            return
        return _conform(value, next(a for a in args if a is not type(None)), where)
    if isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__"):
        _expect(isinstance(value, dict), where, "an object", value)
        hints = _hints(tp)
        missing = sorted(k for k in tp.__required_keys__ if k not in value)
        if missing:
            raise RunnerError(f"manifest.json: {where} lacks {missing}; the bundle is damaged "
                              "or was written by another edgetl version: re-export it")
        for k, v in value.items():
            if k in hints:
                _conform(v, hints[k], f"{where}.{k}")
        return
    if origin in (list, List):
        _expect(isinstance(value, list), where, "a list", value)
        for i, v in enumerate(value):
            _conform(v, args[0], f"{where}[{i}]")
        return
    if origin in (dict, Dict):
        _expect(isinstance(value, dict), where, "an object", value)
        for k, v in value.items():
            _expect(isinstance(k, str), where, "string keys", k)
            _conform(v, args[1], f"{where}[{k!r}]")
        return
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return _expect(ok, where, "a number", value)
    if tp is int:
        return _expect(isinstance(value, int) and not isinstance(value, bool), where,
                       "an integer", value)
    _expect(isinstance(value, tp), where, f"a {_name(tp)}", value)


def _expect(ok: bool, where: str, what: str, found) -> None:
    if not ok:
        shown = repr(found)
        raise RunnerError(f"manifest.json: {where} must be {what}, found "
                          f"{shown[:60] + '…' if len(shown) > 60 else shown}; the bundle is "
                          "damaged or not an edgetl bundle, re-export it")


def check(m) -> dict:
    """Validate a parsed manifest against :class:`Manifest`; return it."""
    if not isinstance(m, dict):
        raise RunnerError(f"manifest.json must hold a JSON object, found {type(m).__name__}; "
                          "re-export the bundle")
    if m.get("schema_version") != SCHEMA_VERSION:
        found = m.get("schema_version")
        raise RunnerError(f"manifest schema_version {found!r} is not supported (this runner "
                          f"reads {SCHEMA_VERSION}); re-export the bundle with the matching "
                          "edgetl, or update the runner")
    _conform(m, Manifest, "manifest")
    _consistent(m)
    if not m["files"]:
        raise RunnerError("manifest.json: 'files' is empty; re-export the bundle")
    if not m["labels"] or len(set(m["labels"])) != len(m["labels"]):
        raise RunnerError(f"manifest.json: labels must be distinct names, found "
                          f"{m['labels'][:10]}; re-export the bundle")
    return m


#: Element types a graph input (``input.dtype``) or tensor data may declare.
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
#: Largest dimension and element count a manifest may declare (a head is kilobytes; a
#: declared shape is allocated with ``np.zeros``, so a huge one would exhaust memory).
MAX_DIM, MAX_ELEMENTS = 1 << 24, 1 << 26


def _at_least(value, low, where: str, high=None) -> None:
    """``value`` is finite and in ``[low, high]`` (``None``: unbounded), else refused."""
    import math

    ok = math.isfinite(value) and (low is None or value >= low) and (high is None
                                                                     or value <= high)
    what = " and ".join(["a finite number", *([f">= {low}"] if low is not None else []),
                         *([f"<= {high}"] if high is not None else [])])
    _expect(ok, where, what, value)


def _shape(shape: list, where: str, nullable: bool = False) -> None:
    n = 1
    for i, d in enumerate(shape):
        if d is None and nullable:
            continue
        _expect(d is not None, f"{where}[{i}]", "an integer", d)
        _at_least(d, 1, f"{where}[{i}]", MAX_DIM)
        n *= d
    _expect(n <= MAX_ELEMENTS, where, f"a shape of at most {MAX_ELEMENTS} elements", shape)


def _subset(names, known, where: str, what: str) -> None:
    bad = [n for n in names if n not in known]
    _expect(not bad, where, f"names of {what} {sorted(known)}", bad)


def _consistent(m: dict) -> None:
    """Rules between fields that the types alone cannot state (each names the field).

    Every file role a block points at is listed in ``files``; every name the runner feeds to
    or reads from a graph is declared where the runner looks for it (head parameters,
    optimizer state, hyper-parameters, graph inputs and outputs); shapes and counts are
    positive and bounded; the timeseries keys the loaders need are present and sane. A
    manifest that breaks one of these would otherwise fail deep in the runner (a KeyError,
    a runtime's "missing input", a huge allocation).
    """
    files, head, opt, ts, inf = (m["files"], m["head"], m["optimizer"], m["train_step"],
                                 m["infer"])
    for where, role in (("files", "backbone"), ("head.init_file", head["init_file"]),
                        ("train_step.file", ts["file"]), ("infer.file", inf["file"]),
                        ("test_vectors.file", m["test_vectors"]["file"])):
        _expect(role in files, where, f"a file role listed in files {sorted(files)}", role)
    if "adabn" in m and "unsupported" not in m["adabn"]:  # the graphs and their tolerances
        a = m["adabn"]
        for k in ("stats", "features", "atol", "features_atol"):
            _expect(k in a, f"adabn.{k}", "present (or adabn.unsupported)", None)
        for k in ("stats", "features"):
            _expect(a[k]["file"] in files, f"adabn.{k}.file",
                    f"a file role listed in files {sorted(files)}", a[k]["file"])
        _expect(len(a["stats"]["outputs"]) == 2 * len(a["layers"]), "adabn.stats.outputs",
                f"a mean and a variance per layer ({2 * len(a['layers'])} names)",
                a["stats"]["outputs"])
        _expect(len(a["features"]["outputs"]) == 1, "adabn.features.outputs",
                "one output (the features)", a["features"]["outputs"])
    rp = m["adapt"].get("replay")
    if rp:  # a replay block needs its file; a bundle's weight is finite and >= 0
        _expect("replay" in files, "adapt.replay", "files.replay listed with it", sorted(files))
        _at_least(rp["weight"], 0, "adapt.replay.weight")
        _at_least(rp["count"], 0, "adapt.replay.count", MAX_DIM)
        if "inputs" in rp:
            _at_least(rp["inputs"], 0, "adapt.replay.inputs", rp["count"])
    mf = (m["adapt"].get("gate") or {}).get("max_forget")
    if mf is not None:
        _at_least(mf, 0, "adapt.gate.max_forget", 100)
    folds = (m["adapt"].get("gate") or {}).get("folds")
    if folds is not None:
        _at_least(folds, 1, "adapt.gate.folds", 20)
    params = [p["name"] for p in head["params"]]
    _expect(params and len(set(params)) == len(params), "head.params",
            "distinct parameter names", params)
    for i, p in enumerate(head["params"]):
        _shape(p["shape"], f"head.params[{i}].shape")
    _expect(len(head["class_params"]) == 2, "head.class_params",
            "[weight name, bias name] of the class layer", head["class_params"])
    _subset(head["class_params"], params, "head.class_params", "head.params")
    _at_least(head["capacity"], 0, "head.capacity", MAX_DIM)  # 0: not stated
    _at_least(head["embedding_dim"], 1, "head.embedding_dim", MAX_DIM)
    _at_least(head["hidden"], 0, "head.hidden", MAX_DIM)
    _at_least(m["features"]["dim"], 1, "features.dim", MAX_DIM)
    state = [s["name"] for s in opt["state"]]
    for i, st in enumerate(opt["state"]):
        _shape(st["shape"], f"optimizer.state[{i}].shape")
        _expect(st["like"] is None or st["like"] in params, f"optimizer.state[{i}].like",
                f"null or one of head.params {params}", st["like"])
    for k, v in opt["hparams"].items():
        _at_least(v, None, f"optimizer.hparams[{k!r}]")
    _subset(ts["hparam_inputs"], opt["hparams"], "train_step.hparam_inputs",
            "optimizer.hparams")
    anchors = ts.get("anchor_inputs") or {}
    _subset(anchors.values(), params, "train_step.anchor_inputs", "head.params")
    _expect(bool(ts["inputs"]), "train_step.inputs", "a non-empty list (features first)",
            ts["inputs"])
    fed = [ts["inputs"][0], ts["targets_input"], ts["sample_weight_input"],
           *ts["hparam_inputs"], *params, *state, *anchors]
    _expect(sorted(fed) == sorted(ts["inputs"]), "train_step.inputs", "exactly the inputs the "
            f"runner feeds (features, targets, weights, hparams, params, state, anchors) "
            f"{sorted(fed)}", ts["inputs"])
    _subset([ts["loss_output"], *(f"new.{n}" for n in params + state)], ts["outputs"],
            "train_step (loss and new.* outputs)", "train_step.outputs")
    if "fused" in ts:  # the K-step graph: the one-step graph's names, on its own file
        fz = ts["fused"]
        _expect(fz["file"] in files, "train_step.fused.file",
                f"a file role listed in files {sorted(files)}", fz["file"])
        _expect(sorted(fz["inputs"]) == sorted(ts["inputs"]), "train_step.fused.inputs",
                f"the same names as train_step.inputs {sorted(ts['inputs'])}", fz["inputs"])
        _subset([fz["loss_output"], *(f"new.{n}" for n in params + state)], fz["outputs"],
                "train_step.fused (loss and new.* outputs)", "train_step.fused.outputs")
        if fz["steps"] is not None:
            _at_least(fz["steps"], 1, "train_step.fused.steps", MAX_DIM)
        if fz["batch_size"] is not None:
            _at_least(fz["batch_size"], 1, "train_step.fused.batch_size", MAX_DIM)
    if "run" in ts:  # the whole-run graph: the fused graph's names and the validation ones
        rb = ts["run"]
        _expect("fused" in ts, "train_step.run", "a train_step.fused block beside it", rb)
        _expect(rb["file"] in files, "train_step.run.file",
                f"a file role listed in files {sorted(files)}", rb["file"])
        _expect(sorted(rb["inputs"]) == sorted([*ts["inputs"], rb["val_input"]]),
                "train_step.run.inputs", f"train_step.inputs {sorted(ts['inputs'])} and "
                "val_input", rb["inputs"])
        _subset([rb["loss_output"], rb["val_logits_output"],
                 *(f"{p}{n}" for n in params + state for p in ("new.", rb["epoch_prefix"]))],
                rb["outputs"], "train_step.run (loss, val logits, new.* and per-epoch outputs)",
                "train_step.run.outputs")
    _expect(bool(inf["inputs"]), "infer.inputs", "a non-empty list (features first)",
            inf["inputs"])
    _subset(inf["inputs"][1:], params, "infer.inputs[1:]", "head.params")
    _subset(["logits"], inf["outputs"], "infer.outputs", "outputs")
    if "trainable" in m:  # the backbone tensors it names are ones the train step updates
        _trainable(m["trainable"], head["params"], m["features"]["dim"])
    inp = m["input"]
    _shape(inp["shape"], "input.shape", nullable=True)
    for k in ("dtype", "data_dtype"):
        _expect(inp.get(k, "float32") in DTYPES, f"input.{k}", f"one of {DTYPES}", inp.get(k))
    for where, b in (("input.batch_size", inp["batch_size"]),
                     ("train_step.batch_size", ts["batch_size"]),
                     ("infer.batch_size", inf["batch_size"])):
        if b is not None:
            _at_least(b, 1, where, MAX_DIM)
    tv = m["test_vectors"]
    for k in ("count", "train_steps"):
        _at_least(tv[k], 0, f"test_vectors.{k}", MAX_DIM)
    for k in ("atol", "train_atol", "logits_atol"):
        if k in tv:
            _at_least(tv[k], 0, f"test_vectors.{k}")
    ad = m["adapt"]
    _at_least(ad["epochs"], 0, "adapt.epochs", MAX_DIM)
    _at_least(ad["batch_size"], 1, "adapt.batch_size", MAX_DIM)
    _expect(0 < ad["val_fraction"] < 1, "adapt.val_fraction", "a number in (0, 1)",
            ad["val_fraction"])
    for k in ("input", "output"):
        q = m["quantization"].get(k)
        if q is not None:
            _expect(q["dtype"] in ("int8", "uint8"), f"quantization.{k}.dtype",
                    "'int8' or 'uint8'", q["dtype"])
            _at_least(q["scale"], 1e-30, f"quantization.{k}.scale")
            _at_least(q["zero_point"], -128, f"quantization.{k}.zero_point", 255)
    if inp.get("modality", "timeseries") == "timeseries":
        _timeseries(inp)


def _trainable(tr: dict, params: list, dim: int) -> None:
    """A tail bundle's ``trainable`` block agrees with the head block and the features.

    Its ``params`` are head parameters of the same shape (the runners train and save
    ``head.params``: a backbone tensor named only here would silently stay frozen), and
    ``cut.shape`` holds ``features.dim`` values per sample (the cached prefix output).
    """
    shapes = {p["name"]: list(p["shape"]) for p in params}
    bad = [p["name"] for p in tr["params"] if shapes.get(p["name"]) != list(p["shape"])]
    _expect(not bad, "trainable.params", "head.params of the same shape (the tensors the "
            "train step updates)", bad)
    _shape(tr["cut"]["shape"], "trainable.cut.shape")
    n = math.prod(tr["cut"]["shape"])
    _expect(n == dim, "trainable.cut.shape", f"features.dim = {dim} values per sample", n)


def _timeseries(inp: dict) -> None:
    """The keys the timeseries loaders and preprocessing read."""
    missing = [k for k in ("channels", "window", "stride", "sample_rate_hz") if k not in inp]
    _expect(not missing, "input", "a timeseries block with channels, window, stride and "
            "sample_rate_hz", f"{missing} missing")
    _expect(bool(inp["channels"]), "input.channels", "a non-empty list", inp["channels"])
    _at_least(inp["window"], 1, "input.window", MAX_DIM)
    _at_least(inp["stride"], 1, "input.stride", MAX_DIM)
    _at_least(inp["sample_rate_hz"], 1e-9, "input.sample_rate_hz")
    norm = inp.get("preprocess", {}).get("normalize")
    if not norm:
        return
    _expect(isinstance(norm, dict), "input.preprocess.normalize", "an object", norm)
    for k in ("mean", "std"):
        v = norm.get(k)
        where = f"input.preprocess.normalize.{k}"
        ok = (isinstance(v, list) and len(v) == len(inp["channels"])
              and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v))
        _expect(ok, where, f"a list of {len(inp['channels'])} numbers (one per channel)", v)
        for i, e in enumerate(v):
            _at_least(e, 1e-30 if k == "std" else None, f"{where}[{i}]")


def parse(body: bytes) -> dict:
    """Parse and :func:`check` the bytes of a manifest."""
    try:
        m = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunnerError(f"manifest.json is not valid JSON ({str(e)[:120]}); re-export the "
                          "bundle") from None
    return check(m)


def read_bytes(root: str) -> bytes:
    """The bytes of ``root/manifest.json``, read once (a regular file, size-capped)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise RunnerError(f"bundle {root} is not a directory; pass the folder that "
                          "`edgetl export` wrote")
    if not os.path.isfile(path):
        raise RunnerError(f"{root} has no {MANIFEST}; is it an edgetl bundle?")
    with open_regular(path, "bundle file") as f:
        body = f.read(MAX_MANIFEST_BYTES + 1)
    if len(body) > MAX_MANIFEST_BYTES:
        raise RunnerError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a "
                          "manifest")
    return body


def sha256_file(path: str) -> str:
    """Hex sha256 of a regular file (never a FIFO or device), streamed."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_path(root: str, rel: str) -> str:
    """``root/rel`` if it names a file directly inside ``root``, else refused.

    No ``..``, no absolute path, no NUL byte, no symlink leading elsewhere.
    """
    if "\x00" in rel or "\x00" in root or os.path.isabs(rel):
        raise RunnerError(f"manifest file {rel!r} points outside the bundle; refusing it")
    full = os.path.normpath(os.path.join(root, rel))
    real = os.path.realpath(full)
    if (os.path.dirname(full) != os.path.normpath(root)
            or os.path.dirname(real) != os.path.realpath(root)):
        raise RunnerError(f"manifest file {rel!r} points outside the bundle; refusing it")
    return full


def verify_files(root: str, m: dict) -> None:
    """Every listed file is inside ``root``, present, and matches its sha256."""
    for role, entry in m["files"].items():
        p = safe_path(root, entry["path"])
        if not os.path.isfile(p):
            raise RunnerError(f"bundle file {entry['path']} ({role}) is missing from {root}")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise RunnerError(
                f"bundle file {entry['path']} ({role}) fails its hash check: sha256 "
                f"{digest[:12]}… but manifest.json says {entry['sha256'][:12]}…; the file was "
                "modified or corrupted. Re-download the bundle")


def markdown() -> str:
    """The bundle format as Markdown, from the TypedDicts above (``docs/bundle-format.md``)."""
    blocks = [Manifest, FileEntry, InputBlock, FeaturesBlock, HeadBlock, ParamSpec,
              OptimizerBlock, StateSpec, GraphBlock, TrainStepBlock, TestVectorsBlock,
              AdaptBlock, GateBlock, AdaBNBlock, BNLayer, TrainableBlock, CutBlock, Parent,
              QuantBlock, Quant]
    out = ["# Bundle format (`manifest.json`, schema version %d)" % SCHEMA_VERSION, "",
           "Generated from `device_runners/edgerun/manifest.py` by `make docs`; do not edit.",
           "A runner refuses a manifest of another schema version, a missing required key or a "
           "value of the wrong type, naming the field.", ""]
    for td in blocks:
        out += [f"## {td.__name__}", "", (td.__doc__ or "").strip().replace("\n    ", "\n"),
                "", "| key | type | required |", "|---|---|---|"]
        for k, tp in _hints(td).items():
            req = "yes" if k in td.__required_keys__ else "no"
            out.append(f"| `{k}` | `{_type_text(tp)}` | {req} |")
        out.append("")
    return "\n".join(out)


def _type_text(tp) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is Union:
        return " | ".join(_type_text(a) for a in args).replace("NoneType", "null")
    if origin in (list, List):
        return f"list[{_type_text(args[0])}]"
    if origin in (dict, Dict):
        return f"object[str, {_type_text(args[1])}]"
    return {str: "str", int: "int", float: "number", bool: "bool",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _blocks() -> list:
    """Every TypedDict reachable from :class:`Manifest`, in first-use order."""
    import typing

    seen: list = []

    def walk(tp) -> None:
        if isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__"):
            if tp in seen:
                return
            seen.append(tp)
            for sub in _hints(tp).values():
                walk(sub)
        for a in typing.get_args(tp):
            walk(a)

    walk(Manifest)
    walk(Quant)
    return seen


def _ts_desc(tp):
    """A JSON type descriptor of ``tp`` for the TypeScript checker (``check.ts``)."""
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is Union:
        rest = [a for a in args if a is not type(None)]
        return {"nullable": _ts_desc(rest[0])} if type(None) in args else _ts_desc(rest[0])
    if isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__"):
        return {"ref": tp.__name__}
    if origin in (list, List):
        return {"list": _ts_desc(args[0])}
    if origin in (dict, Dict):
        return {"dict": _ts_desc(args[1])}
    return {str: "str", int: "int", float: "number", bool: "bool"}[tp]


def _ts_type(d) -> str:
    if isinstance(d, str):
        return {"any": "unknown", "str": "string", "int": "number", "number": "number",
                "bool": "boolean"}[d]
    if "nullable" in d:
        return f"{_ts_type(d['nullable'])} | null"
    if "ref" in d:
        return d["ref"]
    if "list" in d:
        inner = _ts_type(d["list"])
        return f"Array<{inner}>"
    return f"Record<string, {_ts_type(d['dict'])}>"


def typescript() -> str:
    """The schema as TypeScript (``device_runners/js/src/manifest.ts``).

    Interfaces, plus a runtime descriptor that the TypeScript runner validates a manifest
    against with the rules of :func:`check`.
    """
    schema = {td.__name__: {"required": sorted(td.__required_keys__),
                            "fields": {k: _ts_desc(tp) for k, tp in _hints(td).items()}}
              for td in _blocks()}
    out = ["// Generated from device_runners/edgerun/manifest.py by",
           "//   python -m edgerun.manifest --typescript > device_runners/js/src/manifest.ts",
           "// Do not edit: the Python module is the one source of truth (a test fails on drift).",
           "", f"export const SCHEMA_VERSION = {SCHEMA_VERSION};", ""]
    for name, block in schema.items():
        out.append(f"export interface {name} {{")
        for k, d in block["fields"].items():
            opt = "" if k in block["required"] else "?"
            out.append(f"  {json.dumps(k) if not k.isidentifier() else k}{opt}: {_ts_type(d)};")
        out += ["}", ""]
    out += ["export type TypeDesc =", '  | "any" | "str" | "int" | "number" | "bool"',
            "  | { nullable: TypeDesc } | { ref: string } | { list: TypeDesc }"
            " | { dict: TypeDesc };", "",
            "export interface BlockDesc {", "  required: string[];",
            "  fields: Record<string, TypeDesc>;", "}", "",
            "export const SCHEMA: Record<string, BlockDesc> = "
            + json.dumps(schema, indent=2) + ";", ""]
    return "\n".join(out)


if __name__ == "__main__":  # python -m edgerun.manifest > docs/bundle-format.md (make docs)
    import sys

    print(typescript() if sys.argv[1:] == ["--typescript"] else markdown(), end=(
        "" if sys.argv[1:] == ["--typescript"] else "\n"))
