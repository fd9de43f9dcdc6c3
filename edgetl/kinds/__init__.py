"""Recipe data by input kind: loading, splits, augmentation, server training, device files.

One class per kind, registered under the same name as its :mod:`edgetl.inputs` kind (the
manifest's ``input.modality``): :mod:`edgetl.inputs` owns what a *bundle* takes and its
manifest block; this package owns what a *recipe* trains on. :func:`edgetl.pipeline.run_recipe`
is the one pipeline over every kind:

    sd = kind.load(recipe)                       # user-disjoint server splits + check picks
    teacher = kind.pretrain(recipe, out, sd)     # -> out/teacher.pt
    students = kind.distill(recipe, teacher.path, out, sd)
    ... export every (role, target, precision), gate, bench ...
    devices = kind.devices(recipe, out, sd)      # each device's adapt / eval files
    ... one personalisation loop over (bundle, device) through the torch-free runner ...

``tensor`` (a user's own model, ``edgetl export MODEL``) has no recipe data: its bundles are
made by :func:`edgetl.export_model`.
"""

from __future__ import annotations

import importlib

from edgetl.errors import ConfigError
from edgetl.kinds.base import Device, RecipeKind, ServerData

__all__ = ["KINDS", "Device", "RecipeKind", "ServerData", "of"]

#: kind name -> "module:Class", imported on first use (torch and data loaders are heavy).
KINDS: dict[str, str] = {
    "timeseries": "edgetl.kinds.timeseries:Timeseries",
    "image": "edgetl.kinds.image:Images",
    "text": "edgetl.kinds.text:Texts",
}


def of(recipe) -> RecipeKind:
    """The :class:`RecipeKind` for ``recipe.data.kind``."""
    name = recipe.data.kind
    if name not in KINDS:
        raise ConfigError(f"data.kind {name!r} is not a recipe input kind; expected one of "
                          f"{sorted(KINDS)}")
    mod, cls = KINDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)()
