"""Images: Fashion-MNIST on the server and handwritten digits on cameras, or your folders.

Built-in scenario. Server: EfficientNet-Lite0 with its ImageNet weights is fine-tuned on
Fashion-MNIST (teacher) and distilled into a small CNN (student); both become bundles, so the
trade-off of a big pretrained backbone against a small distilled one is measured. Devices:
each simulated camera learns the ten handwritten digits (``load_digits``, 8x8, upsampled by
the runner) — classes the server never saw, in a new domain — from a few images per class
written as a PNG folder: imprinting adds the classes, head training refines them; scored on
the digits no camera trained on.

Your image folders (``kind = "image"``, one folder per label, optionally one per user): the
server users' images train and validate, the device users' images are the held-out set, and
each device user personalises on half of each label's images and is scored on the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from edgetl.check import REPLAY_POOL, CheckData, per_class
from edgetl.checkpoint import Checkpoint
from edgetl.data import images as imdata
from edgetl.kinds.base import Device, RecipeKind, ServerData
from edgetl.train import Split


def image_spec(recipe) -> dict:
    """The manifest's ``input["image"]``: size and mode from the recipe, the weights' mean/std."""
    from edgetl.vision.effnet import IMAGENET_MEAN, IMAGENET_STD

    d = recipe.data
    c = 3 if d.image_mode == "RGB" else 1
    spec = imdata.input_spec("x", d.image_size, d.image_mode, IMAGENET_MEAN[:c],
                             IMAGENET_STD[:c])
    return spec["image"]


def stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n // classes`` seeded indices of every class (at least one), sorted."""
    classes = np.unique(y)
    per = max(1, n // len(classes))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per]
                                   for c in classes]))


def raw_splits(recipe, *, test_subset: int = 2000) -> dict:
    """Seeded splits as raw uint8 images: train, val, test (+ labels).

    Fashion-MNIST: a stratified training subset, a validation split and a stratified test
    subset. Your image folders: the server users' images train and validate, the device
    users' images are the test set; ``"own"`` holds the loaded folders and their split.
    """
    d = recipe.data
    if d.is_files:
        from edgetl.data import files

        im = files.load_images(d)
        g = files.groups_of(d, im.owners, "users", im.y, im.labels, in_order=False)
        tr, va, te = (np.flatnonzero(np.isin(g.group, ids)) for ids in (g.train, g.val, g.device))
        return {"x_train": im.x[tr], "y_train": im.y[tr], "x_val": im.x[va], "y_val": im.y[va],
                "x_test": im.x[te], "y_test": im.y[te], "labels": im.labels, "own": (im, g)}
    x, y, xt, yt, labels = imdata.load_fashion_mnist()
    rng = np.random.default_rng(recipe.pretrain.seed)
    if d.source_subset:
        keep = stratified(y, d.source_subset, rng)
        x, y = x[keep], y[keep]
    perm = rng.permutation(len(y))
    n_val = int(round(d.val_fraction * len(y)))
    va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    te = stratified(yt, test_subset, rng) if test_subset else np.arange(len(yt))
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va],
            "x_test": xt[te], "y_test": yt[te], "labels": tuple(labels)}


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips of (N, C, H, W) images."""
    flip = torch.rand(xb.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], xb.flip(3), xb)


def write_cameras(recipe, out: Path) -> list[Device]:
    """Digits split into ``device_count`` cameras' PNG folders plus one shared eval set."""
    from PIL import Image

    d = recipe.data
    x, y, labels = imdata.load_digits_images()
    rng = np.random.default_rng(d.device_count * 1000 + d.device_shots)
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in range(len(labels))}
    root = Path(out) / "devices"
    if root.exists():
        shutil.rmtree(root)
    used, folders = set(), []
    for cam in range(d.device_count):
        folder = root / f"camera_{cam + 1}" / "adapt"
        for c, lab in enumerate(labels):
            (folder / lab).mkdir(parents=True, exist_ok=True)
            for _ in range(d.device_shots):
                i = int(pools[c].pop())
                used.add(i)
                Image.fromarray(x[i]).save(folder / lab / f"{i:04d}.png")
        folders.append(folder)
    rest = np.array(sorted(set(range(len(y))) - used))
    ev = root / "eval.npz"
    np.savez(ev, x=x[rest], y=np.array([labels[i] for i in y[rest]], dtype=str))
    n = len(labels) * d.device_shots
    return [Device(f"camera_{k + 1}", f, ev, n, len(rest), tuple(labels))
            for k, f in enumerate(folders)]


def write_own_devices(out: Path, own, seed: int) -> list[Device]:
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

    return write_device_halves(out, g, im.y, im.labels, seed, copy_images)


class Images(RecipeKind):
    """uint8 pictures, resized and normalised as the manifest's ``input.image`` says."""

    name = "image"

    def load(self, recipe, *, test_subset: int = 2000) -> ServerData:
        r = raw_splits(recipe, test_subset=test_subset)
        spec = image_spec(recipe)

        def split(raw: np.ndarray, lab: np.ndarray) -> Split:
            return Split(imdata.to_model_input(raw, (spec["height"], spec["width"]),
                                               spec["mode"], spec["mean"], spec["std"]),
                         lab.astype(np.int64))

        rng = np.random.default_rng(0)
        ref = r["x_val"][np.sort(rng.permutation(len(r["x_val"]))[:64])]
        calib = r["x_train"][np.sort(rng.permutation(len(r["x_train"]))[
            : recipe.export.calibration_windows])]
        rp = per_class(r["y_train"], REPLAY_POOL)
        check = CheckData(ref, calib, r["x_test"], r["y_test"], r["labels"], r["x_train"][rp],
                          r["y_train"][rp])
        own = r.get("own")
        what = f"images of {recipe.data.path}" if own else "Fashion-MNIST images"
        describe = (f"{len(r['y_train'])} train / {len(r['y_val'])} val / "
                    f"{len(r['y_test'])} test {what} at {spec['height']} px {spec['mode']}")
        note = ""
        if own:
            skipped = f"; {len(own[0].skipped)} file(s) skipped" if own[0].skipped else ""
            note = own[1].note + skipped
        sd = ServerData(self.name, split(r["x_train"], r["y_train"]),
                        split(r["x_val"], r["y_val"]), split(r["x_test"], r["y_test"]),
                        tuple(r["labels"]), 3 if spec["mode"] == "RGB" else 1, check, describe,
                        source=r, split=own[1] if own else None, note=note,
                        heldout_name=f"device users of {recipe.data.path}" if own else
                        "the Fashion-MNIST test subset", augment=augment)
        sd.cache["image"] = spec
        return sd

    def checkpoint(self, model, recipe, net, sd: ServerData, meta: dict) -> Checkpoint:
        spec = sd.cache["image"]
        chans = ("R", "G", "B") if spec["mode"] == "RGB" else ("L",)
        return Checkpoint(model, net, recipe.head, sd.labels, chans, 0, 0, 0.0,
                          np.asarray(spec["mean"], np.float32),
                          np.asarray(spec["std"], np.float32),
                          {"recipe": recipe.name, **meta}, image=dict(spec))

    def roles(self, recipe) -> dict[str, str]:
        teacher = "effnet" if recipe.teacher.arch == "efficientnet_lite0" else "teacher"
        return {"student": "student", "teacher": teacher}

    def model_name(self, role: str, recipe) -> str:
        if role == "teacher" and recipe.teacher.arch == "efficientnet_lite0":
            return "EfficientNet-Lite0 (ImageNet, fine-tuned)"
        return super().model_name(role, recipe)

    def devices(self, recipe, out: Path, sd: ServerData, *, users: tuple | None = None,
                protocol: str = "sessions") -> list[Device]:
        if users:
            from edgetl.errors import ConfigError

            raise ConfigError("image recipes personalise every device user; --users is for "
                              "time-series recipes")
        own = sd.source.get("own")
        if own:
            return write_own_devices(out, own, recipe.data.seed)
        return write_cameras(recipe, out)
