"""``edgetl run RECIPE``: one pipeline for every input kind.

data -> pretrain -> distill -> export every (role, target, precision) -> release gate ->
latency -> every simulated device personalises every bundle through the torch-free runner.
What differs between sensor windows, images and texts (loading, splits, augmentation, the
checkpoint's input contract, the teacher's training, the devices' files) is the recipe's
input kind (:mod:`edgetl.kinds`); everything here is shared.

The device loop (:func:`personalise`): a device whose labels the bundle knows starts from the
shipped head; one with new labels starts from the head with them imprinted (weight
imprinting, 0 epochs). Either way it then trains ``adapt.epochs`` on its adaptation data,
the runner's gate keeps or rolls back the new head, and both heads are scored on the device's
evaluation data, which it never trained on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from edgetl import adapt as device
from edgetl import kinds, stages
from edgetl.check import release_gate
from edgetl.config import Recipe
from edgetl.kinds import Device, ServerData
from edgetl.progress import console, progress_bar
from edgetl.summary import RunSummary

#: Where ``edgetl run`` lists its devices (``edgetl bench RUN`` reads the first one's data).
DEVICE_INDEX = "devices/index.json"
#: Devices the general model gets less right than this are where personalisation must pay.
LOW_ACCURACY = 0.95


def run_recipe(recipe: Recipe, out: Path, *, show: bool = True) -> RunSummary:
    """Every stage of ``recipe``; writes ``summary.json`` and ``personalisation.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kind = kinds.of(recipe)
    sd = kind.load(recipe)
    if sd.note:
        console.log(f"split of {recipe.data.path}: {sd.note}")
    console.log(f"data: {sd.describe}")
    summ = RunSummary(recipe.name, kind=kind.name)
    teacher = kind.pretrain(recipe, out, sd, show=show)
    students = kind.distill(recipe, teacher.path, out, sd, show=show)
    results = {"teacher": teacher, **students}
    for role, r in results.items():
        name = kind.model_name(role, recipe)
        if r.extra.get("shipped") == "from scratch":  # distillation would have hurt
            name = kind.model_name("student_scratch", recipe) + ", shipped"
        summ.server[role] = {"model": name, **r.to_dict()}
    if "student" in students:
        summ.server["distill"] = {"temperature": recipe.distill.temperature,
                                  "alpha": recipe.distill.alpha,
                                  "param_ratio": students["student"].params / teacher.params}
    summ.server["heldout"] = sd.heldout_name
    summ.server["data"] = {"train": len(sd.train.y), "val": len(sd.val.y),
                           "heldout": len(sd.heldout.y), **sd.info}
    if recipe.data.is_files:
        summ.server["own_data"] = recipe.data.path
    roles = kind.roles(recipe)
    summ.bundles = export_all(recipe, out, {role: results[role].path for role in roles},
                              roles, sd)
    measure_latency(summ.bundles)
    calibrated = calibrate_gate(recipe, kind, sd, summ.bundles, out, show=show)
    if calibrated is not None:  # the devices run the gate the bundles now carry
        recipe, summ.calibration = calibrated
    devices = kind.devices(recipe, out, sd)
    write_device_index(out, devices)
    summ.devices = personalise(recipe, summ.bundles, devices, out / "devices", show=show)
    summ.protocols = other_protocols(recipe, kind, sd, summ.bundles, out, show=show)
    return finish(summ, out, t0)


def other_protocols(recipe: Recipe, kind, sd: ServerData, bundles: list[dict], out: Path, *,
                    users: tuple | None = None, show: bool = True, stress: bool = False,
                    skip: tuple = ()) -> dict:
    """Device rows of the kind's protocols after its main one (``kind.protocols``).

    ``stress``: also the kind's stress protocols (``kind.stress_protocols``: labelled data
    unlike what the device sees later), for choosing defaults on the server-validation users.
    ``skip``: protocols not to run. Returns ``{protocol: rows}``; every bundle that knows the
    devices' labels takes part.
    """
    res = {}
    extra = getattr(kind, "stress_protocols", ()) if stress else ()
    for protocol in (p for p in (*kind.protocols[1:], *extra) if p not in skip):
        devs = kind.devices(recipe, out, sd, users=users, protocol=protocol)
        root = Path(out) / f"devices-{protocol}"
        desc = f"devices personalise ({protocol})"
        if protocol == "stream":
            res[protocol] = personalise_stream(recipe, bundles, devs, root, show=show, desc=desc)
        else:
            res[protocol] = personalise(recipe, bundles, devs, root, show=show, desc=desc)
        for r in res[protocol]:
            r["protocol"] = protocol
    return res


def personalise_stream(recipe: Recipe, bundles: list[dict], devices: list[Device], root: Path,
                       *, show: bool = True, desc: str = "devices personalise (stream)"
                       ) -> list[dict]:
    """Prequential personalisation: adapt after each chunk, score on the next.

    After chunk ``i`` arrives the device adapts (from its current head, on chunks ``0..i``;
    the gate compares against that current head) and is scored on chunk ``i + 1``. One row
    per (bundle, device), accuracies pooled over the scored chunks; a step the runner refuses
    (e.g. a single label so far) keeps the current head.
    """
    from edgetl.errors import EdgetlError

    a = recipe.adapt
    pairs = [(b, d) for b in bundles for d in devices if not can_learn(b, d)[1]]
    rows = []
    with progress_bar(show) as prog:
        task = prog.add_task(desc, total=len(pairs), info="")
        for b, dev in pairs:
            bundle, state = Path(b["path"]), Path(root) / dev.folder / b["name"]
            if state.exists():
                shutil.rmtree(state)
            state.mkdir(parents=True)
            head, steps = None, []
            for i in range(1, len(dev.chunks)):
                data = _concat_npz(dev.chunks[:i], state / f"seen{i}.npz")
                general = device.infer(bundle, dev.chunks[i])
                try:
                    rep = device.adapt(bundle, data, state / "head", head=head,
                                       **adapt_options(a))
                except EdgetlError as e:
                    now = device.infer(bundle, dev.chunks[i], head=head) if head else general
                    steps.append((general, now, now, {"refused": str(e)}))
                    continue
                head = Path(rep["checkpoint"])
                steps.append((general, *scored(bundle, rep, dev.chunks[i]), rep))
            rows.append(stream_row(b, dev, steps))
            r = rows[-1]
            prog.update(task, advance=1, info=f"{b['name']} {dev.name}: "
                                              f"{r['before_accuracy']:.3f} -> "
                                              f"{r['after_accuracy']:.3f}")
    return rows


def calibrate_gate(recipe: Recipe, kind, sd: ServerData, bundles: list[dict], out: Path, *,
                   show: bool = True) -> tuple[Recipe, dict] | None:
    """Choose the device gate's level and replay bound for these bundles, on server-val users.

    With ``[adapt] calibrate_gate`` and a kind that has server-validation users
    (``kind.check_users``): every bundle personalises those users in the protocols whose
    decisions can be judged one by one (all but ``stream``) and the stress ones;
    :func:`edgetl.gatelevel.choose_pair` picks the (level, bound) of largest mean gain that
    hurts none of them. The pair is written into every bundle's ``adapt.gate`` (with the users
    in ``chosen_on``) and returned in the recipe the held-out devices then run, with the sweep
    for ``summary.json``. ``None`` when not asked or no such users (the recipe's values stand).
    """
    from edgetl import gatelevel

    a = recipe.adapt
    users = kind.check_users(recipe, sd) if a.calibrate_gate else None
    if not users:
        return None
    root = Path(out) / "calibration"
    devs = kind.devices(recipe, root, sd, users=users)
    rows = personalise(recipe, bundles, devs, root / "devices", show=show,
                       desc="gate calibration (server-validation users)", adabn=False)
    more = other_protocols(recipe, kind, sd, bundles, root, users=users, show=show,
                           stress=True, skip=("stream",))
    rows += [r for rs in more.values() for r in rs]
    cal = gatelevel.calibrate(rows)
    alpha, bound = cal["alpha"], cal["max_forget"]
    chosen_on = (f"server-validation users {', '.join(map(str, users))} by edgetl run: "
                 f"{cal['decisions']} decisions over {', '.join(kind.protocols[:1])}"
                 f"{''.join(', ' + p for p in more)}")
    for b in bundles:
        set_gate(Path(b["path"]), alpha, bound, chosen_on)
    info = {"users": list(users), "chosen_on": chosen_on, **cal}
    bound_txt = "no replay check" if bound is None else f"replay bound {bound:g} pt"
    console.log(f"gate calibrated on users {', '.join(map(str, users))}: level {alpha:g}, "
                f"{bound_txt} (written into every bundle's adapt.gate)")
    new = dataclasses.replace(a, gate_alpha=alpha,
                              gate_max_forget=-1.0 if bound is None else bound)
    return dataclasses.replace(recipe, adapt=new), info


def set_gate(bundle: Path, alpha: float, max_forget: float | None, chosen_on: str) -> None:
    """Write the gate's level and replay bound into ``bundle``'s manifest (atomically).

    A signed bundle is refused: its signature covers the manifest.
    """
    from edgerun import atomic_write
    from edgerun.manifest import check

    from edgetl.errors import EdgetlError

    if (bundle / "manifest.sig").exists():
        raise EdgetlError(f"{bundle} is signed; calibrate the gate before signing (or set "
                          "[adapt] calibrate_gate = false)")
    m = json.loads((bundle / "manifest.json").read_text())
    gate = m["adapt"]["gate"]
    gate.update({"alpha": alpha, "chosen_on": chosen_on})
    gate.pop("max_forget", None)
    if max_forget is not None and m["adapt"].get("replay"):
        gate["max_forget"] = max_forget
    check(m)  # the device's own schema: a bundle the runner would refuse is never written
    body = (json.dumps(m, indent=2) + "\n").encode()
    atomic_write(str(bundle / "manifest.json"), lambda f: f.write(body))


def _concat_npz(paths, out: Path) -> Path:
    """The windows of ``paths`` in one ``.npz`` (what a device has collected so far)."""
    parts = [dict(np.load(p)) for p in paths]
    np.savez(out, x=np.concatenate([q["x"] for q in parts]),
             y=np.concatenate([q["y"] for q in parts]), channels=parts[0]["channels"])
    return out


def stream_row(b: dict, dev: Device, steps: list) -> dict:
    """One (bundle, device) row of the stream protocol: accuracies pooled over its steps."""
    n = [g["n_windows"] for g, *_ in steps]
    pooled = lambda i: float(np.dot([s[i]["accuracy"] for s in steps], n) / sum(n))  # noqa: E731
    reps = [s[3] for s in steps]
    done = [r for r in reps if "refused" not in r]
    before, after, adapted = pooled(0), pooled(1), pooled(2)
    return {"bundle": b["name"], "device": dev.name,
            **({"user": dev.user} if dev.user is not None else {}),
            "start": "shipped", "new_labels": 0, "n_eval": int(sum(n)), "steps": len(steps),
            "before_accuracy": before, "after_accuracy": after, "gain": after - before,
            "adapted_accuracy": adapted, "adapted_gain": adapted - before,
            "rolled_back": int(sum(r["rolled_back"] for r in done)),
            "kept": int(sum(not r["rolled_back"] for r in done)),
            "refused": [r["refused"] for r in reps if "refused" in r],
            "gate": [{k: r["gate"][k] for k in ("fixed", "broke", "p_value", "keep")}
                     for r in done],
            "feature_seconds": float(sum(r["feature_seconds"] for r in done)),
            "train_seconds": float(sum(r["train_seconds"] for r in done)),
            "adapt_seconds": float(sum(r["feature_seconds"] + r["train_seconds"] for r in done)),
            "peak_rss_mb": float(max([r["peak_rss_mb"] for r in done] or [0.0]))}


def export_all(recipe: Recipe, out: Path, checkpoints: dict[str, Path],
               prefixes: dict[str, str], sd: ServerData) -> list[dict]:
    """Export every checkpoint for every recipe (target, precision), each gated.

    Bundles are ``out/bundles/<prefix>-<target>-<precision>`` (no prefix: ``<target>-
    <precision>``); every bundle must pass ``edgetl check`` on :func:`check_inputs` or the
    run stops with the failing check named.
    """
    from edgetl.report import bundle_line

    check = check_inputs(recipe, sd)
    rows = []
    for role, ck in checkpoints.items():
        for target, precision in recipe.export.bundles():
            name = "-".join(p for p in (prefixes.get(role, ""), target, precision) if p)
            path = Path(out) / "bundles" / name
            man = stages.export(ck, path, recipe, target=target, precision=precision,
                                data=sd)
            console.log(bundle_line(path, man))
            gate = release_gate(path, checkpoint=ck, **check)
            rows.append({**bundle_row(path, man), "role": role, "gate": gate})
    return rows


def bundle_row(path: Path, man) -> dict:
    """A bundle as ``summary.json`` lists it: size, labels, class rows, its checks."""
    return {"name": Path(path).name, "path": str(path), "target": man.target,
            "precision": man.precision, "bytes": sum(f.bytes for f in man.files.values()),
            "backbone_bytes": man.files["backbone"].bytes,
            "files": {k: v.bytes for k, v in man.files.items()},
            "labels": list(man.labels), "n_labels": len(man.labels),
            "dynamic_classes": bool(man.train_step["dynamic_classes"]),
            "class_rows": int(man.head.get("capacity") or len(man.labels)),
            "checks": man.checks}


def measure_latency(bundles: list[dict], *, repeats: int = 50) -> None:
    """Batch-1 backbone latency (runner ``bench``, 1 thread) of every bundle, in place."""
    for b in bundles:
        r = device.run_runner("bench", Path(b["path"]), "--repeats", str(repeats),
                              "--threads", "1", "--batch", "8")
        b["latency_ms_p50"], b["throughput_per_s"] = r["backbone_ms_p50"], r["throughput_per_s"]


def write_device_index(out: Path, devices: list[Device]) -> Path:
    """``out/devices/index.json``: every device's adapt / eval data, for ``edgetl bench``.

    Paths are relative to ``out``, so a copied or moved run folder still finds its data.
    """
    out = Path(out)
    path = out / DEVICE_INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = lambda p: str(Path(p).resolve().relative_to(out.resolve()))  # noqa: E731
    path.write_text(json.dumps([{**dataclasses.asdict(d), "adapt": rel(d.adapt),
                                 "eval": rel(d.eval)} for d in devices], indent=2,
                               default=str))
    return path


def adapt_options(a) -> dict:
    """The recipe's ``[adapt]`` as :func:`edgetl.adapt.adapt` options.

    The simulated devices run the recipe's settings, not whatever an (older) bundle says, so
    a recipe change is measured without re-exporting.
    """
    return {"epochs": a.epochs, "batch_size": a.batch_size, "val_fraction": a.val_fraction,
            "seed": a.seed, "gate_alpha": a.gate_alpha, "patience": a.patience,
            "mix": tuple(a.mix), "class_balanced": a.class_balanced,
            "freeze_absent": a.freeze_absent, "gate_folds": a.gate_folds,
            # a recipe without a replay set leaves the bundle's own (none: off)
            "replay_weight": a.replay_weight if a.replay_per_class > 0 else None,
            "max_forget": a.gate_max_forget if a.replay_per_class > 0 else None}


def can_learn(bundle: dict, device: Device) -> tuple[bool, list[str]]:
    """Whether ``bundle``'s head can hold ``device``'s labels, and which of them are new.

    ONNX heads grow their class axis; TFLite heads fill spare class rows (``class_rows``).
    """
    new = [lab for lab in device.labels if lab not in set(bundle["labels"])]
    room = bundle["dynamic_classes"] or bundle["class_rows"] >= bundle["n_labels"] + len(new)
    return room, new


def personalise(recipe: Recipe, bundles: list[dict], devices: list[Device], root: Path, *,
                show: bool = True, desc: str = "devices personalise",
                adabn: bool = True) -> list[dict]:
    """Every device adapts every bundle that can hold its labels, through the runner.

    Per (bundle, device): the starting head (the shipped one, or with the device's new labels
    imprinted) and the trained head are both scored on the device's evaluation data; state
    goes to ``root/<device>/<bundle>/``. A bundle that cannot hold a device's new labels
    (TFLite without spare class rows) is skipped with a log line.
    """
    a = recipe.adapt
    usable, skipped = [], {}
    for b in bundles:
        for dev in devices:
            room, new = can_learn(b, dev)
            if room:
                usable.append((b, dev, new))
            else:
                skipped[b["name"]] = None
    for name in skipped:
        console.log(f"{name}: no spare class rows for the devices' new labels "
                    "(export.class_capacity); skipped on the devices")
    rows = []
    with progress_bar(show) as prog:
        task = prog.add_task(desc, total=len(usable), info="")
        for b, dev, new in usable:
            bundle, state = Path(b["path"]), Path(root) / dev.folder / b["name"]
            if state.exists():
                shutil.rmtree(state)
            if new:
                start = device.adapt(bundle, dev.adapt, state / "imprint", epochs=0,
                                     val_fraction=a.val_fraction, seed=a.seed)
                before = device.infer(bundle, dev.eval, head=Path(start["checkpoint"]))
            else:
                before = device.infer(bundle, dev.eval)
            bn = adabn_scores(bundle, dev, state / "adabn",
                              Path(start["checkpoint"]) if new else None, before,
                              a) if adabn else {}
            rep = device.adapt(bundle, dev.adapt, state / "trained", **adapt_options(a))
            after, adapted = scored(bundle, rep, dev.eval)
            rows.append({**device_row(b, dev, new, before, rep, after, adapted), **bn})
            r = rows[-1]
            prog.update(task, advance=1, info=f"{b['name']} {dev.name}: "
                                              f"{r['before_accuracy']:.3f} -> "
                                              f"{r['after_accuracy']:.3f}")
    return rows


def scored(bundle: Path, rep: dict, data: Path) -> tuple[dict, dict]:
    """``data`` predicted with the head an adaptation kept and with the head it proposed.

    The proposal is the kept head, or the one the gate refused (``head.rejected.npz``):
    what a device without the gate would use.
    """
    kept = Path(rep["checkpoint"])
    after = device.infer(bundle, data, head=kept)
    rejected = kept.with_name("head.rejected.npz")
    if rep["rolled_back"] and rejected.exists():
        return after, device.infer(bundle, data, head=rejected)
    return after, after


def adabn_scores(bundle: Path, dev: Device, state: Path, head: Path | None,
                 before: dict, a) -> dict:
    """AdaBN beside head training, scored on the device's evaluation data.

    BN statistics re-estimated on the device's adaptation windows (labels unused), the
    starting head unchanged. ``{}`` for bundles without AdaBN graphs (int8, no BatchNorm);
    else ``adabn_accuracy``, ``adabn_gain`` (vs ``before``), ``adabn_seconds`` and what the
    device's gate makes of the statistics with the adaptation labels (``adabn_gate``; the
    gated accuracy is the AdaBN one if kept, else the starting head's).
    """
    if not device.can_recalibrate(bundle):
        return {}
    rec = device.recalibrate(bundle, dev.adapt, state)
    acc = device.infer(bundle, dev.eval, head=head, bn_stats=Path(rec["stats"]))["accuracy"]
    judged = device.adapt(bundle, dev.adapt, state, head=head,
                          **{**adapt_options(a), "epochs": 0})["bn_stats_gate"]
    gated = acc if judged["keep"] else before["accuracy"]
    return {"adabn_accuracy": acc, "adabn_gain": acc - before["accuracy"],
            "adabn_seconds": rec["seconds"], "adabn_gate": judged,
            "adabn_gated_accuracy": gated, "adabn_gated_gain": gated - before["accuracy"]}


def device_row(b: dict, dev: Device, new: list[str], before: dict, rep: dict,
               after: dict, adapted: dict | None = None) -> dict:
    """One (bundle, device) row of ``summary.json``.

    ``before``/``after``: the starting head and the head the device kept (the gate's choice),
    scored on the device's evaluation data; ``adapted``: the head adaptation proposed, kept or
    not (what a device without the gate would have), so the gate can be judged.
    """
    g = rep.get("gate") or {}
    adapted = adapted or after
    return {"bundle": b["name"], "device": dev.name,
            **({"user": dev.user} if dev.user is not None else {}),
            "start": "imprinted" if new else "shipped", "new_labels": len(new),
            "n_adapt": rep["n_windows"], "n_eval": before["n_windows"],
            "before_accuracy": before["accuracy"], "after_accuracy": after["accuracy"],
            "gain": after["accuracy"] - before["accuracy"],
            "val_before": rep["accuracy_before"], "val_after": rep["accuracy_after"],
            "rolled_back": rep["rolled_back"],
            "adapted_accuracy": adapted["accuracy"],
            "adapted_gain": adapted["accuracy"] - before["accuracy"],
            "gate": {k: g[k] for k in ("rule", "alpha", "n", "fixed", "broke", "p_value", "keep",
                                       "reason", "mix_weight", "best_epoch", "replay_before",
                                       "replay_after", "max_forget") if k in g},
            "feature_seconds": rep["feature_seconds"],
            "train_seconds": rep["train_seconds"],
            "adapt_seconds": rep["feature_seconds"] + rep["train_seconds"],
            "peak_rss_mb": rep["peak_rss_mb"], "backend": rep["backend"],
            "precision": rep["precision"],
            **{k: rep[k] for k in ("truncated_texts", "n_texts", "tokenizer") if k in rep},
            **({"eval_truncated_texts": after["truncated_texts"]}
               if "truncated_texts" in after else {})}


def check_inputs(recipe: Recipe, sd: ServerData | None = None) -> dict:
    """:func:`edgetl.check.check_bundle` keyword arguments from a recipe's data.

    Held-out data and its threshold for every kind; where the data has server-validation
    users (sensor windows), also the adaptation check: those users (``[check] users``; never
    trained on, never the held-out device users) personalise through the runner and their
    mean gain may not fall below ``-check.max_adaptation_loss`` points.
    """
    kind = kinds.of(recipe)
    sd = sd or kind.load(recipe)
    cd = sd.check
    kw = {"reference_x": cd.reference,
          "heldout": (cd.heldout_x, np.array([cd.labels[i] for i in cd.heldout_y], dtype=str)),
          "max_drop": recipe.export.max_accuracy_drop}
    users = kind.check_users(recipe, sd)
    if users:
        kw["adaptation"] = adaptation_check(recipe, kind, sd, users)
    return kw


def adaptation_check(recipe: Recipe, kind, sd: ServerData, users: tuple):
    """``(bundle, work) -> Check``: ``users`` personalise the bundle through the runner."""
    from edgetl.check import Check
    from edgetl.manifest import Manifest

    limit = recipe.check.max_adaptation_loss

    def run(bundle: Path, work: Path) -> Check:
        devices = kind.devices(recipe, work, sd, users=users)
        b = bundle_row(bundle, Manifest.read(bundle))
        rows = personalise(recipe, [b], devices, Path(work) / "devices", show=False,
                           adabn=False)  # the release gate judges head training only
        gain = 100 * float(np.mean([r["gain"] for r in rows]))
        per = ", ".join(f"{r.get('user', r['device'])}: {100 * r['gain']:+.1f}" for r in rows)
        return Check("adaptation", gain >= -limit, gain, 0.0 - limit,
                     f"mean gain in points over users "
                     f"{[r.get('user', r['device']) for r in rows]} ({per})")

    return run


def finish(summ: RunSummary, out: Path, t0: float) -> RunSummary:
    """Add device totals and wall time; write ``summary.json`` and ``personalisation.png``."""
    def by_bundle(rows):
        return {n: device_totals([r for r in rows if r["bundle"] == n])
                for n in dict.fromkeys(r["bundle"] for r in rows)}

    summ.totals = {"by_bundle": by_bundle(summ.devices),
                   "by_protocol": {p: by_bundle(rows) for p, rows in summ.protocols.items()},
                   "wall_seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summ.to_dict(), indent=2, default=str))
    from edgetl.report import plot_personalisation

    plot_personalisation(summ, out / summ.plot)
    return summ


def device_totals(d: list[dict]) -> dict:
    """Means over devices: accuracies, gain, how many improved/worsened/rolled back, costs."""
    mean = lambda k: float(np.mean([r[k] for r in d]))  # noqa: E731
    low = [r for r in d if r["before_accuracy"] < LOW_ACCURACY]
    bn = [r for r in d if "adabn_gain" in r]
    # The ceiling of any gate between these two heads: an oracle that knows each device's
    # evaluation data keeps the better of the general and the adapted head. Where it is low,
    # the method (not the gate) is what leaves the error.
    oracle = lambda r: max(r["before_accuracy"], r["adapted_accuracy"])  # noqa: E731
    acc = lambda r, k: oracle(r) if k == "oracle" else r[k]  # noqa: E731
    cut = lambda k: float(np.mean([1 - (1 - acc(r, k)) / (1 - r["before_accuracy"])  # noqa: E731
                                   for r in low])) if low else None
    return {
        "start": d[0]["start"] if len({r["start"] for r in d}) == 1 else "mixed",
        "mean_before_accuracy": mean("before_accuracy"),
        "mean_after_accuracy": mean("after_accuracy"),
        "mean_gain": mean("gain"),
        "users_improved": int(sum(r["gain"] > 0 for r in d)),
        "users_worse": int(sum(r["gain"] < 0 for r in d)),
        "users_worse_1pt": int(sum(r["gain"] < -0.01 for r in d)),
        "worst_gain": float(min(r["gain"] for r in d)),
        "users_below_95": len(low), "error_cut_below_95": cut("after_accuracy"),
        # without the gate: the adapted head on every device
        "ungated_mean_gain": mean("adapted_gain"),
        "ungated_users_worse_1pt": int(sum(r["adapted_gain"] < -0.01 for r in d)),
        "ungated_error_cut_below_95": cut("adapted_accuracy"),
        "oracle_mean_gain": float(np.mean([oracle(r) - r["before_accuracy"] for r in d])),
        "oracle_error_cut_below_95": cut("oracle"),
        "n": len(d), "rolled_back": int(sum(r["rolled_back"] for r in d)),
        **({"kept": int(sum(r["kept"] for r in d))} if "kept" in d[0] else {}),
        # AdaBN (no labels, head unchanged) on the bundles that ship its graphs
        **({"adabn_n": len(bn), "adabn_mean_gain": float(np.mean([r["adabn_gain"] for r in bn])),
            "adabn_users_worse_1pt": int(sum(r["adabn_gain"] < -0.01 for r in bn)),
            "adabn_worst_gain": float(min(r["adabn_gain"] for r in bn)),
            "adabn_gated_mean_gain": float(np.mean([r["adabn_gated_gain"] for r in bn])),
            "adabn_gated_users_worse_1pt": int(sum(r["adabn_gated_gain"] < -0.01 for r in bn)),
            "adabn_kept": int(sum(r["adabn_gate"]["keep"] for r in bn))} if bn else {}),
        "mean_feature_seconds": mean("feature_seconds"),
        "mean_train_seconds": mean("train_seconds"),
        "mean_adapt_seconds": mean("adapt_seconds"),
        "max_peak_rss_mb": float(np.max([r["peak_rss_mb"] for r in d])),
    }


def personalise_bundle(recipe: Recipe, bundles: Path | list[Path], out: Path, *,
                       users: tuple | None = None, show: bool = True,
                       stress: bool = False) -> RunSummary:
    """Only the device stage of :func:`run_recipe` (every protocol), on existing bundles.

    ``stress``: the kind's stress protocols too (:func:`other_protocols`).
    """
    from edgetl.manifest import Manifest

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = kinds.of(recipe)
    sd = kind.load(recipe)
    summ = RunSummary(recipe.name, kind=kind.name)
    devices = kind.devices(recipe, out, sd, users=users)
    write_device_index(out, devices)
    bundles = [bundles] if isinstance(bundles, str | Path) else bundles
    summ.bundles = [bundle_row(Path(b), Manifest.read(Path(b))) for b in bundles]
    summ.devices = personalise(recipe, summ.bundles, devices, out / "devices", show=show)
    summ.protocols = other_protocols(recipe, kind, sd, summ.bundles, out, users=users,
                                     show=show, stress=stress)
    return finish(summ, out, t0)
