"""Inference runtimes the runner can drive, keyed by the manifest's ``target``.

Each backend exposes ``features(x)``, ``train_step(feeds)`` and ``infer(feeds)``; the runtime
library is imported only when its backend is built.
"""

from __future__ import annotations

import numpy as np

from edgerun import RunnerError

BACKENDS = {}


def register(target: str):
    """Class decorator: make a backend available for bundles of ``target``."""

    def deco(cls):
        BACKENDS[target] = cls
        return cls

    return deco


def make_backend(bundle, threads: int = 0):
    """The backend for ``bundle.manifest['target']``."""
    target = bundle.manifest["target"]
    if target not in BACKENDS:
        raise RunnerError(f"bundle target {target!r} is not supported by this runner; "
                          f"supported: {sorted(BACKENDS)}")
    return BACKENDS[target](bundle, threads)


@register("onnx")
class OrtBackend:
    """onnxruntime sessions for the backbone, the head train step and the head infer graph."""

    name = "onnxruntime"

    def __init__(self, bundle, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed; on the device run: "
                              "pip install numpy onnxruntime") from None
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads

        def sess(role):
            try:
                return ort.InferenceSession(bundle.path(role), opts,
                                            providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - runtime errors vary by build
                raise RunnerError(f"onnxruntime {ort.__version__} cannot load "
                                  f"{bundle.manifest['files'][role]['path']}: {e}") from None

        self._bb = sess("backbone")
        self._train = sess("head_train")
        self._infer = sess("head_infer")
        self._in = bundle.manifest["input"]["name"]
        self._train_out = [o.name for o in self._train.get_outputs()]
        self._infer_out = [o.name for o in self._infer.get_outputs()]

    def features(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Backbone features of preprocessed windows, computed in chunks."""
        out = [self._bb.run(None, {self._in: x[i : i + batch]})[0]
               for i in range(0, len(x), batch)]
        return np.concatenate(out, axis=0)

    def train_step(self, feeds: dict) -> dict:
        """One optimizer step; returns outputs by name."""
        return dict(zip(self._train_out, self._train.run(None, feeds)))

    def infer(self, feeds: dict) -> dict:
        """Head logits and embedding; returns outputs by name."""
        return dict(zip(self._infer_out, self._infer.run(None, feeds)))
