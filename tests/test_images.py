"""Image data: server loaders and preprocessing, device folder/npz loaders, and their parity."""

import gzip
import sys

import numpy as np
import pytest
from PIL import Image

from edgetl.data import images as srv
from edgetl.errors import DataError

from .conftest import ROOT, device_imports

sys.path.insert(0, str(ROOT / "device_runners"))
from edgerun import RunnerError  # noqa: E402
from edgerun import images as dev  # noqa: E402


def manifest(size=16, mode="RGB", mean=None, std=None):
    c = 1 if mode == "L" else 3
    mean = [0.485, 0.456, 0.406][:c] if mean is None else mean
    std = [0.229, 0.224, 0.225][:c] if std is None else std
    return {"input": srv.input_spec("image", size, mode, mean, std)}


def rgb(seed, size=12):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path):
    """cat: 2 PNG + 1 JPEG, dog: 2 PNG (one grayscale); plus junk that must be skipped."""
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "day2").mkdir(parents=True)
    Image.fromarray(rgb(0)).save(root / "cat" / "b.png")
    Image.fromarray(rgb(1)).save(root / "cat" / "a.PNG")
    Image.fromarray(rgb(2)).save(root / "cat" / "c.jpg", quality=95)
    Image.fromarray(rgb(3)).save(root / "dog" / "x.png")
    Image.fromarray(rgb(4)[..., 0]).save(root / "dog" / "day2" / "g.png")
    (root / "cat" / "corrupt.png").write_bytes(np.random.default_rng(9).bytes(300))
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(rgb(5)).save(root / "stray.png")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


@pytest.mark.unit
def test_folder_loads_labels_in_sorted_order_and_reports_skipped_files(folder):
    x, y, skipped = dev.load_image_folder(str(folder), manifest())
    assert x.shape == (5, 3, 16, 16) and x.dtype == np.float32 and np.isfinite(x).all()
    assert y == ["cat", "cat", "cat", "dog", "dog"]
    reasons = {p.split("photos/")[1]: r["reason"] for r in skipped for p in [r["path"]]}
    assert set(reasons) == {"cat/corrupt.png", "dog/empty.jpg", "dog/notes.txt", "stray.png"}
    assert "unreadable image" in reasons["cat/corrupt.png"]
    assert reasons["dog/empty.jpg"] == "empty file (0 bytes)"
    assert "not an image file" in reasons["dog/notes.txt"]
    assert "not inside a label folder" in reasons["stray.png"]
    # a.PNG sorts before b.png: the first image is rgb(1), preprocessed like the server does
    m = manifest()["input"]["image"]
    want = srv.to_model_input(rgb(1)[None], 16, "RGB", m["mean"], m["std"])[0]
    np.testing.assert_array_equal(x[0], want)


@pytest.mark.unit
def test_grayscale_file_becomes_three_equal_channels(folder):
    x, y, _ = dev.load_image_folder(str(folder), manifest(mean=[0.5] * 3, std=[0.5] * 3))
    g = x[y.index("dog") + 1]  # dog/day2/g.png
    assert np.array_equal(g[0], g[1]) and np.array_equal(g[1], g[2])
    gray_bundle, _, _ = dev.load_image_folder(str(folder), manifest(mode="L"))
    assert gray_bundle.shape == (5, 1, 16, 16)


@pytest.mark.unit
def test_empty_or_unusable_folder_is_a_runner_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunnerError, match=r"holds no usable image; expected one sub-folder"):
        dev.load_image_folder(str(tmp_path / "empty"), manifest())
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "x.jpg").write_bytes(b"")
    with pytest.raises(RunnerError, match=r"skipped 1, e\.g\. .*x\.jpg: empty file"):
        dev.load_image_folder(str(tmp_path / "bad"), manifest())
    with pytest.raises(RunnerError, match="does not exist"):
        dev.load_image_folder(str(tmp_path / "nope"), manifest())


@pytest.mark.unit
def test_window_bundle_refuses_images(folder):
    with pytest.raises(RunnerError, match="not images"):
        dev.load_image_folder(str(folder), {"input": {"channels": ["ax"], "window": 32}})


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(6, 12, 12, 3), (6, 12, 12), (6, 12, 12, 4), (6, 16, 16, 3),
                                   (6, 16, 16), (6, 16, 16, 4), (6, 40, 30, 3)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_npz_matches_per_image_preprocessing(tmp_path, shape, mode):
    x = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["a", "b"] * 3))
    m = manifest(mode=mode)
    got, y, skipped = dev.load_image_npz(str(tmp_path / "d.npz"), m)
    assert got.shape == (6, len(mode), 16, 16) and y == ["a", "b"] * 3 and skipped == []
    want = np.stack([dev.preprocess_image(Image.fromarray(im), m["input"]["image"]) for im in x])
    np.testing.assert_array_equal(got, want)  # the numpy fast path is exact too


@pytest.mark.unit
def test_npz_without_labels_and_bad_npz_files(tmp_path):
    np.savez(tmp_path / "nolab.npz", x=np.zeros((2, 16, 16, 3), np.uint8))
    x, y, _ = dev.load_image_npz(str(tmp_path / "nolab.npz"), manifest())
    assert x.shape == (2, 3, 16, 16) and y is None
    cases = {
        "float": ({"x": np.zeros((2, 8, 8), np.float32)}, r"must be uint8 images .* float32"),
        "chan": ({"x": np.zeros((2, 8, 8, 2), np.uint8)}, r"\(N, H, W, 3\|4\)"),
        "nox": ({"images": np.zeros((2, 8, 8), np.uint8)}, r"expected an array 'x'"),
        "numy": ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, 1])}, "label names"),
        "leny": ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array(["a"])}, "2 images but 1"),
        "empty": ({"x": np.zeros((0, 8, 8), np.uint8)}, "holds no images"),
    }
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(RunnerError, match=match):
            dev.load_image_npz(str(tmp_path / f"{name}.npz"), manifest())
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(RunnerError, match="not a readable .npz"):
        dev.load_image_npz(str(tmp_path / "junk.npz"), manifest())


@pytest.mark.unit
@pytest.mark.parametrize("src", ["L", "RGB"])
@pytest.mark.parametrize("mode,size", [("RGB", 16), ("L", 16), ("RGB", 5), ("RGB", 12)])
def test_server_and_device_preprocess_identically(src, mode, size):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (4, 12, 12, 3) if src == "RGB" else (4, 12, 12), dtype=np.uint8)
    x[0] = 0  # a flat image and the extremes
    x[1] = 255
    m = manifest(size, mode)["input"]["image"]
    server = srv.to_model_input(x, size, mode, m["mean"], m["std"], batch=3)
    device = np.stack([dev.preprocess_image(Image.fromarray(im), m) for im in x])
    assert server.shape == device.shape == (4, len(mode), size, size)
    np.testing.assert_allclose(server, device, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_digits_upsample_like_the_device(tmp_path):
    x = (np.arange(64, dtype=np.uint8).reshape(1, 8, 8) * 4)
    server = srv.to_model_input(x, 32, "RGB", [0.5] * 3, [0.25] * 3)
    np.savez(tmp_path / "d.npz", x=x)
    device, _, _ = dev.load_image_npz(str(tmp_path / "d.npz"), manifest(32, "RGB", [0.5] * 3,
                                                                       [0.25] * 3))
    np.testing.assert_allclose(server, device, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_sixteen_bit_png_keeps_its_contrast(tmp_path):
    (tmp_path / "a").mkdir()
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256)
    Image.fromarray(ramp).save(tmp_path / "a" / "r.png")
    x, _, _ = dev.load_image_folder(str(tmp_path), manifest(16, "L", [0.0], [1.0]))
    np.testing.assert_allclose(x[0, 0] * 255, (ramp >> 8).astype(np.float32), atol=1e-4)


@pytest.mark.unit
def test_image_spec_errors():
    spec = manifest()["input"]["image"]
    for bad, match in [({"mode": "CMYK"}, "not supported"), ({"std": [1, 0, 1]}, "std > 0"),
                       ({"mean": [0.5]}, "needs 3 mean"), ({"resample": "fancy"}, "unknown"),
                       ({"height": None}, "must hold height")]:
        with pytest.raises(RunnerError, match=match):
            dev.image_spec({**spec, **bad})
    with pytest.raises(DataError, match="mode RGB needs 3"):
        srv.to_model_input(np.zeros((1, 8, 8), np.uint8), 8, "RGB", [0.5], [0.5])
    with pytest.raises(DataError, match="expected uint8 images"):
        srv.to_model_input(np.zeros((1, 8, 8), np.float32), 8, "L", [0.5], [0.5])


@pytest.mark.unit
def test_device_images_module_imports_no_pillow_torch_or_edgetl():
    assert device_imports("import edgerun.images", {"torch", "edgetl", "PIL"}) == []


def _idx(dims, data: bytes, code=0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + data


@pytest.mark.unit
def test_read_idx_parses_and_rejects_damaged_files(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx([2, 3, 4], x.tobytes())))
    np.testing.assert_array_equal(srv.read_idx(tmp_path / "a.gz"), x)
    i32 = np.array([1, -2, 70000], ">i4")
    (tmp_path / "b").write_bytes(_idx([3], i32.tobytes(), 0x0C))
    assert srv.read_idx(tmp_path / "b").tolist() == [1, -2, 70000]
    cases = {
        "short.gz": (gzip.compress(_idx([2, 3, 4], x.tobytes()[:-5])), r"truncated.* found 19"),
        "long.gz": (gzip.compress(_idx([2, 3, 4], x.tobytes() + b"\0")), "trailing bytes"),
        "magic.gz": (gzip.compress(b"\x08\x03" + x.tobytes()), "not an idx file"),
        "head.gz": (gzip.compress(bytes([0, 0, 8, 3, 0, 0])), "header declares 3 dims"),
        "cut.gz": (gzip.compress(_idx([2, 3, 4], x.tobytes()))[:-6], "damaged or truncated"),
        "empty": (b"", "empty file"),
    }
    for name, (raw, match) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(DataError, match=match):
            srv.read_idx(tmp_path / name)


@pytest.mark.unit
def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="expected the four idx files"):
        srv.fashion_mnist_files(tmp_path)


@pytest.mark.unit
def test_load_fashion_mnist_from_idx_root_and_cache(tmp_path):
    """A fake 'package' of the real shapes with constant images; the second load is cached."""
    def fake(split, n):
        return (_idx([n, 28, 28], bytes(n * 784)), _idx([n], (np.arange(n) % 10).astype(
            np.uint8).tobytes()))
    for split, n, prefix in (("train", 60000, "train"), ("test", 10000, "t10k")):
        img, lab = fake(split, n)
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img, 1))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab, 1))
    out = srv.load_fashion_mnist(tmp_path / "cache", root=tmp_path)
    assert [a.shape for a in out[:4]] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    assert len(list((tmp_path / "cache").glob("fashion_mnist_*.npz"))) == 1
    again = srv.load_fashion_mnist(tmp_path / "cache", root=tmp_path)
    np.testing.assert_array_equal(again[1], out[1])


def _fashion_installed() -> bool:
    try:
        srv.fashion_mnist_files()
    except DataError:
        return False
    return True


@pytest.mark.data
@pytest.mark.skipif(not _fashion_installed(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path):
    x_tr, y_tr, x_te, y_te, labels = srv.load_fashion_mnist(tmp_path)
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    assert np.bincount(y_tr).tolist() == [6000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
    assert len(labels) == 10 and x_tr.max() == 255


def test_digits_images():
    pytest.importorskip("sklearn")
    x, y, labels = srv.load_digits_images()
    assert x.shape == (1797, 8, 8) and x.dtype == np.uint8 and x.max() == 255
    assert sorted(set(y.tolist())) == list(range(10)) and labels[3] == "3"
