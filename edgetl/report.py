"""Summary tables (rich) and plots (matplotlib, imported lazily) of a run."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def bundle_line(path: Path, man) -> str:
    """One line per exported bundle: size, parity and the accuracy gate."""
    total = sum(f.bytes for f in man.files.values())
    c = man.checks
    acc = c.get("accuracy")
    acc_s = (f"; held-out accuracy {acc['bundle']:.4f} vs torch {acc['torch_fp32']:.4f} "
             f"({-acc['drop_points']:+.2f} pt)") if acc else ""
    return (f"bundle {path}: {man.target}/{man.precision}, {len(man.files)} files, "
            f"{total / 1024:.0f} KiB; backbone diff {c['backbone_max_abs_err']:.1e} "
            f"(rel {c['backbone_rel_err']:.1e}), train step {c['train_step_max_abs_err']:.1e}"
            f"{acc_s}")


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


def device_table(summary) -> Table:
    """Per device: general vs personalised accuracy on later sessions."""
    t = Table(title="on-device personalisation (adapt on session 1, evaluate on later sessions)")
    for c in ("user", "n adapt", "n eval", "general", "personal", "gain", "gate",
              "adapt ms", "peak RSS MiB"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in summary.devices:
        g = r["gain"]
        color = "green" if g > 0 else ("red" if g < 0 else "white")
        t.add_row(str(r["user"]), str(r["n_adapt"]), str(r["n_eval"]),
                  f"{r['general_accuracy']:.3f}", f"{r['personal_accuracy']:.3f}",
                  f"[{color}]{g:+.3f}[/]", "rolled back" if r["rolled_back"] else "kept",
                  f"{1000 * r['adapt_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}")
    tot = summary.totals
    if tot:
        t.add_section()
        t.add_row("mean", "", "", f"{tot['mean_general_accuracy']:.3f}",
                  f"{tot['mean_personal_accuracy']:.3f}", f"{tot['mean_gain']:+.3f}",
                  f"{tot['rolled_back']} rb", f"{1000 * tot['mean_adapt_seconds']:.0f}",
                  f"{tot['max_peak_rss_mb']:.0f} max")
    return t


def plot_personalisation(summary, path: Path) -> Path:
    """Bar chart: general vs personalised accuracy per held-out user."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = summary.devices
    users = [str(r["user"]) for r in d]
    x = np.arange(len(users))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(users) + 2), 3.6))
    ax.bar(x - 0.2, [r["general_accuracy"] for r in d], 0.4, label="general (server head)")
    ax.bar(x + 0.2, [r["personal_accuracy"] for r in d], 0.4, label="personalised on device")
    lo = min(min(r["general_accuracy"], r["personal_accuracy"]) for r in d) if d else 0
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_xticks(x, users)
    ax.set_xlabel("held-out user")
    ax.set_ylabel("accuracy on later sessions")
    ax.set_title(f"{summary.recipe}: mean gain {summary.totals.get('mean_gain', 0):+.3f}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
