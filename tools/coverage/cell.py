"""One coverage cell: a case x target x precision, in a process of its own.

:func:`run_cell` (the parent side) starts :func:`cell_main` in a child process and waits at
most ``timeout`` seconds; the child writes its row to ``<dir>/result.json`` after every step,
so a crash or a hang still leaves the steps done so far, and the step it died in is marked
``crashed`` / ``timeout``. Steps:

build     the case's factory (init check, server-side head fit)
load      transformers cases: ``save_pretrained`` + edgetl's ``load_model(folder)``; the
          loaded model must give the same labels, input dtype (images: shape and
          normalisation) and logits
export    ``edgetl.export_model`` with calibration and held-out data (parity checks inside)
selftest  ``device_runners/run.py selftest``
adapt     ``run.py adapt`` on labelled device data with new label names
bench     ``run.py bench --threads 1``: batch-1 backbone latency and bundle size
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "device_runners" / "run.py"
STEPS = ("build", "load", "export", "selftest", "adapt", "bench")
#: Steps after which nothing else can run when they fail.
BLOCKING = ("build", "export")
#: Samples: server (head fit, inside build), calibration, held-out, device.
N_CALIB, N_HELDOUT, N_DEVICE = 64, 256, 90
#: Class rows of fixed-class heads (TFLite): 3 server labels + 3 new device labels + spares.
CLASS_CAPACITY = 8
ADAPT_EPOCHS = 20
BENCH_REPEATS = 30
RUNNER_TIMEOUT = 120


def reason(text: str) -> str:
    """The first line of an error, shortened; operator names kept when the text has some."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else "no message"
    first = re.sub(r"(/[^\s:/]+)+/(site-packages|dist-packages)/", "", first)  # library paths
    ops = sorted(set(re.findall(r"aten[.:]{1,2}[A-Za-z_0-9]+(?:\.[a-z_]+)?", str(text))))
    if ops and not any(op in first for op in ops):
        first += f" (operator {', '.join(ops[:3])})"
    return first[:400]


def exc_reason(e: BaseException) -> str:
    """:func:`reason` of an exception, with its type; the traceback goes to the cell's log."""
    traceback.print_exception(e, file=sys.stderr)
    sys.stderr.flush()
    return reason(f"{type(e).__name__}: {e}")


class Row:
    """The cell's result, saved to ``result.json`` after every change."""

    def __init__(self, path: Path, case: str, target: str, precision: str, *,
                 steps: tuple[str, ...] = STEPS, extra: dict | None = None):
        self.path = path
        self.data: dict[str, Any] = {
            "case": case, "target": target, "precision": precision, **(extra or {}),
            "steps": {s: "not run" for s in steps}, "metrics": {}, "notes": [],
            "errors": {}}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        os.replace(tmp, self.path)

    def set(self, step: str, status: str, error: str = "") -> None:
        self.data["steps"][step] = status
        if error:
            self.data["errors"][step] = error
        self.save()

    def metric(self, **kw) -> None:
        self.data["metrics"].update(kw)
        self.save()


def runner_json(cmd: str, bundle: Path, *args, timeout: float = RUNNER_TIMEOUT) -> dict:
    """Run the device runner (no edgetl on its path, as on a device); its JSON or an error."""
    env = {**os.environ, "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, str(RUNNER), cmd, str(bundle), *map(str, args),
                        "--json", "--threads", "1"], capture_output=True, text=True, env=env,
                       timeout=timeout, check=False)
    if p.returncode != 0:
        if p.returncode < 0:
            raise RuntimeError(f"runner {cmd} crashed ({signal.Signals(-p.returncode).name})")
        errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
        tail = errs[-1] if errs else (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"runner {cmd} exit {p.returncode}: {tail}")
    return json.loads(p.stdout)


def _load_check(case, folder: Path, x: np.ndarray) -> tuple[list[str], list[str]]:
    """Save the transformers model, load it as ``edgetl export FOLDER`` does, compare.

    Returns (problems, notes). The input shape is a problem only where the config states it
    (``image_size``); elsewhere the loader's default is noted (``--input-shape`` sets it).
    """
    import torch

    from edgetl.export.load import load_model

    case.model.save_pretrained(folder)
    if case.mean is not None:  # what an image processor would say (rescale, then normalise)
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [m / 255 for m in case.mean],
             "image_std": [s / 255 for s in case.std]}))
    um = load_model(str(folder))
    bad, notes = [], []
    if um.labels != case.labels:
        bad.append(f"labels {um.labels} != {case.labels}")
    want_dtype = "int64" if x.dtype.kind in "iu" else "float32"
    if um.dtype != want_dtype:
        bad.append(f"input dtype {um.dtype} (expected {want_dtype})")
    if um.shape != tuple(x.shape[1:]):
        said = getattr(case.model.config, "image_size", None) is not None
        (bad if said else notes).append(
            f"load_model input shape {um.shape}, not {tuple(x.shape[1:])}"
            + ("" if said else " (the config does not say; --input-shape sets it)"))
    if case.mean is not None and (um.mean is None or not np.allclose(um.mean, case.mean,
                                                                       rtol=1e-5)):
        bad.append(f"mean {um.mean} (expected {case.mean})")
    if bad:
        return bad, notes
    xt = torch.from_numpy(case.normalize(x))
    with torch.no_grad():
        got = um.call(um.module, xt).logits
        want = case.call(case.model, xt).logits
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
        bad.append(f"loaded model's logits differ (max {float((got - want).abs().max()):.3g})")
    return bad, notes


def child_setup(d: Path) -> None:
    """A cell child's own process group, its log in ``d/cell.log``, one torch thread."""
    os.setsid()  # own process group: the parent can stop runner subprocesses with it
    log = os.open(d / "cell.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # converter chatter goes to the cell's log, not the run's terminal
    os.dup2(log, 2)
    import torch

    torch.set_num_threads(1)


def cell_main(case_name: str, target: str, precision: str, folder: str) -> None:
    """The child: run every step of one cell, saving the row as it goes."""
    d = Path(folder)
    child_setup(d)
    row = Row(d / "result.json", case_name, target, precision)
    t_cell = time.perf_counter()
    try:
        _steps(row, d, case_name, target, precision)
    finally:
        row.metric(cell_s=time.perf_counter() - t_cell)


def build_case(row: Row, case_name: str):
    """The registry's case ``case_name``, or None with the build step recorded as failed."""
    from tools.coverage import cases

    row.set("build", "running")
    try:
        return cases.build(case_name)
    except Exception as e:  # noqa: BLE001 - any failure is a finding, recorded
        row.set("build", "failed", exc_reason(e))
        return None


def _steps(row: Row, d: Path, case_name: str, target: str, precision: str) -> None:
    import edgetl
    from edgetl.config import ExportConfig
    from tools.coverage import cases

    case = build_case(row, case_name)
    if case is None:
        return
    row.data.update(source=case.source, spec=case.spec)
    row.metric(params=sum(p.numel() for p in case.model.parameters()))
    row.data["notes"] += case.notes
    row.set("build", "ok")
    calib = case.data(N_CALIB, 2, case.labels)[0]
    heldout = case.data(N_HELDOUT, 1, case.labels)
    dev_x, dev_y = case.data(N_DEVICE, 3, cases.DEVICE_LABELS, hard=True)
    np.savez(d / "device.npz", x=dev_x, y=dev_y)

    if case.hf:
        row.set("load", "running")
        try:
            bad, notes = _load_check(case, d / "hf", calib[:4])
            row.data["notes"] += notes
            row.set("load", "failed" if bad else "ok", "; ".join(bad))
        except Exception as e:  # noqa: BLE001
            row.set("load", "failed", exc_reason(e).replace(str(d), "<cell>"))
        shutil.rmtree(d / "hf", ignore_errors=True)
    else:
        row.set("load", "n/a")

    bundle = d / "bundle"
    row.set("export", "running")
    t = time.perf_counter()
    try:
        kw = {"call": case.call} if case.call is not None else {}
        manifest = edgetl.export_model(
            case.model, example=case.example, labels=case.labels, out=bundle, head=case.head,
            target=target, precision=precision, calibration=calib, heldout=heldout,
            mean=case.mean, std=case.std, layout=case.layout, name=case_name,
            export=ExportConfig(class_capacity=CLASS_CAPACITY), **kw)
    except Exception as e:  # noqa: BLE001
        row.metric(export_s=time.perf_counter() - t)
        row.set("export", "failed", exc_reason(e))
        for s in ("selftest", "adapt", "bench"):
            row.set(s, "skipped")
        return
    row.metric(export_s=time.perf_counter() - t)
    c = manifest.checks
    acc = c.get("accuracy") or {}
    row.metric(backbone_max_abs_err=c.get("backbone_max_abs_err"),
               backbone_rel_err=c.get("backbone_rel_err"),
               infer_max_abs_err=c.get("infer_max_abs_err"),
               train_step_max_abs_err=c.get("train_step_max_abs_err"),
               heldout_torch=acc.get("reference_accuracy"), heldout_bundle=acc.get("bundle"),
               heldout_drop_points=acc.get("drop_points"), heldout_n=acc.get("n"),
               quantization=manifest.quantization or None,
               feature_dim=manifest.features.get("dim"), lr=manifest.optimizer["hparams"]["lr"],
               input_kind=manifest.input.get("modality"))
    row.set("export", "ok")

    for step, args, keep in (
            ("selftest", (), {"max_abs_err": "selftest_max_abs_err",
                              "train_max_abs_err": "selftest_train_max_abs_err",
                              "backend": "backend"}),
            ("adapt", ("--data", d / "device.npz", "--out", d / "state", "--epochs",
                       ADAPT_EPOCHS, "--quiet"),
             {"accuracy_before": "adapt_before", "accuracy_after": "adapt_after",
              "rolled_back": "adapt_rolled_back", "n_windows": "adapt_n"}),
            ("bench", ("--repeats", BENCH_REPEATS, "--quiet"),
             {"backbone_ms_p50": "latency_ms_p50", "backbone_ms_p95": "latency_ms_p95",
              "bundle_bytes": "bundle_bytes", "backbone_bytes": "backbone_bytes"})):
        row.set(step, "running")
        try:
            out = runner_json(step, bundle, *args)
        except Exception as e:  # noqa: BLE001
            row.set(step, "failed", exc_reason(e))
            continue
        row.metric(**{new: out.get(old) for old, new in keep.items()})
        if step == "selftest" and not out.get("ok", False):
            row.set(step, "failed", f"self-test not ok: {out}")
            continue
        row.set(step, "ok")
    if row.data["metrics"].get("bundle_bytes") is None:
        row.metric(bundle_bytes=sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()))


def passed(row: dict) -> bool:
    """End to end: every step ok (``load`` ok or not applicable)."""
    return all(row["steps"][s] in ("ok", "n/a") for s in STEPS)


def run_cell(case: str, target: str, precision: str, folder: Path, *, timeout: float = 300,
             ctx=None, spec: str | None = None) -> dict:
    """Run one cell in a child process (``ctx``: a multiprocessing context); its row.

    ``spec``: a ``--trainable`` cell (:mod:`tools.coverage.trainable`; ``precision`` is its
    fp32), else a head-only cell.
    """
    from tools.coverage import trainable

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ctx = ctx or multiprocessing.get_context("spawn")
    t = time.perf_counter()
    main, steps, judge = ((cell_main, STEPS, passed) if spec is None else
                          (trainable.cell_main, trainable.STEPS, trainable.passed))
    args = (case, target, precision if spec is None else spec, str(folder))
    p = ctx.Process(target=main, args=args,
                    name=f"cell-{case}-{target}-{precision if spec is None else spec}")
    p.start()
    p.join(timeout)
    fate = None
    if p.is_alive():
        fate = "timeout"
        with _quiet():  # the cell and its runner subprocess (its own process group)
            os.killpg(p.pid, signal.SIGKILL)
        p.kill()  # before its setsid(), the group does not exist yet
        p.join()
    elif p.exitcode != 0:
        fate = "crashed"
        with _quiet():  # the group's runner subprocess, if it died in one
            os.killpg(p.pid, signal.SIGKILL)
    res = folder / "result.json"
    row = json.loads(res.read_text()) if res.is_file() else {
        "case": case, "target": target, "precision": precision,
        **({"spec": spec} if spec is not None else {}),
        "steps": {s: "not run" for s in steps}, "metrics": {}, "notes": [], "errors": {}}
    if fate:
        code = p.exitcode
        why = (f"cell exceeded {timeout:g} s" if fate == "timeout" else
               f"cell process died ({signal.Signals(-code).name})" if code and code < 0 else
               f"cell process exited {code}")
        running = [s for s, v in row["steps"].items() if v == "running"]
        first = running[0] if running else next(
            (s for s, v in row["steps"].items() if v == "not run"), steps[0])
        row["steps"][first] = fate
        row["errors"][first] = why
        after = steps[steps.index(first) + 1:]
        for s in after:
            if row["steps"][s] == "not run":
                row["steps"][s] = "skipped"
    row["metrics"]["wall_s"] = time.perf_counter() - t
    row["pass"] = judge(row)
    return row


class _quiet:
    """Ignore a process group that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, ProcessLookupError | PermissionError)
