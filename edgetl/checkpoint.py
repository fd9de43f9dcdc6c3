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
    """

    model: EdgeModel
    net: NetConfig
    head: HeadConfig
    labels: tuple[str, ...]
    channels: tuple[str, ...]
    window: int
    stride: int
    sample_rate_hz: float
    mean: np.ndarray
    std: np.ndarray
    meta: dict = field(default_factory=dict)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Raw (N, T, C) windows -> model input."""
        return ((x - self.mean) / self.std).astype(np.float32)


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
    net = NetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["net"].items()})
    head = HeadConfig(**p["head"])
    model = build_model(len(p["channels"]), len(p["labels"]), net, head)
    model.load_state_dict(p["state_dict"])
    model.eval()
    return Checkpoint(model, net, head, tuple(p["labels"]), tuple(p["channels"]), p["window"],
                      p["stride"], p["sample_rate_hz"], p["mean"].numpy(), p["std"].numpy(),
                      p["meta"])
