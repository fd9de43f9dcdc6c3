"""The aarch64 run against the x86_64 one, bundle by bundle, and the Markdown report (pure)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgetl.tolerances import PiTolerance


@dataclasses.dataclass(frozen=True)
class Check:
    """One x86_64-vs-aarch64 comparison: a measured value against its limit."""

    bundle: str
    name: str
    value: float
    limit: float
    ok: bool
    detail: str = ""
    measured: bool = True  # False: a yes/no check (value and limit mean nothing)


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare_bundle(bundle: str, tol: PiTolerance, ref: dict, arm: dict) -> list[Check]:
    """Compare one bundle's aarch64 results with the x86_64 ones.

    ``ref`` / ``arm`` hold ``selftest`` (the runner's JSON), ``adapt`` (report.json),
    ``head`` (``{name: array}`` of head.npz) and ``infer`` (predictions.json).
    """
    checks = []

    def add(name, value, limit, ok=None, detail="", measured=None):
        measured = ok is None if measured is None else measured
        ok = value <= limit * (1 + 1e-9) if ok is None else ok  # 100 * (0.99 - 0.98) > 1
        checks.append(Check(bundle, name, float(value), float(limit), bool(ok), detail,
                            measured))

    ra, aa = ref["adapt"], arm["adapt"]
    add("selftest passes on aarch64", 0, 0, bool(arm["selftest"].get("ok")),
        f"max abs err {arm['selftest'].get('max_abs_err', float('nan')):.2g} "
        f"(x86_64 {ref['selftest'].get('max_abs_err', float('nan')):.2g})")
    names = sorted(set(ref["head"]) | set(arm["head"]))
    worst, where = 0.0, ""
    for n in names:
        if n not in ref["head"] or n not in arm["head"]:
            worst, where = float("inf"), f"{n} missing on one side"
            break
        r = np.asarray(ref["head"][n])
        if not np.issubdtype(r.dtype, np.number):
            continue
        scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
        d = _max_abs(r, arm["head"][n]) / scale
        if d > worst:
            worst, where = d, n
    add("adapted head, max |Δ| / max(1, |w|)", worst, tol.head_atol, detail=where)
    lr = [h["loss"] for h in ra.get("history", [])]
    la = [h["loss"] for h in aa.get("history", [])]
    add("train loss per epoch, max |Δ|", _max_abs(lr, la) if len(lr) == len(la) else np.inf,
        tol.loss_atol, detail=f"{len(la)} epochs (x86_64 {len(lr)})")
    for key in ("accuracy_before", "accuracy_after"):
        add(f"validation {key.split('_')[1]}, |Δ| points",
            100 * abs(ra[key] - aa[key]), tol.accuracy_points,
            detail=f"{aa[key]:.4f} (x86_64 {ra[key]:.4f})")
    add("same keep/roll-back decision", 0, 0, ra["rolled_back"] == aa["rolled_back"],
        f"rolled back: {aa['rolled_back']} (x86_64 {ra['rolled_back']})")
    pr, pa = ref["infer"]["predictions"], arm["infer"]["predictions"]
    same = len(pr) == len(pa) and len(pr) > 0
    agree = sum(a == b for a, b in zip(pr, pa, strict=True)) / len(pr) if same else 0.0
    add("infer predictions identical, fraction (min)", agree, tol.min_agreement,
        agree >= tol.min_agreement, f"{len(pa)} windows", measured=True)
    if "accuracy" in ref["infer"]:
        ir, ia = ref["infer"]["accuracy"], arm["infer"].get("accuracy", float("nan"))
        add("infer accuracy, |Δ| points", 100 * abs(ir - ia), tol.accuracy_points,
            detail=f"{ia:.4f} (x86_64 {ir:.4f})")
    return checks


def load_side(folder: Path) -> dict:
    """The results a suite run left in ``folder`` (one bundle), for :func:`compare_bundle`."""
    with np.load(folder / "state" / "head.npz", allow_pickle=False) as z:
        head = {k: z[k] for k in z.files}
    return {"selftest": json.loads((folder / "selftest.json").read_text()),
            "adapt": json.loads((folder / "state" / "report.json").read_text()),
            "infer": json.loads((folder / "infer" / "predictions.json").read_text()),
            "head": head}


def summary_markdown(s: dict) -> str:
    """The summary as a Markdown report."""
    a, t = s["aarch64"], s["timings_s"]
    lines = [f"# make test-pi: {'PASS' if s['ok'] else 'FAIL'}", "",
             f"aarch64 (qemu-user, QEMU_CPU={s['qemu_cpu']}): Python {a['python']}, "
             f"{a['libc']}, " + ", ".join(f"{k} {v}" for k, v in a["versions"].items()),
             f"x86_64 host: Python {s['host']['python']}, "
             + ", ".join(f"{k} {v}" for k, v in s["host"]["versions"].items()),
             f"bundles: {s['bundles_from']}; adapt {s['epochs']} epochs, seed {s['seed']}",
             f"rootfs: {'built' if s['rootfs']['built'] else 'reused'} "
             f"{s['rootfs']['tarball']} ({s['rootfs']['tarball_mib']} MiB)",
             "timings: " + ", ".join(f"{k} {v}" for k, v in t.items()), "",
             "| bundle | check | aarch64 vs x86_64 | limit | ok | detail |",
             "|---|---|---:|---:|---|---|"]
    for c in s["checks"]:
        v, lim = (f"{c['value']:.3g}", f"{c['limit']:.3g}") if c["measured"] else ("", "")
        lines.append(f"| {c['bundle']} | {c['name']} | {v} | {lim} | "
                     f"{'yes' if c['ok'] else '**NO**'} | {c['detail']} |")
    lines += ["", "Emulated timings say nothing about a real Pi's speed."]
    return "\n".join(lines) + "\n"
