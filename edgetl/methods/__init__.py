"""Transfer-learning methods beyond plain fine-tuning, one small module each.

Every method is one function registered under its recipe name (``[transfer] method``)::

    fit(model, data: TransferData, cfg: TransferConfig) -> EdgeModel

``model`` is a copy of the source model (it may carry a new head for new target labels);
``data`` holds labelled source windows, the target data the method may use and which
parameters came from the source. ``kind`` says what target data a method needs:
``none`` (source-only), ``supervised`` (labelled target data: fine-tuning, L2-SP, EWC) or
``unsupervised`` (unlabelled target data: AdaBN, DANN, MMD, CORAL).
:func:`edgetl.methods.compare.run_methods` measures them all on a scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgetl.config import TRANSFER_METHODS
from edgetl.errors import ConfigError

KINDS = ("none", "supervised", "unsupervised")


@dataclass(frozen=True)
class Method:
    """A registered method: its name, what target data it needs, its function."""

    name: str
    kind: str
    fit: Callable
    title: str


REGISTRY: dict[str, Method] = {}


def register_method(name: str, kind: str, title: str):
    """Decorator: register ``fit`` under ``name`` (a name listed in ``TRANSFER_METHODS``)."""
    if kind not in KINDS:
        raise ConfigError(f"method kind {kind!r} unknown; known: {KINDS}")

    def deco(fn):
        REGISTRY[name] = Method(name, kind, fn, title)
        return fn

    return deco


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name lists the known ones."""
    _load()
    if name not in REGISTRY:
        raise ConfigError(f"transfer method {name!r} unknown; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def methods() -> dict[str, Method]:
    """Every registered method, in ``TRANSFER_METHODS`` order."""
    _load()
    return {n: REGISTRY[n] for n in TRANSFER_METHODS if n in REGISTRY}


def _load() -> None:
    from edgetl.methods import adabn, coral, dann, ewc, finetune, l2sp, mmd  # noqa: F401
