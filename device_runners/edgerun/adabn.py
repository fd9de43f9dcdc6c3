"""AdaBN on the device: re-estimate the backbone's BatchNorm statistics from unlabelled windows.

``run.py recalibrate BUNDLE --data unlabelled.npz --out STATE`` runs the bundle's AdaBN
*stats* graph over the windows in consecutive chunks of ``adabn.batch_size`` and writes
``STATE/bn_stats.npz`` (atomically): per BN layer the running mean and variance torch would
hold after the same pass (``adabn.reference`` in the manifest: the mean over chunks of each
chunk's batch mean and *unbiased* variance). ``adapt --out STATE`` and ``infer --bn-stats``
then compute features with the bundle's AdaBN *features* graph fed those statistics.

A statistics file is keyed to the backbone's sha256: one written for another backbone is
refused (``infer``) or ignored with a warning (``adapt``, e.g. after ``update`` brought a new
backbone). Non-finite values, negative variances and wrong shapes are refused.

numpy + standard library + the bundle's runtime only (this file runs on the device).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from edgerun import RunnerError, atomic_write

STATS_FILE = "bn_stats.npz"
STATS_FORMAT = "edgerun.bn_stats/1"
#: A statistics file holds a few vectors per BN layer; anything larger is not one.
MAX_STATS_MB = 64.0


def block_of(m: dict) -> dict:
    """The manifest's ``adabn`` block if this bundle can recalibrate, else one clear error."""
    b = m.get("adabn")
    if b is None:
        raise RunnerError("this bundle has no AdaBN graphs (exported by an edgetl without "
                          "AdaBN support); re-export it to recalibrate on the device")
    if b.get("unsupported"):
        raise RunnerError(f"this bundle cannot recalibrate its BatchNorm statistics: "
                          f"{b['unsupported']}")
    if "stats" not in b or "features" not in b:
        raise RunnerError("manifest.json: adabn lacks its stats/features graphs; the bundle is "
                          "damaged: re-export it")
    return b


def _names(b: dict) -> list[str]:
    return list(b["stats"]["outputs"])


class Graphs:
    """The AdaBN stats and features graphs of a bundle, in its runtime."""

    def __init__(self, bundle, threads: int = 0):
        m = bundle.manifest
        self.block = block_of(m)
        self.target = m["target"]
        self.names = _names(self.block)
        if len(self.names) != 2 * len(self.block["layers"]):
            raise RunnerError("manifest.json: adabn.stats outputs do not match adabn.layers; "
                              "re-export the bundle")
        self._stats = _open(bundle, self.block["stats"], threads)
        self._features = _open(bundle, self.block["features"], threads)
        self._feat_out = self.block["features"]["outputs"][0]

    def batch_stats(self, x: np.ndarray) -> list[np.ndarray]:
        """Per-layer batch mean and biased variance of one chunk (``names`` order)."""
        b = self.block["stats"]["batch_size"]
        n = len(x)
        mask = np.ones(n, np.float32)
        if b is not None:  # fixed-batch runtime: pad, and mask the padding out of every stat
            if n > b:
                raise RunnerError(f"internal: chunk of {n} windows for a {b}-row stats graph")
            x = np.concatenate([x, np.zeros((b - n,) + x.shape[1:], x.dtype)])
            mask = np.concatenate([mask, np.zeros(b - n, np.float32)])
        out = self._stats({"x": np.ascontiguousarray(x, np.float32), "mask": mask})
        return [np.asarray(out[k], np.float64) for k in self.names]

    def features(self, x: np.ndarray, stats: dict) -> np.ndarray:
        """Backbone features of preprocessed windows with the BN statistics ``stats``."""
        b = self.block["features"]["batch_size"] or 256
        feeds = {k: np.ascontiguousarray(stats[k], np.float32) for k in self.names}
        out = [self._features({"x": np.ascontiguousarray(x[i : i + b], np.float32), **feeds})
               [self._feat_out] for i in range(0, len(x), b)]
        return np.concatenate(out, axis=0)


def _names_match(m: dict, g: dict, inputs: list, outputs: list) -> None:
    """The names the manifest declares for an AdaBN graph are the graph's own."""
    from edgerun.backends import check_io

    path = m["files"][g["file"]]["path"]
    check_io(path, "adabn graph inputs", g["inputs"], inputs)
    check_io(path, "adabn graph outputs", g["outputs"], outputs, "outputs")


def _open(bundle, g: dict, threads: int):
    """A callable ``feeds -> {output: array}`` for one graph block, in the bundle's runtime."""
    m = bundle.manifest
    path = bundle.path(g["file"])
    if m["target"] == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed; on the device run: "
                              "pip install numpy onnxruntime") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - runtime errors vary by build
            raise RunnerError(f"onnxruntime cannot load {m['files'][g['file']]['path']}: "
                              f"{e}") from None
        outs = [o.name for o in sess.get_outputs()]
        _names_match(m, g, [i.name for i in sess.get_inputs()], outs)
        return lambda feeds: dict(zip(outs, sess.run(None, feeds)))
    if m["target"] == "tflite":
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RunnerError("ai-edge-litert is not installed; on the device run: "
                              "pip install numpy ai-edge-litert") from None
        try:
            run = Interpreter(model_path=path, num_threads=threads or None).get_signature_runner(
                g["signature"])
        except Exception as e:  # noqa: BLE001
            raise RunnerError(f"ai-edge-litert cannot load {m['files'][g['file']]['path']} "
                              f"(signature {g['signature']!r}): {e}") from None
        _names_match(m, g, list(run.get_input_details()), list(run.get_output_details()))
        return lambda feeds: run(**feeds)
    raise RunnerError(f"AdaBN: bundle target {m['target']!r} is not supported by this runner")


def chunks(n: int, batch: int, per_window: list) -> list[tuple[int, int]]:
    """``(start, stop)`` of the consecutive chunks of ``batch`` windows torch's pass uses.

    torch refuses a training-mode BN over a single value per channel; where a layer sees one
    value per window (after pooling), a trailing chunk of one window is dropped instead.
    """
    out = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    if len(out) > 1 and out[-1][1] - out[-1][0] == 1 and min(per_window or [2]) == 1:
        out.pop()
    return out


def running_stats(graphs: Graphs, xp: np.ndarray) -> tuple[dict, int]:
    """The cumulative-average BN statistics torch computes for preprocessed windows ``xp``.

    Returns ``({mean_i / var_i: float32 (channels,)}, chunks used)``. Per chunk of ``n`` rows
    a layer sees ``n * per_window`` values per channel; its unbiased variance is the biased
    one times ``k / (k - 1)``; every chunk weighs the same (``momentum=None``).
    """
    b = graphs.block
    per = [int(layer.get("per_window", 1)) for layer in b["layers"]]
    if len(xp) < 2:
        raise RunnerError(f"recalibration needs at least 2 windows, got {len(xp)}")
    parts = chunks(len(xp), int(b["batch_size"]), per)
    acc = [np.zeros(layer["channels"], np.float64) for layer in b["layers"] for _ in (0, 1)]
    for lo, hi in parts:
        stats = graphs.batch_stats(xp[lo:hi])
        for i, k in enumerate(per):
            cnt = (hi - lo) * k
            if cnt < 2:
                raise RunnerError(f"BatchNorm layer {b['layers'][i]['name']} sees one value "
                                  "per channel in a chunk; give at least 2 windows")
            acc[2 * i] += stats[2 * i]
            acc[2 * i + 1] += stats[2 * i + 1] * cnt / (cnt - 1)
    out = {k: (a / len(parts)).astype(np.float32) for k, a in zip(graphs.names, acc)}
    check_stats(out, b, "the recalibrated statistics")
    return out, len(parts)


def check_stats(stats: dict, block: dict, where: str) -> None:
    """Refuse missing layers, wrong shapes, non-finite values and negative variances."""
    for i, layer in enumerate(block["layers"]):
        for k in (f"mean_{i}", f"var_{i}"):
            if k not in stats:
                raise RunnerError(f"{where}: no {k!r} (BatchNorm layer {layer['name']}); "
                                  "recalibrate again")
            v = np.asarray(stats[k])
            if v.shape != (int(layer["channels"]),) or v.dtype.kind != "f":
                raise RunnerError(f"{where}: {k} has {v.dtype} shape {v.shape}, BatchNorm layer "
                                  f"{layer['name']} needs float ({layer['channels']},); "
                                  "recalibrate again")
            if not np.isfinite(v).all():
                raise RunnerError(f"{where}: {k} (BatchNorm layer {layer['name']}) holds NaN or "
                                  "inf; refusing it (recalibrate on finite windows)")
            if k.startswith("var_") and (v < 0).any():
                raise RunnerError(f"{where}: {k} (BatchNorm layer {layer['name']}) has a "
                                  "negative variance; refusing it")


def _backbone_sha(m: dict) -> str:
    return m["files"]["backbone"]["sha256"]


def save_stats(path: str, stats: dict, meta: dict) -> None:
    """Write ``bn_stats.npz`` atomically: the arrays and ``__meta__`` (format, backbone key)."""
    body = json.dumps({"format": STATS_FORMAT, **meta})
    atomic_write(path, lambda f: np.savez(f, __meta__=np.array(body), **stats),
                 prefix=".bn_stats.", suffix=".npz")


def load_stats(path: str, m: dict) -> tuple[dict, dict]:
    """``(stats, meta)`` of a ``bn_stats.npz`` for this bundle, checked; else one error."""
    from edgerun.files import read_npz

    block = block_of(m)
    arrays = read_npz(path, "BN statistics", int(MAX_STATS_MB * 2**20),
                      hint="write it with `run.py recalibrate`")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
        ok = isinstance(meta, dict) and meta.get("format") == STATS_FORMAT
    except (KeyError, ValueError):
        ok = False
    if not ok:
        raise RunnerError(f"{path} is not a BN statistics file of this runner (no "
                          f"{STATS_FORMAT} header); write it with `run.py recalibrate`")
    if meta.get("backbone_sha256") != _backbone_sha(m):
        raise RunnerError(f"{path} holds statistics of another backbone (sha256 "
                          f"{str(meta.get('backbone_sha256'))[:12]}…, this bundle's is "
                          f"{_backbone_sha(m)[:12]}…); run `run.py recalibrate` with this bundle")
    check_stats(arrays, block, path)
    return {k: arrays[k] for k in _names(block)}, meta


def stats_digest(stats: dict) -> str:
    """sha256 of the statistics' bytes (the feature cache key)."""
    h = hashlib.sha256()
    for k in sorted(stats):
        h.update(k.encode())
        h.update(np.ascontiguousarray(stats[k], np.float32).tobytes())
    return h.hexdigest()


class Recalibrated:
    """A runner backend whose ``features`` use recalibrated BN statistics; all else delegated.

    ``features_key`` joins the feature cache key (``edgerun.adapt.cached_features``), so
    features computed with other statistics are never reused.
    """

    def __init__(self, backend, graphs: Graphs, stats: dict, source: str):
        self._backend, self._graphs, self._stats = backend, graphs, stats
        self.features_key = stats_digest(stats)
        self.bn_stats = source

    def features(self, x: np.ndarray) -> np.ndarray:
        """Features of preprocessed windows with the recalibrated statistics."""
        return self._graphs.features(x, self._stats)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def with_stats(backend, bundle, path: str, threads: int = 0) -> Recalibrated:
    """``backend`` computing features with the statistics in ``path`` (checked)."""
    stats, _ = load_stats(path, bundle.manifest)
    return Recalibrated(backend, Graphs(bundle, threads), stats, path)


def for_state(backend, bundle, state_dir: str, threads: int = 0):
    """``(backend, warning)``: recalibrated if ``state_dir`` holds statistics for this backbone.

    No ``bn_stats.npz``: the backend unchanged. Statistics of another backbone (a new bundle
    version since): unchanged, with a warning to recalibrate. A damaged file: an error.
    """
    path = os.path.join(state_dir, STATS_FILE)
    if not os.path.isfile(path):
        return backend, None
    m = bundle.manifest
    from edgerun.files import read_npz

    try:
        meta = json.loads(str(read_npz(path, "BN statistics", int(MAX_STATS_MB * 2**20))
                              ["__meta__"]))
    except (KeyError, ValueError):
        meta = {}
    if isinstance(meta, dict) and meta.get("format") == STATS_FORMAT and meta.get(
            "backbone_sha256") != _backbone_sha(m):
        return backend, (f"{path} holds BN statistics of another backbone; features use the "
                         "bundle's own: run `run.py recalibrate` again")
    return with_stats(backend, bundle, path, threads), None


def recalibrate(bundle_dir: str, data_path: str, out_dir: str, *, threads: int = 0,
                trust_key: str | None = None, max_data_mb: float | None = None,
                quiet: bool = False) -> dict:
    """Recalibrate on ``data_path`` (labels ignored) into ``out_dir/bn_stats.npz``; the report.

    Holds the state folder's lock; on any error nothing in ``out_dir`` is replaced.
    """
    from edgerun import data as dataio
    from edgerun.adapt import data_digest, write_json
    from edgerun.bundle import Bundle
    from edgerun.files import state_lock

    t0 = time.perf_counter()
    bundle = Bundle(bundle_dir, trust_key=trust_key)
    m = bundle.manifest
    graphs = Graphs(bundle, threads)
    kw = {} if max_data_mb is None else {"max_mb": max_data_mb}
    ds = dataio.load(data_path, m, need_labels=False, bundle=bundle, **kw)
    stats, n_chunks = running_stats(graphs, dataio.preprocess(ds.x, m))
    shipped = shipped_stats(bundle)
    shift = {layer["name"]: float(np.abs(stats[f"mean_{i}"] - shipped[f"mean_{i}"]).mean()
                                  / np.sqrt(shipped[f"var_{i}"] + 1e-5).mean())
             for i, layer in enumerate(graphs.block["layers"])} if shipped else {}
    meta = {"backbone_sha256": _backbone_sha(m), "bundle": m["name"],
            "bundle_version": m.get("version"), "data_sha256": data_digest(data_path),
            "n_windows": int(len(ds.x)), "chunks": n_chunks,
            "batch_size": int(graphs.block["batch_size"])}
    report = {**meta, "stats": os.path.join(out_dir, STATS_FILE), "target": m["target"],
              "layers": len(graphs.block["layers"]), "mean_shift_in_std": shift,
              "seconds": time.perf_counter() - t0}
    with state_lock(out_dir):
        save_stats(os.path.join(out_dir, STATS_FILE), stats, meta)
        write_json(os.path.join(out_dir, "recalibrate.json"), report)
    if not quiet:
        import sys

        print(f"recalibrated {len(graphs.block['layers'])} BatchNorm layer(s) on "
              f"{len(ds.x)} windows in {report['seconds'] * 1000:.0f} ms -> "
              f"{report['stats']}", file=sys.stderr)
    return report


def shipped_stats(bundle) -> dict:
    """The BN statistics the bundle shipped with (test vectors ``adabn.shipped.*``), or {}."""
    tv = bundle.manifest["test_vectors"]
    with np.load(bundle.path(tv["file"]), allow_pickle=False) as z:
        return {k.split(".", 2)[2]: z[k] for k in z.files if k.startswith("adabn.shipped.")}


def selftest(bundle, threads: int = 0) -> float | None:
    """The AdaBN graphs against the shipped reference; the max error, ``None`` if none.

    The reference: torch's statistics of the test windows, and the features with them.
    """
    b = bundle.manifest.get("adabn")
    if not b or b.get("unsupported"):
        return None
    tv = bundle.manifest["test_vectors"]
    with np.load(bundle.path(tv["file"]), allow_pickle=False) as z:
        want = {k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("adabn.")
                and not k.startswith("adabn.shipped.")}
    if "features" not in want or "xn" not in want:
        raise RunnerError("the bundle's test vectors have no AdaBN reference; re-export it")
    graphs = Graphs(bundle, threads)
    xp = want["xn"]  # stored as model input: no preprocessing to disagree on
    got, _ = running_stats(graphs, xp)
    err_s = max(float(np.abs(got[k] - want[k]).max()) for k in graphs.names)
    err_f = float(np.abs(graphs.features(xp, got) - want["features"]).max())
    if not err_s <= float(b["atol"]) or not err_f <= float(b["features_atol"]):
        raise RunnerError(f"self-test failed: this runtime's AdaBN statistics (max err "
                          f"{err_s:.3g}, tolerance {b['atol']}) or features with them ({err_f:.3g},"
                          f" tolerance {b['features_atol']}) differ from torch's reference; "
                          "the runtime build or the bundle is broken")
    return max(err_s, err_f)
