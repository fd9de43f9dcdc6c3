"""``edgetl export MODEL``: a user's model from a factory, weights or a Hugging Face folder.

MODEL is one of:

* ``package.module:factory`` or ``path/to/file.py:factory``: a callable returning an
  ``nn.Module`` (``--weights``: a safetensors file or a torch state dict, read with
  ``weights_only=True``);
* a Hugging Face Transformers folder (``config.json`` + weights) of an image, text (sequence)
  or audio classification model: its classifier becomes the head, the input spec (shape,
  normalisation, labels) comes from its config and ``preprocessor_config.json``.

(An edgetl checkpoint ``*.pt`` is handled by the CLI itself.)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError
from edgetl.export.model import call_positional


@dataclass
class UserModel:
    """A loaded model and what its source says about its input (``None``: not known)."""

    module: Any
    source: str
    name: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    labels: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = ""
    call: Any = call_positional
    provenance: dict = field(default_factory=dict)


def load_model(spec: str, weights: Path | None = None) -> UserModel:
    """Resolve MODEL (see the module docstring) into a :class:`UserModel` in eval mode."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{spec} is a folder without config.json; MODEL is a Hugging Face "
                              "model folder, a package.module:factory, or an edgetl checkpoint")
        if weights is not None:
            raise ConfigError("--weights is for package.module:factory models; a Hugging Face "
                              "folder carries its own weights")
        return load_hf(path)
    if ":" in spec:
        return load_factory(spec, weights)
    raise ConfigError(f"MODEL {spec!r} is neither an existing folder, an edgetl checkpoint (.pt) "
                      "nor package.module:factory; e.g. edgetl export mypkg.nets:make_model "
                      "--weights model.safetensors ...")


def load_factory(spec: str, weights: Path | None) -> UserModel:
    """``module:factory`` (a module name, or a ``.py`` path) called with no arguments."""
    import torch

    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise ConfigError(f"MODEL {spec!r}: expected package.module:factory")
    if mod_name.endswith(".py"):
        file = Path(mod_name)
        if not file.is_file():
            raise ConfigError(f"MODEL {spec!r}: {file} does not exist")
        uspec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(uspec)
        sys.modules[file.stem] = module
        uspec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the current folder
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ConfigError(f"MODEL {spec!r}: cannot import {mod_name} ({e}); run from the "
                              "folder that holds it or install its package") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"MODEL {spec!r}: {mod_name} has no callable {attr!r}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"MODEL {spec!r}: {attr}() returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    if weights is not None:
        load_weights(model, Path(weights))
    return UserModel(model.eval(), "factory", attr, provenance={"model_source": spec,
                                                                "weights": str(weights or "")})


def load_weights(model, path: Path) -> None:
    """Load a safetensors file or a torch state dict (``weights_only=True``) strictly."""
    import torch

    if not path.is_file():
        raise ConfigError(f"--weights {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"--weights {path} is not a readable safetensors file or torch state "
                          f"dict ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--weights {path} holds no state dict (name -> tensor)")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"--weights {path}: tensors {bad[:5]} contain NaN or inf")
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ConfigError(f"--weights {path} does not fit the model: missing "
                          f"{res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}")


#: Transformers auto classes by the architecture suffix of ``config.architectures``.
HF_TASKS = {"ForImageClassification": ("AutoModelForImageClassification", "image"),
            "ForSequenceClassification": ("AutoModelForSequenceClassification", "text"),
            "ForAudioClassification": ("AutoModelForAudioClassification", "audio")}
#: Token-id length of a text model's bundle when ``--input-shape`` is not given.
HF_TEXT_LENGTH = 128
#: Audio samples per input when not given (1 s at 16 kHz).
HF_AUDIO_SAMPLES = 16000


def load_hf(folder: Path) -> UserModel:
    """A Transformers classification model from ``folder`` (offline, eager attention)."""
    from edgetl.errors import require
    from edgetl.progress import quiet_loggers

    with quiet_loggers("torchao", "torch.utils._pytree", "transformers"):
        transformers = require("transformers", "text")
    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    task = next(((auto, kind) for a in archs for suf, (auto, kind) in HF_TASKS.items()
                 if a.endswith(suf)), None)
    if task is not None and task[1] == "text" and _is_audio(cfg.get("model_type")):
        task = HF_TASKS["ForAudioClassification"]  # Wav2Vec2ForSequenceClassification etc.
    if task is None:
        raise ConfigError(f"{folder}: config.json architectures {archs} name no image, sequence "
                          "or audio classification model (…ForImageClassification, "
                          "…ForSequenceClassification, …ForAudioClassification)")
    auto, kind = task
    try:
        model = getattr(transformers, auto).from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ConfigError(f"{folder}: transformers cannot load it ({type(e).__name__}: "
                          f"{str(e)[:300]})") from None
    c = model.config
    id2label = {int(k): v for k, v in (c.id2label or {}).items()}
    labels = tuple(id2label[i] for i in sorted(id2label)) if id2label else None
    if labels and all(v == f"LABEL_{i}" for i, v in enumerate(labels)):
        labels = None  # transformers' placeholders are no label names
    um = UserModel(model.eval(), "huggingface", archs[0], labels=labels,
                   provenance={"model_source": str(folder), "hf_architecture": archs[0],
                               "transformers": transformers.__version__})
    if kind == "image":
        size = getattr(c, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        um.shape, um.dtype, um.layout = (int(getattr(c, "num_channels", 3)), h, w), \
            "float32", "NCHW"
        um.call = _hf_call("pixel_values")
        um.mean, um.std = _hf_normalisation(folder)
    elif kind == "text":
        um.shape, um.dtype, um.layout = (HF_TEXT_LENGTH,), "int64", "NL"
        pad = c.pad_token_id if c.pad_token_id is not None else 0
        um.call = _hf_text_call(int(pad))
        um.provenance["pad_token_id"] = int(pad)
    else:
        um.shape, um.dtype, um.layout = (HF_AUDIO_SAMPLES,), "float32", "NS"
        um.call = _hf_call("input_values")
    return um


def _is_audio(model_type: str | None) -> bool:
    """Whether transformers' audio-classification auto class knows ``model_type``.

    Audio models name their classifier ``…ForSequenceClassification`` (Wav2Vec2, HuBERT,
    WavLM...), so the architecture name alone cannot tell them from text models.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES


class _hf_call:
    """Call a Transformers model with its input under its keyword name."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, model, x):
        return model(**{self.name: x})


class _hf_text_call:
    """Token ids in; the attention mask is ``ids != pad`` (computed in the graph)."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, model, ids):
        return model(input_ids=ids, attention_mask=(ids != self.pad).long())


def _hf_normalisation(folder: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """mean/std from ``preprocessor_config.json`` in the units of the device's data.

    Image processors rescale by ``rescale_factor`` (1/255) before normalising, so with
    ``do_rescale`` the bundle's mean/std are in pixel units: data stays 0..255 floats.
    """
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return None, None
    pc = json.loads(p.read_text())
    if not pc.get("do_normalize", True) or "image_mean" not in pc:
        return None, None
    k = 1.0 / float(pc.get("rescale_factor", 1 / 255)) if pc.get("do_rescale", True) else 1.0
    return (tuple(float(v) * k for v in pc["image_mean"]),
            tuple(float(v) * k for v in pc["image_std"]))
