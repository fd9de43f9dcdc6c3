"""Device images: a folder of labelled pictures or an ``.npz`` of uint8 images.

The bundle's ``manifest["input"]`` fixes the preprocessing (``"modality": "image"``)::

    {"layout": "NCHW", "name": ..., "image": {"height": H, "width": W, "mode": "RGB" | "L",
     "resample": "bilinear", "mean": [...], "std": [...]}}

Each image is converted to ``mode`` (Pillow's ``convert``: alpha is dropped, not composited),
resized to (W, H) with Pillow's filter, scaled to float32 / 255, normalised per channel and
laid out CHW. The server (``edgetl.data.images.to_model_input``) does the same steps with the
same Pillow calls. Pillow is imported only here, only when images are loaded.

Folder layout: ``root/<label>/**/*.png|jpg|jpeg``. Files that cannot be used are skipped and
reported, never fatal. EXIF orientation is ignored (pixels are used as stored), like the
server, which sees raw arrays.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from edgerun import RunnerError

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CHANNELS = {"L": 1, "RGB": 3}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RunnerError("this bundle takes images, which need Pillow; install it with: "
                          "pip install pillow") from None
    return Image


def image_spec(spec: dict) -> dict:
    """Validate ``manifest["input"]["image"]`` (or the whole ``manifest["input"]``)."""
    spec = spec.get("image", spec)
    try:
        h, w, mode = int(spec["height"]), int(spec["width"]), str(spec["mode"])
        mean = [float(v) for v in spec["mean"]]
        std = [float(v) for v in spec["std"]]
    except (KeyError, TypeError, ValueError) as e:
        raise RunnerError(f"manifest input.image must hold height, width, mode, mean, std "
                          f"({e!r}); found {spec}. Re-export the bundle") from None
    resample = str(spec.get("resample", "bilinear"))
    if mode not in CHANNELS:
        raise RunnerError(f"manifest image mode {mode!r} is not supported; expected 'RGB' or 'L'")
    c = CHANNELS[mode]
    if len(mean) != c or len(std) != c or min(std) <= 0 or h < 1 or w < 1:
        raise RunnerError(f"manifest image spec: mode {mode} needs {c} mean and {c} std value(s) "
                          f"(std > 0) and a positive size; found {spec}")
    if resample not in RESAMPLE:
        raise RunnerError(f"manifest image resample {resample!r} unknown; expected one of "
                          f"{list(RESAMPLE)}")
    return {"height": h, "width": w, "mode": mode, "resample": resample,
            "mean": mean, "std": std}


def _manifest_spec(manifest: dict) -> dict:
    inp = manifest.get("input", {})
    if inp.get("modality") != "image":
        raise RunnerError(f"this bundle's input is {inp.get('modality', 'sensor windows')!r}, "
                          "not images; pass an .npz/.csv of windows instead")
    return image_spec(inp)


def normalize(u8: np.ndarray, spec: dict) -> np.ndarray:
    """Bytes (N, H, W, C) -> float32 (N, C, H, W) as ``(u8 / 255 - mean) / std``.

    Same float32 operation order as the server; do not reorder it.
    """
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    x = u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _to_8bit(img):
    """16/32-bit grayscale -> L by keeping the high byte (Pillow's convert would clip at 255)."""
    if not img.mode.startswith("I"):
        return img
    a = np.asarray(img).astype(np.int64)
    if img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
        return _pil().fromarray(a.astype(np.uint8))
    return _pil().fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))


def image_bytes(img, spec: dict) -> np.ndarray:
    """Convert and resize one PIL image: uint8 (H, W, C) before normalisation."""
    Image = _pil()
    filt = getattr(getattr(Image, "Resampling", Image), spec["resample"].upper())
    img = _to_8bit(img)
    if img.mode != spec["mode"]:
        img = img.convert(spec["mode"])
    size = (spec["width"], spec["height"])
    if img.size != size:
        img = img.resize(size, filt)
    a = np.asarray(img, np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def preprocess_image(img, spec: dict) -> np.ndarray:
    """One PIL image -> float32 (C, H, W) ready for the backbone (see the module docstring)."""
    spec = image_spec(spec)
    return normalize(image_bytes(img, spec)[None], spec)[0]


def read_image(path: str, spec: dict, max_mb: float | None = None):
    """uint8 (H, W, C), or a reason string when the file cannot be used.

    ``spec`` needs height, width, mode and resample (see :func:`image_spec`). Only a regular
    file is read (a FIFO or device is skipped), of at most ``max_mb`` MiB when given.
    """
    from edgerun.files import open_regular

    Image = _pil()
    try:
        f = open_regular(path, "image", None if max_mb is None else int(max_mb * 2**20))
    except RunnerError as e:
        return str(e)
    try:
        if os.fstat(f.fileno()).st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, palette transparency
            with Image.open(f) as img:
                img.load()
                return image_bytes(img, spec)
    except Image.DecompressionBombError as e:
        return f"image too large to decode safely ({e})"
    except Exception as e:  # any decoder failure (corrupt, truncated, odd mode) skips the file
        return f"unreadable image ({type(e).__name__}: {e})"
    finally:
        f.close()


def collect_images(root: str):
    """``(files [(path, label)], skipped)`` of ``root/<label>/**``, sorted, deterministic."""
    files, skipped = [], []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith("."):
            continue
        if not os.path.isdir(path):
            skipped.append({"path": path, "reason": "not inside a label folder; put images in "
                            f"{os.path.join(root, '<label>', name)}"})
            continue
        for dirpath, dirnames, names in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(names):
                fp = os.path.join(dirpath, fn)
                if fn.startswith("."):
                    continue
                if os.path.splitext(fn)[1].lower() not in IMAGE_EXTS:
                    skipped.append({"path": fp, "reason": "not an image file (expected "
                                    f"{', '.join(IMAGE_EXTS)})"})
                else:
                    files.append((fp, name))
    return files, skipped


def load_image_folder(root: str, manifest: dict, max_mb: float | None = None):
    """Load ``root/<label>/**/*.png|jpg|jpeg`` (case-insensitive), one folder per label.

    Hidden files and folders are ignored; files directly in ``root``, other extensions and
    empty, corrupt or undecodable images are skipped and reported. EXIF orientation is ignored.

    Returns:
        ``(x, y, skipped)``: x float32 (N, C, H, W), y label names (N,), skipped a list of
        ``{"path", "reason"}``.
    """
    spec = _manifest_spec(manifest)
    if not os.path.isdir(root):
        raise RunnerError(f"image folder {root} does not exist or is not a folder; expected "
                          f"{root}/<label>/<image>.png|.jpg")
    files, skipped = collect_images(root)
    arrays, labels = [], []
    for path, label in files:
        r = read_image(path, spec, max_mb)
        if isinstance(r, str):
            skipped.append({"path": path, "reason": r})
        else:
            arrays.append(r)
            labels.append(label)
    if not arrays:
        why = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise RunnerError(f"{root} holds no usable image; expected one sub-folder per label with "
                          f"{'/'.join(IMAGE_EXTS)} files ({root}/<label>/<image>.png)"
                          + (f"; skipped {len(skipped)}, e.g. {why}" if skipped else ""))
    return normalize(np.stack(arrays), spec), labels, skipped


def load_image_npz(path: str, manifest: dict, max_mb: float | None = None):
    """Load an ``.npz`` with ``x`` uint8 (N, H, W) or (N, H, W, 3|4) and optional ``y`` names.

    Images of any size go through the same conversion and resizing as folder images; when
    they already have the bundle's size and channels, numpy alone does the work.

    Returns:
        ``(x, y, skipped)``: x float32 (N, C, H, W), y label names or None, skipped ``[]``.
    """
    from edgerun.data import open_npz

    spec = _manifest_spec(manifest)
    with open_npz(path, "images", max_mb) as z:
        if "x" not in z.files:
            raise RunnerError(f"{path}: expected an array 'x' of images, found keys {z.files}")
        x = np.asarray(z["x"])
        y = z["y"] if "y" in z.files else None
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (3, 4))):
        raise RunnerError(f"{path}: 'x' must be uint8 images (N, H, W) or (N, H, W, 3|4) with "
                          f"values 0..255, found {x.dtype} {x.shape}; convert with "
                          "np.clip(img, 0, 255).astype(np.uint8)")
    if len(x) == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise RunnerError(f"{path}: 'x' holds no images (shape {x.shape})")
    if y is not None:
        from edgerun.data import label_names

        y = label_names(path, y, len(x), "images")
    return _array_input(x, spec), y, []


def _array_input(x: np.ndarray, spec: dict) -> np.ndarray:
    sized = x.shape[1:3] == (spec["height"], spec["width"])
    gray = x.ndim == 3
    if sized and (gray or spec["mode"] == "RGB"):
        # Fast path: Pillow's L->RGB repeats the gray value and RGBA->RGB drops alpha.
        u8 = x[..., None] if gray else x[..., :3]
        if u8.shape[3] != len(spec["mean"]):
            u8 = np.repeat(u8, len(spec["mean"]), axis=3)
        return normalize(u8, spec)
    Image = _pil()
    out = np.empty((len(x), len(spec["mean"]), spec["height"], spec["width"]), np.float32)
    for i in range(len(x)):
        out[i] = normalize(image_bytes(Image.fromarray(x[i]), spec)[None], spec)[0]
    return out
