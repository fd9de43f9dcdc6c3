"""``python -m tools.kstep_bench``: on-device adaptation with and without the fused train graph.

A HAR-sized bundle (the HAR student's conv net, 6 IMU channels × 128 samples, 6 classes,
a ``--dim``-wide feature layer, linear head, SGD-momentum) is exported twice: as today
(``head_train_k.onnx``, the fused K-step graph, and ``head_train_run.onnx``, the whole run)
and as an older bundle without them. On
``--windows`` synthetic windows (``val_fraction`` 0.25: ~600 training windows at the default
800), fresh runner processes then run, interleaved round by round (A, B, C, A, B, C …):

- A: ``run.py adapt`` with the fused graphs (``--epochs``, batch 32, patience 0);
- B: the same without them (one runtime call per train step);
- C: ``run.py infer`` over the same windows (one backbone pass + the head).

Printed (not asserted): median feature / train / adaptation seconds of A and B, the median
per-round ratios adaptation ÷ inference (A/C, B/C) and train B ÷ train A with their spread
(min–max over rounds). The machine's speed drifts, so ratios come from the same round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np


def build(work: Path, dim: int, kind: str, optimizer: str) -> tuple[Path, Path]:
    """The fused bundle and its copy without the fused graph."""
    import torch

    from edgetl.checkpoint import Checkpoint
    from edgetl.config import ExportConfig, HeadConfig, NetConfig
    from edgetl.data.synthetic import make_windows
    from edgetl.export import export_bundle
    from edgetl.nets import build_model

    torch.manual_seed(0)
    net = NetConfig((16, 32, dim), (7, 5, 3), (2, 2, 1), 0.1)
    head = HeadConfig(kind=kind, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.005,
                      **({"hidden": 32} if kind == "mlp" else {}))
    model = build_model(6, 6, net, head).eval()
    x, _ = make_windows(256, window=128, channels=6, classes=6, seed=1)
    mean, std = x.reshape(-1, 6).mean(0), x.reshape(-1, 6).std(0)
    ck = Checkpoint(model, net, head, tuple(f"a{i}" for i in range(6)),
                    tuple(f"c{i}" for i in range(6)), 128, 64, 50.0, mean, std,
                    {"recipe": "har-sized"})
    fused = work / "fused"
    export_bundle(ck, fused, ExportConfig(target="onnx", precision="fp32", train_batch=32,
                                          n_test_vectors=4), reference_x=x[:64])
    one = work / "one_step"
    shutil.copytree(fused, one)
    m = json.loads((one / "manifest.json").read_text())
    for block in ("fused", "run"):  # the whole-run graph sits on the fused one
        fz = m["train_step"].pop(block, None)
        if fz:
            (one / m["files"].pop(fz["file"])["path"]).unlink()
    (one / "manifest.json").write_text(json.dumps(m))
    return fused, one


def spread(v: list[float]) -> str:
    """``median (min–max)``."""
    return f"{statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f})"


def main(argv: list[str] | None = None) -> dict:
    """Build, run the interleaved rounds, print the table; return the raw numbers."""
    from edgetl.adapt import run_runner
    from edgetl.data.synthetic import make_windows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=96, help="feature width (HAR student: 48)")
    ap.add_argument("--windows", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kind", default="linear")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kstep-") as tmp:
        work = Path(tmp)
        fused, one = build(work, a.dim, a.kind, a.optimizer)
        x, y = make_windows(a.windows, window=128, channels=6, classes=6, seed=7)
        data = work / "dev.npz"
        np.savez(data, x=x, y=np.array([f"a{i}" for i in y], dtype=str))
        rows = {"A": [], "B": [], "C": []}
        common = ["--data", str(data), "--epochs", str(a.epochs), "--batch-size", "32",
                  "--val-fraction", "0.25", "--patience", "0", "--threads", str(a.threads)]
        for r in range(a.rounds):
            rows["A"].append(run_runner("adapt", fused, *common, "--out", str(work / f"a{r}")))
            rows["B"].append(run_runner("adapt", one, *common, "--out", str(work / f"b{r}")))
            rows["C"].append(run_runner("infer", fused, "--data", str(data), "--threads",
                                        str(a.threads)))
    res = {"args": vars(a), "n_train": rows["A"][0]["n_train"], "steps": rows["A"][0]["steps"],
           "steps_fused": rows["A"][0]["steps_fused"]}
    for k in "AB":
        for f in ("feature_seconds", "train_seconds"):
            res[f"{k}.{f}"] = [r[f] for r in rows[k]]
        res[f"{k}.adapt_seconds"] = [r["feature_seconds"] + r["train_seconds"] for r in rows[k]]
    res["C.infer_seconds"] = [r["seconds"] for r in rows["C"]]
    inf = res["C.infer_seconds"]
    print(f"HAR-sized {a.kind}/{a.optimizer} head, D={a.dim}, {res['n_train']} training "
          f"windows, {a.epochs} epochs: {res['steps']} steps ({res['steps_fused']} fused), "
          f"{a.rounds} interleaved rounds, {a.threads} thread(s); median (min–max)")
    for k, what in (("A", "fused graph"), ("B", "one step per call")):
        ad = res[f"{k}.adapt_seconds"]
        print(f"  {what:18s} features {spread(res[f'{k}.feature_seconds'])} s, train "
              f"{spread(res[f'{k}.train_seconds'])} s, adaptation ÷ inference "
              f"{spread([x / c for x, c in zip(ad, inf, strict=True)])}")
    print(f"  inference pass      {spread(inf)} s")
    for k, what in (("A", "fused"), ("B", "one-step")):
        tr = res[f"{k}.train_seconds"]
        print(f"  train ÷ inference, {what}: "
              f"{spread([t / c for t, c in zip(tr, inf, strict=True)])}")
    ratio = [b / f for b, f in zip(res["B.train_seconds"], res["A.train_seconds"], strict=True)]
    print(f"  train time one-step ÷ fused: {spread(ratio)}")
    return res


if __name__ == "__main__":
    main()
