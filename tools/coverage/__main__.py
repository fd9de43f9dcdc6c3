"""``python -m tools.coverage --out docs/coverage.md [--only NAME] [--jobs N]``.

Runs every case of :data:`tools.coverage.cases.CASES` for every registered exporter
(``edgetl.export.registry.EXPORTERS``) and precision, each cell in a process of its own, and
writes the table (``--out``) and its JSON (same name, ``.json``). ``--only`` re-runs some
cases and keeps the other rows of an existing JSON.

Trainable cells (:mod:`tools.coverage.trainable`): every case x ``--trainable-targets`` x
``--trainable-specs`` (fp32), in the JSON's ``trainable`` block. ``--trainable-specs none``
runs none (the block is kept), ``--skip-head`` runs only them (the head-only rows are kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tools.coverage import cases, trainable
from tools.coverage.cell import BENCH_REPEATS, ROOT, run_cell
from tools.coverage.report import render

VERSIONS = ("edgetl", "torch", "transformers", "onnx", "onnxruntime", "litert-torch",
            "ai-edge-litert", "torchao", "numpy")


def targets_and_precisions() -> tuple[list[str], list[str]]:
    """Every registered exporter (built-ins loaded) and every precision edgetl knows."""
    from edgetl.config import PRECISIONS
    from edgetl.export.registry import EXPORTERS, get_exporter

    get_exporter("onnx")  # loads the built-in exporters into the registry
    return sorted(EXPORTERS), list(PRECISIONS)


def _git(*args: str) -> str:
    p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return p.stdout.strip()


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the coverage cells and write the table; exit 0 even when cells fail."""
    ap = argparse.ArgumentParser(prog="python -m tools.coverage", description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    ap.add_argument("--only", action="append", default=[],
                    help="case name (repeatable, or comma-separated); default: all")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per cell")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "coverage",
                    help="bundles, device data and logs of each cell")
    ap.add_argument("--start", choices=("forkserver", "spawn"), default="forkserver",
                    help="forkserver: cells fork from a process that imported torch, "
                         "transformers and the exporters once; spawn: a fresh interpreter each")
    ap.add_argument("--trainable-specs", default=",".join(trainable.SPECS),
                    help="--trainable SPECs of the trainable cells (comma-separated; none: "
                         "no trainable cells)")
    ap.add_argument("--trainable-targets", default=",".join(trainable.TARGETS))
    ap.add_argument("--skip-head", action="store_true",
                    help="run only the trainable cells; keep the head-only rows")
    a = ap.parse_args(argv)
    only = [n for v in a.only for n in v.split(",") if n]
    unknown = sorted(set(only) - set(cases.CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {sorted(cases.CASES)}")
    names = only or list(cases.CASES)
    targets, precisions = targets_and_precisions()
    specs = [] if a.trainable_specs in ("", "none") else a.trainable_specs.split(",")
    tr_targets = a.trainable_targets.split(",")
    if set(tr_targets) - set(targets):
        ap.error(f"unknown trainable target(s); known: {targets}")
    cells = [] if a.skip_head else [(c, t, p) for c in names for t in targets for p in precisions]
    tr_cells = trainable.cells(names, specs, tr_targets)

    ctx = multiprocessing.get_context(a.start)
    if a.start == "forkserver":
        ctx.set_forkserver_preload(["tools.coverage.preload"])
    commit = _git("rev-parse", "--short", "HEAD")  # the code the cells run: before they do
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "tools", "edgetl",
                      "device_runners"))
    t0 = time.perf_counter()
    rows: dict[tuple, dict] = {}
    tr_rows: dict[tuple, dict] = {}
    n_all = len(cells) + len(tr_cells)
    print(f"coverage: {len(cells)} cells ({len(names)} cases x {targets} x {precisions}) + "
          f"{len(tr_cells)} trainable cells ({tr_targets} x {specs}), {a.jobs} job(s), work "
          f"in {a.work}", flush=True)
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futs = {pool.submit(run_cell, *cell, a.work / cell[0] / f"{cell[1]}-{cell[2]}",
                            timeout=a.timeout, ctx=ctx): (rows, cell) for cell in cells}
        futs.update({pool.submit(run_cell, c, t, trainable.PRECISION,
                                 a.work / c / trainable.folder_name(t, s), timeout=a.timeout,
                                 ctx=ctx, spec=s): (tr_rows, (c, t, s))
                     for c, t, s in tr_cells})
        for i, fut in enumerate(as_completed(futs), 1):
            row = fut.result()
            into, cell = futs[fut]
            into[cell] = row
            bad = [f"{s} {v}: {row['errors'].get(s, '')[:120]}"
                   for s, v in row["steps"].items() if v in ("failed", "timeout", "crashed")]
            print(f"[{i}/{n_all}] {' '.join(cell)}: "
                  f"{'pass' if row['pass'] else 'FAIL'} ({row['metrics']['wall_s']:.0f} s)"
                  + (f" {bad[0]}" if bad else ""), flush=True)
    total = time.perf_counter() - t0

    out_json = a.out.with_suffix(".json")
    before = json.loads(out_json.read_text()) if out_json.is_file() else None
    old = before if only or a.skip_head else None
    new_rows = [rows[c] for c in cells]
    keep = [r for r in (old or {}).get("rows", [])
            if a.skip_head or r["case"] not in names]
    order = list(cases.CASES)
    all_rows = sorted(keep + new_rows, key=lambda r: (
        order.index(r["case"]) if r["case"] in order else len(order), r["target"],
        r["precision"]))
    info = dict((old or {}).get("cases", {}))
    for r in new_rows:
        info[r["case"]] = {"source": r.get("source"), "spec": r.get("spec"),
                           "notes": r.get("notes", []), "params": r["metrics"].get("params")}
    info = {n: info[n] for n in sorted(info, key=lambda n: order.index(n) if n in order else 99)}
    cmd = "python -m tools.coverage " + " ".join(argv if argv is not None else sys.argv[1:])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tr_block = (before or {}).get("trainable")
    if tr_cells:
        tr_block = trainable.merge(tr_block, [tr_rows[c] for c in tr_cells], order,
                                   command=cmd.strip(), date=now, commit=commit + (
                                       " (uncommitted changes)" if dirty else ""),
                                   seconds=total, timeout=a.timeout)
    data = {
        "command": old["command"] if old else cmd.strip(), "date": old["date"] if old else now,
        "commit": old["commit"] if old else commit,
        "dirty": dirty or bool(old and old.get("dirty")),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU(s), Python "
                   f"{platform.python_version()}",
        "versions": _versions(), "jobs": a.jobs, "timeout_s": a.timeout,
        "bench_repeats": BENCH_REPEATS, "total_s": total if old is None else
        (old.get("total_s", 0.0) + total), "targets": targets, "precisions": precisions,
        "partial_updates": [*(old or {}).get("partial_updates", []),
                            *([{"command": cmd.strip(), "date": now, "cases": names,
                                "seconds": total, "commit": commit + (" (uncommitted changes)"
                                                                      if dirty else "")}]
                              if old else [])],
        "cases": info, "rows": all_rows,
        "summary": {"pass": sum(r["pass"] for r in all_rows), "cells": len(all_rows)},
        **({"trainable": tr_block} if tr_block else {}),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=1, default=float) + "\n")
    a.out.write_text(render(data))
    print(f"{data['summary']['pass']} of {data['summary']['cells']} cells pass end to end"
          + (f", {tr_block['summary']['pass']} of {tr_block['summary']['cells']} trainable "
             "cells" if tr_block else "") + f"; {total / 60:.1f} min; wrote {a.out} and "
          f"{out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
