"""edgerun: the device side of edgetl.

Standard library + numpy + one inference runtime (onnxruntime here). Never torch, never the
server package: this folder is copied onto phones, Raspberry Pis and gateways as it is.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1


class RunnerError(ValueError):
    """Bad input or a bundle that fails verification; the message says what to do."""
