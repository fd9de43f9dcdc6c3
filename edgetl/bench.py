"""``edgetl bench``: the latency / memory / size / accuracy trade-off of every bundle.

For each bundle × thread count, in fresh device-runner processes (numpy + one runtime, as on
a device):

- backbone latency at batch 1 (p50, p95 after warm-up) and throughput at batch 32;
- on-device adaptation on one fixed local data set: feature pass, head training for
  ``epochs`` epochs, their total, and the runner's peak RSS (median of ``adapt_repeats``
  processes); one inference pass over the same data for comparison;
- bundle size; accuracy on the device's evaluation data before and after adaptation.

In the same run, per backbone (checkpoint) × threads, the baselines a user would otherwise
pick (:mod:`edgetl.baselines`): the PyTorch eager tutorial loop, ONNX Runtime's training
artifacts on the merged model (where its environment exists), and the physical limit —
backbone FLOPs ÷ the measured matmul peak. Ratios are computed within the run, since the
machine is noisy; the four targets of the issue are reported as measured, met or not.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgetl import adapt as device
from edgetl.errors import ConfigError, EdgetlError
from edgetl.manifest import MANIFEST

#: The targets, with how each is computed from bench.json (see ``targets``).
TARGETS = {
    "adapt_vs_inference": ("adaptation (features + 20 epochs) ≤ 1.5× one inference pass "
                           "over the same data", 1.5),
    "speedup_vs_pytorch": ("≥ 10× faster than the PyTorch eager loop for 20 epochs", 10.0),
    "rss_vs_pytorch": ("runner peak RSS ≤ 1/3 of the PyTorch baseline's", 1 / 3),
    "int8_speedup": ("int8 backbone ≥ 2× faster than fp32 at batch 1 on at least one target",
                     2.0),
}


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


def find_device_data(paths: list[Path]) -> tuple[Path, Path]:
    """The fixed local data set of a run folder: ``(adapt data, evaluation data)``.

    The first device of the run's ``devices/index.json`` (written by ``edgetl run``): HAR's
    first held-out user (first session / later sessions), camera 1's image folders and the
    shared digits, device 1's texts and the shared evaluation CSV.
    """
    from edgetl.pipeline import DEVICE_INDEX

    for p in map(Path, paths):
        index = p / DEVICE_INDEX
        if index.is_file():
            devices = json.loads(index.read_text())
            if devices:
                first = devices[0]
                return p / first["adapt"], p / first["eval"]
    raise ConfigError(f"no device data in {[str(p) for p in paths]}: pass a run folder of "
                      f"`edgetl run` (it has {DEVICE_INDEX}), or --data and --eval")


def _manifest(bundle: Path) -> dict:
    """The bundle's manifest as the runner reads it (plain JSON)."""
    return json.loads((Path(bundle) / MANIFEST).read_text())


def prepare_data(bundle: Path, adapt_data: Path, eval_data: Path, out: Path, *,
                 val_fraction: float, seed: int) -> dict:
    """Write the baselines' inputs: the runner's preprocessing and training split, as ``.npz``.

    The head starts from the bundle's when the device's labels are the bundle's; otherwise
    (new labels) from a fresh linear layer over the device's labels, as a tutorial would.
    """
    from edgerun import data as dataio  # baselines get exactly the runner's inputs
    from edgerun.bundle import Bundle

    rb = Bundle(str(bundle))  # text: its tokenizer
    m = rb.manifest
    ds = dataio.load(str(adapt_data), m, need_labels=True, bundle=rb)
    ev = dataio.load(str(eval_data), m, need_labels=True, bundle=rb)
    labels = list(m["labels"])
    seen = list(dict.fromkeys(ds.y))
    new_labels = not set(seen) <= set(labels)
    order = labels + [lab for lab in seen if lab not in labels]  # the runner's class order
    y = np.asarray([order.index(lab) for lab in ds.y], np.int64)
    tr, _ = dataio.stratified_split(y, val_fraction, seed, dataio.split_mode(m))
    arrays: dict[str, np.ndarray] = {}
    if not new_labels:
        with np.load(bundle / m["files"][m["head"]["init_file"]]["path"],
                     allow_pickle=False) as z:
            for p in m["head"]["params"]:
                arrays[f"init.{p['name']}"] = z[p["name"]]
        classes = labels
    else:
        classes = seen
        f = int(m["features"]["dim"])
        rng = np.random.default_rng(seed)
        bound = 1 / np.sqrt(f)
        arrays["init.weight"] = rng.uniform(-bound, bound, (len(seen), f)).astype(np.float32)
        arrays["init.bias"] = rng.uniform(-bound, bound, len(seen)).astype(np.float32)
        y = np.asarray([classes.index(lab) for lab in ds.y], np.int64)
    y_eval = np.asarray([classes.index(lab) if lab in classes else -1 for lab in ev.y],
                        np.int64)
    np.savez(out, x_train=dataio.preprocess(ds.x[tr], m), y_train=y[tr],
             x_eval=dataio.preprocess(ev.x, m), y_eval=y_eval,
             n_classes=np.int64(len(classes)), feature_dim=np.int64(m["features"]["dim"]),
             **arrays)
    return {"n_train": int(len(tr)), "n_windows": int(len(y)), "n_eval": int(len(y_eval)),
            "classes": classes, "new_labels": new_labels}


def _flops_input(man: dict, bundle: Path):
    """Text bundles: the runner bench's batch-1 input (first reference text, own length)."""
    if man["input"].get("modality") != "text":
        return None
    from edgetl.text.encoder import trim

    with np.load(Path(bundle) / man["files"][man["test_vectors"]["file"]]["path"],
                 allow_pickle=False) as z:
        return trim(z["x"][:1])


def _median(rows: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def bench_adaptation(bundle: Path, data: Path, work: Path, *, threads: int, epochs: int,
                     repeats: int) -> dict:
    """Median feature/train seconds and peak RSS of fresh ``adapt`` processes.

    Also the median of as many inference passes over the same data, the comparison the
    adaptation target is judged on.
    """
    reps = []
    for k in range(repeats):
        out = work / f"adapt_t{threads}_{k}"  # fresh folder: no feature cache
        reps.append(device.run_runner("adapt", bundle, "--data", str(data), "--out", str(out),
                                      "--epochs", str(epochs), "--threads", str(threads),
                                      "--seed", "0"))
    infs = [device.run_runner("infer", bundle, "--data", str(data), "--threads", str(threads))
            for _ in range(repeats)]
    feat, train = _median(reps, "feature_seconds"), _median(reps, "train_seconds")
    return {"epochs": epochs, "repeats": repeats, "n_windows": reps[0]["n_windows"],
            "n_train": reps[0]["n_train"], "steps": reps[0]["steps"],
            "feature_seconds": feat, "train_seconds": train, "adapt_seconds": feat + train,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in reps),
            "infer_seconds": _median(infs, "seconds"),
            "infer_peak_rss_mb": max(r["peak_rss_mb"] for r in infs),
            "checkpoint": reps[0]["checkpoint"], "rolled_back": reps[0]["rolled_back"]}


def bench_accuracy(bundle: Path, data: Path, eval_data: Path, work: Path, head: str) -> dict:
    """Accuracy on the evaluation data of the head adaptation starts from and of its result."""
    start = device.run_runner("adapt", bundle, "--data", str(data), "--out",
                              str(work / "start"), "--epochs", "0")
    before = device.run_runner("infer", bundle, "--data", str(eval_data), "--head",
                               start["checkpoint"])
    after = device.run_runner("infer", bundle, "--data", str(eval_data), "--head", head)
    return {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "n_eval": before["n_windows"], "new_labels": start["new_labels"]}


def _ck_label(ck) -> str:
    """``run/checkpoint`` (``har/student``), the backbone's name in the tables."""
    return f"{Path(ck).parent.name}/{Path(ck).stem}"


def _checkpoint_of(man: dict, bundle: Path) -> Path | None:
    """The checkpoint a bundle was exported from, or None.

    Its recorded path, else the file of that name in the bundle's run folder (run folders
    move between machines).
    """
    ck = (man.get("provenance") or {}).get("checkpoint")
    if not ck:
        return None
    for p in (Path(ck), Path(bundle).resolve().parents[1] / Path(ck).name):
        if p.is_file():
            return p
    return None


def bench_baselines(ck: Path, bundles: list[Path], data: Path, eval_data: Path, work: Path, *,
                    threads: tuple[int, ...], epochs: int, val_fraction: float,
                    seed: int) -> dict:
    """PyTorch eager and ORT-training-merged baselines for one backbone, at each thread count."""
    from edgetl.export.ort_training import ort_python

    mans = {b: _manifest(b) for b in bundles}
    # the fp32 ONNX bundle has the plainest head (no spare TFLite rows): prepare from it
    ref = next((b for b in bundles if mans[b]["target"] == "onnx"
                and mans[b]["precision"] == "fp32"), bundles[0])
    m = mans[ref]
    tag = _ck_label(ck).replace("/", "_")
    prep = work / f"baseline_{tag}.npz"
    info = prepare_data(ref, data, eval_data, prep, val_fraction=val_fraction, seed=seed)
    opt = m["optimizer"]
    out = {"checkpoint": str(ck), "reference_bundle": ref.name, **info, "rows": []}
    try:
        ort_py = ort_python()
    except EdgetlError as e:
        ort_py, out["ort_training_skipped"] = None, str(e)
    if (m["target"], m["precision"]) != ("onnx", "fp32"):
        ort_py, out["ort_training_skipped"] = None, "no fp32 ONNX bundle of this backbone"
    for t in threads:
        r = device.run_json([sys.executable, "-m", "edgetl.baselines", "torch",
                             "--checkpoint", str(ck), "--data", str(prep), "--epochs",
                             str(epochs), "--batch", "32", "--threads", str(t), "--optimizer",
                             opt["name"], "--hparams", json.dumps(opt["hparams"])],
                            "PyTorch eager baseline")
        out["rows"].append(r)
        if ort_py:
            script = Path(__file__).with_name("_ort_merged_baseline.py")
            r = device.run_json([ort_py, str(script), str(ref), str(prep),
                                 str(work / f"ort_{tag}_{t}"), "--epochs", str(epochs),
                                 "--batch", "32", "--threads", str(t),
                                 "--lr", str(opt["hparams"]["lr"])], "ORT training baseline")
            out["rows"].append(r)
    return out


def machine_peak(threads: tuple[int, ...]) -> dict[int, dict]:
    """Measured fp32 matmul GFLOP/s per thread count (a process each)."""
    return {t: device.run_json([sys.executable, "-m", "edgetl.baselines", "peak",
                                "--threads", str(t)], "matmul peak") for t in threads}


def bench_groups(paths: list[Path], data: Path | None = None,
                 eval_data: Path | None = None) -> list[dict]:
    """``paths`` as groups that share one local data set.

    Each run folder is a group with its own device data; bundle folders given directly form
    one more group, which needs ``data`` and ``eval_data``.
    """
    groups, loose = [], []
    for p in map(Path, paths):
        if (p / MANIFEST).is_file():
            loose.append(p)
            continue
        bundles = find_bundles([p])
        d, e = (data, eval_data) if data and eval_data else find_device_data([p])
        groups.append({"run": p.name, "bundles": bundles, "data": d, "eval_data": e})
    if loose:
        if not (data and eval_data):
            raise ConfigError("bundle folders given directly need --data and --eval (the local "
                              "data to adapt on and to score); or pass the run folder")
        groups.append({"run": "", "bundles": loose, "data": data, "eval_data": eval_data})
    if not groups:
        raise ConfigError("nothing to bench: pass run folders or bundle folders")
    return groups


def bench_bundles(paths: list[Path], *, threads: tuple[int, ...] = (1, 2), repeats: int = 1000,
                  epochs: int = 20, adapt_repeats: int = 3, data: Path | None = None,
                  eval_data: Path | None = None, baselines: bool = True,
                  val_fraction: float = 0.25, seed: int = 0, show: bool = True) -> dict:
    """Measure every bundle under ``paths`` and the baselines; return the bench.json dict."""
    from edgetl.baselines import backbone_flops
    from edgetl.progress import progress_bar

    groups = bench_groups(paths, data, eval_data)
    many = len(groups) > 1
    jobs = [(g, b) for g in groups for b in g["bundles"]]
    mans = {b: _manifest(b) for _, b in jobs}
    by_ck: dict[Path, tuple[dict, list[Path]]] = {}
    for g, b in jobs:
        ck = _checkpoint_of(mans[b], b)
        if ck is not None:
            by_ck.setdefault(ck, (g, []))[1].append(b)
    rows, base = [], []
    n_steps = len(jobs) * len(threads) + (len(by_ck) if baselines else 0) + 1
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-") as tmp, progress_bar(show) as prog:
        work = Path(tmp)
        task = prog.add_task("bench", total=n_steps, info="matmul peak")
        peak = machine_peak(threads)
        prog.update(task, advance=1)
        flops = {ck: backbone_flops(ck, _flops_input(mans[bs[0]], bs[0]))
                 for ck, (_, bs) in by_ck.items()}
        for k, (g, b) in enumerate(jobs):
            man = mans[b]
            name = f"{g['run']}/{b.name}" if many and g["run"] else b.name
            acc = None
            for i, t in enumerate(threads):
                prog.update(task, info=f"{name} × {t} thread(s)")
                r = device.run_runner("bench", b, "--threads", str(t), "--repeats",
                                      str(repeats), "--batch", "32")
                ad = bench_adaptation(b, g["data"], work / str(k), threads=t, epochs=epochs,
                                      repeats=adapt_repeats)
                if i == 0:
                    acc = bench_accuracy(b, g["data"], g["eval_data"], work / str(k),
                                         ad["checkpoint"])
                chk = man.get("checks", {}).get("accuracy", {})
                ck = _checkpoint_of(man, b)
                row = {"name": name, "run": g["run"], "checkpoint": str(ck) if ck else None,
                       "backbone_flops": flops.get(ck), **r, "adaptation": ad,
                       "device_accuracy": acc,
                       "heldout_accuracy": chk.get("bundle"),
                       "accuracy_drop_points": chk.get("drop_points")}
                pk = peak[t].get("int8_gops") if r["precision"] == "int8" else None
                rows.append(_with_limits(row, pk or peak[t]["gflops"]))
                prog.update(task, advance=1)
        if baselines:
            for ck, (g, bs) in by_ck.items():
                prog.update(task, info=f"baselines for {ck.parent.name}/{ck.name}")
                base.append(bench_baselines(ck, bs, g["data"], g["eval_data"], work,
                                            threads=threads, epochs=epochs,
                                            val_fraction=val_fraction, seed=seed))
                prog.update(task, advance=1)
    machine = {"platform": platform.platform(), "machine": platform.machine(),
               "processor": platform.processor() or None, "python": platform.python_version(),
               "cpus": os.cpu_count()}
    res = {"machine": machine, "repeats": repeats, "epochs": epochs,
           "adapt_repeats": adapt_repeats,
           "groups": [{"run": g["run"], "data": str(g["data"]), "eval_data": str(g["eval_data"]),
                       "bundles": [b.name for b in g["bundles"]]} for g in groups],
           "peak": {str(t): v for t, v in peak.items()}, "rows": rows, "baselines": base}
    res["comparisons"] = comparisons(res)
    res["targets"] = targets(res)
    return res


def _with_limits(row: dict, gflops: float) -> dict:
    """Add the physical limit: ideal seconds at the measured peak, and the fraction reached."""
    f = row.get("backbone_flops")
    if not f:
        return row
    peak = gflops * 1e9
    ad = row["adaptation"]
    ideal_b1 = f / peak
    ideal_adapt = f * ad["n_windows"] / peak  # the head's FLOPs are negligible next to this
    row["limit"] = {"peak_gflops": gflops,
                    "batch1_ideal_ms": ideal_b1 * 1e3,
                    "batch1_fraction": ideal_b1 / (row["backbone_ms_p50"] / 1e3),
                    "throughput_fraction": f * row["throughput_per_s"] / peak,
                    "adapt_ideal_seconds": ideal_adapt,
                    "adapt_fraction": ideal_adapt / ad["adapt_seconds"]}
    return row


def comparisons(res: dict) -> list[dict]:
    """Per bundle × threads, the within-run ratios the targets are judged on."""
    base = {}
    for b in res["baselines"]:
        for r in b["rows"]:
            base[(b["checkpoint"], r["name"], r["threads"])] = r
    out = []
    for row in res["rows"]:
        ad = row["adaptation"]
        c = {"name": row["name"], "threads": row["threads"],
             "adapt_vs_inference": ad["adapt_seconds"] / ad["infer_seconds"]}
        pt = base.get((row["checkpoint"], "pytorch-eager", row["threads"]))
        if pt:
            c["speedup_vs_pytorch"] = pt["train_seconds"] / ad["adapt_seconds"]
            c["rss_vs_pytorch"] = ad["peak_rss_mb"] / pt["peak_rss_mb"]
        ot = base.get((row["checkpoint"], "ort-training-merged", row["threads"]))
        if ot:
            c["speedup_vs_ort_training"] = ot["train_seconds"] / ad["adapt_seconds"]
            c["rss_vs_ort_training"] = ad["peak_rss_mb"] / ot["peak_rss_mb"]
        if row["precision"] == "int8":
            fp = next((r for r in res["rows"] if r["checkpoint"] == row["checkpoint"]
                       and r["target"] == row["target"] and r["precision"] == "fp32"
                       and r["threads"] == row["threads"]), None)
            if fp:
                c["int8_speedup"] = fp["backbone_ms_p50"] / row["backbone_ms_p50"]
        out.append(c)
    return out


def targets(res: dict) -> list[dict]:
    """Each target: the worst (or, for int8, the best) measured value and whether it is met."""
    comps = res["comparisons"]
    out = []
    for key, (text, bound) in TARGETS.items():
        vals = [(c[key], c["name"], c["threads"]) for c in comps if key in c]
        if not vals:
            out.append({"target": key, "text": text, "bound": bound, "met": None,
                        "value": None, "where": "not measured in this run"})
            continue
        if key == "int8_speedup":  # at least one target must reach it: judge the best
            v = max(vals)
            met = v[0] >= bound
        elif key == "speedup_vs_pytorch":  # every bundle must: judge the worst
            v = min(vals)
            met = v[0] >= bound
        else:
            v = max(vals)
            met = v[0] <= bound
        out.append({"target": key, "text": text, "bound": bound, "met": bool(met),
                    "value": v[0], "where": f"{v[1]}, {v[2]} thread(s)",
                    "range": [min(vals)[0], max(vals)[0]]})
    return out


def _fmt(v, spec: str, dash: str = "–") -> str:
    return dash if v is None else format(v, spec)


def markdown(res: dict) -> str:
    """The README tables: inference, adaptation, baselines, targets."""
    L = ["#### Inference (backbone)", "",
         "| bundle | threads | size KiB | batch-1 p50 µs | p95 µs | batch-32 windows/s "
         "| % of peak (b1 / b32) | held-out acc |", "|" + "---|" * 8]
    for r in res["rows"]:
        lim = r.get("limit") or {}
        pct = (f"{100 * lim['batch1_fraction']:.1f} / {100 * lim['throughput_fraction']:.1f}"
               if lim else "–")
        L.append(f"| {r['name']} | {r['threads']} | {r['bundle_bytes'] / 1024:.0f} | "
                 f"{r['backbone_ms_p50'] * 1e3:.0f} | {r['backbone_ms_p95'] * 1e3:.0f} | "
                 f"{r['throughput_per_s']:,.0f} | {pct} | "
                 f"{_fmt(r.get('heldout_accuracy'), '.4f')} |")
    ep = res["epochs"]
    L += ["", f"#### On-device adaptation ({ep} epochs, median of {res['adapt_repeats']} runner "
          "processes)", "",
          f"| bundle | threads | windows | feature pass ms | head training ms ({ep} ep) | total ms "
          "| inference pass ms | total ÷ inference | peak RSS MiB | device acc before → after |",
          "|" + "---|" * 10]
    comp = {(c["name"], c["threads"]): c for c in res["comparisons"]}
    for r in res["rows"]:
        a, acc = r["adaptation"], r.get("device_accuracy")
        c = comp[(r["name"], r["threads"])]
        accs = (f"{acc['accuracy_before']:.3f} → {acc['accuracy_after']:.3f}" if acc else "–")
        L.append(f"| {r['name']} | {r['threads']} | {a['n_windows']} | "
                 f"{a['feature_seconds'] * 1e3:.1f} | {a['train_seconds'] * 1e3:.1f} | "
                 f"{a['adapt_seconds'] * 1e3:.1f} | {a['infer_seconds'] * 1e3:.1f} | "
                 f"{c['adapt_vs_inference']:.2f}× | {a['peak_rss_mb']:.0f} | {accs} |")
    if res["baselines"]:
        L += ["", f"#### Baselines ({ep} epochs on the same training windows)", "",
              "| backbone | method | threads | train s | peak RSS MiB | acc after | "
              "edgetl runner (same threads) |", "|" + "---|" * 7]
        for b in res["baselines"]:
            for r in b["rows"]:
                mine = [x for x in res["rows"] if x["checkpoint"] == b["checkpoint"]
                        and x["threads"] == r["threads"]]
                best = min(mine, key=lambda x: x["adaptation"]["adapt_seconds"]) if mine else None
                ref = (f"{best['name']}: {best['adaptation']['adapt_seconds']:.3f} s, "
                       f"{r['train_seconds'] / best['adaptation']['adapt_seconds']:.0f}× faster, "
                       f"{best['adaptation']['peak_rss_mb']:.0f} MiB" if best else "–")
                L.append(f"| {_ck_label(b['checkpoint'])} | {r['name']} | {r['threads']} | "
                         f"{r['train_seconds']:.3f} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
                         f"{r['accuracy_after']:.3f} | {ref} |")
            if b.get("ort_training_skipped"):
                L.append(f"| {_ck_label(b['checkpoint'])} | ort-training-merged | – | skipped: "
                         f"{b['ort_training_skipped']} | | | |")
    L += ["", "#### Targets", "", "| target | measured | where | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        val = _fmt(t["value"], ".2f")
        rng = t.get("range")
        if rng and rng[0] != rng[1]:
            val += f" (range {rng[0]:.2f}–{rng[1]:.2f})"
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        L.append(f"| {t['text']} | {val} | {t['where']} | {met} |")
    m = res["machine"]
    peaks = ", ".join(f"{v['gflops']:.0f} GFLOP/s fp32"
                      + (f" / {v['int8_gops']:.0f} GOP/s int8" if v.get("int8_gops") else "")
                      + f" at {t} thread(s)" for t, v in res["peak"].items())
    data = "; ".join(f"{g['run'] or 'bundles'}: `{g['data']}`" for g in res["groups"])
    L += ["", f"Batch-1 latency: {res['repeats']} timed calls after warm-up; each cell a fresh "
          f"runner process. % of peak: backbone FLOPs (multiply-add = 2) per second ÷ the "
          f"measured matmul peak of the bundle's precision. Local data: {data}. "
          f"Measured matmul peak: {peaks}. "
          f"{m['machine']}, {m['cpus']} CPUs, {m['platform']}."]
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> Path:
    """``tradeoff.png``: per scenario (run), accuracy vs latency and vs adaptation cost.

    One thread; the Pareto front (no other bundle is faster *and* at least as accurate) is
    circled. Accuracies of different scenarios are not comparable, so each gets its own row.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r["threads"] for r in res["rows"])
    runs = list(dict.fromkeys(r.get("run", "") for r in res["rows"]))
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 4.4 * len(runs)), squeeze=False)
    for k, run in enumerate(runs):
        rows = [r for r in res["rows"] if r["threads"] == t0 and r.get("run", "") == run]
        panels = [
            (axes[k][0], lambda r: r["backbone_ms_p50"] * 1e3, lambda r: r.get("heldout_accuracy"),
             f"backbone latency, batch 1, {t0} thread (µs, p50)",
             "held-out accuracy (server test set)"),
            (axes[k][1], lambda r: r["adaptation"]["adapt_seconds"] * 1e3,
             lambda r: (r.get("device_accuracy") or {}).get("accuracy_after"),
             f"on-device adaptation: features + {res['epochs']} epochs (ms)",
             "device accuracy after adaptation"),
        ]
        for ax, fx, fy, xl, yl in panels:
            _tradeoff_panel(ax, [(fx(r), fy(r), r) for r in rows if fy(r) is not None])
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(run or "bundles", fontsize=10, loc="left")
    fig.suptitle("edgetl bundles: ○ onnx, □ tflite; blue fp32, orange int8; marker area ∝ "
                 "bundle bytes; red: Pareto front", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tradeoff_panel(ax, pts: list) -> None:
    import matplotlib.ticker

    if not pts:
        return
    biggest = max(r["bundle_bytes"] for _, _, r in pts)
    for x, y, r in pts:
        ax.scatter(x, y, s=30 + 150 * np.sqrt(r["bundle_bytes"] / biggest),
                   marker="o" if r["target"] == "onnx" else "s",
                   c="tab:blue" if r["precision"] == "fp32" else "tab:orange", alpha=0.75)
        ax.annotate(r["name"].split("/")[-1], (x, y), fontsize=7, xytext=(5, 3),
                    textcoords="offset points")
    front = pareto([(x, y) for x, y, _ in pts])
    fx, fy = zip(*front, strict=True)
    ax.step(fx, fy, where="post", color="tab:red", lw=1.2)
    ax.scatter(fx, fy, s=300, facecolors="none", edgecolors="tab:red", lw=1.5)
    xs = [x for x, _, _ in pts]
    if max(xs) > 20 * min(xs):  # student and big backbone: decades apart
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower x and higher y, sorted by x."""
    front, best = [], -np.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def write(res: dict, out: Path) -> tuple[Path, Path, Path]:
    """``bench.json``, ``bench.md`` and ``tradeoff.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    return out / "bench.json", out / "bench.md", plot(res, out / "tradeoff.png")
