"""Server checkpoints: a model's weights plus everything needed to rebuild and export it.

Saved atomically (write to a temporary file, then ``os.replace``), so a crash or a failed stage
never leaves a half-written checkpoint over a good one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.config import HeadConfig, NetConfig
from edgetl.errors import EdgetlError
from edgetl.nets import EdgeModel, build_model

FORMAT = "edgetl.checkpoint/1"


@dataclass
class Checkpoint:
    """A trained :class:`EdgeModel` with its data contract.

    Shape:
        mean, std: (C,) per-channel normalisation applied to raw windows before the model.

    Image models carry ``image`` (the manifest's ``input["image"]`` spec: size, mode,
    mean/std); raw input is then uint8 images of any size, preprocessed exactly as the
    device runner does. Text models carry ``text`` (the manifest's ``input["text"]``:
    tokenizer and ``max_length``); raw input is then strings, tokenised to ``(N, 2, L)``
    int64 ids and attention mask.
    """

    model: EdgeModel
    net: NetConfig | None
    head: HeadConfig
    labels: tuple[str, ...]
    channels: tuple[str, ...] = ()
    window: int = 0
    stride: int = 0
    sample_rate_hz: float = 0.0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    std: np.ndarray = field(default_factory=lambda: np.ones(0, np.float32))
    meta: dict = field(default_factory=dict)
    image: dict | None = None
    text: dict | None = None
    #: An input kind of :mod:`edgetl.inputs` (a user's model: :class:`TensorInput`); when
    #: None it follows from ``image``/``text``, else the time-series fields.
    input: Any = None

    @property
    def kind(self):
        """The :mod:`edgetl.inputs` kind of this model's input."""
        from edgetl import inputs

        if self.input is not None:
            return self.input
        if self.text is not None:
            return inputs.TextInput(self.text)
        if self.image is not None:
            return inputs.ImageInput(self.image)
        return inputs.TimeseriesInput(tuple(self.channels), self.window, self.stride,
                                      self.sample_rate_hz, self.mean, self.std)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Raw data (windows, uint8 images, texts, tensors) -> model input."""
        return self.kind.normalize(x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input without the batch axis: (T, C), (C, H, W), (2, L) for text..."""
        return self.kind.shape


def save_checkpoint(ck: Checkpoint, path: Path) -> Path:
    """Write ``ck`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state_dict": ck.model.state_dict(),
        "net": dataclasses.asdict(ck.net),
        "head": dataclasses.asdict(ck.head),
        "labels": list(ck.labels),
        "channels": list(ck.channels),
        "window": ck.window,
        "stride": ck.stride,
        "sample_rate_hz": ck.sample_rate_hz,
        "mean": torch.from_numpy(np.asarray(ck.mean, np.float32)),
        "std": torch.from_numpy(np.asarray(ck.std, np.float32)),
        "meta": ck.meta,
        "image": ck.image,
        "text": ck.text,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise EdgetlError(f"checkpoint {path} does not exist; run `edgetl pretrain` / "
                          "`edgetl distill` first or pass the right --checkpoint")
    try:
        p = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise EdgetlError(f"{path} is not a readable edgetl checkpoint: {e}") from None
    if not isinstance(p, dict) or p.get("format") != FORMAT:
        raise EdgetlError(f"{path}: expected format {FORMAT!r}, found "
                          f"{p.get('format') if isinstance(p, dict) else type(p).__name__!r}")
    try:
        net = NetConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in p["net"].items()})
        head = HeadConfig(**p["head"])
        net_build = dataclasses.replace(net, pretrained=False)  # weights from the state dict
        model = build_model(len(p["channels"]), len(p["labels"]), net_build, head)
        model.load_state_dict(p["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise EdgetlError(f"{path}: not a complete {FORMAT} checkpoint ({type(e).__name__}: "
                          f"{e}); re-save it with `edgetl pretrain` / `edgetl distill` or "
                          "`edgetl.checkpoint.save_checkpoint`") from None
    bad = [k for k, t in [*p["state_dict"].items(), ("mean", p["mean"]), ("std", p["std"])]
           if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise EdgetlError(f"{path}: tensors {bad[:5]} hold NaN or infinite values (a damaged "
                          "or diverged checkpoint); nothing was exported from it")
    model.eval()
    return Checkpoint(model, net, head, tuple(p["labels"]), tuple(p["channels"]), p["window"],
                      p["stride"], p["sample_rate_hz"], p["mean"].numpy(), p["std"].numpy(),
                      p["meta"], p.get("image"), p.get("text"))
