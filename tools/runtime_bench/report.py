"""The runtime bench's summary, its Markdown tables and its plot.

Summary: median and min–max over rounds, and per-round ratios to the Python runner.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from tools.runtime_bench import METRICS, RATIOS, RUNTIMES


def _stats(v: list[float]) -> dict:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def summarise(rows: list[dict]) -> dict:
    """Per bundle and runtime, in the rows' order: stats of each metric.

    Returns ``{bundle: {runtime: {metric: stats, "vs_python": {metric: stats}, "work":
    [(steps, epochs, rolled_back)], "failed": [error, ...]}}}``.
    """
    py = {(r["round"], r["bundle"]): r for r in rows
          if r["runtime"] == "python" and "error" not in r}
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["bundle"], {}).setdefault(r["runtime"], []).append(r)
    out: dict = {}
    for b, by_rt in groups.items():
        for key, all_rows in by_rt.items():
            rs = [r for r in all_rows if "error" not in r]
            cell: dict = {"failed": [r["error"] for r in all_rows if "error" in r]}
            for m in METRICS:
                v = [r[m] for r in rs if r.get(m) is not None]
                if v:
                    cell[m] = _stats(v)
            ratios = {}
            for m in RATIOS:
                v = [r[m] / py[(r["round"], b)][m] for r in rs
                     if key != "python" and (r["round"], b) in py]
                if v:
                    ratios[m] = _stats(v)
            if ratios:
                cell["vs_python"] = ratios
            if rs:
                cell["work"] = sorted({(r["steps"], r["epochs"], r["rolled_back"]) for r in rs})
                cell["backend"] = rs[0].get("backend")
            out.setdefault(b, {})[key] = cell
    return out


def fmt(s: dict | None, scale: float = 1.0, unit: str = "") -> str:
    """``median (min–max)`` with 2-3 significant digits; ``—`` when not measured."""
    if not s:
        return "—"
    g = lambda x: f"{x * scale:.0f}" if x * scale >= 100 else f"{x * scale:.3g}"  # noqa: E731
    if s["n"] == 1:
        return g(s["median"]) + unit
    return f"{g(s['median'])}{unit} ({g(s['min'])}–{g(s['max'])})"


def label(key: str, cell: dict) -> str:
    """The runtime's name; the Python runner's with the runtime it ran (per bundle target)."""
    if key == "python" and cell.get("backend"):
        return f"Python runner, {cell['backend']}"
    return RUNTIMES[key].label


def markdown(summary: dict, meta: dict) -> str:
    """The tables: in-process phases per bundle and runtime, the commands and the page."""
    rounds = f"{meta['rounds']} round{'s' if meta['rounds'] > 1 else ''}"
    lines = [f"Runtimes side by side on {meta['data_desc']}; seed {meta['seed']}, "
             f"{meta['epochs']} epochs, {rounds} interleaved, fresh process per cell. "
             "Median (min–max over rounds); ratios are per round to the Python runner on the "
             f"same bundle. Machine: {meta['machine']}.", ""]
    lines += ["| bundle | runtime | load (ms) | self-test (ms) | adapt: features + train (ms) |"
              " train step (ms) | self-test ÷ Python | adapt ÷ Python | work |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b, cells in summary.items():
        for k, c in cells.items():
            vs = c.get("vs_python", {})
            work = "; ".join(f"{s} steps, {e} epochs, {'rolled back' if rb else 'kept'}"
                             for s, e, rb in c.get("work", []))
            if c["failed"]:
                work = f"**failed** {len(c['failed'])}×: {c['failed'][0][:120]}"
            lines.append(
                f"| {b} | {label(k, c)} | {fmt(c.get('load_s'), 1000)} | "
                f"{fmt(c.get('selftest_s'), 1000)} | {fmt(c.get('adapt_s'), 1000)} | "
                f"{fmt(c.get('step_ms'))} | {fmt(vs.get('selftest_s'), unit='×')} | "
                f"{fmt(vs.get('adapt_s'), unit='×')} | {work} |")
    lines += ["", "What a user waits for: the whole command in a fresh process (`run.py` / "
              "`cli.js`: interpreter start, imports, load, self-test, and for `adapt` the "
              "self-test again, the data, training, the gate and the state folder written), and "
              "in the browser the web page from picking the bundle folder to \"Self-test "
              "passed\" (files read, sha256, WASM runtime, sessions, self-test). Start: "
              "process or page start → runner and runtime imported.", "",
              "| bundle | runtime | start (s) | `selftest` command (s) | `adapt` command (s) |"
              " web page: pick folder → self-test passed (s) |", "|---|---|---|---|---|---|"]
    for b, cells in summary.items():
        for k, c in cells.items():
            lines.append(f"| {b} | {label(k, c)} | {fmt(c.get('startup_s'))} | "
                         f"{fmt(c.get('cmd_selftest_s'))} | {fmt(c.get('cmd_adapt_s'))} | "
                         f"{fmt(c.get('page_load_s'))} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    """Load, self-test, adaptation, the page's load (median, min–max): a panel per bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundles = list(summary)
    fig, axes = plt.subplots(len(bundles), 1, figsize=(8.5, 1.2 + 1.9 * len(bundles)),
                             squeeze=False, sharex=True)
    shown = (("load_s", "load (read, verify, runtime, sessions)", "tab:gray"),
             ("selftest_s", "self-test", "tab:blue"),
             ("adapt_s", "adapt (features + training)", "tab:orange"),
             ("page_load_s", "web page: pick folder → self-test passed", "tab:green"))
    h = 0.8 / len(shown)
    for ax, b in zip(axes[:, 0], bundles, strict=True):
        keys = [k for k in summary[b] if summary[b][k].get("adapt_s")]
        for j, (m, name, colour) in enumerate(shown):
            pts = [(i + (j - (len(shown) - 1) / 2) * h, summary[b][k][m])
                   for i, k in enumerate(keys) if summary[b][k].get(m)]
            if not pts:
                continue
            ys, st = zip(*pts, strict=True)
            ax.barh(ys, [s["median"] for s in st], height=h, color=colour, label=name,
                    xerr=[[s["median"] - s["min"] for s in st],
                          [s["max"] - s["median"] for s in st]], capsize=2)
        ax.set_yticks(range(len(keys)), [label(k, summary[b][k]) for k in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(b, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds (median; whiskers: min–max over rounds; log scale)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (1.2 + 1.9 * len(bundles))))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
