"""``python -m tools.litert_replay BUNDLE...``: docs/android.md's Kotlin sketch, replayed in Python.

The Kotlin LiteRT sketch cannot be compiled here (no Android SDK). This replays its feeding
with ai-edge-litert on a TFLite bundle: the reference train steps from ``head_init.npz`` with
0-d hyper-parameters, one-hot targets over all ``head.capacity`` rows, ``sample_weight`` as
given (0 = padding), parameters and optimizer state fed back each step; the infer signature on
the reference features padded to its fixed batch, asking for ``logits`` only; the backbone on
the normalised reference windows, quantised with round-half-even and dequantised for int8.
Prints the largest errors against ``test_vectors.npz`` beside the manifest's tolerances.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def replay(bundle: Path) -> dict:
    """Largest errors of the sketch's calls against the bundle's reference vectors."""
    from ai_edge_litert.interpreter import Interpreter

    m = json.loads((bundle / "manifest.json").read_text())
    ts, tvb = m["train_step"], m["test_vectors"]
    tv = np.load(bundle / m["files"]["test_vectors"]["path"])
    init = np.load(bundle / m["files"]["head_init"]["path"])
    head = Interpreter(model_path=str(bundle / m["files"][ts["file"]]["path"]), num_threads=1)
    train = head.get_signature_runner(ts["signature"])
    infer = head.get_signature_runner(m["infer"]["signature"])
    rows, dim = m["head"]["capacity"], m["features"]["dim"]
    params = {p["name"]: init[p["name"]].astype(np.float32) for p in m["head"]["params"]}
    state = {s["name"]: np.zeros(s["shape"], np.float32) for s in m["optimizer"]["state"]}
    losses = []
    for step in range(tvb["train_steps"]):
        labels = tv["train_labels"][step]
        targets = np.zeros((ts["batch_size"], rows), np.float32)
        targets[np.arange(len(labels)), labels] = 1
        out = train(**{
            "features": tv["train_features"][step].astype(np.float32),
            ts["targets_input"]: targets,
            ts["sample_weight_input"]: tv["train_weights"][step].astype(np.float32),
            **{h: np.array(m["optimizer"]["hparams"][h], np.float32) for h in ts["hparam_inputs"]},
            **params, **state})
        params = {k: out["new." + k] for k in params}
        state = {k: out["new." + k] for k in state}
        losses.append(float(out[ts["loss_output"]]))
    feats = tv["features"].astype(np.float32)
    batch = m["infer"]["batch_size"] or len(feats)
    padded = np.zeros((batch, dim), np.float32)
    padded[: len(feats)] = feats
    logits = infer(features=padded, **{k: init[k].astype(np.float32) for k in params})
    bb = Interpreter(model_path=str(bundle / m["files"]["backbone"]["path"]))
    run = bb.get_signature_runner(m["input"]["signature"])
    q = m.get("quantization") or {}
    qi, qo = q.get("input"), q.get("output")
    norm = m["input"]["preprocess"]["normalize"]
    got = []
    for x in tv["x"]:
        z = ((x - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32))
        z = z.astype(np.float32)
        if qi:
            z = np.clip(np.rint(z / np.float32(qi["scale"])) + qi["zero_point"], -128, 127)
            z = z.astype(np.int8)
        y = run(**{m["input"]["name"]: z[None]})[m["features"]["name"]][0]
        got.append((y.astype(np.float32) - qo["zero_point"]) * np.float32(qo["scale"]) if qo else y)
    final = max(float(np.abs(params[k] - tv["train_final." + k]).max()) for k in params)
    return {
        "train_params": final,
        "train_atol": tvb["train_atol"],
        "train_loss": float(np.abs(np.array(losses) - tv["train_loss"]).max()),
        "logits": float(np.abs(logits["logits"][: len(feats)] - tv["logits"]).max()),
        "logits_atol": tvb.get("logits_atol", tvb["atol"]),
        "features": float(np.abs(np.array(got) - tv["features"]).max()),
        "atol": tvb["atol"],
    }


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["runs/har/bundles/tflite-fp32", "runs/har/bundles/tflite-int8"]:
        r = replay(Path(arg))
        print(arg, " ".join(f"{k}={v:.2g}" for k, v in r.items()))
