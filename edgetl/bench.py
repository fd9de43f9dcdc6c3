"""``edgetl bench``: size and batch-1 backbone latency of every bundle, measured by the runner.

Each measurement is a fresh device-runner process (numpy + one runtime), as on a device; all
bundles are measured in one invocation so their ratios share the same machine state.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from edgetl import adapt as device
from edgetl.errors import ConfigError
from edgetl.manifest import MANIFEST, Manifest


def find_bundles(paths: list[Path]) -> list[Path]:
    """Bundle folders among ``paths``: a bundle itself, or a run folder's ``bundles/*``."""
    found = []
    for p in paths:
        p = Path(p)
        if (p / MANIFEST).is_file():
            found.append(p)
        else:
            found += sorted(q.parent for q in p.glob(f"bundles/*/{MANIFEST}"))
    if not found:
        raise ConfigError(f"no bundles in {[str(p) for p in paths]}: pass bundle folders or a "
                          "run folder written by `edgetl run` (it has bundles/*/manifest.json)")
    return found


def bench_bundles(bundles: list[Path], *, threads: tuple[int, ...] = (1, 2),
                  repeats: int = 1000) -> dict:
    """Measure every bundle at every thread count; return ``{"machine", "rows"}``."""
    from edgetl.progress import progress_bar

    rows = []
    with progress_bar(True) as prog:
        task = prog.add_task("bench bundles", total=len(bundles) * len(threads), info="")
        for b in bundles:
            man = Manifest.read(b)
            for t in threads:
                r = device.run_runner("bench", b, "--threads", str(t), "--repeats", str(repeats))
                acc = man.checks.get("accuracy", {})
                rows.append({"name": b.name, **r, "heldout_accuracy": acc.get("bundle"),
                             "accuracy_drop_points": acc.get("drop_points")})
                prog.update(task, advance=1, info=f"{b.name} x{t}: "
                                                  f"{r['backbone_ms_p50'] * 1000:.0f} µs")
    machine = {"platform": platform.platform(), "machine": platform.machine(),
               "processor": platform.processor() or None, "python": platform.python_version()}
    return {"machine": machine, "repeats": repeats, "rows": rows}


def markdown(res: dict) -> str:
    """The README table: one line per bundle, latency columns per thread count."""
    threads = sorted({r["threads"] for r in res["rows"]})
    names = list(dict.fromkeys(r["name"] for r in res["rows"]))
    head = ["bundle", "target", "precision", "bundle KiB", "backbone KiB",
            *[f"backbone p50 µs ({t} thr)" for t in threads], "held-out acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        rs = {r["threads"]: r for r in res["rows"] if r["name"] == n}
        r = next(iter(rs.values()))
        acc = r.get("heldout_accuracy")
        lat = [f"{rs[t]['backbone_ms_p50'] * 1e3:.0f} (p95 {rs[t]['backbone_ms_p95'] * 1e3:.0f})"
               for t in threads]
        cells = [n, r["target"], r["precision"], f"{r['bundle_bytes'] / 1024:.0f}",
                 f"{r['backbone_bytes'] / 1024:.0f}", *lat,
                 f"{acc:.4f}" if acc is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    m = res["machine"]
    lines.append("")
    lines.append(f"Batch 1, {res['repeats']} timed calls after warm-up, one runner process per "
                 f"cell; {m['machine']}, {m['platform']}.")
    return "\n".join(lines) + "\n"


def write(res: dict, out: Path) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    return out / "bench.json", out / "bench.md"
