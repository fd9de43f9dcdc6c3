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


def _new_class_cells(d: dict | None) -> list[str]:
    """Imprinting / + head training accuracy, train ms and peak RSS of a bundle's devices."""
    if not d:  # no device could add its classes to this bundle's head
        return ["fixed classes", "–", "–", "–"]
    return [f"{d['imprint_accuracy']:.3f}", f"{d['trained_accuracy']:.3f}",
            f"{1000 * d['train_seconds']:.0f}", f"{d['max_peak_rss_mb']:.0f}"]


def vision_tables(summary) -> list[Table]:
    """Server models, bundles and cameras of the vision scenario."""
    own = summary.server.get("own_data")  # your image folders, not Fashion-MNIST -> digits
    t = Table(title=f"{summary.recipe}: server models "
                    f"({'device users of ' + own if own else 'Fashion-MNIST test subset'})")
    for c in ("model", "params", "backbone params", "val acc", "test acc", "train s"):
        t.add_column(c, justify="left" if c == "model" else "right")
    names = {"teacher": "teacher" if own else "EfficientNet-Lite0 (ImageNet, fine-tuned)",
             "student_scratch": "student CNN (from scratch)", "student": "student CNN (distilled)"}
    for key, label in names.items():
        r = summary.server.get(key)
        if r:
            t.add_row(label, f"{r['params']:,}", f"{r['backbone_params']:,}",
                      f"{r['val_accuracy']:.3f}", f"{r['heldout_accuracy']:.3f}",
                      f"{r['seconds']:.0f}")
    b = Table(title="bundles and devices (each personalises on its own images)" if own else
              "bundles and cameras (digits: 10 new classes, unseen test digits)")
    for c in ("bundle", "KiB", "backbone KiB", "test acc" if own else "fashion test acc",
              "vs torch", "imprint",
              "+ head training", "train ms", "RSS MiB"):
        b.add_column(c, justify="left" if c == "bundle" else "right", no_wrap=True)
    by = summary.totals.get("by_bundle", {})
    for r in summary.bundles:
        acc = r["checks"].get("accuracy", {})
        cam = _new_class_cells(by.get(r["name"]))
        b.add_row(r["name"], f"{r['bytes'] / 1024:.0f}", f"{r['backbone_bytes'] / 1024:.0f}",
                  f"{acc.get('bundle', float('nan')):.4f}",
                  f"{0.0 - acc.get('drop_points', float('nan')):+.2f} pt", *cam)
    return [t, b]


def text_tables(summary) -> list[Table]:
    """MiniLM vs its distilled student, then every bundle with its device topic accuracy."""
    own = summary.server.get("own_data")  # your text CSV, not WordNet -> fortunes
    what = "device users of " + own if own else "WordNet noun categories, test glosses"
    t = Table(title=f"{summary.recipe}: server models ({what})")
    for c in ("model", "layers", "params", "val acc", "test acc", "train s"):
        t.add_column(c, justify="left" if c == "model" else "right")
    names = {"teacher": "all-MiniLM-L6-v2 (frozen) + head", "student": "student (distilled)"}
    for key, label in names.items():
        r = summary.server.get(key)
        if r:
            t.add_row(label, str(r["layers"]), f"{r['params']:,}", f"{r['val_accuracy']:.3f}",
                      f"{r['heldout_accuracy']:.3f}", f"{r['seconds']:.0f}")
    b = Table(title="bundles and devices (each personalises on its own texts)" if own else
              "bundles and devices (fortune topics the server never saw)")
    for c in ("bundle", "MiB", "latency ms", "test acc" if own else "gloss test acc",
              "vs torch", "imprint",
              "+ head training", "train ms", "RSS MiB"):
        b.add_column(c, justify="left" if c == "bundle" else "right", no_wrap=True)
    by = summary.totals.get("by_bundle", {})
    for r in summary.bundles:
        acc = r["checks"].get("accuracy", {})
        dev = _new_class_cells(by.get(r["name"]))
        b.add_row(r["name"], f"{r['bytes'] / 2**20:.1f}", f"{r.get('latency_ms_p50', 0):.2f}",
                  f"{acc.get('bundle', float('nan')):.4f}",
                  f"{0.0 - acc.get('drop_points', float('nan')):+.2f} pt", *dev)
    return [t, b]


def run_tables(summary) -> list[Table]:
    """The tables ``edgetl run`` prints for a summary of any input kind."""
    if summary.kind == "image":
        return vision_tables(summary)
    if summary.kind == "text":
        return text_tables(summary)
    return [server_table(summary), device_table(summary), bundles_table(summary)]


def server_table(summary) -> Table:
    """Teacher / student-from-scratch / distilled student on held-out users."""
    t = Table(title=f"{summary.recipe}: server models (accuracy on held-out users)")
    for c in ("model", "params", "server-val acc", "held-out acc", "train s"):
        t.add_column(c, justify="right" if c != "model" else "left")
    names = {"teacher": "teacher", "student_scratch": "student (from scratch)",
             "student": "student (distilled)"}
    for key, label in names.items():
        r = summary.server.get(key)
        if r:
            t.add_row(label, f"{r['params']:,}", f"{r['val_accuracy']:.3f}",
                      f"{r['heldout_accuracy']:.3f}", f"{r['seconds']:.1f}")
    return t


def device_table(summary, bundle: str | None = None) -> Table:
    """Per device, for one bundle (default the first): general vs personalised accuracy."""
    name = bundle or summary.bundle_names()[0]
    rows = [r for r in summary.devices if r["bundle"] == name]
    t = Table(title=f"on-device personalisation with {name} (adapt on session 1, evaluate on "
                    "later sessions)")
    for c in ("user", "n adapt", "n eval", "general", "personal", "gain", "gate",
              "adapt ms", "peak RSS MiB"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        g = r["gain"]
        color = "green" if g > 0 else ("red" if g < 0 else "white")
        t.add_row(str(r["user"]), str(r["n_adapt"]), str(r["n_eval"]),
                  f"{r['general_accuracy']:.3f}", f"{r['personal_accuracy']:.3f}",
                  f"[{color}]{g:+.3f}[/]", "rolled back" if r["rolled_back"] else "kept",
                  f"{1000 * r['adapt_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}")
    tot = summary.totals.get("by_bundle", {}).get(name)
    if tot:
        t.add_section()
        t.add_row("mean", "", "", f"{tot['mean_general_accuracy']:.3f}",
                  f"{tot['mean_personal_accuracy']:.3f}", f"{tot['mean_gain']:+.3f}",
                  f"{tot['rolled_back']} rb", f"{1000 * tot['mean_adapt_seconds']:.0f}",
                  f"{tot['max_peak_rss_mb']:.0f} max")
    return t


def bundles_table(summary) -> Table:
    """One row per exported bundle: size, parity, held-out accuracy and device means."""
    t = Table(title="bundles (held-out users; device columns are means over devices)")
    for c in ("bundle", "KiB", "bb rel err", "step err", "held-out", "vs torch", "general",
              "personal", "adapt ms", "RSS MiB"):
        t.add_column(c, justify="left" if c == "bundle" else "right", no_wrap=True)
    by = summary.totals.get("by_bundle", {})
    for b in summary.bundles:
        c, d = b["checks"], by.get(b["name"], {})
        acc = c.get("accuracy", {})
        t.add_row(b["name"], f"{b['bytes'] / 1024:.0f}", f"{c['backbone_rel_err']:.1e}",
                  f"{c['train_step_max_abs_err']:.1e}", f"{acc.get('bundle', float('nan')):.4f}",
                  f"{0.0 - acc.get('drop_points', float('nan')):+.2f} pt",
                  f"{d.get('mean_general_accuracy', float('nan')):.3f}",
                  f"{d.get('mean_personal_accuracy', float('nan')):.3f}",
                  f"{1000 * d.get('mean_adapt_seconds', float('nan')):.0f}",
                  f"{d.get('max_peak_rss_mb', float('nan')):.0f}")
    return t


def plot_personalisation(summary, path: Path) -> Path:
    """Per-user bars for the first bundle; per-bundle means beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = summary.bundle_names()
    first = names[0] if names else ""
    d = [r for r in summary.devices if r["bundle"] == first]
    users = [str(r["user"]) for r in d]
    x = np.arange(len(users))
    wide = 0.7 * len(users) + 2
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(6, wide) + 1 + 0.9 * len(names), 3.8),
                                 width_ratios=[max(6, wide), 1 + 0.9 * len(names)])
    ax.bar(x - 0.2, [r["general_accuracy"] for r in d], 0.4, label="general (server head)")
    ax.bar(x + 0.2, [r["personal_accuracy"] for r in d], 0.4, label="personalised on device")
    vals = [v for r in summary.devices for v in (r["general_accuracy"], r["personal_accuracy"])]
    lo = max(0.0, min(vals) - 0.05) if vals else 0.0
    ax.set_ylim(lo, 1.0)
    ax.set_xticks(x, users)
    ax.set_xlabel("held-out user")
    ax.set_ylabel("accuracy on later sessions")
    gain = summary.totals.get("by_bundle", {}).get(first, {}).get("mean_gain", 0.0)
    ax.set_title(f"{summary.recipe} / {first}: mean gain {gain:+.3f}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    by = summary.totals.get("by_bundle", {})
    xb = np.arange(len(names))
    bx.bar(xb - 0.2, [by[n]["mean_general_accuracy"] for n in names], 0.4)
    bx.bar(xb + 0.2, [by[n]["mean_personal_accuracy"] for n in names], 0.4)
    bx.set_ylim(lo, 1.0)
    bx.set_xticks(xb, names, rotation=30, ha="right", fontsize=8)
    bx.set_title("mean over devices", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
