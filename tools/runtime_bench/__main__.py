"""``python -m tools.runtime_bench RUN_OR_BUNDLE... --out DIR``: see ``tools.runtime_bench``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import tools.runtime_bench as rb
from tools.runtime_bench.report import markdown, plot, summarise


def find_bundles(paths: list[Path]) -> list[Path]:
    """Bundle folders: each path is one (has manifest.json) or a run (``bundles/*/``)."""
    out = []
    for p in paths:
        if (p / "manifest.json").is_file():
            out.append(p)
        elif found := sorted(m.parent for m in p.glob("bundles/*/manifest.json")):
            out += found
        else:
            raise SystemExit(f"error: {p} is neither a bundle (manifest.json) nor a run folder "
                             "with bundles/*/manifest.json (make demo writes runs/har)")
    return out


def default_data(paths: list[Path]) -> Path:
    """The first device's adaptation data of the first run folder (``devices/index.json``)."""
    for p in paths:
        index = p / "devices" / "index.json"
        if index.is_file():
            return p / json.loads(index.read_text())[0]["adapt"]
    raise SystemExit("error: no --data given and no devices/index.json in "
                     f"{', '.join(map(str, paths))}: pass --data FILE (a .npz or .csv)")


def describe(data: Path) -> str:
    """The data file as the table names it: its path and, for ``.npz`` windows, how many."""
    desc = f"`{data}`"
    if data.suffix == ".npz":
        import numpy as np

        with np.load(data) as z:
            desc += f" ({len(z['x'])} windows)"
    return desc


def versions(rows: list[dict]) -> dict:
    """Python, Node, the runtimes and Chromium, as this run used them."""
    v = {"Python": platform.python_version()}
    for r in rows:
        if "backend" in r:
            name, _, ver = r["backend"].rpartition(" ")
            v[name or r["backend"]] = ver
        if "chromium" in r:
            v["Chromium"] = r["chromium"]
    try:
        v["Node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                   check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return v


def machine(load_start: tuple, load_end: tuple) -> str:
    """Cores, CPU model and the load average at the start and the end."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{os.cpu_count()} cores ({cpu}), load average {load_start[0]:.1f} at the start, "
            f"{load_end[0]:.1f} at the end (shared with other jobs: numbers drift)")


def main(argv: list[str] | None = None) -> dict:
    """Run the rounds; write runtimes.{json,md,png} under --out; return what was written."""
    ap = argparse.ArgumentParser(prog="python -m tools.runtime_bench",
                                 description=rb.__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run folders (runs/har) or bundles")
    ap.add_argument("--data", type=Path, default=None,
                    help="adaptation data (default: the run's first device, devices/index.json)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"),
                    help="writes runtimes.{json,md,png} here (beside edgetl bench's bench.md)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None,
                    help="default: the first bundle's adapt.epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runtimes", default=",".join(rb.RUNTIMES),
                    help=f"comma-separated, of {', '.join(rb.RUNTIMES)}")
    ap.add_argument("--no-page", action="store_true", help="skip the web page's load time")
    ap.add_argument("--no-commands", action="store_true",
                    help="skip the whole run.py / cli.js commands")
    a = ap.parse_args(argv)
    bundles = find_bundles(a.paths)
    data = a.data or default_data(a.paths)
    epochs = a.epochs if a.epochs is not None else json.loads(
        (bundles[0] / "manifest.json").read_text())["adapt"]["epochs"]
    keys = [k.strip() for k in a.runtimes.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in rb.RUNTIMES]:
        raise SystemExit(f"error: unknown runtime(s) {unknown}; known: {list(rb.RUNTIMES)}")
    skipped = {}
    for k in keys:
        why = rb.unavailable(rb.RUNTIMES[k].kind)
        if why:
            skipped[k] = why
            print(f"skipping {k}: {why}", file=sys.stderr)
    keys = [k for k in keys if k not in skipped]
    load0 = os.getloadavg()
    rows = rb.run_rounds(bundles, data, rounds=a.rounds, seed=a.seed, epochs=epochs,
                         runtimes=keys, page=not a.no_page, commands=not a.no_commands,
                         say=lambda s: print(s, file=sys.stderr, flush=True))
    summary = summarise(rows)
    meta = {"data": str(data), "data_desc": describe(data), "seed": a.seed, "epochs": epochs,
            "rounds": a.rounds, "bundles": [str(b) for b in bundles],
            "machine": machine(load0, os.getloadavg()), "versions": versions(rows),
            "skipped": skipped}
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "summary": summary, "rows": rows}
    (a.out / "runtimes.json").write_text(json.dumps(result, indent=1))
    md = markdown(summary, meta)
    if skipped:
        md += "\nNot measured here: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "\n"
    (a.out / "runtimes.md").write_text(md)
    plot(summary, a.out / "runtimes.png")
    print(md)
    print(f"wrote {a.out / 'runtimes.json'}, runtimes.md, runtimes.png", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
