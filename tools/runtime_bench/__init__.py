"""``python -m tools.runtime_bench``: the device runners' runtimes side by side, per bundle.

For each bundle (``edgetl run``'s ``bundles/{onnx,tflite}-{fp32,int8}``), in fresh processes,
rounds interleaved (round r runs every runtime once, starting one further along: A, B, C / B,
C, A …; the machine's speed drifts, so ratios are taken within a round):

- the Python runner (``device_runners``: onnxruntime or ai-edge-litert) — ``py_cell.py``;
- the TypeScript runner (``device_runners/js``) on onnxruntime-node, on onnxruntime-web's
  WASM build in Node (1 thread), on LiteRT.js in Node (TFLite) — ``node_cell.mjs``;
- the same in headless Chromium (``browser_cell.mjs``): onnxruntime-web at 1 and 2 WASM
  threads, LiteRT.js (TFLite), plus the web page itself: pick the bundle folder → "Self-test
  passed".

Measured in each process (``measure.mjs`` / ``py_cell.py``, the same phases): ``startup_s``
(process or page start → runner and runtime imported), ``load_s`` (files read, sha256
checked, WASM runtime instantiated where it is lazy, sessions created), ``selftest_s``,
``adapt_s`` = ``feature_s`` + ``train_s`` (all windows' features, then the epochs of head
training with a validation pass each, as ``report.json`` times them; same data, seed and
epochs everywhere). For the command-line runners also the whole commands as a user runs
them (``cmd_selftest_s``: ``run.py selftest`` / ``cli.js selftest``; ``cmd_adapt_s``), each in
a fresh process. Reported: median and min–max over rounds, and per-round ratios to the Python
runner on the same bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
JS_DIST = ROOT / "device_runners" / "js" / "dist"
WEB_DIST = ROOT / "device_runners" / "web" / "dist"
CHROMIUM = os.environ.get("EDGETL_CHROMIUM", "/usr/bin/chromium")


@dataclass(frozen=True)
class Runtime:
    """One way to run a bundle: ``kind`` python | node | browser, for bundle ``targets``."""

    label: str
    kind: str
    targets: tuple[str, ...]
    js_runtime: str | None = None  # node_cell.mjs / cli.js --runtime
    threads: int = 0  # browser: WASM threads (0: the runtime's default)


#: The runtimes, by key (a plain registry: ``--runtimes`` picks from it).
RUNTIMES: dict[str, Runtime] = {
    "python": Runtime("Python runner (onnxruntime / ai-edge-litert)", "python",
                      ("onnx", "tflite")),
    "node": Runtime("onnxruntime-node", "node", ("onnx",), "node"),
    "node-wasm": Runtime("onnxruntime-web WASM in Node, 1 thread", "node", ("onnx",), "web"),
    "node-litert": Runtime("LiteRT.js compat WASM in Node", "node", ("tflite",), "litert"),
    "chromium-wasm-1t": Runtime("onnxruntime-web WASM in Chromium, 1 thread", "browser",
                                ("onnx",), threads=1),
    "chromium-wasm-2t": Runtime("onnxruntime-web WASM in Chromium, 2 threads", "browser",
                                ("onnx",), threads=2),
    "chromium-litert": Runtime("LiteRT.js WASM in Chromium", "browser", ("tflite",), threads=1),
}

#: Metrics summarised (median, min–max), in the tables' order.
METRICS = ("startup_s", "load_s", "selftest_s", "adapt_s", "feature_s", "train_s", "step_ms",
           "cmd_selftest_s", "cmd_adapt_s", "page_load_s")
#: Metrics also given as per-round ratios to the Python runner on the same bundle.
RATIOS = ("load_s", "selftest_s", "adapt_s")


class BenchError(RuntimeError):
    """A cell failed: its command and the end of its output."""


def unavailable(kind: str) -> str | None:
    """Why runtimes of ``kind`` cannot run here (None: they can)."""
    if kind == "python":
        return None
    if not shutil.which("node"):
        return "node not found on PATH (Node >= 20: apt-get install nodejs npm)"
    if not (JS_DIST / "index.js").is_file():
        return "device_runners/js/dist is not built: run `make js-install`"
    if kind == "browser":
        if not os.access(CHROMIUM, os.X_OK):
            return (f"{CHROMIUM} not found (Debian: apt-get install chromium; "
                    "EDGETL_CHROMIUM=PATH for another)")
        if not (WEB_DIST / "edgerun" / "index.js").is_file():
            return "device_runners/web/dist is not built: run `make js-install`"
        if not (ROOT / "device_runners" / "js" / "node_modules" / "playwright-core").is_dir():
            return "playwright-core is missing from device_runners/js/node_modules: npm ci"
    return None


def _run(cmd: list[str], timeout: float) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh process: (start epoch, wall seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": ""}  # the device runner imports edgerun only
    t0, p0 = time.time(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - p0
    if p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))[:300]} exited {p.returncode}:\n"
                         f"{(p.stdout + p.stderr)[-1500:]}")
    return t0, wall, p.stdout


def _last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"expected one JSON line at the end of the output, got: "
                         f"{stdout[-500:]!r}") from None


def run_cell(rt: Runtime, bundle: Path, data: Path, *, seed: int, epochs: int,
             page: bool = True, commands: bool = True, timeout: float = 600) -> dict:
    """One round of one runtime on one bundle: its metrics (seconds; ``step_ms`` in ms)."""
    adapt = {"seed": seed, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="rtbench-") as tmp:
        plan = {"bundle": str(bundle), "data": str(data), "adapt": adapt}
        if rt.kind == "python":
            cmd = [sys.executable, str(HERE / "py_cell.py"),
                   json.dumps({**plan, "out": f"{tmp}/cell"})]
        elif rt.kind == "node":
            cmd = ["node", str(HERE / "node_cell.mjs"),
                   json.dumps({**plan, "runtime": rt.js_runtime})]
        else:
            cmd = ["node", str(HERE / "browser_cell.mjs"),
                   json.dumps({**plan, "threads": rt.threads, "page": page})]
        t0, wall, out = _run(cmd, timeout)
        r = _last_json(out)
        if r.get("errors"):
            raise BenchError(f"the page reported errors: {r['errors'][:3]}")
        if "imported_at" in r:
            r["startup_s"] = r.pop("imported_at") - t0
        r["process_s"] = wall
        if commands and rt.kind != "browser":
            if rt.kind == "python":
                base = [sys.executable, str(ROOT / "device_runners" / "run.py")]
                extra: list[str] = []
            else:
                base = ["node", str(JS_DIST / "cli.js")]
                extra = ["--runtime", str(rt.js_runtime)]
            r["cmd_selftest_s"] = _run([*base, "selftest", str(bundle), "--quiet", *extra],
                                       timeout)[1]
            r["cmd_adapt_s"] = _run([*base, "adapt", str(bundle), "--data", str(data), "--out",
                                     f"{tmp}/cmd", "--seed", str(seed), "--epochs", str(epochs),
                                     "--quiet", *extra], timeout)[1]
    return r


def plan_cells(bundles: list[Path], runtimes: list[str]) -> list[tuple[Path, str]]:
    """(bundle, runtime key) for every runtime that runs the bundle's target."""
    cells = []
    for b in bundles:
        target = json.loads((b / "manifest.json").read_text())["target"]
        cells += [(b, k) for k in runtimes if target in RUNTIMES[k].targets]
    return cells


def run_rounds(bundles: list[Path], data: Path, *, rounds: int, seed: int, epochs: int,
               runtimes: list[str], page: bool = True, commands: bool = True,
               say=print) -> list[dict]:
    """Every cell once per round, rotated each round; a failed cell is recorded, not fatal."""
    cells = plan_cells(bundles, runtimes)
    rows = []
    for r in range(rounds):
        for b in bundles:
            mine = [k for bb, k in cells if bb == b]
            order = mine[r % len(mine):] + mine[:r % len(mine)] if mine else []
            for k in order:
                row = {"round": r, "bundle": b.name, "runtime": k}
                try:
                    row.update(run_cell(RUNTIMES[k], b, data, seed=seed, epochs=epochs,
                                        page=page, commands=commands))
                    say(f"round {r + 1}/{rounds} {b.name} {k}: self-test "
                        f"{row['selftest_s']:.3f} s, adapt {row['adapt_s']:.3f} s")
                except (BenchError, subprocess.TimeoutExpired, KeyError) as e:
                    row["error"] = str(e)[-2000:]
                    say(f"round {r + 1}/{rounds} {b.name} {k}: FAILED {str(e)[:300]}")
                rows.append(row)
    return rows
