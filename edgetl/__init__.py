"""edgetl: on-device transfer learning, from a server model to a personalised head on the device.

The stage functions are importable from here (``edgetl.export_model(...)``); each is loaded on
first use, so ``import edgetl`` (and ``edgetl --help``) stays light.
"""

__version__ = "0.1.0"

#: Public stage functions: name -> module that defines it (imported lazily).
_API = {
    "export_model": "edgetl.export.model",
    "export_bundle": "edgetl.export.bundle",
    "load_model": "edgetl.export.load",
    "check_bundle": "edgetl.check",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgetl' has no attribute {name!r}")
