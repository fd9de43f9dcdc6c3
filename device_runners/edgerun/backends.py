"""Inference runtimes the runner can drive, keyed by the manifest's ``target``.

Each backend exposes ``features(x)``, ``train_step(feeds)`` and ``infer(feeds)`` on float32
arrays of any batch size; fixed-batch graphs are padded here, int8 inputs quantised and int8
outputs dequantised here, so callers never see the difference. The runtime library is
imported only when its backend is built.
"""

from __future__ import annotations

import time

import numpy as np

from edgerun import RunnerError

BACKENDS = {}


class BudgetExceeded(RunnerError):
    """The time budget (``backend.deadline``) ran out in or between backbone calls."""


def check_deadline(backend) -> None:
    """Raise :class:`BudgetExceeded` once ``backend.deadline`` has passed.

    ``deadline``: a ``time.perf_counter`` time, or ``None`` (no budget). Called between
    backbone chunks.
    """
    if backend.deadline is not None and time.perf_counter() >= backend.deadline:
        raise BudgetExceeded("the time budget ran out during the backbone pass")


def register(target: str):
    """Class decorator: make a backend available for bundles of ``target``."""

    def deco(cls):
        BACKENDS[target] = cls
        return cls

    return deco


TRAINERS = ("stateless", "ort-training")


def check_io(file: str, where: str, declared, graph, what: str = "inputs") -> None:
    """The names the manifest feeds (``declared``) are exactly the graph's ``what``.

    Checked when a graph is loaded, so a manifest that names other inputs than its graph
    fails here naming both lists, not in the runtime's first call (a "missing input" error).
    """
    if sorted(declared) != sorted(graph):
        raise RunnerError(f"manifest.json: {where} {sorted(declared)} do not match the "
                          f"{what} of {file} {sorted(graph)}; the bundle is damaged or was "
                          "written by another edgetl version: re-export it")


def make_backend(bundle, threads: int = 0, trainer: str | None = None):
    """The backend for ``bundle.manifest['target']``, training with ``trainer``.

    ``trainer`` defaults to the manifest's ``train_step.trainer``: ``stateless`` (the head's
    train-step graph) or ``ort-training`` (ONNX Runtime's training API on the bundle's
    training artifacts).
    """
    m = bundle.manifest
    target = m["target"]
    if target not in BACKENDS:
        raise RunnerError(f"bundle target {target!r} is not supported by this runner; "
                          f"supported: {sorted(BACKENDS)}")
    trainer = trainer or m["train_step"].get("trainer", "stateless")
    if trainer not in TRAINERS:
        raise RunnerError(f"unknown trainer {trainer!r}; expected one of {TRAINERS}")
    if trainer == "ort-training" and "ort_training" not in m["train_step"]:
        raise RunnerError("this bundle has no ONNX Runtime training artifacts; export it with "
                          "`edgetl export --trainer ort-training` or use --trainer stateless")
    backend = BACKENDS[target](bundle, threads)
    backend.trainer, backend.trainer_version = "stateless", backend.version
    if trainer == "ort-training":
        step = OrtTrainingStep(bundle)
        backend.train_step = step
        backend.fused = backend.run_graph = None  # the K-step graphs are the stateless trainer's
        backend.trainer, backend.trainer_version = "ort-training", step.version
    return backend


@register("onnx")
class OrtBackend:
    """onnxruntime sessions for the backbone, the head train step and the head infer graph."""

    name = "onnxruntime"
    #: ``perf_counter`` time after which backbone calls stop: checked between chunks, and a
    #: running call is cancelled (``RunOptions.terminate`` set from a timer thread).
    deadline = None
    #: The manifest's ``train_step.fused`` block when :meth:`train_steps` runs the bundle's
    #: K-step graph (``None``: one step per call); ``fused_steps``: its ``steps``.
    fused = fused_steps = None
    #: The manifest's ``train_step.run`` block when :meth:`train_run` runs the bundle's
    #: whole-run graph (``None``: one fused and one infer call per epoch).
    run_graph = None

    def __init__(self, bundle, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed; on the device run: "
                              "pip install numpy onnxruntime") from None
        self.version = ort.__version__

        def options(n):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if n:
                opts.intra_op_num_threads = n
            return opts

        def sess(role, n=threads):
            what = f"onnxruntime {ort.__version__}: {bundle.manifest['files'][role]['path']}"
            try:
                return _OrtGuarded(ort.InferenceSession(bundle.path(role), options(n),
                                                        providers=["CPUExecutionProvider"]),
                                   what)
            except Exception as e:  # noqa: BLE001 - runtime errors vary by build
                raise RunnerError(f"onnxruntime {ort.__version__} cannot load "
                                  f"{bundle.manifest['files'][role]['path']}: "
                                  f"{_one_line(e)}") from None

        m = bundle.manifest
        self._bb = sess("backbone")
        # The head graphs are a few small matmuls: a thread pool costs more than it saves
        # (measured: 20 epochs took twice as long on 2 threads), so they run on one.
        self._train = sess(m["train_step"]["file"], 1)
        self._infer = sess(m["infer"]["file"], 1)
        self._in = bundle.manifest["input"]["name"]
        self._text_in = bundle.manifest["input"].get("names") if m["input"].get(
            "modality") == "text" else None
        self._dynamic_int8 = "dynamic" in str((m.get("quantization") or {}).get("scheme", ""))
        self._dim = int(m["features"]["dim"])
        self._bb_file = f"onnxruntime {ort.__version__}: {m['files']['backbone']['path']}"
        self._train_out = [o.name for o in self._train.get_outputs()]
        self._infer_out = [o.name for o in self._infer.get_outputs()]
        for blk, sess_ in (("train_step", self._train), ("infer", self._infer)):
            check_io(m["files"][m[blk]["file"]]["path"], f"{blk}.inputs", m[blk]["inputs"],
                     [i.name for i in sess_.get_inputs()])
        fz = m["train_step"].get("fused")
        if fz:  # the K-step graph: same feeds, stacked (edgerun.adapt.train_epoch)
            self._train_k = sess(fz["file"], 1)
            check_io(m["files"][fz["file"]]["path"], "train_step.fused.inputs", fz["inputs"],
                     [i.name for i in self._train_k.get_inputs()])
            check_io(m["files"][fz["file"]]["path"], "train_step.fused.outputs",
                     fz["outputs"], [o.name for o in self._train_k.get_outputs()], "outputs")
            self._train_k_out = [o.name for o in self._train_k.get_outputs()]
            self.fused, self.fused_steps = fz, fz["steps"]
        rb = m["train_step"].get("run") if fz else None
        if rb:  # the whole-run graph: epochs of the fused graph and their validation logits
            self._train_run = sess(rb["file"], 1)
            check_io(m["files"][rb["file"]]["path"], "train_step.run.inputs", rb["inputs"],
                     [i.name for i in self._train_run.get_inputs()])
            check_io(m["files"][rb["file"]]["path"], "train_step.run.outputs", rb["outputs"],
                     [o.name for o in self._train_run.get_outputs()], "outputs")
            self._train_run_out = [o.name for o in self._train_run.get_outputs()]
            self.run_graph = rb

    def features(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Backbone features of preprocessed windows, computed in chunks."""
        if self._text_in:
            return self._text_features(x)
        if self._dynamic_int8:  # one activation scale per call: one input per call
            batch = 1
        out = [self._bb_run({self._in: x[i : i + batch]}) for i in range(0, len(x), batch)]
        return _features_shape(np.concatenate(out, axis=0), len(x), self._dim, self._bb_file)

    def _bb_run(self, feeds: dict) -> np.ndarray:
        """The backbone's first output; the call is cancelled at :attr:`deadline`.

        One graph with a huge loop would otherwise run past any budget: Python cannot
        interrupt a running call, but onnxruntime polls ``RunOptions.terminate``.
        """
        if self.deadline is None:
            return self._bb.run(None, feeds)[0]
        import threading

        import onnxruntime as ort

        check_deadline(self)
        opts = ort.RunOptions()
        opts.log_severity_level = 4  # the cancellation is reported as one error: line
        timer = threading.Timer(max(self.deadline - time.perf_counter(), 0.0),
                                setattr, (opts, "terminate", True))
        timer.daemon = True
        timer.start()
        try:
            return self._bb.run(None, feeds, opts)[0]
        except Exception:  # noqa: BLE001 - onnxruntime's Fail has no public class
            if opts.terminate:
                raise BudgetExceeded("the time budget ran out during a backbone call "
                                     "(onnxruntime cancelled it)") from None
            raise
        finally:
            timer.cancel()

    def _text_features(self, x: np.ndarray) -> np.ndarray:
        """(N, 2, L) ids + mask: texts sorted by length, each chunk cut to its longest text.

        int8 bundles run one text per call: dynamic quantisation picks one activation scale
        per call, so in a batch a text's features would depend on its neighbours.
        """
        batch = 1 if self._dynamic_int8 else 32
        n_tok = x[:, 1].sum(1)
        order = np.argsort(n_tok, kind="stable")
        out = np.empty((len(x), self._dim), np.float32)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            c = x[idx, :, : max(int(n_tok[idx].max()), 1)]
            out[idx] = self._bb_run({n: np.ascontiguousarray(c[:, j])
                                     for j, n in enumerate(self._text_in)})
        return out

    def train_step(self, feeds: dict) -> dict:
        """One optimizer step; returns outputs by name."""
        return dict(zip(self._train_out, self._train.run(None, feeds)))

    def train_steps(self, feeds: dict) -> dict:
        """Several optimizer steps (the fused graph; batches stacked); outputs by name."""
        return dict(zip(self._train_k_out, self._train_k.run(None, feeds)))

    def train_run(self, feeds: dict) -> dict:
        """Epochs of fused steps and their validation logits (the whole-run graph)."""
        return dict(zip(self._train_run_out, self._train_run.run(None, feeds)))

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
    #: The manifest's ``train_step.fused`` block when :meth:`train_steps` runs the bundle's
    #: K-step graph (a fixed ``steps``: LiteRT graphs have fixed shapes), else ``None``.
    fused = fused_steps = None
    run_graph = None  # no whole-run graph for TFLite bundles
    #: ``perf_counter`` time after which backbone calls stop. Checked between calls only:
    #: LiteRT's Python API cannot cancel a running call, so one long call runs to its end.
    deadline = None

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

        def runner(role, signature, n=threads, it=None):
            what = (f"ai-edge-litert {self.version}: {m['files'][role]['path']} (signature "
                    f"{signature!r})")
            try:
                it = it or Interpreter(model_path=bundle.path(role), num_threads=n or None)
                return _Guarded(it.get_signature_runner(signature), what)
            except Exception as e:  # noqa: BLE001 - runtime errors vary by build
                raise RunnerError(f"{what} cannot be loaded: {_one_line(e)}") from None

        self._bb = runner("backbone", m["input"].get("signature"))
        # text: one backbone signature per sequence length; each text goes to the shortest
        # one that holds it (padding is masked: same features, less work)
        lens = m["input"].get("length_signatures") or {}
        self._by_len = None
        if lens:
            it = Interpreter(model_path=bundle.path("backbone"), num_threads=threads or None)
            self._by_len = sorted((int(n), runner("backbone", s, it=it))
                                  for n, s in lens.items())
        # the small head graphs run on one thread (see OrtBackend)
        self._train = runner(m["train_step"]["file"], m["train_step"]["signature"], 1)
        self._infer = runner(m["infer"]["file"], m["infer"]["signature"], 1)
        for blk, run_ in (("train_step", self._train), ("infer", self._infer)):
            check_io(f"{m['files'][m[blk]['file']]['path']} (signature "
                     f"{m[blk]['signature']!r})", f"{blk}.inputs", m[blk]["inputs"],
                     list(run_.get_input_details()))
        fz = m["train_step"].get("fused")
        if fz:  # the K-step graph: same feeds, K batches stacked (edgerun.adapt.fused_groups)
            self._train_k = runner(fz["file"], fz["signature"], 1)
            self._check_fused(m, fz)
            self.fused, self.fused_steps = fz, int(fz["steps"])
        self._in = m["input"]["name"]
        self._out = m["features"]["name"]
        bb = f"{m['files']['backbone']['path']} (signature {m['input'].get('signature')!r})"
        self._dim, self._bb_file = int(m["features"]["dim"]), f"ai-edge-litert {self.version}: {bb}"
        check_io(bb, "input.name", [self._in], list(self._bb.get_input_details()))
        check_io(bb, "features.name", [self._out], list(self._bb.get_output_details()),
                 "outputs")
        q = m.get("quantization") or {}
        self._qin, self._qout = q.get("input"), q.get("output")
        self._bb_batch = int(m["input"].get("batch_size") or 1)
        self._in_dtype = np.dtype(m["input"].get("dtype") or "float32")
        # an int8 graph needs the manifest's quantisation of its input and output: without
        # it the runner would feed floats (or read int8 as features) and fail in the runtime
        for where, want, det in (
                ("quantization.input (else input.dtype)",
                 (self._qin or {}).get("dtype", self._in_dtype.name),
                 self._bb.get_input_details()[self._in]),
                ("quantization.output (else float32)",
                 (self._qout or {}).get("dtype", "float32"),
                 self._bb.get_output_details()[self._out])):
            if np.dtype(det["dtype"]).name != want:
                raise RunnerError(f"manifest.json: {where} says {want}, but {bb} has "
                                  f"{np.dtype(det['dtype']).name}; the bundle is damaged: "
                                  "re-export it")
        self._infer_batch = m["infer"].get("batch_size")
        self._infer_x = m["infer"]["inputs"][0]

    def _check_fused(self, m: dict, fz: dict) -> None:
        """The fused graph's names and its fixed (steps, batch) shape against the manifest."""
        where = f"{m['files'][fz['file']]['path']} (signature {fz['signature']!r})"
        ins = self._train_k.get_input_details()
        check_io(where, "train_step.fused.inputs", fz["inputs"], list(ins))
        check_io(where, "train_step.fused.outputs", fz["outputs"],
                 list(self._train_k.get_output_details()), "outputs")
        want = [fz["steps"], fz["batch_size"] or m["train_step"].get("batch_size")]
        have = [int(d) for d in ins[m["train_step"]["inputs"][0]]["shape"][:2]]
        if None in want or have != want:
            raise RunnerError(f"manifest.json: train_step.fused.steps and .batch_size {want} "
                              f"must be the fixed (steps, batch) of {where}'s features, which "
                              f"are {have}: the bundle is damaged, re-export it")

    def train_steps(self, feeds: dict) -> dict:
        """``fused_steps`` optimizer steps in one call (full batches stacked); outputs by name.

        Hyper-parameters go in shaped as for :meth:`train_step`.
        """
        return self._train_k(**{k: v.reshape(1) if np.ndim(v) == 0 else v
                                for k, v in feeds.items()})

    def features(self, x: np.ndarray) -> np.ndarray:
        """Backbone features of preprocessed windows, in the graph's fixed batch."""
        if self._by_len:
            return self._text_features(x)
        b, out = self._bb_batch, []
        for i in range(0, len(x), b):
            check_deadline(self)
            chunk = (_quantize(x[i : i + b], self._qin) if self._qin
                     else np.ascontiguousarray(x[i : i + b], self._in_dtype))
            y = self._bb(**{self._in: _pad(chunk, b)})[self._out]
            out.append(_dequantize(y, self._qout)[: min(b, len(x) - i)])
        return _features_shape(np.concatenate(out, axis=0), len(x), self._dim, self._bb_file)

    def _text_features(self, x: np.ndarray) -> np.ndarray:
        """(N, 2, L) ids + mask, one text per call through its shortest length signature."""
        out = []
        for i in range(len(x)):
            check_deadline(self)
            n = int(x[i, 1].sum())
            length, run = next((L, r) for L, r in self._by_len if L >= n)
            out.append(run(**{self._in: np.ascontiguousarray(x[i : i + 1, :, :length],
                                                              self._in_dtype)})[self._out])
        return np.concatenate(out, axis=0)

    def train_step(self, feeds: dict) -> dict:
        """One optimizer step (the caller pads to the manifest's batch with weight 0).

        0-d inputs (lr, momentum, weight decay) go in as shape (1,): LiteRT's signature runner
        resizes every input on every call, and resizing one to 0-d segfaults ai-edge-litert
        2.3.0 on Linux aarch64 (found by `make test-pi`). Bundles since ``hparam_shape``
        declare (1,) in the graph (nothing is resized; LiteRT.js, which wants the graph's
        exact shape, takes them too); older ones declare 0-d, where (1,) broadcasts the same:
        outputs are bit-identical on x86_64.
        """
        return self._train(**{k: v.reshape(1) if np.ndim(v) == 0 else v
                               for k, v in feeds.items()})

    def infer(self, feeds: dict) -> dict:
        """Head logits and embedding of any number of rows."""
        x = feeds[self._infer_x]
        b = int(self._infer_batch or len(x))
        outs = []
        for i in range(0, len(x), b):
            res = self._infer(**{**feeds, self._infer_x: _pad(x[i : i + b], b)})
            outs.append({k: v[: min(b, len(x) - i)] for k, v in res.items()})
        return {k: np.concatenate([o[k] for o in outs], axis=0) for k in outs[0]}


def _features_shape(f: np.ndarray, n: int, dim: int, what: str) -> np.ndarray:
    """``f`` if it is ``(n, dim)`` features, else refused.

    A damaged backbone can load, run and return another shape, which numpy would broadcast
    into nonsense or fail on later.
    """
    if f.shape != (n, dim):
        raise RunnerError(f"{what} returned features of shape {f.shape}, expected ({n}, "
                          f"{dim}) (manifest features.dim); the model file is damaged: "
                          "re-download the bundle")
    return f


def _one_line(e: BaseException, limit: int = 300) -> str:
    """A runtime's (often multi-line) message as one line: the error stays one line."""
    return " ".join(str(e).split())[:limit]


class _Guarded:
    """A LiteRT signature runner whose runtime failures are one :class:`RunnerError`.

    A model that loads can still fail when the interpreter prepares or invokes it (a
    damaged quantisation scale that matches its sha256: "unsupported scale value (-nan) …
    failed to prepare"), or when its tensor details are read (a damaged tensor name or index:
    UnicodeDecodeError, TypeError). The names fed are checked against the graph at load
    (:func:`check_io`), so an error here is the model's or the runtime's, and is named so.
    """

    def __init__(self, run, what: str):
        self._run, self._what = run, what

    def get_input_details(self) -> dict:
        return self._guard(self._run.get_input_details)

    def get_output_details(self) -> dict:
        return self._guard(self._run.get_output_details)

    def __call__(self, **feeds):
        return self._guard(self._run, **feeds)

    def _guard(self, fn, **kw):
        try:
            return fn(**kw)
        # the runtime's own failures on a damaged model: RuntimeError (prepare, invoke),
        # ValueError/UnicodeDecodeError (a damaged tensor name), TypeError/OverflowError (a
        # tensor index beyond int32 handed to the C++ wrapper)
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            raise RunnerError(f"{self._what} failed to run ({_one_line(e)}); the model file "
                              "is damaged or this runtime build cannot run it: re-download "
                              "the bundle") from None


class _OrtGuarded:
    """An onnxruntime session whose run-time failures are one :class:`RunnerError`.

    A damaged graph (matching its sha256) can load and still fail in ``run`` (a "Fail" or
    "InvalidArgument" from a kernel). onnxruntime's own exception types derive from
    ``Exception`` directly, so they are collected from its pybind module by kind.
    """

    def __init__(self, sess, what: str):
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        self._sess, self._what = sess, what
        self._errors = (RuntimeError, ValueError, *(
            v for v in vars(state).values()
            if isinstance(v, type) and issubclass(v, Exception)))

    def get_inputs(self):
        return self._sess.get_inputs()

    def get_outputs(self):
        return self._sess.get_outputs()

    def run(self, names, feeds: dict, run_options=None):
        try:
            return self._sess.run(names, feeds, run_options)
        except self._errors as e:
            if run_options is not None and run_options.terminate:
                raise  # cancelled by the time budget: the caller reports that
            raise RunnerError(f"{self._what} failed to run ({_one_line(e)}); the model file "
                              "is damaged or this runtime build cannot run it: re-download "
                              "the bundle") from None


def _ort_training_api():
    """``onnxruntime.training.api`` without importing torch.

    The package's ``__init__`` imports its torch-based optim module; registering the package
    without running it loads only the C++-backed api (CheckpointState, Module, Optimizer).
    """
    import importlib.util
    import os
    import sys
    import types

    hint = ("this bundle trains with ONNX Runtime's training API: pip install "
            "onnxruntime-training-cpu==1.19.2 (x86_64, deprecated upstream; not together with "
            "onnxruntime), or run with --trainer stateless (any onnxruntime)")
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None:
        raise RunnerError(hint)
    tdir = os.path.join(os.path.dirname(spec.origin), "training")
    if not os.path.isdir(os.path.join(tdir, "api")):
        raise RunnerError(hint)
    if "onnxruntime.training" not in sys.modules:
        pkg = types.ModuleType("onnxruntime.training")
        pkg.__path__ = [tdir]
        sys.modules["onnxruntime.training"] = pkg
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    try:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer
    except ImportError as e:
        raise RunnerError(f"{hint} ({e})") from None
    return CheckpointState, Module, Optimizer


class OrtTrainingStep:
    """ONNX Runtime training (``onnxruntime.training.api``) behind the stateless contract.

    Called with the same feeds as the head's train-step graph and returning the same outputs,
    so the adaptation loop does not change. The head's parameters are written into the
    training checkpoint state each step; ORT computes loss and gradients. With momentum and
    weight decay 0 ORT's own SGD optimizer steps; otherwise (ORT's SGD has a learning rate
    only) torch-semantics SGD is applied to ORT's gradients in numpy.
    """

    def __init__(self, bundle):
        CheckpointState, Module, Optimizer = _ort_training_api()
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # shape-merge warnings of the optimizer graph
        self.version = f"onnxruntime-training {ort.__version__}"
        m = bundle.manifest
        ts = m["train_step"]
        ot = ts["ort_training"]
        if m["optimizer"]["name"] != "sgd":
            raise RunnerError(f"ort-training supports sgd heads, this one uses "
                              f"{m['optimizer']['name']}; use --trainer stateless")
        self.state = CheckpointState.load_checkpoint(bundle.path(ot["checkpoint"]))
        # (the checkpoint state must be given its values only after the Module exists)
        self.module = Module(bundle.path(ot["training_model"]), self.state,
                             bundle.path(ot["eval_model"]), device="cpu")
        self.opt = Optimizer(bundle.path(ot["optimizer_model"]), self.module)
        self.names = [p["name"] for p in m["head"]["params"]]
        self.inputs = list(ot["inputs"])
        self.loss_name = ts["loss_output"]

    def __call__(self, feeds: dict) -> dict:
        lr, mom, wd = (float(feeds[k]) for k in ("lr", "momentum", "weight_decay"))
        for n in self.names:
            self.state.parameters[n] = np.ascontiguousarray(feeds[n], np.float32)
        self.module.train()
        loss = np.float32(self.module(*(np.ascontiguousarray(feeds[k]) for k in self.inputs)))
        out = {self.loss_name: loss}
        if mom == 0.0 and wd == 0.0:
            self.opt.set_learning_rate(lr)
            self.opt.step()
            for n in self.names:
                out["new." + n] = self.state.parameters[n].data.copy()
                out["new.momentum." + n] = np.asarray(feeds["momentum." + n], np.float32)
        else:
            for n in self.names:
                p = np.asarray(feeds[n], np.float32)
                g = self.state.parameters[n].grad + np.float32(wd) * p
                buf = np.float32(mom) * np.asarray(feeds["momentum." + n], np.float32) + g
                out["new.momentum." + n] = buf
                out["new." + n] = p - np.float32(lr) * buf
        self.module.lazy_reset_grad()  # ORT accumulates gradients across calls otherwise
        return out
