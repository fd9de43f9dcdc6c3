"""Typed errors. Every user-facing failure is an :class:`EdgetlError` (a ``ValueError``).

The CLI catches ``EdgetlError``, prints its one-line message and exits 1 without a traceback.
"""

from __future__ import annotations


class EdgetlError(ValueError):
    """Base class of every error edgetl raises on bad input or a failed check."""


class ConfigError(EdgetlError):
    """A recipe or an option has an unknown key, a wrong type or an out-of-range value."""


class DataError(EdgetlError):
    """Input data has the wrong shape, dtype, labels or non-finite values."""


class BundleError(EdgetlError):
    """A bundle is missing a file, has a wrong hash or an unsupported schema."""


class ShapeMismatchError(EdgetlError):
    """An exported graph returns outputs whose shapes differ from PyTorch's."""


class ToleranceError(EdgetlError):
    """An exported graph's outputs differ from PyTorch's by more than the backend's tolerance."""


class MissingBackendError(EdgetlError, ImportError):
    """An optional backend is not installed; the message names the extra to install."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingBackendError` naming the pip extra.

    Args:
        module: dotted module name, e.g. ``"onnxruntime"``.
        extra: the edgetl extra that installs it, e.g. ``"onnx"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingBackendError(
            f"{module} is not installed ({e}). Install it with: pip install 'edgetl[{extra}]' "
            "-c constraints.txt"
        ) from e
