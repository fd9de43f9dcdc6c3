"""The vision scenario: Fashion-MNIST on the server, handwritten digits on the cameras.

Server: EfficientNet-Lite0 with its ImageNet weights is fine-tuned on Fashion-MNIST (teacher)
and distilled into a small CNN (student). Both become device bundles, so the trade-off of a
big pretrained backbone against a small distilled one is measured, not assumed.

Devices: each simulated camera learns the ten handwritten digits (``load_digits``, 8x8,
upsampled by the runner) — classes the server never saw, in a new domain — from a few
images per class written as a PNG folder: weight imprinting adds the classes, head training
refines them. Scored on the digits no camera trained on.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetl import adapt as device
from edgetl.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgetl.config import Recipe
from edgetl.data import images as imdata
from edgetl.nets import build_model, count_params
from edgetl.progress import console, progress_bar
from edgetl.summary import RunSummary
from edgetl.train import Split, accuracy, distill, train_classifier


@dataclass
class VisionData:
    """Raw uint8 images and their model input, split for the server.

    Shape:
        raw_*: (N, 28, 28) uint8; train/val/test: Split of (N, C, S, S) float32.
    """

    raw_train: np.ndarray
    raw_val: np.ndarray
    raw_test: np.ndarray
    train: Split
    val: Split
    test: Split
    labels: tuple[str, ...]
    image: dict


def image_spec(recipe: Recipe) -> dict:
    """The manifest's ``input["image"]``: size and mode from the recipe, the weights' mean/std."""
    from edgetl.vision.effnet import IMAGENET_MEAN, IMAGENET_STD

    d = recipe.data
    c = 3 if d.image_mode == "RGB" else 1
    spec = imdata.input_spec("x", d.image_size, d.image_mode, IMAGENET_MEAN[:c],
                             IMAGENET_STD[:c])
    return spec["image"]


def _stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(y)
    per = max(1, n // len(classes))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per]
                                   for c in classes]))


def raw_splits(recipe: Recipe, *, test_subset: int = 2000) -> dict[str, np.ndarray]:
    """Seeded Fashion-MNIST splits as raw uint8 images: train, val, test (+ labels, names).

    Your image folders (``kind = "image"``): the server users' images train and validate, the
    device users' images are the test set; ``"own"`` holds the loaded folders and their split
    (the device files are made from them).
    """
    d = recipe.data
    if d.is_files:
        return _own_splits(recipe)
    x, y, xt, yt, labels = imdata.load_fashion_mnist()
    rng = np.random.default_rng(recipe.pretrain.seed)
    if d.source_subset:
        keep = _stratified(y, d.source_subset, rng)
        x, y = x[keep], y[keep]
    perm = rng.permutation(len(y))
    n_val = int(round(d.val_fraction * len(y)))
    va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    te = _stratified(yt, test_subset, rng) if test_subset else np.arange(len(yt))
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va],
            "x_test": xt[te], "y_test": yt[te], "labels": tuple(labels)}


def _own_splits(recipe: Recipe) -> dict:
    from edgetl.data import files

    d = recipe.data
    im = files.load_images(d)
    g = files.groups_of(d, im.owners, "users", im.y, im.labels, in_order=False)
    tr, va, te = (np.flatnonzero(np.isin(g.group, ids)) for ids in (g.train, g.val, g.device))
    return {"x_train": im.x[tr], "y_train": im.y[tr], "x_val": im.x[va], "y_val": im.y[va],
            "x_test": im.x[te], "y_test": im.y[te], "labels": im.labels, "own": (im, g)}


def vision_data(recipe: Recipe, *, test_subset: int = 2000, raw: dict | None = None
                ) -> VisionData:
    """Fashion-MNIST: a stratified training subset, a validation split, a test subset.

    ``raw``: the :func:`raw_splits` to use (default: made from the recipe).
    """
    r = raw if raw is not None else raw_splits(recipe, test_subset=test_subset)
    spec = image_spec(recipe)

    def split(raw: np.ndarray, lab: np.ndarray) -> Split:
        return Split(imdata.to_model_input(raw, (spec["height"], spec["width"]), spec["mode"],
                                           spec["mean"], spec["std"]), lab.astype(np.int64))

    return VisionData(r["x_train"], r["x_val"], r["x_test"], split(r["x_train"], r["y_train"]),
                      split(r["x_val"], r["y_val"]), split(r["x_test"], r["y_test"]),
                      r["labels"], spec)


def _checkpoint(model, recipe: Recipe, net, vd: VisionData, meta: dict) -> Checkpoint:
    spec = vd.image
    chans = ("R", "G", "B") if spec["mode"] == "RGB" else ("L",)
    return Checkpoint(model, net, recipe.head, vd.labels, chans, 0, 0, 0.0,
                      np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32),
                      {"recipe": recipe.name, **meta}, image=dict(spec))


def train_server(recipe: Recipe, out: Path, vd: VisionData, *, show: bool = True) -> dict:
    """Fine-tune the teacher, distill the student (and its from-scratch twin); save all three."""
    out = Path(out)
    c = 3 if vd.image["mode"] == "RGB" else 1
    res = {}
    torch.manual_seed(recipe.pretrain.seed)
    teacher = build_model(c, len(vd.labels), recipe.teacher, recipe.head)
    desc = ("fine-tune EfficientNet-Lite0" if recipe.teacher.arch == "efficientnet_lite0"
            else "pretrain teacher")
    r = train_classifier(teacher, vd.train, vd.val, recipe.pretrain, desc=desc, show=show)
    res["teacher"] = _record(teacher, r, vd, recipe, recipe.teacher, out / "teacher.pt",
                             {"role": "teacher", "pretrained": recipe.teacher.pretrained})
    for name, kd in (("student", True), ("student_scratch", False)):
        torch.manual_seed(recipe.student_train.seed)
        student = build_model(c, len(vd.labels), recipe.student, recipe.head)
        if kd:
            r = distill(teacher, student, vd.train, vd.val, recipe.student_train,
                        recipe.distill, show=show)
        else:
            r = train_classifier(student, vd.train, vd.val, recipe.student_train,
                                 desc="student from scratch", show=show)
        res[name] = _record(student, r, vd, recipe, recipe.student, out / f"{name}.pt",
                            {"role": name, "distilled": kd})
    return res


def _record(model, r, vd: VisionData, recipe: Recipe, net, path: Path, meta: dict) -> dict:
    test_acc = accuracy(model, vd.test)
    save_checkpoint(_checkpoint(model, recipe, net, vd,
                                {**meta, "heldout_accuracy": test_acc}), path)
    return {"params": count_params(model), "backbone_params": count_params(model.backbone),
            "val_accuracy": r.val_accuracy or 0.0, "heldout_accuracy": test_acc,
            "seconds": r.seconds, "checkpoint": str(path)}


def export_bundles(recipe: Recipe, out: Path, vd: VisionData, *, show: bool = True) -> list:
    """Every (backbone, target, precision) bundle, gated by ``edgetl check``."""
    rng = np.random.default_rng(0)
    ref = vd.raw_val[np.sort(rng.permutation(len(vd.raw_val))[:64])]
    calib = vd.raw_train[np.sort(rng.permutation(len(vd.raw_train))[
        : recipe.export.calibration_windows])]
    teacher = "effnet" if recipe.teacher.arch == "efficientnet_lite0" else "teacher"
    return export_roles(recipe, out, {"student": "student", "teacher": teacher}, ref, calib,
                        (vd.raw_test, vd.test.y))


def export_roles(recipe: Recipe, out: Path, roles: dict[str, str], ref: np.ndarray,
                 calib: np.ndarray, eval_set: tuple) -> list:
    """Export ``out/<role>.pt`` for every recipe (target, precision) as ``<prefix>-t-p``.

    Every bundle is gated by ``edgetl check``.
    """
    import dataclasses

    from edgetl.check import release_gate
    from edgetl.export import export_bundle
    from edgetl.report import bundle_line

    rows = []
    for role, prefix in roles.items():
        ck_path = Path(out) / f"{role}.pt"
        ck = load_checkpoint(ck_path)
        for target, precision in recipe.export.bundles():
            name = f"{prefix}-{target}-{precision}"
            path = Path(out) / "bundles" / name
            cfg = dataclasses.replace(recipe.export, target=target, precision=precision)
            man = export_bundle(ck, path, cfg, reference_x=ref, calib_x=calib,
                                eval_set=eval_set,
                                provenance={"checkpoint": str(ck_path), "recipe": recipe.name},
                                adapt=recipe.adapt)
            console.log(bundle_line(path, man))
            gate = release_gate(path, checkpoint=ck_path)  # export gated held-out accuracy
            rows.append({"name": name, "backbone": role, "path": str(path), "target": target,
                         "precision": precision,
                         "bytes": sum(f.bytes for f in man.files.values()),
                         "backbone_bytes": man.files["backbone"].bytes,
                         "dynamic_classes": man.train_step["dynamic_classes"],
                         "class_rows": int(man.head.get("capacity") or len(man.labels)),
                         "n_labels": len(man.labels),
                         "checks": man.checks, "gate": gate})
    return rows


def write_cameras(recipe: Recipe, out: Path) -> list[dict]:
    """Digits split into ``device_count`` cameras' PNG folders plus one shared eval set."""
    from PIL import Image

    d = recipe.data
    x, y, labels = imdata.load_digits_images()
    rng = np.random.default_rng(d.device_count * 1000 + d.device_shots)
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in range(len(labels))}
    cams, used = [], set()
    root = Path(out) / "cameras"
    if root.exists():
        shutil.rmtree(root)
    for cam in range(d.device_count):
        folder = root / f"camera_{cam + 1}" / "adapt"
        n = 0
        for c, lab in enumerate(labels):
            (folder / lab).mkdir(parents=True, exist_ok=True)
            for _ in range(d.device_shots):
                i = int(pools[c].pop())
                used.add(i)
                Image.fromarray(x[i]).save(folder / lab / f"{i:04d}.png")
                n += 1
        cams.append({"camera": cam + 1, "adapt": folder, "n_adapt": n})
    rest = np.array(sorted(set(range(len(y))) - used))
    ev = root / "eval.npz"
    np.savez(ev, x=x[rest], y=np.array([labels[i] for i in y[rest]], dtype=str))
    for c in cams:
        c["eval"], c["n_eval"], c["n_labels"] = ev, len(rest), len(labels)
    return cams


def write_own_devices(recipe: Recipe, out: Path, own) -> list[dict]:
    """Each device user's images, copied as ``adapt/<label>/`` and ``eval/<label>/`` folders.

    The first half of every label (seeded) adapts, the rest evaluates; the device reads the
    original files, as a camera would.
    """
    from edgetl.data.files import write_device_halves

    im, g = own

    def copy_images(folder: Path, part: str, sel: np.ndarray) -> Path:
        for i in sel:
            dst = folder / part / im.labels[im.y[i]]
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(im.paths[i], dst / f"{i:05d}_{Path(im.paths[i]).name}")
        return folder / part

    return write_device_halves(out, g, im.y, recipe.data.seed, copy_images)


def personalise_cameras(recipe: Recipe, bundles: list, out: Path, *,
                        show: bool = True) -> list[dict]:
    """Imprinting only, then imprinting + head training, on every camera and bundle."""
    cams = write_cameras(recipe, out)
    return learn_new_classes(recipe, bundles, cams, Path(out) / "cameras", "camera",
                             "cameras learn digits", show=show)


def learn_new_classes(recipe: Recipe, bundles: list, devices: list[dict], root: Path,
                      key: str, desc: str, *, show: bool = True) -> list[dict]:
    """Every device learns its new labels on every bundle that can hold them.

    ``devices``: dicts with ``key`` (the device number), ``adapt`` / ``eval`` data paths and
    ``n_adapt`` / ``n_eval`` / ``n_labels``. Per (bundle, device): weight imprinting only
    (0 epochs), then imprinting + ``adapt.epochs`` of head training, each scored on the
    device's eval data; state goes to ``root/<key>_<n>/<bundle>/``.
    """
    a = recipe.adapt
    rows = []
    n_new = devices[0]["n_labels"]
    usable = [b for b in bundles  # ONNX grows its class axis; TFLite fills spare class rows
              if b["dynamic_classes"] or b["class_rows"] >= b["n_labels"] + n_new]
    with progress_bar(show) as prog:
        task = prog.add_task(desc, total=len(usable) * len(devices), info="")
        for b in usable:
            for dev in devices:
                state = Path(root) / f"{key}_{dev[key]}" / b["name"]
                imprint = device.adapt(Path(b["path"]), dev["adapt"], state / "imprint",
                                       epochs=0, val_fraction=a.val_fraction, seed=a.seed)
                acc_imprint = device.infer(Path(b["path"]), dev["eval"],
                                           head=Path(imprint["checkpoint"]))["accuracy"]
                rep = device.adapt(Path(b["path"]), dev["adapt"], state / "trained",
                                   epochs=a.epochs, batch_size=a.batch_size,
                                   val_fraction=a.val_fraction, seed=a.seed)
                inf = device.infer(Path(b["path"]), dev["eval"], head=Path(rep["checkpoint"]))
                acc = inf["accuracy"]
                rows.append({"bundle": b["name"], key: dev[key],
                             **({"user": dev["user"]} if "user" in dev else {}),
                             "n_adapt": dev["n_adapt"], "n_eval": dev["n_eval"],
                             "imprint_accuracy": acc_imprint, "trained_accuracy": acc,
                             "rolled_back": rep["rolled_back"],
                             "feature_seconds": rep["feature_seconds"],
                             "train_seconds": rep["train_seconds"],
                             "peak_rss_mb": rep["peak_rss_mb"], "backend": rep["backend"],
                             **{k: rep[k] for k in ("truncated_texts", "n_texts", "tokenizer")
                                if k in rep},
                             **({"eval_truncated_texts": inf["truncated_texts"]}
                                if "truncated_texts" in inf else {})})
                prog.update(task, advance=1, info=f"{b['name']} {key} {dev[key]}: "
                                                  f"{acc_imprint:.3f} -> {acc:.3f}")
    return rows


def run_vision(recipe: Recipe, out: Path, *, show: bool = True) -> RunSummary:
    """Every stage of the vision recipe; writes ``summary.json`` and ``vision.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw = raw_splits(recipe)
    vd = vision_data(recipe, raw=raw)
    own = raw.get("own")
    if own:
        skipped = f"; {len(own[0].skipped)} file(s) skipped" if own[0].skipped else ""
        console.log(f"split of {recipe.data.path}: {own[1].note}{skipped}")
    console.log(f"data: {len(vd.train.y)} train / {len(vd.val.y)} val / {len(vd.test.y)} test "
                f"{'images of ' + recipe.data.path if own else 'Fashion-MNIST images'} at "
                f"{vd.image['height']} px {vd.image['mode']}")
    summ = RunSummary(recipe.name, kind="image", plot="vision.png")
    summ.server = train_server(recipe, out, vd, show=show)
    if own:
        summ.server["own_data"] = recipe.data.path
    summ.bundles = export_bundles(recipe, out, vd, show=show)
    if own:
        summ.devices = learn_new_classes(recipe, summ.bundles,
                                         write_own_devices(recipe, out, own), out / "devices",
                                         "device", "devices personalise", show=show)
    else:
        summ.devices = personalise_cameras(recipe, summ.bundles, out, show=show)
    summ.totals = {"by_bundle": by_bundle(summ.devices), "wall_seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summ.to_dict(), indent=2, default=str))
    plot_vision(summ, out / "vision.png")
    return summ


def by_bundle(rows: list[dict]) -> dict[str, dict]:
    """Per bundle: mean accuracies and seconds over its devices, their largest peak RSS."""
    by = {}
    for name in dict.fromkeys(r["bundle"] for r in rows):
        rs = [r for r in rows if r["bundle"] == name]
        by[name] = {k: float(np.mean([r[k] for r in rs])) for k in (
            "imprint_accuracy", "trained_accuracy", "feature_seconds", "train_seconds")}
        by[name]["max_peak_rss_mb"] = float(max(r["peak_rss_mb"] for r in rs))
    return by


def plot_vision(summ: RunSummary, path: Path) -> Path:
    """Digit accuracy on the cameras (imprinting vs + head training) per bundle, with size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = summ.totals.get("by_bundle", {})
    names = list(by)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 3.8))
    ax.bar(x - 0.2, [by[n]["imprint_accuracy"] for n in names], 0.4, label="imprinting only")
    ax.bar(x + 0.2, [by[n]["trained_accuracy"] for n in names], 0.4,
           label="imprinting + head training")
    sizes = {b["name"]: b["bytes"] for b in summ.bundles}
    ax.set_xticks(x, [f"{n}\n{sizes.get(n, 0) / 1024:.0f} KiB" for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("digit accuracy (unseen digits)")
    ax.set_title(f"{summ.recipe}: cameras learn 10 new classes from a few images each",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
