"""Every tolerance edgetl checks bundles against, in one place.

Export (``edgetl export``), the release gate (``edgetl check``) and the tests read these;
the device runner reads the ones it needs from the manifest, where export records them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: max |runtime - PyTorch| of fp32 outputs (backbone features, logits, train-step outputs),
#: per target. Both runtimes land at ~1e-6 on the HAR student; 1e-4 leaves room for other
#: CPUs' kernels (e.g. ARM NEON summation order) without hiding a wrong graph.
PARITY_ATOL = {"onnx": 1e-4, "tflite": 1e-4}


def scaled_atol(target: str, reference) -> float:
    """Parity tolerance for outputs of a given magnitude: ``atol * max(1, max|reference|)``.

    Backbone features and logits are compared relative to their scale (a 1280-d
    EfficientNet feature of magnitude 6 accumulates more float32 rounding than a 48-d one);
    train-step outputs (parameters, optimizer state, loss) keep the absolute tolerance.
    """
    import numpy as np

    return PARITY_ATOL[target] * max(1.0, float(np.max(np.abs(reference))) if np.size(
        reference) else 1.0)

#: Train steps of a tail bundle (``--trainable`` beyond the head) are compared with the same
#: torch step run in float64 (the truth, up to float64 rounding), not with torch's float32
#: step: a backbone tensor's gradient sums products over batch x positions with cancellation,
#: so *any* float32 evaluation of it can be off by far more than the parity tolerance relative
#: to the result (measured: HAR ``--trainable all``, conv-weight momenta ~1, torch float32 off
#: the float64 step by up to 3.0e-3, onnxruntime by 6.6e-7; a 64 px CNN's last conv: both
#: float32 steps off by 1.7e-4 at momenta ~0.2). The exported graph may be this many times as
#: far from the float64 step as torch's own float32 step is (a measured rounding noise, per
#: output: the largest over the checked steps, because a ReLU or max-pool tie rounded the
#: other way reroutes a gradient at one step and another runtime's such jumps fall on other
#: steps — a 64 px CNN's ``all``, conv momentum: torch 5e-4 at one step of 20, onnxruntime
#: 2e-4 at another, both ~1e-6 elsewhere; another summation order gives noise of the same
#: size, not the same values), or within the parity tolerance scaled as
#: :func:`train_step_bound` says, whichever is larger; a wrong graph (a missing term, a wrong
#: sign or learning rate) is off by the gradient's own size and still fails.
TRAIN_STEP_NOISE_FACTOR = 4.0


def train_step_bound(atol: float, truth, noise: float | None = None) -> float:
    """Bound on ``max|runtime - truth|`` of one train-step output.

    ``atol * max(1, max|truth|)`` (float32 rounds relative to the value past 1); with
    ``noise`` (max|torch float32 - torch float64| of this output, the float64 step being
    ``truth``), at least :data:`TRAIN_STEP_NOISE_FACTOR` times that noise.
    """
    import numpy as np

    base = atol * max(1.0, float(np.max(np.abs(truth))) if np.size(truth) else 1.0)
    return base if noise is None else max(base, TRAIN_STEP_NOISE_FACTOR * float(noise))


#: Device self-test of fp32 bundles: the runner must reproduce the shipped reference vectors
#: within this multiple of the target's parity tolerance.
SELFTEST_FP32_FACTOR = 10.0

#: Device self-test of int8 bundles: int8 kernels may round differently on another CPU, so
#: the reference vectors (the exporting runtime's own outputs) are matched within this
#: fraction of the largest feature / logit magnitude (~ a few quantisation steps).
SELFTEST_INT8_REL = 0.02

#: Device self-test of int8 bundles whose backbone output is int8 (TFLite static int8): the
#: features may differ from the shipped vectors (the exporting runtime's own outputs, so 0 on
#: the same build) by this many steps of the output quantisation scale. Another CPU's kernels
#: may round a requantisation the other way (one step at the output, and an inner layer's
#: one-step difference can carry through to a second); a damaged backbone moves features by
#: many steps. Logits are checked separately, from the shipped features through the fp32 head,
#: with the fp32 tolerance (``logits_atol``).
SELFTEST_INT8_STEPS = 2.0


def selftest_tolerances(target: str, precision: str, quantization: dict, features, logits,
                        n_real: int) -> dict:
    """``test_vectors`` tolerances: ``atol`` (features) and ``logits_atol`` when separate.

    fp32: ``SELFTEST_FP32_FACTOR`` times the scaled parity tolerance, one ``atol`` for both.
    int8 with an int8 backbone output (``quantization.output.scale``, or
    ``quantization.in_graph.output.scale`` when the graph dequantises it): features within
    :data:`SELFTEST_INT8_STEPS` output steps, logits (computed on the device from the
    shipped features, so no quantisation error reaches them) within the fp32 tolerance.
    int8 without an output scale (ONNX dynamic quantisation: float outputs, a scale chosen
    per call): the older relative rule, :data:`SELFTEST_INT8_REL` of the largest feature or
    logit. The basis is returned too (``basis``), for the manifest's ``checks``.
    """
    import numpy as np

    logits = np.asarray(logits)[:, :n_real]
    fp32 = SELFTEST_FP32_FACTOR * max(scaled_atol(target, np.asarray(features)[:8]),
                                      scaled_atol(target, logits[:8]))
    if precision != "int8":
        return {"atol": fp32, "basis": f"{SELFTEST_FP32_FACTOR:g} x the {target} parity "
                "tolerance, scaled by the largest value"}
    q = quantization or {}
    # float32 graph I/O (TFLite int8_io="float32"): the same steps, dequantised in the graph
    out = q.get("output") or (q.get("in_graph") or {}).get("output") or {}
    if out.get("scale"):
        step = float(out["scale"])
        # + half a step: dequantised values are float32, so k whole steps may come out a hair
        # above k * scale; the bound means "at most SELFTEST_INT8_STEPS whole steps"
        return {"atol": (SELFTEST_INT8_STEPS + 0.5) * step,
                "logits_atol": SELFTEST_FP32_FACTOR * scaled_atol(target, logits),
                "basis": f"features: at most {SELFTEST_INT8_STEPS:g} steps of the backbone's "
                         f"output quantisation scale {step:.4g}; logits (fp32 head on the shipped "
                         f"features): {SELFTEST_FP32_FACTOR:g} x the fp32 parity tolerance"}
    rel = SELFTEST_INT8_REL * max(float(np.abs(features).max()), float(np.abs(logits).max()))
    return {"atol": rel, "basis": f"{SELFTEST_INT8_REL:g} x the largest feature or logit "
            "(no output quantisation scale: dynamic int8)"}


#: Train steps compared against PyTorch at export and in ``edgetl check``.
TRAIN_STEPS_CHECKED = 20

#: Of the checked train steps, this many may break an output's bound (:func:`train_step_bound`)
#: — by at most :data:`TRAIN_STEP_OUTLIER_FACTOR` times it — when every other step keeps it.
#: A ReLU, ReLU6 or max-pool input that rounds to the other side of its kink in one float32
#: evaluation reroutes one gradient term at one step: measured, a depthwise-separable CNN's
#: ``last:1`` at step 14 of 20, where onnxruntime's momenta were 2.8e-4 off the float64 step
#: on one tensor (2.8 x its bound, 3.8e-4 of its value) and ~1e-6 at the 19 others, while
#: torch's float32 step happened to round that input the same way as float64. A wrong graph
#: (a missing term, a wrong sign or learning rate, mishandled padding) is off at every step.
TRAIN_STEP_OUTLIER_STEPS = 1
TRAIN_STEP_OUTLIER_FACTOR = 10.0

#: Train steps shipped as reference vectors: the device self-test replays them with its
#: trainer (stateless graph or ONNX Runtime training) and compares with the parity tolerance.
#: A bundle with a fixed-K fused graph (TFLite) ships at least K, so the replay reaches it.
TRAIN_VECTOR_STEPS = 3

#: Default held-out accuracy (points) a bundle may lose against the fp32 reference; recipes
#: override it with ``export.max_accuracy_drop``.
MAX_ACCURACY_DROP_POINTS = 1.0

#: Default: personalised heads may not lose accuracy on average against the general head on
#: the check users (points); recipes override it with ``check.max_adaptation_loss``.
MAX_ADAPTATION_LOSS_POINTS = 0.0


def parity_atol(target: str) -> float:
    """The fp32 parity tolerance of ``target``."""
    return PARITY_ATOL[target]


@dataclass(frozen=True)
class PiTolerance:
    """Emulated Linux aarch64 (``make test-pi``) vs x86_64: the same runner, bundle and data.

    ``head_atol``: max |Δ| of the adapted head's parameters, relative to max(1, max|w|);
    ``loss_atol``: max |Δ| of the per-epoch train loss; ``accuracy_points``: |Δ| of the
    validation and infer accuracies; ``min_agreement``: fraction of infer predictions that
    must be identical.
    """

    head_atol: float
    loss_atol: float
    accuracy_points: float
    min_agreement: float


#: Under qemu the runtimes pick the kernels a real Cortex-A72/A76 gets (the emulated CPU's
#: features), so both precisions landed at <= 2e-7 (head) and identical predictions on the HAR
#: student (`make test-pi`, README). fp32 keeps the export parity bound; int8 allows a few
#: activations one quantisation step apart (other int8 kernels, e.g. dot-product ones) on a
#: real Pi: looser, still far below what a wrong graph, layout or scale produces.
PI_TOLERANCE = {"fp32": PiTolerance(1e-4, 1e-4, 0.0, 1.0),
                "int8": PiTolerance(1e-3, 1e-3, 1.0, 0.99)}

#: ``torchrun --nproc-per-node 2`` vs one process (``edgetl pretrain`` / ``distill``, same seed
#: and global batch): max |Δ| of any weight or buffer of the checkpoints. Measured 9e-8 on the
#: test's tiny HAPT recipe (2 epochs); only the order of float sums differs (gradients averaged
#: over ranks, batch statistics all-reduced). Training amplifies such differences: over the full
#: 15-epoch HAR teacher (`make ddp`) 2 processes drift from 1 as far as a 1-thread from a
#: 2-thread single process does, so this bound is for short runs only.
DDP_WEIGHTS_ATOL = 1e-5
