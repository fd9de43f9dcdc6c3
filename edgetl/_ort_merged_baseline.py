"""Baseline for ``edgetl bench``: ONNX Runtime training artifacts on the *merged* model.

What a user of ONNX Runtime's training API would do without edgetl's split: one graph
backbone → head, the backbone's weights frozen (``frozen_params``), the head's trainable
(``requires_grad``), so every training step runs the whole backbone forward again.

Runs in the separate environment with ``onnxruntime-training-cpu==1.19.2`` and
``onnx==1.17.0`` (``make venv-ort``) and imports neither edgetl nor torch::

    python _ort_merged_baseline.py BUNDLE DATA.npz WORKDIR --epochs 20 --batch 32 \
        --threads 1 --lr 0.05

``BUNDLE`` is an fp32 ONNX bundle; ``DATA.npz`` is what ``edgetl bench`` prepares
(``x_train``, ``y_train``, ``x_eval``, ``y_eval``, ``n_classes``, ``init.<param>``). Prints
one JSON line. ORT's SGD has a learning rate only (no momentum or weight decay): the loop
costs the same per step, the trajectory differs, which the accuracy column shows.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # edgetl's own modules must not shadow the packages below


def _sibling(relpath: str):
    """A module of edgetl loaded from its file: this environment has no edgetl installed."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), relpath)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def merged_model(bundle: str, init: dict):
    """backbone.onnx → head_infer.onnx as one graph; head params become initializers."""
    import onnx
    from onnx import compose, numpy_helper

    with open(os.path.join(bundle, "manifest.json")) as f:
        m = json.load(f)
    bb = onnx.load(os.path.join(bundle, m["files"]["backbone"]["path"]))
    head = onnx.load(os.path.join(bundle, m["files"][m["infer"]["file"]]["path"]))
    feat_in, *param_names = m["infer"]["inputs"]
    g = head.graph
    for name in param_names:
        g.initializer.append(numpy_helper.from_array(init[name], name))
    keep = [i for i in g.input if i.name not in param_names]
    del g.input[:]
    g.input.extend(keep)
    logits = m["infer"]["outputs"][0]
    # the head's node and intermediate names may repeat the backbone's: prefix those only
    keep_names = {i.name for i in g.input} | {o.name for o in g.output} | set(param_names)
    ren = {o: "head/" + o for n in g.node for o in n.output if o not in keep_names}
    for n in g.node:
        n.name = "head/" + n.name
        n.input[:] = [ren.get(i, i) for i in n.input]
        n.output[:] = [ren.get(o, o) for o in n.output]
    if bb.ir_version != head.ir_version:
        head.ir_version = bb.ir_version
    merged = compose.merge_models(bb, head, io_map=[(m["features"]["name"], feat_in)],
                                  outputs=[logits])
    frozen = [i.name for i in bb.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT]
    return merged, list(param_names), frozen, logits


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("data")
    p.add_argument("workdir")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    art = _sibling(os.path.join("export", "_ort_artifacts.py"))
    vm_hwm_mb = _sibling("baselines.py").vm_hwm_mb  # stdlib-only at import
    art._training_package()
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    ort.set_default_logger_severity(3)
    with np.load(a.data, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    init = {k[5:]: np.ascontiguousarray(v, np.float32) for k, v in d.items()
            if k.startswith("init.")}
    model, params, frozen, logits = merged_model(a.bundle, init)
    os.makedirs(a.workdir, exist_ok=True)
    t0 = time.perf_counter()
    artifacts.generate_artifacts(model, requires_grad=params, frozen_params=frozen,
                                 loss=art.weighted_soft_ce(), optimizer=artifacts.OptimType.SGD,
                                 artifact_directory=a.workdir)
    gen_seconds = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    state = CheckpointState.load_checkpoint(os.path.join(a.workdir, "checkpoint"))
    module = Module(os.path.join(a.workdir, "training_model.onnx"), state,
                    os.path.join(a.workdir, "eval_model.onnx"), device="cpu",
                    session_options=so)
    opt = Optimizer(os.path.join(a.workdir, "optimizer_model.onnx"), module)
    opt.set_learning_rate(a.lr)
    x, y = d["x_train"], d["y_train"].astype(np.int64)
    n_cls = int(d["n_classes"])
    eye = np.eye(n_cls, dtype=np.float32)
    names = module.input_names()
    rng = np.random.default_rng(a.seed)
    module.train()
    t0 = time.perf_counter()
    steps = 0
    for _ in range(a.epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x), a.batch):
            idx = perm[i : i + a.batch]
            feeds = {"targets": eye[y[idx]], "sample_weight": np.ones(len(idx), np.float32)}
            feeds.update({n: np.ascontiguousarray(x[idx]) for n in names if n not in feeds})
            module(*(feeds[n] for n in names))
            opt.step()
            module.lazy_reset_grad()
            steps += 1
    train_seconds = time.perf_counter() - t0
    infer_path = os.path.join(a.workdir, "inference.onnx")
    module.export_model_for_inferencing(infer_path, [logits])
    sess = ort.InferenceSession(infer_path, providers=["CPUExecutionProvider"])
    xe = d["x_eval"]
    pred = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: xe[i : i + 256]})[0]
                           .argmax(1) for i in range(0, len(xe), 256)])
    print(json.dumps({"name": "ort-training-merged", "threads": a.threads, "epochs": a.epochs,
                      "steps": steps, "n_train": int(len(x)), "train_seconds": train_seconds,
                      "artifact_seconds": gen_seconds,
                      "accuracy_after": float((pred == d["y_eval"]).mean()),
                      "peak_rss_mb": vm_hwm_mb(), "onnxruntime": ort.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
