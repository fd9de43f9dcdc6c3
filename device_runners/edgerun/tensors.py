"""Device data for bundles of any model: an ``.npz`` whose ``x`` is the model's input.

Bundles exported from a user's own PyTorch or Hugging Face model (``edgetl export MODEL``)
declare their input as a plain tensor (``"modality": "tensor"``)::

    {"name": "x", "shape": [batch, *dims], "dtype": "float32" | "int64" | "int32",
     "data_dtype": "float32" | "int64", "layout": "NCHW" | "NTC" | "NL" | ...,
     "preprocess": {"normalize": {"mean": [...], "std": [...], "axis": 1}}}

``dtype`` is what the backbone graph takes (TFLite takes int32 token ids where the PyTorch
model took int64); ``data_dtype`` is what the user's data holds. The ``.npz`` holds ``x``
(N, *dims) of that kind (floats for a float model, integers for token ids) and optionally
``y`` (N,) label names. Normalisation, when the manifest has one, is ``(x - mean) / std``
along ``axis`` (the channel axis of ``x``, counted with the batch axis).
"""

from __future__ import annotations

import numpy as np

from edgerun import RunnerError

DTYPES = ("float32", "float16", "int64", "int32")


def spec(manifest: dict) -> dict:
    """Validated ``manifest["input"]`` of a tensor bundle: dims, dtypes, normalisation."""
    inp = manifest["input"]
    try:
        dims = [int(v) for v in inp["shape"][1:]]
        dtype, data_dtype = str(inp["dtype"]), str(inp.get("data_dtype", inp["dtype"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RunnerError(f"manifest input needs 'shape' and 'dtype' ({e!r}); found {inp}. "
                          "Re-export the bundle") from None
    if dtype not in DTYPES or data_dtype not in DTYPES or any(d < 1 for d in dims):
        raise RunnerError(f"manifest input: dtype {dtype!r}/{data_dtype!r} (known: "
                          f"{list(DTYPES)}) with dims {dims} is not usable; re-export the bundle")
    norm = (inp.get("preprocess") or {}).get("normalize")
    if norm is not None:
        try:
            mean = np.asarray(norm["mean"], np.float32).ravel()
            std = np.asarray(norm["std"], np.float32).ravel()
            axis = int(norm.get("axis", 1))
        except (KeyError, TypeError, ValueError) as e:
            raise RunnerError(f"manifest input.preprocess.normalize needs mean, std ({e!r}); "
                              "re-export the bundle") from None
        if not 1 <= axis <= len(dims) or len(mean) != len(std) or not (std > 0).all() or (
                len(mean) not in (1, dims[axis - 1])):
            raise RunnerError(f"manifest normalisation (mean {len(mean)}, std {len(std)} values, "
                              f"axis {axis}) does not fit input dims {dims}; re-export the bundle")
        norm = {"mean": mean, "std": std, "axis": axis}
    return {"dims": dims, "dtype": dtype, "data_dtype": data_dtype, "normalize": norm}


def load_npz(path: str, manifest: dict, max_mb: float | None = None):
    """``x`` and optional label names ``y`` from ``path``, checked against the manifest."""
    from edgerun.data import open_npz

    s = spec(manifest)
    with open_npz(path, f"inputs of shape (N, {', '.join(map(str, s['dims']))})", max_mb) as z:
        if "x" not in z.files:
            raise RunnerError(f"{path}: expected an array 'x' of model inputs, found keys "
                              f"{z.files}")
        x = np.asarray(z["x"])
        y = z["y"] if "y" in z.files else None
    want = tuple(s["dims"])
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise RunnerError(f"{path}: 'x' has shape {tuple(x.shape)}, the bundle takes (N, "
                          f"{', '.join(map(str, want))}) ({manifest['input'].get('layout', '')}); "
                          "reshape or resize the data to the model's input")
    if len(x) == 0:
        raise RunnerError(f"{path} holds no samples")
    integer = np.dtype(s["data_dtype"]).kind == "i"
    if integer and x.dtype.kind not in "iu":
        raise RunnerError(f"{path}: the model takes integer ids ({s['data_dtype']}), 'x' is "
                          f"{x.dtype}; save the token ids as integers")
    if not integer and x.dtype.kind not in "fiub":
        raise RunnerError(f"{path}: 'x' must be numeric for this model ({s['data_dtype']}), "
                          f"found dtype {x.dtype}")
    if integer:
        info = np.iinfo(np.dtype(s["dtype"]))
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise RunnerError(f"{path}: ids outside {s['dtype']} range "
                              f"[{info.min}, {info.max}]")
    else:
        with np.errstate(over="ignore"):
            x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            n_bad = int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum())
            raise RunnerError(f"{path}: {n_bad} sample(s) contain NaN or inf; clean or drop "
                              "them before adapting")
    if y is not None:
        from edgerun.data import label_names

        y = label_names(path, y, len(x))
    return x, y


def preprocess(x: np.ndarray, manifest: dict) -> np.ndarray:
    """Raw model input -> what the backbone graph takes (normalised, in its dtype)."""
    s = spec(manifest)
    if s["normalize"] is not None:
        n = s["normalize"]
        shape = [1] * x.ndim
        shape[n["axis"]] = -1
        x = (x.astype(np.float32) - n["mean"].reshape(shape)) / n["std"].reshape(shape)
    return np.ascontiguousarray(x, dtype=np.dtype(s["dtype"]))
