"""Summary tables (rich) and plots (matplotlib, imported lazily) of a run."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def bundle_line(path: Path, man) -> str:
    """One line per exported bundle: size, parity and the accuracy gate."""
    total = sum(f.bytes for f in man.files.values())
    c = man.checks
    acc = c.get("accuracy")
    acc_s = (f"; held-out accuracy {acc['bundle']:.4f} vs {acc['reference'].replace('_', ' ')} "
             f"{acc['reference_accuracy']:.4f} "
             f"({0.0 - acc['drop_points']:+.2f} pt)") if acc else ""
    return (f"bundle {path}: {man.target}/{man.precision}, {len(man.files)} files, "
            f"{total / 1024:.0f} KiB; backbone diff {c['backbone_max_abs_err']:.1e} "
            f"(rel {c['backbone_rel_err']:.1e}), train step {c['train_step_max_abs_err']:.1e}"
            f"{acc_s}")


def check_table(bundle, checks) -> Table:
    """``edgetl check``: one row per check, failures in red."""
    t = Table(title=f"edgetl check {bundle}")
    for c in ("check", "result", "value", "limit", "detail"):
        t.add_column(c, justify="right" if c in ("value", "limit") else "left",
                     no_wrap=c != "detail")
    for c in checks:
        res = "[green]ok[/]" if c.ok else "[bold red]FAIL[/]"
        fmt = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
        t.add_row(c.name, res, fmt(c.value), fmt(c.limit), c.detail)
    return t


#: Row labels of the starting head, by a device row's ``start``.
START = {"shipped": "shipped head", "imprinted": "new labels imprinted", "mixed": "start"}


def run_tables(summary) -> list[Table]:
    """The tables ``edgetl run`` prints, for a summary of any input kind."""
    tables = [server_table(summary), bundles_table(summary)]
    if summary.devices:
        tables.insert(1, device_table(summary))
        tables.insert(2, protocol_table(summary))
    return tables


def protocol_table(summary) -> Table:
    """Per protocol and bundle: general model, adapted without the gate, the gate's choice.

    Gains in points; "hurt" counts devices more than 1 pt below the general model; "error cut"
    is the mean share of the general model's errors removed on devices it gets < 95 % right;
    "oracle: cut" is the error cut of a gate that knew each device's evaluation data (the
    better of the two heads per device): the most any gate could get from this method.
    """
    t = Table(title="personalisation by protocol (means over devices; gains in points; "
                    "hurt: devices > 1 pt worse; error cut: devices the general model gets "
                    "< 95 % right)")
    for c in ("protocol", "bundle", "general", "no gate: gain", "hurt", "error cut",
              "gate: gain", "hurt", "error cut", "kept", "oracle: cut"):
        t.add_column(c, justify="left" if c in ("protocol", "bundle") else "right",
                     no_wrap=True)
    pct = lambda v: "–" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    by = {"sessions": summary.totals.get("by_bundle", {}),
          **summary.totals.get("by_protocol", {})}
    for protocol, bundles in by.items():
        for name, d in bundles.items():
            color = "green" if d["mean_gain"] >= 0 and not d["users_worse_1pt"] else "red"
            kept = (f"{d['kept']}/{d['kept'] + d['rolled_back']}" if "kept" in d else
                    f"{d['n'] - d['rolled_back']}/{d['n']}")
            t.add_row(protocol, name, f"{d['mean_before_accuracy']:.3f}",
                      f"{100 * d['ungated_mean_gain']:+.2f}", str(d["ungated_users_worse_1pt"]),
                      pct(d["ungated_error_cut_below_95"]),
                      f"[{color}]{100 * d['mean_gain']:+.2f}[/]", str(d["users_worse_1pt"]),
                      pct(d["error_cut_below_95"]), kept,
                      pct(d.get("oracle_error_cut_below_95")))
    return t


def server_table(summary) -> Table:
    """Teacher / student-from-scratch / distilled student on the held-out data."""
    held = summary.server.get("heldout", "held-out data")
    t = Table(title=f"{summary.recipe}: server models (accuracy on {held})")
    for c in ("model", "params", "backbone params", "server-val acc", "held-out acc",
              "train s"):
        t.add_column(c, justify="right" if c != "model" else "left")
    shipped_twin = (summary.server.get("student") or {}).get("shipped") == "from scratch"
    for key in ("teacher", "student_scratch", "student_distilled", "student"):
        r = summary.server.get(key)
        if r and not (key == "student_scratch" and shipped_twin):  # listed once, as shipped
            t.add_row(r.get("model", key), f"{r['params']:,}", f"{r['backbone_params']:,}",
                      f"{r['val_accuracy']:.3f}", f"{r['heldout_accuracy']:.3f}",
                      f"{r['seconds']:.1f}")
    return t


def _start(rows: list[dict]) -> str:
    kinds = {r["start"] for r in rows}
    return START[kinds.pop() if len(kinds) == 1 else "mixed"]


def device_table(summary, bundle: str | None = None) -> Table:
    """Per device, for one bundle (default the first): starting vs personalised accuracy."""
    name = bundle or summary.bundle_names()[0]
    rows = [r for r in summary.devices if r["bundle"] == name]
    start = _start(rows)
    t = Table(title=f"on-device personalisation with {name} (scored on each device's "
                    "evaluation data, never trained on)")
    for c in ("device", "n adapt", "n eval", start, "personalised", "gain", "gate",
              "adapt ms", "peak RSS MiB"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        g = r["gain"]
        color = "green" if g > 0 else ("red" if g < 0 else "white")
        t.add_row(str(r.get("user", r["device"])), str(r["n_adapt"]), str(r["n_eval"]),
                  f"{r['before_accuracy']:.3f}", f"{r['after_accuracy']:.3f}",
                  f"[{color}]{g:+.3f}[/]", "rolled back" if r["rolled_back"] else "kept",
                  f"{1000 * r['adapt_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}")
    tot = summary.totals.get("by_bundle", {}).get(name)
    if tot:
        t.add_section()
        t.add_row("mean", "", "", f"{tot['mean_before_accuracy']:.3f}",
                  f"{tot['mean_after_accuracy']:.3f}", f"{tot['mean_gain']:+.3f}",
                  f"{tot['rolled_back']} rb", f"{1000 * tot['mean_adapt_seconds']:.0f}",
                  f"{tot['max_peak_rss_mb']:.0f} max")
    return t


def bundles_table(summary) -> Table:
    """One row per exported bundle: size, latency, parity, held-out accuracy, device means."""
    t = Table(title="bundles (device columns: means over devices; – : the bundle cannot hold "
                    "the devices' new labels)")
    for c in ("bundle", "KiB", "backbone KiB", "ms", "step err", "held-out", "vs torch",
              "start", "personal", "gain", "adapt ms", "RSS MiB"):
        t.add_column(c, justify="left" if c == "bundle" else "right", no_wrap=True)
    by = summary.totals.get("by_bundle", {})
    nan = float("nan")
    for b in summary.bundles:
        c, d = b["checks"], by.get(b["name"])
        acc = c.get("accuracy", {})
        dev = (["–"] * 5 if not d else
               [f"{d['mean_before_accuracy']:.3f}", f"{d['mean_after_accuracy']:.3f}",
                f"{d['mean_gain']:+.3f}", f"{1000 * d['mean_adapt_seconds']:.0f}",
                f"{d['max_peak_rss_mb']:.0f}"])
        t.add_row(b["name"], f"{b['bytes'] / 1024:.0f}", f"{b['backbone_bytes'] / 1024:.0f}",
                  f"{b.get('latency_ms_p50', nan):.2f}", f"{c['train_step_max_abs_err']:.1e}",
                  f"{acc.get('bundle', nan):.4f}",
                  f"{0.0 - acc.get('drop_points', nan):+.2f} pt", *dev)
    return t


def plot_personalisation(summary, path: Path) -> Path:
    """Per-device bars for the first bundle, per-bundle means, and size vs latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = summary.bundle_names()
    first = names[0] if names else ""
    d = [r for r in summary.devices if r["bundle"] == first]
    start = _start(summary.devices) if summary.devices else START["shipped"]
    devs = [str(r.get("user", r["device"])) for r in d]
    x = np.arange(len(devs))
    wide = max(5.0, 0.6 * len(devs) + 2)
    mid = 1.5 + 0.8 * (len(summary.protocols) + 1 if summary.protocols else len(names))
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(wide + mid + 4.5, 4.2),
                                     width_ratios=[wide, mid, 4.5])
    gated = bool(d) and "adapted_accuracy" in d[0]
    ax.bar(x - 0.27, [r["before_accuracy"] for r in d], 0.27, label=start)
    if gated:
        ax.bar(x, [r["adapted_accuracy"] for r in d], 0.27, color="0.7",
               label="adapted (no gate)")
    ax.bar(x + 0.27, [r["after_accuracy"] for r in d], 0.27,
           label="kept by the device's gate" if gated else "personalised on device")
    vals = [v for r in summary.devices
            for v in (r["before_accuracy"], r["after_accuracy"], r.get("adapted_accuracy", 1))]
    lo = max(0.0, min(vals) - 0.05) if vals else 0.0
    ax.set_ylim(lo, 1.0)
    ax.set_xticks(x, devs, rotation=30 if len(devs) > 8 else 0, fontsize=8)
    ax.set_xlabel("device (held-out)")
    ax.set_ylabel("accuracy on the device's evaluation data")
    by = summary.totals.get("by_bundle", {})
    gain = by.get(first, {}).get("mean_gain", 0.0)
    ax.set_title(f"{summary.recipe} / {first}: mean gain {100 * gain:+.1f} pt", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8,
              frameon=False)
    if summary.protocols:  # the first bundle under every protocol
        prot = {"sessions": by, **summary.totals.get("by_protocol", {})}
        groups = [p for p in prot if first in prot[p]]
        t = [prot[p][first] for p in groups]
        xb = np.arange(len(groups))
        bx.bar(xb - 0.27, [v["mean_before_accuracy"] for v in t], 0.27)
        bx.bar(xb, [v["mean_before_accuracy"] + v["ungated_mean_gain"] for v in t], 0.27,
               color="0.7")
        bx.bar(xb + 0.27, [v["mean_after_accuracy"] for v in t], 0.27)
        bx.set_xticks(xb, groups, fontsize=8)
        bx.set_title(f"{first}, mean by protocol", fontsize=10)
    else:
        xb = np.arange(len(names))
        bx.bar(xb - 0.2, [by[n]["mean_before_accuracy"] for n in names], 0.4)
        bx.bar(xb + 0.2, [by[n]["mean_after_accuracy"] for n in names], 0.4)
        bx.set_xticks(xb, names, rotation=30, ha="right", fontsize=7)
        bx.set_title("mean over devices", fontsize=10)
    bx.set_ylim(lo, 1.0)
    for b in summary.bundles:
        if "latency_ms_p50" in b:
            cx.scatter(b["bytes"] / 2**20, b["latency_ms_p50"], s=36)
            cx.annotate(b["name"], (b["bytes"] / 2**20, b["latency_ms_p50"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    from matplotlib.ticker import FormatStrFormatter

    cx.set_xscale("log")
    cx.set_yscale("log")
    pts = [(b["bytes"] / 2**20, b["latency_ms_p50"]) for b in summary.bundles
           if "latency_ms_p50" in b]
    cols = list(zip(*pts, strict=True)) if pts else [(1,), (1,)]
    for axis, vals in zip((cx.xaxis, cx.yaxis), cols,
                          strict=True):
        narrow = max(vals) < 10 * min(vals)  # less than a decade: label the minor ticks too
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%.2g" if narrow else ""))
    cx.set_xlabel("bundle size (MiB)")
    cx.set_ylabel("backbone ms, batch 1, 1 thread")
    cx.set_title("size vs latency", fontsize=10)
    cx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
