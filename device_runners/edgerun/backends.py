"""Inference runtimes the runner can drive, keyed by the manifest's ``target``.

Each backend exposes ``features(x)``, ``train_step(feeds)`` and ``infer(feeds)`` on float32
arrays of any batch size; fixed-batch graphs are padded here, int8 inputs quantised and int8
outputs dequantised here, so callers never see the difference. The runtime library is
imported only when its backend is built.
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

        m = bundle.manifest
        self._bb = sess("backbone")
        self._train = sess(m["train_step"]["file"])
        self._infer = sess(m["infer"]["file"])
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


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``n`` rows."""
    if len(a) == n:
        return a
    return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def _quantize(x: np.ndarray, q) -> np.ndarray:
    if not q:
        return np.ascontiguousarray(x, np.float32)
    info = np.iinfo(np.dtype(q["dtype"]))
    v = np.round(x / q["scale"]) + q["zero_point"]
    return np.clip(v, info.min, info.max).astype(q["dtype"])


def _dequantize(y: np.ndarray, q) -> np.ndarray:
    if not q:
        return y
    return (y.astype(np.float32) - q["zero_point"]) * np.float32(q["scale"])


@register("tflite")
class LiteRTBackend:
    """LiteRT (``ai-edge-litert``) signature runners: backbone, head ``train`` and ``infer``.

    Every op is a TFLite built-in, so any LiteRT build runs these models; batch sizes are
    fixed at export and taken from the manifest.
    """

    name = "ai-edge-litert"

    def __init__(self, bundle, threads: int = 0):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RunnerError("ai-edge-litert is not installed; on the device run: "
                              "pip install numpy ai-edge-litert") from None
        try:
            from importlib.metadata import version

            self.version = version("ai-edge-litert")
        except Exception:  # noqa: BLE001 - metadata is optional on stripped images
            self.version = "unknown"
        m = bundle.manifest

        def runner(role, signature):
            try:
                it = Interpreter(model_path=bundle.path(role), num_threads=threads or None)
                return it.get_signature_runner(signature)
            except Exception as e:  # noqa: BLE001 - runtime errors vary by build
                raise RunnerError(f"ai-edge-litert {self.version} cannot load "
                                  f"{m['files'][role]['path']} (signature {signature!r}): "
                                  f"{e}") from None

        self._bb = runner("backbone", m["input"].get("signature"))
        self._train = runner(m["train_step"]["file"], m["train_step"]["signature"])
        self._infer = runner(m["infer"]["file"], m["infer"]["signature"])
        self._in = m["input"]["name"]
        self._out = m["features"]["name"]
        q = m.get("quantization") or {}
        self._qin, self._qout = q.get("input"), q.get("output")
        self._bb_batch = int(m["input"].get("batch_size") or 1)
        self._infer_batch = m["infer"].get("batch_size")
        self._infer_x = m["infer"]["inputs"][0]

    def features(self, x: np.ndarray) -> np.ndarray:
        """Backbone features of preprocessed windows, in the graph's fixed batch."""
        b, out = self._bb_batch, []
        for i in range(0, len(x), b):
            chunk = _quantize(x[i : i + b], self._qin)
            y = self._bb(**{self._in: _pad(chunk, b)})[self._out]
            out.append(_dequantize(y, self._qout)[: min(b, len(x) - i)])
        return np.concatenate(out, axis=0)

    def train_step(self, feeds: dict) -> dict:
        """One optimizer step (the caller pads to the manifest's batch with weight 0)."""
        return self._train(**feeds)

    def infer(self, feeds: dict) -> dict:
        """Head logits and embedding of any number of rows."""
        x = feeds[self._infer_x]
        b = int(self._infer_batch or len(x))
        outs = []
        for i in range(0, len(x), b):
            res = self._infer(**{**feeds, self._infer_x: _pad(x[i : i + b], b)})
            outs.append({k: v[: min(b, len(x) - i)] for k, v in res.items()})
        return {k: np.concatenate([o[k] for o in outs], axis=0) for k in outs[0]}
