"""Input kinds: what a backbone takes, how raw data becomes it, and its manifest block.

One class per kind, registered by its manifest ``input.modality`` name:

timeseries  (N, T, C) sensor windows, normalised per channel (the HAR scenario)
image       uint8 pictures, resized and normalised as ``input.image`` says (vision)
text        strings, tokenised with the bundle's tokenizer into (N, 2, L) ids + mask (text)
tensor      any model's own input tensor, (N, *dims) float or integer ids, optionally
            normalised along one axis (``edgetl export MODEL``: a user's model)

The device runner has the same registry (``device_runners/edgerun/data.py: KINDS``); a test
keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgetl.errors import DataError

INPUT_KINDS: dict[str, type] = {}


def register_input(name: str):
    """Class decorator: register an input kind under its manifest ``modality`` name."""

    def deco(cls):
        cls.modality = name
        INPUT_KINDS[name] = cls
        return cls

    return deco


@register_input("timeseries")
@dataclass(frozen=True)
class TimeseriesInput:
    """(N, T, C) windows of ``channels`` at ``sample_rate_hz``, normalised by mean/std."""

    channels: tuple[str, ...]
    window: int
    stride: int
    sample_rate_hz: float
    mean: np.ndarray
    std: np.ndarray
    modality: ClassVar[str]
    #: int8 quantises activations per call (no calibration data): inputs that are ids.
    dynamic_int8: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.window, len(self.channels))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def check_raw(self, name: str, x: np.ndarray) -> None:
        if x.ndim != 3 or x.shape[1:] != self.shape:
            raise DataError(f"{name} windows must be (N, {self.shape[0]}, {self.shape[1]}), "
                            f"got {x.shape}")

    def block(self, sig: dict) -> dict:
        return {"layout": "NTC", "channels": list(self.channels), "window": self.window,
                "stride": self.stride, "sample_rate_hz": self.sample_rate_hz,
                "preprocess": {"normalize": {"mean": [float(v) for v in self.mean],
                                             "std": [float(v) for v in self.std]}}}

    def vector_x(self, raw: np.ndarray, xn: np.ndarray) -> dict:
        return {"x": raw.astype(np.float32)}


@register_input("image")
@dataclass(frozen=True)
class ImageInput:
    """uint8 (N, H, W[, 3|4]) pictures of any size; ``spec`` is the manifest's ``image``."""

    spec: dict
    modality: ClassVar[str]
    dynamic_int8: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.spec["mean"]), self.spec["height"], self.spec["width"])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        from edgetl.data.images import to_model_input

        im = self.spec
        return to_model_input(x, (im["height"], im["width"]), im["mode"], im["mean"],
                              im["std"], resample=im.get("resample", "bilinear"))

    def check_raw(self, name: str, x: np.ndarray) -> None:
        if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (3, 4))):
            raise DataError(f"{name} images must be uint8 (N, H, W) or (N, H, W, 3|4), got "
                            f"{x.dtype} {x.shape}")

    def block(self, sig: dict) -> dict:
        return {"layout": "NCHW", "image": dict(self.spec)}

    def vector_x(self, raw: np.ndarray, xn: np.ndarray) -> dict:
        return {"x": raw}


@register_input("text")
@dataclass(frozen=True)
class TextInput:
    """Strings, tokenised to (N, 2, L) int64 ids + mask; ``spec`` is the manifest's ``text``."""

    spec: dict
    modality: ClassVar[str]
    #: activation ranges change with every sentence: one calibration set would clip others
    dynamic_int8: ClassVar[bool] = True

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.spec["max_length"])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        from edgetl.text.encoder import Tokens

        return Tokens(self.spec["max_length"]).encode(x)[0]

    def check_raw(self, name: str, x: np.ndarray) -> None:
        if np.asarray(x).ndim != 1 or np.asarray(x).dtype.kind not in "UO":
            raise DataError(f"{name} texts must be a 1-D array of strings, got "
                            f"{np.asarray(x).dtype} {np.asarray(x).shape}")

    def block(self, sig: dict) -> dict:
        return {"layout": "N2L", "names": sig["inputs"], "dtype": sig.get("dtype", "int64"),
                "text": dict(self.spec),
                **({"length_signatures": sig["length_signatures"]}
                   if "length_signatures" in sig else {})}

    def vector_x(self, raw: np.ndarray, xn: np.ndarray) -> dict:
        # the tokens, and the texts: the device checks its tokenizer too
        return {"x": xn, "texts": np.asarray(raw, dtype=str)}


#: dtypes a tensor input may have (what the user's data holds).
TENSOR_DTYPES = ("float32", "int64")


@register_input("tensor")
@dataclass(frozen=True)
class TensorInput:
    """A model's own input: (N, *dims) of ``dtype``, optionally normalised along ``axis``.

    ``mean``/``std`` (one value, or one per entry of ``axis``) make the model input
    ``(x - mean) / std``; data files then hold ``x`` before that step, on the server and on
    the device alike. ``layout`` is a free-form note for people (``NCHW``, ``NL``...).
    """

    dims: tuple[int, ...]
    dtype: str = "float32"
    layout: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    axis: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    modality: ClassVar[str]

    def __post_init__(self):
        if self.dtype not in TENSOR_DTYPES:
            raise DataError(f"input dtype {self.dtype!r} is not supported; expected one of "
                            f"{TENSOR_DTYPES}")
        if not self.dims or any(int(d) < 1 for d in self.dims):
            raise DataError(f"input shape {tuple(self.dims)} must be positive sizes without "
                            "the batch axis, e.g. 3,96,96")
        if (self.mean is None) != (self.std is None):
            raise DataError("normalisation needs both mean and std (or neither)")
        if self.mean is not None:
            if self.dtype != "float32":
                raise DataError("mean/std normalisation applies to float inputs only")
            if not 1 <= self.axis <= len(self.dims):
                raise DataError(f"normalisation axis {self.axis} is outside input dims "
                                f"{tuple(self.dims)} (axis 1 is the first non-batch axis)")
            n = self.dims[self.axis - 1]
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, n):
                raise DataError(f"mean/std need 1 or {n} values (axis {self.axis} has size "
                                f"{n}); got {len(self.mean)} and {len(self.std)}")
            if min(self.std) <= 0:
                raise DataError(f"std values must be > 0, got {list(self.std)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.dims)

    @property
    def integer(self) -> bool:
        return self.dtype != "float32"

    @property
    def dynamic_int8(self) -> bool:
        """Token-id models quantise activations per call, as the text scenario does."""
        return self.integer

    def normalize(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.integer:
            return np.ascontiguousarray(x, dtype=np.int64)
        x = x.astype(np.float32)
        if self.mean is not None:
            shape = [1] * x.ndim
            shape[self.axis] = -1
            x = (x - np.asarray(self.mean, np.float32).reshape(shape)) / np.asarray(
                self.std, np.float32).reshape(shape)
        return np.ascontiguousarray(x, dtype=np.float32)

    def check_raw(self, name: str, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise DataError(f"{name} data must have shape (N, {', '.join(map(str, self.shape))})"
                            f", got {tuple(x.shape)}")
        if self.integer and x.dtype.kind not in "iu":
            raise DataError(f"{name} data must hold integer ids for this {self.dtype} input, got "
                            f"{x.dtype}")
        if not self.integer:
            if x.dtype.kind not in "fiub":
                raise DataError(f"{name} data must be numeric, got {x.dtype}")
            if not np.isfinite(x.astype(np.float64)).all():
                raise DataError(f"{name} data contains NaN or inf")

    def block(self, sig: dict) -> dict:
        pre = ({"normalize": {"mean": [float(v) for v in self.mean],
                              "std": [float(v) for v in self.std], "axis": self.axis}}
               if self.mean is not None else {})
        return {"layout": self.layout, "dtype": sig.get("dtype", self.dtype),
                "data_dtype": self.dtype, **({"preprocess": pre} if pre else {}),
                **self.extra}

    def vector_x(self, raw: np.ndarray, xn: np.ndarray) -> dict:
        return {"x": np.asarray(raw).astype(self.dtype)}
