"""Image data for the vision scenario: Fashion-MNIST (server), handwritten digits (device).

* **Fashion-MNIST** (Xiao, Rasul, Vollgraf 2017, Zalando SE, MIT/Expat licence): 60 000 train
  + 10 000 test 28x28 grayscale images from the Debian package ``dataset-fashion-mnist``
  (idx ``.gz`` files under ``/usr/share/datasets/fashion-mnist``). Parsed once, cached as
  ``.npz``.
* **Handwritten digits** (UCI "Optical Recognition of Handwritten Digits", via
  ``sklearn.datasets.load_digits``): 1797 8x8 images with values 0..16, rescaled to 0..255.

:func:`to_model_input` is the *server* copy of the image contract that bundles record in
``manifest["input"]["image"]``: convert to ``mode`` -> resize to (W, H) with Pillow's
bilinear filter -> float32 / 255 -> (x - mean) / std per channel -> CHW. The device runner
(``device_runners/edgerun/images.py``) implements the same steps with the same Pillow calls;
``tests/test_images.py`` checks that the two agree.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgetl.data.hapt import cache_dir
from edgetl.errors import DataError, MissingBackendError, require

PACKAGE = "dataset-fashion-mnist"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Folder-safe versions of the official names ("T-shirt/top", ..., "Ankle boot").
FASHION_LABELS = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle_boot")
DIGIT_LABELS = tuple(str(d) for d in range(10))
CACHE_VERSION = 1
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_INSTALL = f"apt-get install {PACKAGE} (or: make data-vision)"


def _dpkg_listing() -> list[str]:
    if shutil.which("dpkg") is None:
        return []
    try:
        p = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=False,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return p.stdout.splitlines() if p.returncode == 0 else []


def fashion_mnist_files(root: Path | None = None) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST idx ``.gz`` files, keyed as :data:`FASHION_FILES`.

    Looks in ``root`` when given; otherwise in what ``dpkg -L dataset-fashion-mnist`` lists,
    then under ``/usr/share``.

    Raises:
        DataError: a file is missing; the message says how to install the package.
    """
    if root is not None:
        found = {k: Path(root) / n for k, n in FASHION_FILES.items()}
        miss = [str(p) for p in found.values() if not p.is_file()]
        if miss:
            raise DataError(f"Fashion-MNIST files missing in {root}: {miss}; expected the four "
                            f"idx files {sorted(FASHION_FILES.values())}")
        return found
    by_name = {Path(p).name: Path(p) for p in _dpkg_listing()}
    found = {k: by_name[n] for k, n in FASHION_FILES.items() if n in by_name}
    if len(found) < len(FASHION_FILES):
        for base in ("/usr/share/datasets/fashion-mnist", "/usr/share"):
            for dirpath, _, names in os.walk(base):
                for k, n in FASHION_FILES.items():
                    if k not in found and n in names:
                        found[k] = Path(dirpath) / n
                if len(found) == len(FASHION_FILES):
                    break
    miss = [n for k, n in FASHION_FILES.items() if k not in found or not found[k].is_file()]
    if miss:
        raise DataError(f"Fashion-MNIST not found (missing {miss}; searched the {PACKAGE} "
                        f"package listing and /usr/share). Install it with: {_INSTALL}")
    return found


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzip-compressed or plain) into a native-endian array.

    Layout: 2 zero bytes, a dtype code, the number of dims, one big-endian uint32 per dim,
    then the data in row-major order.

    Raises:
        DataError: bad magic, unknown dtype code, or a truncated/oversized payload.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut gzip stream is EOFError
        raise DataError(f"{path}: cannot read idx file ({e}); the file is damaged or truncated, "
                        f"reinstall it ({_INSTALL})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an idx file; expected magic 00 00 <dtype code> <ndim>, "
                        f"found {raw[:4].hex(' ') or 'an empty file'}")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"{path}: idx header declares {ndim} dims but the file holds "
                        f"{len(raw)} bytes; the file is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dt = np.dtype(_IDX_DTYPES[raw[2]])
    want = int(np.prod(dims)) * dt.itemsize
    got = len(raw) - head
    if got != want:
        what = "truncated" if got < want else "followed by trailing bytes"
        raise DataError(f"{path}: idx data is {what}: dims {dims} x {dt.itemsize} byte(s) need "
                        f"{want} bytes, found {got}; reinstall the file ({_INSTALL})")
    return np.frombuffer(raw, dt, offset=head).reshape(dims).astype(dt.newbyteorder("="))


def load_fashion_mnist(cache: Path | None = None, *, root: Path | None = None):
    """Fashion-MNIST as arrays, parsed once from the idx files and cached as ``.npz``.

    Args:
        cache: cache directory; default ``$EDGETL_CACHE`` or ``~/.cache/edgetl``.
        root: folder holding the four idx files; default the Debian package's.

    Returns:
        ``(x_train, y_train, x_test, y_test, labels)``: x uint8 (60000, 28, 28) and
        (10000, 28, 28), y int64 class ids 0..9, labels :data:`FASHION_LABELS`.
    """
    files = fashion_mnist_files(root)
    key = ":".join(f"{p}:{p.stat().st_size}" for p in files.values()) + f":{CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = Path(cache or cache_dir()) / f"fashion_mnist_{digest}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["x_train"], z["y_train"], z["x_test"], z["y_test"], FASHION_LABELS
    arr = {k: read_idx(p) for k, p in files.items()}
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = arr[f"{split}_images"], arr[f"{split}_labels"]
        if x.shape != (n, 28, 28) or y.shape != (n,) or x.dtype != np.uint8:
            raise DataError(f"Fashion-MNIST {split}: expected images ({n}, 28, 28) uint8 and "
                            f"labels ({n},), found {x.shape} {x.dtype} and {y.shape}; "
                            f"reinstall {PACKAGE}")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"Fashion-MNIST {split}: labels must be 0..9, found "
                            f"{int(y.min())}..{int(y.max())}")
    out = {"x_train": arr["train_images"], "y_train": arr["train_labels"].astype(np.int64),
           "x_test": arr["test_images"], "y_test": arr["test_labels"].astype(np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"], FASHION_LABELS


def load_digits_images():
    """Handwritten digits from ``sklearn.datasets.load_digits``, rescaled to uint8 0..255.

    Returns:
        ``(x, y, labels)``: x uint8 (1797, 8, 8), y int64 (1797,), labels ``("0", ..., "9")``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingBackendError(f"scikit-learn is not installed ({e}); the digits data ships "
                                  "with it. Install it with: pip install scikit-learn") from e
    d = load_digits()
    x = np.rint(np.asarray(d.images, np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return x, np.asarray(d.target, np.int64), DIGIT_LABELS


def _resample(image_mod, name: str):
    if name not in RESAMPLE:
        raise DataError(f"unknown resample filter {name!r}; expected one of {list(RESAMPLE)}")
    return getattr(getattr(image_mod, "Resampling", image_mod), name.upper())


def normalize(u8: np.ndarray, mean, std) -> np.ndarray:
    """Bytes (N, H, W, C) -> float32 (N, C, H, W) as ``(u8 / 255 - mean) / std``.

    The exact float32 operation order the device runner uses; do not reorder it.
    """
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    x = u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (x - mean) / std


def to_model_input(x: np.ndarray, size: int | tuple[int, int], mode: str, mean, std, *,
                   resample: str = "bilinear", batch: int = 1024) -> np.ndarray:
    """Preprocess uint8 images exactly as the device runner does (the bundle's image contract).

    Args:
        x: uint8 images, (N, H, W) grayscale or (N, H, W, 3) RGB.
        size: output side (square) or ``(height, width)``.
        mode: ``"L"`` (1 channel) or ``"RGB"`` (3 channels).
        mean, std: one float per output channel.
        resample: Pillow filter name (the manifest's ``"resample"``).
        batch: most images converted at a time (also capped at ~16 MB of floats).

    Shape:
        returns float32 (N, C, height, width).
    """
    x = np.asarray(x)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)):
        raise DataError(f"expected uint8 images (N, H, W) or (N, H, W, 3), found "
                        f"{x.dtype} {x.shape}")
    if mode not in ("L", "RGB"):
        raise DataError(f"mode must be 'L' or 'RGB', got {mode!r}")
    c = 1 if mode == "L" else 3
    if len(np.atleast_1d(mean)) != c or len(np.atleast_1d(std)) != c:
        raise DataError(f"mode {mode} needs {c} mean and {c} std value(s), got mean={mean} "
                        f"std={std}")
    if np.any(np.asarray(std, np.float64) <= 0) or h < 1 or w < 1:
        raise DataError(f"std must be > 0 and size >= 1, got std={std} size={size}")
    out = np.empty((len(x), c, h, w), np.float32)
    gray = x.ndim == 3
    # Pillow's L->RGB copies the gray value into each band, so resizing gray images as L and
    # broadcasting to the bands is exact (and 3-4x cheaper); RGB->L needs Pillow's weights.
    same = x.shape[1:3] == (h, w) and (gray or mode == "RGB")
    pil = None if same else require("PIL.Image", "train")
    filt = None if same else _resample(pil, resample)
    mean32 = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std32 = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    batch = max(1, min(batch, (1 << 22) // (c * h * w) or 1))  # ~16 MB of floats a step
    for s in range(0, len(x), batch):
        chunk = x[s : s + batch]
        if not same:
            imgs = [pil.fromarray(im) for im in chunk]
            chunk = np.stack([np.asarray((im if gray else im.convert(mode)).resize((w, h), filt))
                              for im in imgs])
        if chunk.ndim == 3:
            chunk = chunk[..., None]
        # In place, but the same float32 operations in the same order as normalize().
        o = out[s : s + len(chunk)]
        o[...] = chunk.transpose(0, 3, 1, 2)
        o /= np.float32(255.0)
        o -= mean32
        o /= std32
    return out


def input_spec(name: str, size: int | tuple[int, int], mode: str, mean, std,
               resample: str = "bilinear") -> dict:
    """The ``manifest["input"]`` entry for an image bundle (the device's contract)."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"modality": "image", "layout": "NCHW", "name": name,
            "image": {"height": h, "width": w, "mode": mode, "resample": resample,
                      "mean": [float(v) for v in np.atleast_1d(mean)],
                      "std": [float(v) for v in np.atleast_1d(std)]}}
