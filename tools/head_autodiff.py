"""``python -m tools.head_autodiff``: hand-written head gradients vs export-time autodiff.

Issue 18 asks whether the hand-written head train graphs (``edgetl/head.py``) should become
one case of the ``--trainable`` mechanism (torch autograd traced at export,
``edgetl/trainable``) or stay where they are faster. For every head kind × optimizer this
builds both ONNX train graphs for the same head (the autodiff one: a tail that is the
identity, so only the head trains), then in onnxruntime (1 thread):

- parity: ``--steps`` steps from the same start on the same batches, feeding parameters and
  optimizer state back; the largest difference of the loss and every parameter;
- speed: per-step time of each graph, interleaved (A, B, A, B …) over ``--rounds`` rounds of
  ``--steps`` calls; the median per-round ratio autodiff ÷ hand-written and its min–max;
- graph size (nodes, bytes).

Printed as a Markdown table; nothing is asserted (``tests/test_trainable.py`` holds the
parity tests).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = (("linear", "sgd"), ("linear", "adam"), ("mlp", "sgd"), ("mlp", "adam"),
         ("cosine", "sgd"), ("cosine", "adam"))


def _graphs(kind: str, optimizer: str, dim: int, classes: int, batch: int, work: Path):
    """The hand-written and the autodiff train graph (paths), their inputs, start params."""
    import torch

    from edgetl.export.onnx import OnnxExporter
    from edgetl.export.tail import Tail, export_onnx
    from edgetl.head import HeadSpec
    from edgetl.trainable.cut import Cut
    from edgetl.trainable.step import TailInfer, TailModel, TailTrain

    spec = HeadSpec(kind, dim, classes, hidden=32 if kind == "mlp" else 0)
    hand = work / f"{kind}-{optimizer}-hand"
    hand.mkdir()
    sig = OnnxExporter().export_head(spec, optimizer, hand, opset=17, batch=batch)
    g = torch.Generator().manual_seed(0)
    params = {n: (torch.randn(*s, generator=g) * 0.1).numpy()
              for n, s in spec.param_shapes().items()}
    if kind == "cosine":
        params["scale"] = np.array([10.0], np.float32)
    model = TailModel(torch.nn.Identity(), spec, [], dim)
    auto = work / f"{kind}-{optimizer}-auto"
    auto.mkdir()
    tail = Tail("head (autodiff)", Cut(torch.nn.Identity(), torch.nn.Identity(), "x", (dim,)),
                [], TailTrain(model, optimizer), TailInfer(model), params)
    export_onnx(tail, auto, opset=17, batch=batch, rows=classes)
    return (hand / sig["files"]["head_train"], auto / "tail_train.onnx",
            spec.hparam_names(optimizer), spec.state_names(optimizer), params)


def _feeds(hp_names, state_names, params, f, t, w, hp):
    feeds = {"features": f, "targets": t, "sample_weight": w}
    feeds.update({k: np.asarray(hp[k], np.float32) for k in hp_names})
    feeds.update(params)
    for s in state_names:
        like = s.split(".", 1)[1] if "." in s else None
        feeds.setdefault(s, np.zeros(1, np.float32) if like is None
                         else np.zeros_like(params[like]))
    return feeds


def _run(sess, hp_names, state_names, params, batches, hp):
    """Steps through ``sess``; the losses and the final parameters."""
    p = {k: v.copy() for k, v in params.items()}
    state = {}
    losses = []
    for f, t, w in batches:
        feeds = _feeds(hp_names, state_names, p, f, t, w, hp) | state
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds),
                       strict=True))
        losses.append(float(out["loss"]))
        p = {k: out["new." + k] for k in p}
        state = {s: out["new." + s] for s in state_names}
    return losses, p


def measure(kind, optimizer, dim, classes, batch, steps, rounds, work: Path) -> dict:
    """Parity, per-step times and sizes of the two graphs for one head."""
    import onnx
    import onnxruntime as ort

    hand, auto, hp_names, state_names, params = _graphs(kind, optimizer, dim, classes, batch,
                                                        work)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sh, sa = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
              for p in (hand, auto))
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(batch, dim)).astype(np.float32),
                np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)],
                np.ones(batch, np.float32)) for _ in range(steps)]
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "beta1": 0.9, "beta2": 0.999,
          "eps": 1e-8}
    lh, ph = _run(sh, hp_names, state_names, params, batches, hp)
    la, pa = _run(sa, hp_names, state_names, params, batches, hp)
    err = max([abs(a - b) for a, b in zip(lh, la, strict=True)]
              + [float(np.abs(ph[k] - pa[k]).max()) for k in ph])
    times = {"hand": [], "auto": []}
    for _ in range(rounds):
        for name, sess in (("hand", sh), ("auto", sa)):
            t0 = time.perf_counter()
            _run(sess, hp_names, state_names, params, batches, hp)
            times[name].append((time.perf_counter() - t0) / steps)
    ratios = [a / h for a, h in zip(times["auto"], times["hand"], strict=True)]
    nodes = {k: len(onnx.load(str(p)).graph.node) for k, p in (("hand", hand), ("auto", auto))}
    return {"head": f"{kind}/{optimizer}", "err": err,
            "hand_us": 1e6 * statistics.median(times["hand"]),
            "auto_us": 1e6 * statistics.median(times["auto"]),
            "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
            "hand_nodes": nodes["hand"], "auto_nodes": nodes["auto"],
            "hand_kib": hand.stat().st_size / 1024, "auto_kib": auto.stat().st_size / 1024}


def main(argv=None) -> None:
    """Print the table for every head kind × optimizer."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=48, help="feature width (HAR student: 48)")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    print("| head | parity (max abs, 20 steps) | hand-written µs/step | autodiff µs/step | "
          "autodiff ÷ hand (median, min–max) | nodes hand / autodiff | KiB hand / autodiff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for kind, opt in KINDS:
            r = measure(kind, opt, a.dim, a.classes, a.batch, a.steps, a.rounds, Path(d))
            print(f"| {r['head']} | {r['err']:.1e} | {r['hand_us']:.0f} | {r['auto_us']:.0f} | "
                  f"{r['ratio']:.2f} ({r['lo']:.2f}–{r['hi']:.2f}) | {r['hand_nodes']} / "
                  f"{r['auto_nodes']} | {r['hand_kib']:.0f} / {r['auto_kib']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
