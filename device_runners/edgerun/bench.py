"""``run.py bench``: what a bundle's backbone costs on this device, in the runner's own process.

Batch-1 latency (the streaming case: one window or one camera frame at a time) and
throughput at a larger batch (a backlog of buffered windows). Both time
``backend.features``, so int8 quantise/dequantise and fixed-batch padding are included, as a
device pays them. Runtimes whose graph has a fixed batch (LiteRT backbones are exported at
batch 1) run a batch as that many calls; the result says how the batch was run.
"""

from __future__ import annotations

import os
import time

import numpy as np

from edgerun import RunnerError
from edgerun import data as dataio
from edgerun.adapt import peak_rss_mb, test_vectors
from edgerun.backends import make_backend
from edgerun.bundle import Bundle


def _timed(fn, repeats: int, warmup: int) -> np.ndarray:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t
    return times


def bench(bundle_dir: str, *, repeats: int = 300, warmup: int = 30, threads: int = 0,
          batch: int = 32, trust_key: str | None = None) -> dict:
    """Backbone latency at batch 1, throughput at ``batch``, the bundle's size on disk.

    Inputs are the bundle's reference windows (tiled up to ``batch``), preprocessed as the
    manifest says. Latency: ``repeats`` calls after ``warmup``; throughput: enough batch calls
    for about the same number of windows (at least 5).
    """
    if repeats < 10 or batch < 1:
        raise RunnerError(f"need --repeats >= 10 (for percentiles) and --batch >= 1; got "
                          f"{repeats}, {batch}")
    bundle = Bundle(bundle_dir, trust_key=trust_key)
    m = bundle.manifest
    t0 = time.perf_counter()
    backend = make_backend(bundle, threads)
    load_seconds = time.perf_counter() - t0
    x = dataio.preprocess(test_vectors(bundle)["x"], m)
    x1 = np.ascontiguousarray(x[:1])
    xb = np.ascontiguousarray(np.resize(x, (batch,) + x.shape[1:]))

    lat = _timed(lambda: backend.features(x1), repeats, warmup) * 1000
    n_batches = max(5, repeats // batch)
    tb = _timed(lambda: backend.features(xb), n_batches, max(2, warmup // batch))
    graph_batch = m["input"].get("batch_size")
    mode = (f"{-(-batch // int(graph_batch))} calls of the batch-{graph_batch} graph"
            if graph_batch else f"one call of batch {batch}")
    sizes = {role: int(e["bytes"]) if "bytes" in e else os.path.getsize(bundle.path(role))
             for role, e in m["files"].items()}
    return {"bundle": os.path.abspath(bundle_dir), "target": m["target"],
            "precision": m["precision"], "backend": backend.name,
            "backend_version": backend.version, "threads": threads, "repeats": repeats,
            "backbone_ms_p50": float(np.percentile(lat, 50)),
            "backbone_ms_p95": float(np.percentile(lat, 95)),
            "backbone_ms_mean": float(lat.mean()),
            "batch": batch, "batch_calls": n_batches,
            "batch_ms_p50": float(np.median(tb) * 1000),
            "throughput_per_s": float(batch / np.median(tb)),
            "batch_mode": mode,
            "load_seconds": load_seconds,
            "bundle_bytes": sum(sizes.values()) + os.path.getsize(
                os.path.join(bundle_dir, "manifest.json")),
            "backbone_bytes": sizes["backbone"], "peak_rss_mb": peak_rss_mb()}
