"""Image bundles end to end on tiny generated images: export, runner on PNG folders, imprinting."""

import json

import numpy as np
import pytest
import torch

from edgetl.checkpoint import Checkpoint
from edgetl.config import ExportConfig, HeadConfig, NetConfig, TrainConfig
from edgetl.data.images import input_spec, to_model_input
from edgetl.export import export_bundle
from edgetl.kinds.image import augment
from edgetl.manifest import Manifest
from edgetl.nets import build_model
from edgetl.train import Split, train_classifier

from .conftest import run_runner

SIZE = 16
LABELS = ("bright", "dark", "striped")


def make_images(n: int, seed: int, kinds=(0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 12, 12) images of three easy kinds: bright, dark, horizontal stripes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(np.asarray(kinds), n)
    x = rng.integers(0, 60, (n, 12, 12)).astype(np.int32)
    x[y == 0] += 180
    x[y == 2, ::2, :] += 190
    x[y == 3, :, ::2] += 190  # vertical stripes: a kind the server never saw
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def image_ck() -> Checkpoint:
    return tiny_image_checkpoint()


def tiny_image_checkpoint() -> Checkpoint:
    """A 2-layer CNN on 16x16 RGB (bilinear from 12x12 gray), 6 epochs: a few seconds."""
    torch.manual_seed(0)
    spec = input_spec("x", SIZE, "RGB", (0.5,) * 3, (0.25,) * 3)["image"]
    net = NetConfig((8, 16), (3, 3), (2, 1), 0.0, arch="cnn2d")
    head = HeadConfig(lr=0.05)
    model = build_model(3, 3, net, head)
    x, y = make_images(240, seed=0)
    split = Split(to_model_input(x, SIZE, "RGB", spec["mean"], spec["std"]), y)
    train_classifier(model, split, None, TrainConfig(epochs=6, batch_size=32, lr=0.02),
                     show=False, augment=augment)
    return Checkpoint(model, net, head, LABELS, ("R", "G", "B"), 0, 0, 0.0,
                      np.asarray(spec["mean"]), np.asarray(spec["std"]), {"recipe": "tiny-img"},
                      image=spec)


@pytest.fixture(scope="module", params=["onnx", "tflite"])
def image_bundle(request, image_ck, tmp_path_factory):
    return image_bundle_at(tmp_path_factory.mktemp(f"img-{request.param}") / "bundle",
                           request.param, image_ck)


def image_bundle_at(out, target: str, ck: Checkpoint | None = None):
    """Export the tiny image model to ``out`` (raw 12x12 gray reference images)."""
    x, _ = make_images(32, seed=1)
    ev = make_images(120, seed=2)
    export_bundle(ck or tiny_image_checkpoint(), out,
                  ExportConfig(target=target, n_test_vectors=4, train_batch=16,
                               max_accuracy_drop=1.0, class_capacity=6),
                  reference_x=x, calib_x=x, eval_set=ev)
    return out


def _png_folder(root, n_per, seed, kinds):
    from PIL import Image

    x, y = make_images(n_per * 4 * len(kinds), seed, kinds)
    names = dict(enumerate([*LABELS, "vertical"]))
    count = {}
    for img, k in zip(x, y):
        if count.get(k, 0) >= n_per:
            continue
        count[k] = count.get(k, 0) + 1
        (root / names[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / names[k] / f"{count[k]:03d}.png")
    return root


def test_manifest_carries_the_image_preprocessing(image_bundle):
    m = Manifest.read(image_bundle)
    assert m.input["modality"] == "image" and m.input["layout"] == "NCHW"
    assert m.input["image"]["height"] == SIZE and m.input["image"]["mode"] == "RGB"
    assert m.input["shape"][1:] == [3, SIZE, SIZE]
    assert m.checks["backbone_max_abs_err"] < 1e-4 and m.checks["accuracy"]["drop_points"] <= 1
    assert run_runner("selftest", image_bundle).returncode == 0


def test_runner_adapts_on_a_png_folder_and_skips_bad_files(image_bundle, tmp_path):
    root = _png_folder(tmp_path / "photos", 8, seed=3, kinds=(0, 1, 2))
    (root / "dark" / "broken.png").write_bytes(b"not a png at all")
    (root / "dark" / "empty.jpg").write_bytes(b"")
    p = run_runner("adapt", image_bundle, "--data", root, "--out", tmp_path / "s", "--json",
                   "--quiet", "--epochs", "10")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["skipped_files"] == 2 and r["n_windows"] == 24
    assert {s["path"].rsplit("/", 1)[1] for s in r["skipped"]} == {"broken.png", "empty.jpg"}
    assert any("skipped 2" in w for w in r["warnings"])
    empty = tmp_path / "nothing"
    (empty / "dark").mkdir(parents=True)
    p = run_runner("adapt", image_bundle, "--data", empty, "--out", tmp_path / "s2")
    assert p.returncode == 1 and "no usable image" in p.stderr.lower()


def test_new_class_by_imprinting_then_training(image_bundle, tmp_path):
    """A kind the server never saw (vertical stripes) is learned on the device.

    ONNX grows its dynamic class axis; TFLite fills a spare row of its fixed-capacity head.
    """
    root = _png_folder(tmp_path / "photos", 10, seed=4, kinds=(0, 1, 2, 3))
    x, y = make_images(200, seed=5, kinds=(0, 1, 2, 3))
    names = np.array([*LABELS, "vertical"])[y]
    np.savez(tmp_path / "eval.npz", x=x, y=names)
    accs, reps = {}, {}
    for epochs in (0, 15):
        out = tmp_path / f"e{epochs}"
        p = run_runner("adapt", image_bundle, "--data", root, "--out", out, "--json", "--quiet",
                       "--epochs", str(epochs))
        assert p.returncode == 0, p.stderr
        reps[epochs] = json.loads(p.stdout)
        assert reps[epochs]["new_labels"] == ["vertical"]
        inf = run_runner("infer", image_bundle, "--data", tmp_path / "eval.npz", "--head",
                         out / "head.npz", "--json", "--quiet")
        res = json.loads(inf.stdout)
        accs[epochs] = res["per_label_accuracy"]["vertical"]
    assert accs[0] > 0.5  # imprinting alone already recognises the new kind
    assert reps[0]["steps"] == 0 and reps[0]["history"] == []
    # training starts from the imprinted head, and the gate keeps it unless validation improves
    r = reps[15]
    assert r["steps"] > 0 and (r["accuracy_after"] >= r["accuracy_before"] or r["rolled_back"])
