"""One cell of ``tools.runtime_bench`` in a fresh process: the Python device runner.

``device_runners/edgerun`` (numpy + onnxruntime or ai-edge-litert, no torch, no edgetl),
timed as ``measure.mjs`` times the TypeScript runner.

Usage: ``python tools/runtime_bench/py_cell.py '{"bundle": DIR, "data": FILE, "out": DIR,
"adapt": {"seed": 0, "epochs": 30}, "threads": 0}'`` -> one JSON line: ``imported_at``
(epoch seconds once the runner and its runtime are imported), ``load_s`` (bundle read, sha256
checked, sessions created), ``selftest_s``, ``feature_s`` + ``train_s`` = ``adapt_s`` (as
``report.json`` times them), ``steps``, ``epochs``, ``step_ms``, ``rolled_back``.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "device_runners"))

plan = json.loads(sys.argv[1])
target = json.loads((Path(plan["bundle"]) / "manifest.json").read_text())["target"]
if target == "onnx":
    import onnxruntime  # noqa: F401  (imported here so that load_s is not import time)
else:
    import ai_edge_litert.interpreter  # noqa: F401
from edgerun import adapt as ad  # noqa: E402
from edgerun.backends import make_backend  # noqa: E402
from edgerun.bundle import Bundle  # noqa: E402

imported_at = time.time()
threads = plan.get("threads", 0)
t0 = time.perf_counter()
bundle = Bundle(plan["bundle"])
backend = make_backend(bundle, threads)
t1 = time.perf_counter()
err = max(ad.selftest_forward(bundle, backend), ad.selftest_train(bundle, backend))
t2 = time.perf_counter()
a = plan["adapt"]
rep = ad.adapt(plan["bundle"], plan["data"], plan["out"], seed=a["seed"], epochs=a["epochs"],
               threads=threads, quiet=True)
print(json.dumps({
    "imported_at": imported_at, "load_s": t1 - t0, "selftest_s": t2 - t1,
    "feature_s": rep["feature_seconds"], "train_s": rep["train_seconds"],
    "adapt_s": rep["feature_seconds"] + rep["train_seconds"], "steps": rep["steps"],
    "epochs": rep["epochs_run"], "step_ms": rep["step_ms"], "rolled_back": rep["rolled_back"],
    "accuracy_after": rep["accuracy_after"], "selftest_err": err,
    "steps_fused": rep.get("steps_fused"), "backend": f"{backend.name} {backend.version}"}))
