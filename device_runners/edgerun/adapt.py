"""Adapt the head on local data, run inference, and self-test a bundle against its vectors.

Adaptation: backbone features once -> head epochs over the cached features (the epoch of lowest
validation loss kept, early stopping) -> the mix of shipped and adapted head of lowest validation
loss (WiSE-FT) -> the gate (:mod:`edgerun.gate`) keeps it only on evidence that it is better than
the current head; the local data never leaves the device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from edgerun import RunnerError, __version__, adabn, atomic_write
from edgerun import data as dataio
from edgerun import gate as gating
from edgerun import replay as replaying
from edgerun.backends import make_backend
from edgerun.bundle import Bundle, sha256_file
from edgerun.commit import Commit
from edgerun.head import Head, backbone_of, check_finite


def _proc_status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = _proc_status_mb("VmHWM")  # resets at exec; ru_maxrss would include a parent's peak
    if peak is not None:
        return peak
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def rss_mb() -> float:
    """Current resident memory of this process, in MiB (Linux; 0 where unknown)."""
    return _proc_status_mb("VmRSS") or 0.0


def write_json(path: str, obj: dict) -> None:
    """Atomic JSON write."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False, suffix=".json")


def anchors_of(m: dict, params: dict) -> dict:
    """The ``anchor.<param>`` feeds of an L2-SP train step: copies of ``params`` (or none)."""
    return {a: params[p].copy() for a, p in m["train_step"].get("anchor_inputs", {}).items()}


def class_balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-window weights ``n / (K * n_c)``: every label present weighs the same in total.

    Shape:
        y: (N,) class ids -> (N,) float32 weights with mean 1.
    """
    classes, counts = np.unique(y, return_counts=True)
    per = dict(zip(classes.tolist(), (len(y) / (len(classes) * counts)).tolist()))
    return np.asarray([per[c] for c in y.tolist()], np.float32)


def training_pool(feats, y, tr, *, class_balanced: bool, replay=None,
                  replay_weight: float = 0.0) -> tuple:
    """What the epochs draw batches from: ``(features, labels, weights, indices)``.

    The local training windows ``tr`` (per-window sample weights: class-balanced over ``tr``
    or 1), and with ``replay`` (the bundle's replay set) its windows too, weighing
    ``replay_weight`` in total relative to the local ones (:func:`edgerun.replay.weights`).
    """
    sw = np.ones(len(y), np.float32)
    if class_balanced:
        sw[tr] = class_balanced_weights(y[tr])
    if replay is None:
        return feats, y, sw, tr
    f_r, y_r = replay
    w_r = replaying.weights(sw[tr], len(y_r), replay_weight)
    return (np.concatenate([feats, f_r]), np.concatenate([y, y_r]), np.concatenate([sw, w_r]),
            np.concatenate([tr, len(y) + np.arange(len(y_r))]))


def _zero_state(m: dict, params: dict) -> dict:
    state = {}
    for s in m["optimizer"]["state"]:
        like = s["like"]
        state[s["name"]] = (np.zeros(s["shape"], np.float32) if like is None
                            else np.zeros_like(params[like]))
    return state


def _feeds(ts: dict, hp: dict, f, t, w, params: dict, state: dict,
           anchors: dict | None) -> dict:
    feeds = {ts["inputs"][0]: f, ts["targets_input"]: t, ts["sample_weight_input"]: w}
    # no copy when ``hp`` already holds float32 arrays (:class:`_Trainer` makes them once)
    feeds.update({k: np.asarray(hp[k], np.float32) for k in ts["hparam_inputs"]})
    feeds.update(params)
    feeds.update(state)
    feeds.update(anchors or {})
    return feeds


def _carry(out: dict, params: dict, state: dict) -> None:
    for k in params:
        params[k] = out["new." + k]
    for k in state:
        state[k] = out["new." + k]


def _step(backend, ts: dict, hp: dict, f, t, w, params: dict, state: dict,
          anchors: dict | None = None) -> float:
    """One train step through the backend; updates ``params`` and ``state`` in place.

    ``anchors``: the ``anchor.<param>`` inputs of an L2-SP train step (held fixed).
    """
    out = backend.train_step(_feeds(ts, hp, f, t, w, params, state, anchors))
    _carry(out, params, state)
    return float(out[ts["loss_output"]])


def _steps(backend, ts: dict, hp: dict, f, t, w, params: dict, state: dict,
           anchors: dict | None = None) -> list[float]:
    """``len(f)`` train steps in one call of the fused graph (``train_step.fused``).

    ``f``, ``t``, ``w``: the batches stacked, (K, N, D), (K, N, C), (K, N). Updates
    ``params`` and ``state`` in place; returns the K losses.
    """
    out = backend.train_steps(_feeds(ts, hp, f, t, w, params, state, anchors))
    _carry(out, params, state)
    return [float(v) for v in np.reshape(out[ts["fused"]["loss_output"]], -1)]


class _Trainer:
    """Epochs of train steps over cached features, with one bundle's step and settings.

    ``fixed``: the runtime takes exactly ``bs`` windows per step (a partial batch is padded,
    weight 0); ``fuse``: batches go through the fused K-step graph, and whole epochs through
    the whole-run graph (:meth:`epochs`), where the bundle has them.
    """

    def __init__(self, backend, ts: dict, hp: dict, anchors: dict, *, n_cls: int, bs: int,
                 fixed: bool, fuse: bool):
        self.backend, self.ts, self.hp, self.anchors = backend, ts, hp, anchors
        self.hp_feeds = {k: np.asarray(hp[k], np.float32) for k in ts["hparam_inputs"]}
        self.eye = np.eye(n_cls, dtype=np.float32)
        self.n_cls, self.bs, self.fixed, self.fuse = n_cls, bs, fixed, fuse

    def epoch(self, order, pool_f, pool_y, pool_w, params: dict, state: dict, epoch: int,
              after_step=None) -> tuple[float, int, int, int, str | None]:
        """One epoch over ``order`` (indices into the pool); updates ``params``/``state``.

        ``after_step(epoch)`` runs after every one-step call and may stop the epoch by
        returning a reason. Returns ``(loss sum, windows, steps, fused steps, stopped)``.
        """
        backend, ts, hp, anchors, eye, bs = (self.backend, self.ts, self.hp_feeds,
                                             self.anchors, self.eye, self.bs)
        total, count, steps, fused, done = 0.0, 0, 0, 0, 0
        groups = fused_groups(backend, len(order), bs) if self.fuse else []
        if groups:  # the fused steps' batches gathered once, the last one padded (weight 0)
            n, rows = len(order), sum(groups) * bs
            sel = order[:rows] if rows <= n else np.resize(order, rows)  # any pool rows, then
            f, t, w = pool_f[sel], eye[pool_y[sel]], pool_w[sel]
            if rows > n:  # zeroed: rows of weight 0 add nothing to the loss or the gradients
                f[n:], t[n:], w[n:] = 0.0, 0.0, 0.0
            f, t, w = (f.reshape(-1, bs, f.shape[1]), t.reshape(-1, bs, t.shape[1]),
                       w.reshape(-1, bs))
        for g in groups:
            for loss in _steps(backend, ts, hp, f[fused : fused + g], t[fused : fused + g],
                               w[fused : fused + g], params, state, anchors):
                _check_loss(loss, epoch, self.hp)
                n = min(bs, len(order) - done)
                total += loss * n
                count += n
                steps += 1
                done += n
            fused += g
        for i in range(done, len(order), bs):
            b = order[i : i + bs]
            n = len(b)
            f, t, w = pool_f[b], eye[pool_y[b]], pool_w[b]
            if self.fixed and n < bs:  # pad to the runtime's fixed batch; weight 0 masks it
                pad = bs - n
                f = np.concatenate([f, np.zeros((pad, f.shape[1]), np.float32)])
                t = np.concatenate([t, np.zeros((pad, self.n_cls), np.float32)])
                w = np.concatenate([w, np.zeros(pad, np.float32)])
            loss = _step(backend, ts, hp, f, t, w, params, state, anchors)
            stopped = after_step(epoch) if after_step else None
            _check_loss(loss, epoch, self.hp)
            total += loss * n
            count += n
            steps += 1
            if stopped:
                return total, count, steps, fused, stopped
        return total, count, steps, fused, None

    def runs(self, n_windows: int, dim: int) -> int:
        """Epochs per call of the whole-run graph (``train_step.run``).

        For epochs of ``n_windows`` windows of ``dim`` features: at most
        :data:`MAX_RUN_STEPS` steps and :data:`MAX_RUN_BYTES` of stacked batches a call (a
        call is never interrupted, so a training-state save waits for its end); 0: one fused
        and one infer call per epoch (no run graph, a fixed-K fused graph, steps checked one
        by one, or one epoch over those bounds).
        """
        b = self.backend
        if not (self.fuse and getattr(b, "run_graph", None) and getattr(b, "fused", None)
                and not b.fused_steps):
            return 0
        steps = -(-n_windows // self.bs)
        return min(MAX_RUN_BYTES // (steps * self.bs * (dim + self.n_cls + 1) * 4),
                   MAX_RUN_STEPS // steps)

    def epochs(self, rng, pool, first: int, last: int, pool_f, pool_y, pool_w, head: Head,
               state: dict, feats_va, y_va, val, after_step=None, per_call: int | None = None):
        """Epochs ``first`` .. ``last - 1`` over ``pool``, one at a time as consumed.

        Yields per epoch ``(loss sum, windows, steps, fused steps, stopped, val_loss,
        val_accuracy)`` with ``head.params``, ``state`` and ``rng`` as they are after that
        epoch (its shuffle drawn from ``rng``); ``val(head)`` scores the validation windows.
        With a whole-run graph (:meth:`runs`), epochs run in calls of several (their
        shuffles drawn in order, ``rng`` set back to each epoch's state as it is yielded),
        with the same steps, losses and validation logits as one epoch per call;
        ``per_call`` caps the epochs a call runs (1: a training-state save after every epoch).
        """
        chunk = min(self.runs(len(pool), pool_f.shape[1]), per_call or MAX_RUN_STEPS)
        epoch = first
        while epoch < last:
            if not chunk:
                out = self.epoch(rng.permutation(pool), pool_f, pool_y, pool_w,
                                 head.params, state, epoch, after_step)
                yield (*out, *val(head)[:2])
                epoch += 1
                continue
            todo = range(epoch, min(last, epoch + chunk))
            orders, rngs = [], []
            for _ in todo:
                orders.append(rng.permutation(pool))
                rngs.append(rng.bit_generator.state)
            yield from self._run(orders, rngs, todo, rng, pool_f, pool_y, pool_w, head,
                                 state, feats_va, y_va)
            epoch = todo[-1] + 1

    def _run(self, orders, rngs, todo, rng, pool_f, pool_y, pool_w, head: Head, state: dict,
             feats_va, y_va):
        """The epochs ``todo`` (shuffles ``orders``) in one call of the whole-run graph."""
        backend, bs, rb = self.backend, self.bs, self.backend.run_graph
        n = len(orders[0])
        n_steps = -(-n // bs)
        rows = n_steps * bs
        sel = np.stack(orders)
        if rows > n:  # any pool rows to pad with, zeroed below
            sel = np.concatenate([sel, sel[:, np.arange(rows - n) % n]], axis=1)
        f, t, w = pool_f[sel], self.eye[pool_y[sel]], pool_w[sel]
        if rows > n:  # zeroed: rows of weight 0 add nothing to the loss or the gradients
            f[:, n:], t[:, n:], w[:, n:] = 0.0, 0.0, 0.0
        e = len(orders)
        feeds = _feeds(self.ts, self.hp_feeds, f.reshape(e, n_steps, bs, f.shape[-1]),
                       t.reshape(e, n_steps, bs, t.shape[-1]), w.reshape(e, n_steps, bs),
                       head.params, state, self.anchors)
        feeds[rb["val_input"]] = feats_va
        out = backend.train_run(feeds)
        losses = np.reshape(out[rb["loss_output"]], (e, n_steps))
        logits = out[rb["val_logits_output"]][:, :, : len(head.labels)]
        val_loss = gating.softmax_xent_epochs(logits, y_va)  # _val_scores' values, per epoch
        val_acc = (np.count_nonzero(logits.argmax(axis=2) == y_va, axis=1) / len(y_va)).tolist()
        pre, finite = rb["epoch_prefix"], np.isfinite(losses).all(axis=1)
        sizes = [bs] * (n_steps - 1) + [n - bs * (n_steps - 1)]  # windows per step
        for i, epoch in enumerate(todo):
            total = 0.0
            for loss, k in zip(losses[i].tolist(), sizes):
                if not finite[i]:
                    _check_loss(loss, epoch, self.hp)
                total += loss * k
            count = n
            for k in head.params:
                head.params[k] = out[pre + k][i]
            for k in state:
                state[k] = out[pre + k][i]
            rng.bit_generator.state = rngs[i]
            yield total, count, n_steps, n_steps, None, val_loss[i], val_acc[i]


def _check_loss(loss: float, epoch: int, hp: dict) -> None:
    """A non-finite training loss stops the run, naming the learning rate to lower."""
    if not math.isfinite(loss):
        raise RunnerError(f"training diverged (loss {loss}) at epoch {epoch + 1}; lower the "
                          f"learning rate (now {hp['lr']}) with --lr")


#: Most steps in one call of a fused graph that takes any number (``steps`` null): bounds the
#: stacked copy of the features a call holds.
MAX_FUSED_STEPS = 64
#: Most bytes of stacked batches (features, targets, weights) and most steps in one call of
#: the whole-run graph: epochs are grouped into calls below both (the step bound keeps a
#: call short: the training state is saved between calls, never inside one).
MAX_RUN_BYTES, MAX_RUN_STEPS = 16 << 20, 256


def fused_groups(backend, n_windows: int, bs: int) -> list[int]:
    """Steps per fused call for an epoch of ``n_windows`` in batches of ``bs``.

    The runner's batch order is unchanged. A graph that takes any number of steps
    (``steps`` null) runs every batch of the epoch, the last partial one padded to ``bs``
    rows of weight 0 (which add nothing to the loss or the gradients), at most
    :data:`MAX_FUSED_STEPS` per call; a fixed-K graph takes the full batches in groups of K
    and the rest of the epoch runs one step per call. Empty without a fused graph.
    """
    if not getattr(backend, "fused", None):
        return []
    k = backend.fused_steps
    if k:
        return [int(k)] * (n_windows // bs // int(k))
    n = -(-n_windows // bs)
    return [min(MAX_FUSED_STEPS, n - i) for i in range(0, n, MAX_FUSED_STEPS)]


def rel_err(got, want) -> float:
    """Largest ``|got - want| / max(1, |want|)``: absolute below 1, relative above.

    The self-test's train comparison: a TFLite head's spare class rows sit at -10000, where
    one float32 step is 0.001, so a plain absolute bound would have to be that loose.
    """
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    return float((np.abs(g - w) / np.maximum(1.0, np.abs(w))).max())


def selftest_train(bundle: Bundle, backend) -> float:
    """Replay the shipped reference train steps with this backend's trainer; max error."""
    m = bundle.manifest
    tv = m["test_vectors"]
    z = test_vectors(bundle, train=True)
    f = z["train_features"].astype(np.float32)
    w = z["train_weights"].astype(np.float32)
    losses = z["train_loss"]
    labels = z["train_labels"]
    final = {k.split(".", 1)[1]: z[k] for k in z if k.startswith("train_final.")}
    head = Head.from_bundle(bundle)
    t = np.eye(head.rows(m["head"]["class_params"]), dtype=np.float32)[labels]
    params = dict(head.params)
    state = _zero_state(m, params)
    anchors = anchors_of(m, params)
    hp = m["optimizer"]["hparams"]
    err = 0.0
    for i in range(len(losses)):
        loss = _step(backend, m["train_step"], hp, f[i], t[i], w[i], params, state, anchors)
        err = max(err, rel_err(loss, losses[i]))
    err = max(err, *(rel_err(params[k], v) for k, v in final.items()))
    groups = fused_groups(backend, len(losses), 1)
    if groups:  # the same steps through the fused graph (a fixed K: the rest one per call)
        params, state, i = dict(head.params), _zero_state(m, head.params), 0
        for g in groups:
            got = _steps(backend, m["train_step"], hp, f[i : i + g], t[i : i + g],
                         w[i : i + g], params, state, anchors)
            err = max(err, *(rel_err(a, b) for a, b in zip(got, losses[i : i + g])))
            i += g
        for j in range(i, len(losses)):
            loss = _step(backend, m["train_step"], hp, f[j], t[j], w[j], params, state, anchors)
            err = max(err, rel_err(loss, losses[j]))
        err = max(err, *(rel_err(params[k], v) for k, v in final.items()))
    rb = getattr(backend, "run_graph", None)
    if rb and groups:  # the same steps as one epoch of the whole-run graph, and its logits
        params, state = dict(head.params), _zero_state(m, head.params)
        feeds = _feeds(m["train_step"], hp, f[None], t[None], w[None], params, state, anchors)
        out = backend.train_run({**feeds, rb["val_input"]: f[0]})
        got = np.reshape(out[rb["loss_output"]], -1)
        err = max(err, *(rel_err(a, b) for a, b in zip(got, losses)))
        err = max(err, *(rel_err(out["new." + k], v) for k, v in final.items()))
        want = _infer(backend, bundle, Head({k: out["new." + k] for k in params}, head.labels),
                      f[0])["logits"]
        err = max(err, rel_err(out[rb["val_logits_output"]][0], want))
    if not err <= float(tv["train_atol"]):
        raise RunnerError(f"self-test failed: {backend.trainer} training on this runtime differs "
                          f"from the server's reference train steps by {err:.3g} (> "
                          f"{tv['train_atol']}); the runtime build or the bundle is broken")
    return err


TRAIN_STATE = "train_state.npz"
#: Seconds past ``--max-seconds`` after which a backbone call is cancelled.
BACKBONE_GRACE_S = 1.0
TRAIN_FORMAT = "edgerun.train/1"


def _save_train_state(path: str, key: dict, epoch: int, rng, head: Head, state: dict,
                      best, history: list, steps: int) -> None:
    """Everything to continue training after ``epoch``; atomic (temp, fsync, rename)."""
    meta = {"format": TRAIN_FORMAT, "key": key, "epoch": epoch, "steps": steps,
            "rng": rng.bit_generator.state, "history": history, "labels": head.labels,
            "best": None if best is None else [best[0], best[2]]}
    arrays = {f"p.{k}": v for k, v in head.params.items()}
    arrays.update({f"s.{k}": v for k, v in state.items()})
    if best is not None:
        arrays.update({f"b.{k}": v for k, v in best[1].items()})
    atomic_write(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays),
                 prefix=".train.", suffix=".npz")


def _load_train_state(path: str, key: dict, head: Head, state: dict, epochs: int, rng):
    """The saved training state ``(meta, arrays)`` if it belongs to this run, else refused.

    A damaged file (unreadable, missing or misshapen arrays, a bad record) returns
    ``(None, reason)``: it is only a resume point, so the run starts over (the head
    checkpoint is untouched) and says why. A *readable* state of another run (other data,
    bundle or settings) is an error: resuming it would be wrong, starting over may not be
    what was meant. ``rng`` gets the saved generator state on success.
    """
    from edgerun.files import read_npz

    try:
        arrays = read_npz(path, "training state")
        meta = json.loads(str(arrays.pop("__meta__")))
    except (RunnerError, ValueError, KeyError) as e:
        return None, str(e)[:160]
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_FORMAT:
        return None, f"not an {TRAIN_FORMAT} record"
    if meta.get("key") != key:
        raise RunnerError(f"{path} belongs to another adaptation (other data, bundle or "
                          "settings); delete it or drop --resume")
    want = {**{f"p.{k}": v.shape for k, v in head.params.items()},
            **{f"s.{k}": np.shape(v) for k, v in state.items()}}
    best = meta.get("best")
    if best is not None:
        want.update({f"b.{k}": v.shape for k, v in head.params.items()})
    bad = [k for k, shp in want.items() if k not in arrays or arrays[k].shape != shp
           or arrays[k].dtype.kind != "f" or not np.isfinite(arrays[k]).all()]
    epoch, steps = meta.get("epoch"), meta.get("steps")
    if bad or not (isinstance(epoch, int) and 0 <= epoch <= epochs and isinstance(steps, int)
                   and isinstance(meta.get("history"), list)
                   and (best is None or (isinstance(best, list) and len(best) == 2))):
        return None, f"arrays {bad[:4]} missing, misshapen or non-finite" if bad else \
            "a bad epoch/steps/history/best record"
    try:
        rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError) as e:
        return None, f"bad random-generator state ({e})"
    return (meta, arrays), None


def test_vectors(bundle: Bundle, train: bool = False) -> dict:
    """The bundle's reference vectors, read safely and checked against the manifest.

    ``x``, ``features`` and ``logits`` (and with ``train`` the reference train steps) must
    be present, numeric and of consistent shapes; a file that matches its sha256 but was
    written wrong is one :class:`RunnerError` naming what does not fit.
    """
    m = bundle.manifest
    role = m["test_vectors"]["file"]
    fwd = ["x", "features", "logits"]
    steps = ["train_features", "train_weights", "train_loss", "train_labels"]
    z = bundle.arrays(role, fwd + (steps if train else []))
    n, dim = len(z["x"]) if z["x"].ndim else -1, int(m["features"]["dim"])
    inp = m["input"]
    want = {"features": (n, dim)}
    if inp.get("modality", "timeseries") == "timeseries":
        want["x"] = (n, int(inp["window"]), len(inp["channels"]))
    bad = [f"{k} {z[k].shape} (expected {v})" for k, v in want.items() if z[k].shape != v]
    rows = int(m["head"]["capacity"]) or (z["logits"].shape or (0,))[-1]  # 0: not stated
    if z["logits"].shape != (n, rows):
        bad.append(f"logits {z['logits'].shape} (expected ({n}, {rows}))")
    if train:
        f, w, loss, lab = (z[k] for k in steps)
        k = len(loss) if loss.ndim == 1 else -1
        if (loss.shape != (k,) or f.ndim != 3 or f.shape[:1] != (k,) or f.shape[2:] != (dim,)
                or w.shape != f.shape[:2] or lab.shape != f.shape[:2]
                or lab.dtype.kind not in "iu"
                or (lab.size and not 0 <= lab.min() <= lab.max() < rows)):
            bad.append(f"train steps (features {f.shape}, weights {w.shape}, labels "
                       f"{lab.shape} {lab.dtype}, loss {loss.shape})")
    if bad:
        name = m["files"][role]["path"]
        raise RunnerError(f"bundle file {name} ({role}) does not fit the manifest: "
                          f"{'; '.join(bad)}; re-export or re-download the bundle")
    return z


def _finished_report(out_dir: str, run_key: str) -> dict | None:
    """The folder's report if it is of the run ``run_key`` and its head is in place."""
    from edgerun.files import open_regular

    path = os.path.join(out_dir, "report.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, "head.npz"))):
        return None
    try:
        with open_regular(path, "report", 64 << 20) as f:
            rep = json.loads(f.read().decode("utf-8"))
    except (RunnerError, ValueError, RecursionError):
        return None
    return rep if isinstance(rep, dict) and rep.get("run_key") == run_key else None


def selftest(bundle: Bundle, backend) -> float:
    """Run the bundle's reference vectors (forward and train steps); return the max error."""
    return max(selftest_forward(bundle, backend), selftest_train(bundle, backend))


def selftest_forward(bundle: Bundle, backend) -> float:
    """Reference features and logits through this runtime; the max error, or raise."""
    tv = bundle.manifest["test_vectors"]
    z = test_vectors(bundle)
    x, feats, logits = z["x"], z["features"], z["logits"]
    texts = [str(t) for t in z["texts"]] if "texts" in z else None
    if texts is not None:  # text bundles: this device's tokenizer must give the server's ids
        from edgerun.text import TextEncoder

        enc = TextEncoder(bundle)
        ids = enc.encode(texts)[0]
        if not np.array_equal(ids, x):
            bad = int(np.flatnonzero((ids != x).any(axis=(1, 2)))[0])
            raise RunnerError(f"self-test failed: the tokenizer ({enc.name}) gives other ids "
                              f"than the server for {texts[bad][:80]!r}; the bundle's "
                              "tokenizer files or the tokenizers package are inconsistent")
    f = backend.features(dataio.preprocess(x, bundle.manifest))
    head = Head.from_bundle(bundle)
    # the head runs on the shipped features: its check does not inherit the backbone's error
    # (an int8 backbone's features may differ by quantisation steps; logits must not)
    lg = _infer(backend, bundle, head, feats.astype(np.float32))["logits"]
    err_f, err_l = float(np.abs(f - feats).max()), float(np.abs(lg - logits).max())
    atol_l = float(tv.get("logits_atol", tv["atol"]))
    for what, err, atol in (("backbone features", err_f, float(tv["atol"])),
                            ("head logits", err_l, atol_l)):
        if not err <= atol:
            raise RunnerError(f"self-test failed: this runtime's {what} differ from the "
                              f"server's reference vectors by {err:.3g} (> {atol:.3g}); the "
                              "runtime build or the bundle is broken")
    return max(err_f, err_l)


def data_digest(path: str) -> str:
    """sha256 of a data file, or of every file (name and content) under a data folder."""
    if not os.path.isdir(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            h.update(sha256_file(full).encode())
    return h.hexdigest()


FEATURES_FORMAT = "edgerun.features/1"


def _read_cached(path: str, key: str, shape: tuple):
    """``(features, None)`` from a cache entry that matches ``key``, else ``(None, why)``."""
    from edgerun.files import read_npz

    try:
        z = read_npz(path, "feature cache", int(np.prod(shape)) * 4 + (1 << 20))
        meta = json.loads(str(z["__meta__"]))
        feats = z["features"]
    except (RunnerError, ValueError, KeyError) as e:
        return None, f"unreadable ({str(e)[:120]})"
    if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
        return None, "not a feature cache entry"
    if meta.get("key") != key:
        return None, "made for other data, backbone or preprocessing"
    if (feats.shape != shape or feats.dtype != np.float32
            or hashlib.sha256(feats.tobytes()).hexdigest() != meta.get("sha256")):
        return None, "damaged (its features do not match their recorded sha256 or shape)"
    return feats, None


def cached_features(backend, bundle: Bundle, ds, data_path: str, out_dir: str, digest=None):
    """Backbone features of ``ds``, cached in ``out_dir/features/`` on the device.

    The backbone is frozen, so features depend only on the data file, the backbone and the
    preprocessing; the key hashes all three. An entry stores its key and the sha256 of its
    features, both checked on read: a stale or damaged entry is recomputed, with a warning.
    ``digest``: a callable giving :func:`data_digest` of ``data_path`` (the caller's, to hash
    the data once per run); without a ``features/`` folder there is nothing to look up, so
    the data is hashed only when the entry is saved.

    Returns ``(features, was_cached, warning or None, save)``. ``save()`` writes the entry:
    call it only once nothing can refuse the run any more (messages that say nothing was
    written stay true); it returns a warning when the cache cannot be written (a full disk
    only loses the cache).
    """
    m = bundle.manifest
    digest = digest or (lambda: data_digest(data_path))
    extra = getattr(backend, "features_key", None)  # recalibrated BN statistics (edgerun.adabn)

    def entry() -> tuple[str, str]:
        key = [digest(), m["files"]["backbone"]["sha256"],
               m["input"].get("preprocess") or m["input"].get("image") or m["input"].get("text")]
        if extra:
            key.append(extra)
        key = json.dumps(key, sort_keys=True)
        return key, os.path.join(out_dir, "features",
                                 hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")

    shape = (len(ds.x), int(m["features"]["dim"]))
    note = None
    if os.path.isdir(os.path.join(out_dir, "features")):
        key, path = entry()
        if os.path.lexists(path):
            feats, why = _read_cached(path, key, shape)
            if feats is not None:
                return feats, True, None, lambda: None
            note = f"the feature cache {path} was {why}; the features were recomputed"
    feats = np.ascontiguousarray(backend.features(dataio.preprocess(ds.x, m)), np.float32)
    sha = hashlib.sha256(feats).hexdigest()  # C-contiguous: hashed in place, no copy

    def save():
        key, path = entry()
        meta = {"format": FEATURES_FORMAT, "key": key, "sha256": sha}
        try:  # a cache: no fsync (lost at worst, never half-written)
            atomic_write(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)),
                                                  features=feats),
                         suffix=".npz", durable=False)
        except OSError as e:
            return f"the feature cache was not written ({e.strerror or e}); it is only a cache"
        return None

    return feats, False, note, save


def _infer(backend, bundle: Bundle, head: Head, feats: np.ndarray) -> dict:
    names = bundle.manifest["infer"]["inputs"]
    feeds = {names[0]: feats, **{n: head.params[n] for n in names[1:]}}
    return backend.infer(feeds)


def _accuracy(pred_labels: list, true_labels: list) -> float:
    if not true_labels:
        return float("nan")
    return float(np.mean([p == t for p, t in zip(pred_labels, true_labels)]))


def _predict(backend, bundle, head: Head, feats: np.ndarray) -> list:
    if len(feats) == 0:
        return []
    logits = _infer(backend, bundle, head, feats)["logits"]
    idx = logits[:, : len(head.labels)].argmax(axis=1)  # spare rows of a fixed head never win
    return [head.labels[i] for i in idx]


def _val_scores(backend, bundle, head: Head, feats: np.ndarray, y: np.ndarray) -> tuple:
    """Validation ``(loss, accuracy, right)`` of ``head``.

    Cross-entropy over the label rows in use (spare rows of a fixed head never count),
    accuracy, and the per-window correctness.
    """
    logits = _infer(backend, bundle, head, feats)["logits"][:, : len(head.labels)]
    right = logits.argmax(axis=1) == y
    # right.mean()'s value (an exact count over n in float64) without its wrapper's overhead
    acc = np.count_nonzero(right) / len(right) if len(right) else float("nan")
    return gating.softmax_xent(logits, y), acc, right


#: What to do about a new label with no spare class row, by whether the bundle is a tail
#: bundle (``trainable``: its traced graphs fix the class rows whatever the target).
_DYNAMIC_HINT = {False: "use an onnx bundle (dynamic classes)",
                 True: "export with --target onnx --trainable head (dynamic classes)"}
#: Defaults of the manifest's ``adapt`` block keys added after schema 2 shipped.
GATE_DEFAULTS = {"rule": "mcnemar", "alpha": 0.05, "folds": 1}
PATIENCE_DEFAULT = 8
MIX_DEFAULT = (0.25, 0.5, 0.75, 1.0)


def gate_settings(m: dict, alpha, rule, patience, mix,
                  max_forget=None, folds=None) -> tuple[dict, int, tuple]:
    """Gate, patience and mixing weights: flags given, else the bundle's, else defaults.

    ``folds`` (the bundle's ``adapt.gate.folds``, default 1): the gate's evidence is pooled
    over this many validation folds, each from another run of the same training
    (:func:`pooled_verdict`); 1 judges the run's own validation split only.

    ``max_forget`` (points; the bundle's ``adapt.gate.max_forget``; negative: no check): the
    replay check of :func:`edgerun.gate.forgetting`, only where the bundle ships a replay set.
    """
    d = m["adapt"]
    g = {**GATE_DEFAULTS, **(d.get("gate") or {})}
    g.setdefault("max_forget", None)
    if max_forget is not None:
        if not max_forget < float("inf"):
            raise RunnerError(f"--max-forget must be a finite number of points, got {max_forget}")
        g["max_forget"] = None if max_forget < 0 else float(max_forget)
    if g["max_forget"] is not None and replaying.block(m) is None:
        g["max_forget"] = None  # nothing to check against
    if alpha is not None:
        g["alpha"] = alpha
    if rule is not None:
        g["rule"] = rule
    if folds is not None:
        g["folds"] = folds
    if isinstance(g["folds"], bool) or not isinstance(g["folds"], int) or not 1 <= g["folds"] <= 20:
        raise RunnerError(f"the gate's folds must be an integer from 1 to 20, got {g['folds']!r}")
    if g["rule"] not in gating.RULES:
        raise RunnerError(f"unknown gate rule {g['rule']!r}; known: {', '.join(gating.RULES)}")
    if not 0 <= float(g["alpha"]) <= 1:
        raise RunnerError(f"the gate's alpha must be in [0, 1], got {g['alpha']!r}")
    patience = d.get("patience", PATIENCE_DEFAULT) if patience is None else patience
    mix = tuple(d.get("mix", MIX_DEFAULT)) if mix is None else tuple(mix)
    if not mix or any(not 0 < float(w) <= 1 for w in mix):
        raise RunnerError(f"mixing weights must be in (0, 1], got {list(mix)}")
    return g, int(patience), tuple(float(w) for w in mix)


def statistics_gate(raw, backend, bundle, head: Head, labels: list, feats_raw, feats, *,
                    seed: int, val_fraction: float, gate: dict) -> dict:
    """The device's gate on recalibrated BN statistics (AdaBN), when labels exist.

    ``head`` predicts the validation windows of the labels it knows twice: on the bundle's
    statistics (``raw``, ``feats_raw``) and on the recalibrated ones (``backend``, ``feats``);
    :func:`edgerun.gate.decide` compares the two. Fewer than 2 known labels: not judged, so
    refused (``keep`` false).
    """
    known = np.flatnonzero([lab in head.labels for lab in labels])
    y = np.asarray([head.labels.index(labels[i]) for i in known], np.int64)
    if len(np.unique(y)) < 2:
        return {"rule": gate["rule"], "alpha": gate["alpha"], "keep": False,
                "reason": "fewer than 2 labels the head knows: the recalibrated statistics "
                          "cannot be judged; the bundle's are used"}
    _, va = dataio.stratified_split(y, val_fraction, seed, dataio.split_mode(bundle.manifest))
    idx = known[va]
    _, acc0, right0 = _val_scores(raw, bundle, head, feats_raw[idx], y[va])
    _, acc1, right1 = _val_scores(backend, bundle, head, feats[idx], y[va])
    verdict = gating.decide(right0, right1, alpha=gate["alpha"], rule=gate["rule"])
    verdict = {**verdict, "accuracy_before": acc0, "accuracy_after": acc1}
    # the replay check, as for a head: the statistics must not cost the server's windows of
    # the labels the device has (the bundle ships the windows themselves for this)
    rp = replaying.inputs(bundle, head.labels, bundle.manifest["input"]["shape"][1:])
    if rp is not None:
        local = np.isin(rp[1], np.unique(y))
        if local.any():
            x_r, y_r = rp[0][local], rp[1][local]
            before = _val_scores(raw, bundle, head, raw.features(x_r), y_r)[1]
            after = _val_scores(backend, bundle, head, backend.features(x_r), y_r)[1]
            verdict = gating.forgetting(verdict, before, after, gate.get("max_forget"))
    return verdict


def propose(backend, bundle, start: Head, adapted: Head, feats_va, y_va, mix: tuple) -> tuple:
    """The interpolation ``start + w * (adapted - start)`` of lowest validation loss.

    Over the weights ``mix`` (ties: the smaller weight, closer to the starting head; WiSE-FT,
    Wortsman et al. 2022). Returns ``(head, w, (loss, acc, right) of start, (loss, acc,
    right) of head)``.
    """
    scores0 = _val_scores(backend, bundle, start, feats_va, y_va)
    best = None
    for w in sorted(mix):
        cand = Head(gating.mix(start.params, adapted.params, w), list(start.labels))
        scores = _val_scores(backend, bundle, cand, feats_va, y_va)
        if best is None or scores[0] < best[1][0] - 1e-7:
            best = (w, scores, cand)
    w, scores, cand = best
    return cand, w, scores0, scores


def choose_head(backend, bundle, start: Head, adapted: Head, feats_va, y_va, *,
                mix: tuple, gate: dict) -> tuple[Head, dict]:
    """The head this run proposes (:func:`propose`), and the gate's verdict on it.

    The gate (:func:`edgerun.gate.decide`) compares its validation predictions with
    ``start``'s.
    """
    cand, w, scores0, scores = propose(backend, bundle, start, adapted, feats_va, y_va, mix)
    return cand, verdict_of(w, scores0, scores, gate)


def verdict_of(w: float, scores0: tuple, scores: tuple, gate: dict) -> dict:
    """The gate's verdict on one split for a proposal of :func:`propose`.

    ``w``: its mixing weight; ``scores0``/``scores``: ``(loss, acc, right)`` of the starting
    head and of the proposal.
    """
    (loss0, acc0, right0), (loss, acc, right) = scores0, scores
    verdict = gating.decide(right0, right, alpha=gate["alpha"], rule=gate["rule"])
    verdict.update({"mix_weight": w, "val_loss_before": loss0, "val_loss_after": loss,
                    "accuracy_before": acc0, "accuracy_after": acc, "folds": 1})
    return verdict


def train_fold(trainer: _Trainer, backend, bundle, start: Head, feats, y, tr, va, *,
               epochs: int, patience: int, seed: int, pool_kw: dict, after_step=None):
    """One more training run of the same procedure on another split: the evidence folds.

    From ``start`` with a fresh optimizer state: epochs over the pool of ``tr``
    (:func:`training_pool`), the epoch of lowest validation loss on ``va`` kept, early
    stopping after ``patience`` epochs without a new lowest, steps by ``trainer`` (its L2-SP
    anchors: ``start``'s); ``after_step(head, epoch)`` may stop training by returning a reason.
    Returns ``(head, stopped)``.
    """
    head = start.copy()
    state = _zero_state(bundle.manifest, head.params)
    pool_f, pool_y, pool_w, pool = training_pool(feats, y, tr, **pool_kw)
    rng = np.random.default_rng(seed)
    best, stopped = None, None
    check = (lambda epoch: after_step(head, epoch)) if after_step else None
    feats_va, y_va = feats[va], y[va]
    for epoch in range(epochs):
        *_, stopped = trainer.epoch(rng.permutation(pool), pool_f, pool_y, pool_w, head.params,
                                    state, epoch, check)
        val_loss = _val_scores(backend, bundle, head, feats_va, y_va)[0]
        if best is None or val_loss < best[0]:
            best = (val_loss, {k: v.copy() for k, v in head.params.items()}, epoch + 1)
        if stopped or (patience and epoch + 1 - best[2] >= patience):
            break
    if best is not None:
        head.params = best[1]
    return head, stopped


def pooled_verdict(first: tuple, more: list, *, gate: dict) -> dict:
    """The gate's verdict on paired validation predictions pooled over folds.

    ``first``: ``(right_start, right_proposed)`` of the run's own split; ``more``: the same
    for every other fold (each window validates in one fold only). The test is
    :func:`edgerun.gate.decide` on their concatenation; ``fold_counts`` lists each fold's
    ``[fixed, broke]``.
    """
    pairs = [first, *more]
    verdict = gating.decide(np.concatenate([a for a, _ in pairs]),
                            np.concatenate([b for _, b in pairs]),
                            alpha=gate["alpha"], rule=gate["rule"])
    counts = [[int(np.sum(b & ~a)), int(np.sum(a & ~b))] for a, b in pairs]
    verdict["reason"] = (f"cross-validated over {len(pairs)} folds ({verdict['n']} windows): "
                         f"{verdict['reason']}")
    return {**verdict, "folds": len(pairs), "fold_counts": counts}


def adapt_settings(m: dict, epochs, batch_size, val_fraction) -> tuple[int, int, float]:
    """Flags given, else the manifest's ``adapt`` defaults; validated."""
    d = m["adapt"]
    epochs = d["epochs"] if epochs is None else epochs
    batch_size = d["batch_size"] if batch_size is None else batch_size
    val_fraction = d["val_fraction"] if val_fraction is None else val_fraction
    if epochs < 0 or batch_size < 1 or not 0 < val_fraction < 1:
        raise RunnerError(f"need epochs >= 0, batch_size >= 1, 0 < val_fraction < 1; got "
                          f"{epochs}, {batch_size}, {val_fraction}")
    return int(epochs), int(batch_size), float(val_fraction)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def adapt(bundle_dir: str, data_path: str, out_dir: str, **kw) -> dict:
    """Fine-tune the head on ``data_path`` into ``out_dir``, holding the folder's lock.

    Only one ``adapt`` or ``update`` runs on a state folder at a time: a second one fails
    at once naming the first's pid (:class:`edgerun.files.state_lock`). Options and result:
    :func:`adapt_unlocked`.
    """
    from edgerun.files import state_lock

    with state_lock(out_dir):
        return adapt_unlocked(bundle_dir, data_path, out_dir, **kw)


def adapt_unlocked(bundle_dir: str, data_path: str, out_dir: str, *,
                   epochs: int | None = None, batch_size: int | None = None,
                   val_fraction: float | None = None, lr: float | None = None,
                   seed: int = 0, head_path: str | None = None, threads: int = 0,
                   trainer: str | None = None, max_seconds: float | None = None,
                   max_memory_mb: float | None = None, trust_key: str | None = None,
                   resume: bool = False, max_data_mb: float = dataio.MAX_DATA_MB,
                   checkpoint_every: float = 1.0, class_balanced: bool | None = None,
                   l2sp: float | None = None, backbone_lr_scale: float | None = None,
                   allow_downgrade: bool = False, gate_alpha: float | None = None,
                   gate_rule: str | None = None,
                   patience: int | None = None, mix: tuple | None = None,
                   freeze_absent: bool | None = None, replay_weight: float | None = None,
                   max_forget: float | None = None, gate_folds: int | None = None,
                   quiet: bool = False, commit_extra: dict | None = None) -> dict:
    """Fine-tune the head on ``data_path``; write ``head.npz`` and ``report.json`` to ``out_dir``.

    Which head: each epoch ends with the validation loss of the head so far; the epoch of
    lowest loss is kept, and training stops after ``patience`` epochs without a new lowest
    (0: never early). The kept head is then mixed with the starting head (weights ``mix``,
    the lowest validation loss wins: :func:`choose_head`), and the gate (``gate_rule``,
    ``gate_alpha``; default: the bundle's ``adapt.gate``) replaces the current head with it
    only when it is better on the validation windows by more than noise
    (:func:`edgerun.gate.decide`). A head the gate refused is kept beside as
    ``head.rejected.npz`` for inspection; ``report.json["gate"]`` says what was kept and why.

    Budgets: training stops after the step that crosses ``max_seconds`` (counted from the
    start, feature pass included) or ``max_memory_mb`` (resident memory), and keeps the best
    head so far by validation loss; the gate then judges that head as usual.

    Crash safety: after an epoch, once ``checkpoint_every`` seconds have passed since the last
    save (0: every epoch), the training state (head, optimizer state, RNG, history) is written
    atomically to ``out_dir/train_state.npz``; with ``resume`` a killed run
    continues from it and ends exactly where an uninterrupted run would. ``head.npz`` is only
    ever replaced atomically, so a valid checkpoint (old or new) exists at every moment.

    ``freeze_absent``: class rows of labels the head knows but the local data lacks are
    restored after every step, so training cannot push down classes it never sees (default:
    the bundle's ``adapt.freeze_absent``).

    ``replay_weight`` (default: the bundle's ``adapt.replay.weight``; 0: off): the bundle's
    replay set (server features, :mod:`edgerun.replay`) trains beside the local training
    windows with this total weight relative to theirs; validation and the gate stay local.
    ``max_forget`` (default: the bundle's ``adapt.gate.max_forget``; < 0: off): the gate also
    refuses a head that loses more than this many points on the replay set.

    ``class_balanced`` (default: the bundle's ``adapt.class_balanced``): each training
    window weighs ``n / (K * n_c)`` (sample_weight), so a
    label with few windows counts as much as a frequent one. ``l2sp``: coefficient of the
    head's pull toward the head training starts from (bundles exported with head.l2sp).
    ``backbone_lr_scale``: the backbone tensors' lr over the head's (bundles whose train step
    takes ``backbone_lr_scale``; default the bundle's).

    ``epochs``, ``batch_size`` and ``val_fraction`` default to the bundle's ``adapt`` block
    (the recipe's ``[adapt]`` section, written at export).

    Rollback protection: a bundle older than one this folder already accepted (same name,
    lower ``version``) is refused unless ``allow_downgrade`` (:mod:`edgerun.versions`).

    Commit: ``head.npz``, ``head.prev.npz``, ``report.json``, ``versions.json`` and the JSON
    files of ``commit_extra`` (``{name: object}``, e.g. ``update``'s ``bundle.json``) are
    replaced as one step (:mod:`edgerun.commit`); ``train_state.npz`` goes with it. With
    ``resume`` and no training state, a finished run of the same key (``report.json``'s
    ``run_key``) is returned as it is instead of being redone.

    Returns the report (also written as ``report.json``).
    """
    from edgerun import versions
    from edgerun.backends import BudgetExceeded
    from edgerun.commit import recover

    t_start = time.perf_counter()
    warnings: list[str] = recover(out_dir)  # a killed run's commit finished, orphans removed
    bundle = Bundle(bundle_dir, trust_key=trust_key)
    m = bundle.manifest
    versions.check(m, out_dir, allow_downgrade=allow_downgrade)
    epochs, batch_size, val_fraction = adapt_settings(m, epochs, batch_size, val_fraction)
    gate, patience, mix = gate_settings(m, gate_alpha, gate_rule, patience, mix, max_forget,
                                        gate_folds)
    if class_balanced is None:
        class_balanced = bool(m["adapt"].get("class_balanced", False))
    if freeze_absent is None:
        freeze_absent = bool(m["adapt"].get("freeze_absent", False))
    replay_weight = replaying.settings(m, replay_weight)
    backend = make_backend(bundle, threads, trainer)
    if max_seconds is not None:  # backbone calls are cancelled (ONNX) or stop between chunks
        # 1 s of grace: a budget crossed in a pass that does finish still trains one step and
        # keeps the best head (the documented budget rule); a pass that does not is stopped
        backend.deadline = t_start + max_seconds + BACKBONE_GRACE_S
    raw = backend
    # the data file hashed once per run (feature cache key, run key), and only when needed
    digest = functools.cache(lambda: data_digest(data_path))

    try:
        selftest_err = selftest(bundle, backend)
        # recalibrated BN statistics in the state folder (run.py recalibrate): features use
        # them (the budget then stops between chunks, not inside a call)
        backend, bn_warning = adabn.for_state(backend, bundle, out_dir, threads)
        if bn_warning:
            warnings.append(bn_warning)
        ds = dataio.load(data_path, m, need_labels=True, max_mb=max_data_mb, bundle=bundle)
        if len(set(ds.y)) < 2:
            raise RunnerError(f"{data_path}: every window is labelled {ds.y[0]!r}; adapting a "
                              "classifier needs windows of at least 2 labels (nothing was "
                              "written)")
        if ds.skipped:
            warnings.append(f"skipped {len(ds.skipped)} unreadable file(s), e.g. "
                            f"{ds.skipped[0]['path']}: {ds.skipped[0]['reason']}")

        head0 = Head.load(head_path, bundle) if head_path else Head.from_bundle(bundle)
        t0 = time.perf_counter()
        feats, cached, note, save_cache = cached_features(backend, bundle, ds, data_path,
                                                          out_dir, digest)
        bn_gate = None
        if backend is not raw:  # recalibrated statistics: judged against the bundle's first
            feats_raw, _, note_raw, save_raw = cached_features(raw, bundle, ds, data_path,
                                                               out_dir, digest)
            bn_gate = statistics_gate(raw, backend, bundle, head0, ds.y, feats_raw, feats,
                                      seed=seed, val_fraction=val_fraction, gate=gate)
            if not bn_gate["keep"]:
                backend, feats, note, save_cache = raw, feats_raw, note_raw, save_raw
                warnings.append(f"the recalibrated BN statistics were refused by the gate "
                                f"({bn_gate['reason']}); training used the bundle's, and "
                                f"{adabn.STATS_FILE} is set aside as bn_stats.rejected.npz")
        feature_seconds = time.perf_counter() - t0
    except BudgetExceeded as e:
        raise RunnerError(f"{e} before training started: the --max-seconds {max_seconds:g} "
                          "budget is too small for this bundle and data (or the backbone does "
                          "not finish); nothing was written: raise --max-seconds or adapt on "
                          "fewer windows") from None
    finally:
        raw.deadline = None  # training checks the budget after every step itself
    if note:
        warnings.append(note)

    head = head0.copy()
    seen = list(dict.fromkeys(ds.y))
    new = [lab for lab in seen if lab not in head.labels]
    missing = [lab for lab in head.labels if lab not in seen]
    dynamic = m["train_step"]["dynamic_classes"]
    cls = m["head"]["class_params"]
    if new and not dynamic and len(head.labels) + len(new) > head.rows(cls):
        raise RunnerError(
            f"labels {new} are not in this bundle's head {head.labels}, and its {m['target']} "
            f"graphs have a fixed number of class rows ({head.rows(cls)}, {len(head.labels)} "
            f"in use); drop those windows, export with a larger export.class_capacity, or "
            f"{_DYNAMIC_HINT['trainable' in m]}")
    # class ids in the order the head will have them (new labels appended by imprinting)
    names = head.labels + new
    y = np.asarray([names.index(lab) for lab in ds.y], np.int64)
    # windows of a recording overlap (block split with a purge gap); images do not
    tr, va = dataio.stratified_split(y, val_fraction, seed, dataio.split_mode(m))
    # What a run writes when it trains nothing or the gate keeps the starting head: the same
    # imprinting from *every* window (no validation left to protect). ``None``: ``start``.
    start_full = None
    emb = _infer(backend, bundle, head, feats)["embedding"] if new else None
    ys = np.asarray(ds.y)

    def imprinted(idx) -> Head:
        """The starting head with the new labels imprinted from the windows ``idx``."""
        h = head0.copy()
        if new:
            h.add_classes(new, {n: emb[idx][ys[idx] == n] for n in new}, cls, grow=dynamic,
                          normalise=m["head"]["kind"] == "cosine")
        return h

    if new:  # from the training windows only: the gate's validation windows stay unseen
        start_full = imprinted(np.arange(len(y)))
        head = imprinted(tr)
        warnings.append(f"labels {new} are new to this head: added {len(new)} class(es) by "
                        "weight imprinting from their mean features (training windows while "
                        "the gate judges, every window in a head written without training)")
    if missing:
        warnings.append(f"local data has no windows of {missing}; the head keeps them but "
                        "cannot check them")
    if len(va) == 0:
        raise RunnerError(f"{data_path}: too few windows ({len(y)}) for a validation split; "
                          "collect at least 2 windows per label")
    few = [head.labels[c] for c in np.unique(y) if (y == c).sum() < 3]
    if few:
        warnings.append(f"labels {few} have fewer than 3 windows; their accuracy is noisy")
    # The gate's baseline is the head training starts from: the shipped (or given) head, with
    # any new labels imprinted; a rollback returns to it.
    start = head.copy()

    hp = dict(m["optimizer"]["hparams"])
    if lr is not None:
        hp["lr"] = lr
    ts = m["train_step"]
    if l2sp is not None:
        if "l2sp" not in ts["hparam_inputs"]:
            raise RunnerError("--l2sp needs a bundle exported with head.l2sp > 0 (its train step "
                              "takes the anchor inputs); this one has none")
        if not l2sp >= 0:
            raise RunnerError(f"--l2sp must be >= 0, got {l2sp}")
        hp["l2sp"] = l2sp
    if backbone_lr_scale is not None:
        if "backbone_lr_scale" not in ts["hparam_inputs"]:
            raise RunnerError("--backbone-lr-scale needs a bundle that trains backbone tensors "
                              "(exported with --trainable bias, last:N, all or globs); this one "
                              "trains the head only: use --lr")
        if not backbone_lr_scale > 0:
            raise RunnerError(f"--backbone-lr-scale must be > 0, got {backbone_lr_scale}")
        hp["backbone_lr_scale"] = backbone_lr_scale
    anchors = anchors_of(m, start.params)  # L2-SP pulls toward the head training starts from
    absent = np.asarray([head.labels.index(lab) for lab in missing], np.int64)
    frozen_rows = list(cls) if freeze_absent and len(absent) else []
    replay_set, replay_info = None, None
    if replaying.block(m) is not None:  # scored for the report even when not trained on
        replay_set = replaying.load(bundle, names, feats.shape[1])
        replay_info = {"weight": replay_weight, "windows": int(len(replay_set[1]))}
    pool_f, pool_y, pool_w, pool = training_pool(
        feats, y, tr, class_balanced=class_balanced,
        replay=replay_set if replay_weight > 0 else None, replay_weight=replay_weight)
    n_cls = head.rows(cls)  # targets span every class row (spare rows get none)
    state = _zero_state(m, head.params)
    fixed = ts.get("batch_size")
    bs = int(fixed) if fixed else batch_size
    if fixed and batch_size != bs:
        warnings.append(f"this {m['target']} bundle trains with a fixed batch of {bs}; "
                        f"--batch-size {batch_size} was ignored")
    rng = np.random.default_rng(seed)
    history, steps = [], 0
    if max_memory_mb is not None and rss_mb() > max_memory_mb:
        raise RunnerError(f"the runner already uses {rss_mb():.0f} MiB after loading the runtime "
                          f"and the data, above --max-memory-mb {max_memory_mb:g}; nothing was "
                          "written. Raise the budget or adapt on fewer windows")
    stopped, best = None, None
    os.makedirs(out_dir, exist_ok=True)
    cache_note = save_cache()  # after every check that refuses with "nothing was written"
    if cache_note:
        warnings.append(cache_note)
    state_path = os.path.join(out_dir, TRAIN_STATE)
    key = {"data": digest(), "backbone": m["files"]["backbone"]["sha256"],
           "head": head_path and sha256_file(head_path), "epochs": epochs, "batch": bs,
           "seed": seed, "val_fraction": val_fraction, "hparams": hp,
           "class_balanced": class_balanced, "patience": patience, "gate": gate,
           "freeze_absent": freeze_absent, "replay_weight": replay_weight,
           "mix": list(mix), "trainer": backend.trainer, "labels": head.labels,
           "bn_stats": getattr(backend, "features_key", None)}
    run_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    first = 0
    if resume and not os.path.isfile(state_path):
        done = _finished_report(out_dir, run_key)
        if done is not None:  # killed after its commit: the run is complete, keep it as is
            _say(quiet, "this adaptation already finished (report.json); nothing to resume")
            return done
    if resume and os.path.isfile(state_path):
        saved, damage = _load_train_state(state_path, key, head, state, epochs, rng)
        if damage:
            warnings.append(f"damaged training state {TRAIN_STATE} ({damage}); starting over")
        if saved is not None:
            meta, arrays = saved
            first, steps, history = int(meta["epoch"]), int(meta["steps"]), meta["history"]
            head.params = {k: arrays[f"p.{k}"] for k in head.params}
            state = {k: arrays[f"s.{k}"] for k in state}
            if meta["best"] is not None:
                best = (meta["best"][0], {k: arrays[f"b.{k}"] for k in head.params},
                        meta["best"][1])
            warnings.append(f"resumed after epoch {first} from {TRAIN_STATE}")
    early = None
    # the fused graph keeps the one-step path's results; a budget or frozen rows need a check
    # after every step, so they keep one step per call
    fuse = not frozen_rows and max_seconds is None and max_memory_mb is None
    trainer = _Trainer(backend, ts, hp, anchors, n_cls=n_cls, bs=bs, fixed=bool(fixed), fuse=fuse)
    feats_va, y_va, steps_fused = feats[va], y[va], 0
    t1 = last_save = time.perf_counter()

    def over_budget(epoch: int) -> str | None:
        if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
            return f"time budget of {max_seconds:g} s reached in epoch {epoch + 1}"
        if max_memory_mb is not None and rss_mb() > max_memory_mb:
            return f"memory budget of {max_memory_mb:g} MiB reached in epoch {epoch + 1}"
        return None

    def after_step(epoch: int) -> str | None:
        for name in frozen_rows:  # absent labels keep their starting rows
            head.params[name][absent] = start.params[name][absent]
        return over_budget(epoch)

    runs = trainer.epochs(rng, pool, first, epochs, pool_f, pool_y, pool_w, head, state,
                          feats_va, y_va, lambda h: _val_scores(backend, bundle, h, feats_va, y_va),
                          after_step, per_call=1 if checkpoint_every == 0 else None)
    for epoch, (total, count, n_steps, n_fused, stopped, val_loss, val_acc) in zip(
            range(first, epochs), runs):
        steps += n_steps
        steps_fused += n_fused
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1), "val_loss": val_loss,
                        "val_accuracy": val_acc, "complete": stopped is None})
        if best is None or val_loss < best[0]:
            best = (val_loss, {k: v.copy() for k, v in head.params.items()}, epoch + 1)
        if not stopped and patience and epoch + 1 - best[2] >= patience and epoch + 1 < epochs:
            early = (f"validation loss has not improved for {patience} epochs (best: epoch "
                     f"{best[2]}, {best[0]:.4f})")
            break
        if stopped:
            break
        if time.perf_counter() - last_save >= checkpoint_every and epoch + 1 < epochs:
            try:
                _save_train_state(state_path, key, epoch + 1, rng, head, state, best, history,
                                  steps)
            except OSError as e:
                from edgerun.commit import disk_error

                raise disk_error(e, TRAIN_STATE, out_dir) or e from None
            last_save = time.perf_counter()
    train_seconds = time.perf_counter() - t1
    if best is not None:  # the epoch of lowest validation loss
        head.params = best[1]
    if stopped:
        warnings.append(f"stopped early: {stopped}; kept the best head so far (epoch {best[2]}, "
                        f"validation loss {best[0]:.4f})")
    if epochs == 0:  # imprinting only: nothing was trained, the start head is the result
        cand, verdict = choose_head(backend, bundle, start, start, feats[va], y[va], mix=(1.0,),
                                    gate={"rule": "none", "alpha": gate["alpha"]})
        verdict["reason"] = "no training (--epochs 0): the starting head is written"
        cand = start_full if start_full is not None else cand
    else:
        cand, w, scores0, scores = propose(backend, bundle, start, head, feats_va, y_va, mix)
        verdict = verdict_of(w, scores0, scores, gate)
        if gate["folds"] > 1 and gate["rule"] != "none":  # more evidence: the other folds
            splits = dataio.stratified_folds(y, val_fraction, seed, dataio.split_mode(m),
                                             gate["folds"])[1:]
            more, why = [], stopped

            for j, (tr_j, va_j) in enumerate(splits, 1):
                if why:
                    break
                if not len(va_j):
                    continue
                start_j = imprinted(tr_j)

                def fold_step(h: Head, epoch: int, s0: Head = start_j) -> str | None:
                    for name in frozen_rows:  # absent labels keep their starting rows
                        h.params[name][absent] = s0.params[name][absent]
                    return over_budget(epoch)

                head_j, why = train_fold(
                    _Trainer(backend, ts, hp, anchors_of(m, start_j.params), n_cls=n_cls, bs=bs,
                             fixed=bool(fixed), fuse=fuse),
                    backend, bundle, start_j, feats, y, tr_j, va_j, epochs=epochs,
                    patience=patience, seed=seed + j, after_step=fold_step,
                    pool_kw={"class_balanced": class_balanced, "replay_weight": replay_weight,
                             "replay": replay_set if replay_weight > 0 else None})
                _, _, s0, s1 = propose(backend, bundle, start_j, head_j, feats[va_j], y[va_j],
                                       mix)
                more.append((s0[2], s1[2]))
            if why:
                warnings.append(f"the gate's evidence folds were cut short ({why}); it judged "
                                "the run's own validation split only")
            else:
                verdict = {**verdict, **pooled_verdict((scores0[2], scores[2]), more, gate=gate)}
    verdict.update({"best_epoch": best[2] if best else 0, "early_stop": early})
    head.params = cand.params
    if replay_set is not None:  # the server's windows of the labels this device trained on
        local = np.isin(replay_set[1], np.unique(y))
        f_r, y_r = replay_set[0][local], replay_set[1][local]
        replay_info["scored"] = int(local.sum())
        if len(y_r):
            replay_info["accuracy_start"] = _val_scores(backend, bundle, start, f_r, y_r)[1]
            replay_info["accuracy_proposed"] = _val_scores(backend, bundle, head, f_r, y_r)[1]
            if epochs:
                verdict = gating.forgetting(verdict, replay_info["accuracy_start"],
                                            replay_info["accuracy_proposed"],
                                            gate["max_forget"])
    acc_before, acc_after = verdict["accuracy_before"], verdict["accuracy_after"]
    rolled_back = not verdict["keep"]

    ckpt = os.path.join(out_dir, "head.npz")
    # A head.npz of another backbone (``update`` leaves it in place until the new one is
    # written, so a crash never leaves the folder without a head) is never kept or copied.
    usable = (os.path.exists(ckpt)
              and backbone_of(ckpt) == m["files"]["backbone"]["sha256"])
    if rolled_back:
        _say(quiet, f"gate: {verdict['reason']}")
    else:
        check_finite(head.params, f"refusing to write {ckpt}")  # before anything is staged
    written = not rolled_back or not usable
    if ds.info.get("truncated_texts"):
        warnings.append(f"{ds.info['truncated_texts']} of {ds.info['n_texts']} texts were longer "
                        f"than {ds.info['max_length']} word pieces and were truncated")
    report = {
        "runner_version": __version__, "bundle": m.get("name"), "data": os.path.abspath(data_path),
        "backend": backend.name, "backend_version": backend.version, "target": m["target"],
        "trainer": backend.trainer, "trainer_version": backend.trainer_version,
        "precision": m["precision"], "accuracy_before": acc_before, "accuracy_after": acc_after,
        "rolled_back": rolled_back, "gate": verdict, "checkpoint": os.path.abspath(ckpt),
        "checkpoint_written": written, "n_windows": len(y), "n_train": int(len(tr)),
        "n_val": int(len(va)), "epochs": epochs, "batch_size": bs, "steps": steps,
        "steps_fused": steps_fused,
        "optimizer": m["optimizer"]["name"], "hparams": hp, "labels": head.labels,
        "class_balanced": class_balanced, "freeze_absent": freeze_absent,
        "replay": replay_info, "head_kind": m["head"]["kind"],
        "new_labels": new, "missing_labels": missing, "warnings": warnings,
        "skipped_files": len(ds.skipped), "skipped": ds.skipped[:50],
        "feature_seconds": feature_seconds, "features_cached": cached,
        "train_seconds": train_seconds,
        "step_ms": 1000 * train_seconds / max(steps, 1) if steps else None,
        "total_seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
        "selftest_max_abs_err": selftest_err, "history": history,
        "bn_stats": getattr(backend, "bn_stats", None),
        "stopped_early": stopped, "early_stop": early, "epochs_run": len(history),
        "budget": {"max_seconds": max_seconds, "max_memory_mb": max_memory_mb},
        "run_key": run_key, "bn_stats_gate": bn_gate,
        **ds.info,
    }
    # One commit (edgerun.commit): every new file staged and fsynced before any is replaced;
    # a kill from here on is finished by the next run, a full disk replaces nothing.
    c = Commit(out_dir)
    try:
        if rolled_back:
            if not usable:
                kept = start_full if start_full is not None else start
                c.stage("head.npz", lambda f: kept.write(f, bundle, {
                    "rolled_back": True, "imprinted": new, "run_key": run_key}))
            if all(np.isfinite(v).all() for v in head.params.values()):  # for inspection
                c.stage("head.rejected.npz", lambda f: head.write(f, bundle, {
                    "rejected": verdict["reason"], "data": os.path.basename(data_path),
                    "run_key": run_key}))
        else:
            if usable:  # keep the previous head: copy, never move, head.npz
                c.stage_copy(ckpt, "head.prev.npz")
            c.stage("head.npz", lambda f: head.write(
                f, bundle, {"accuracy_before": acc_before, "accuracy_after": acc_after,
                            "data": os.path.basename(data_path), "run_key": run_key}))
        c.stage_json("report.json", report)
        record = versions.updated(m, out_dir, allow_downgrade=allow_downgrade)
        if record is not None:
            c.stage_json(versions.VERSIONS_FILE, record)
        for name, obj in (commit_extra or {}).items():
            c.stage_json(name, obj)
        if bn_gate is not None and not bn_gate["keep"]:  # set aside, not used again
            c.stage_copy(os.path.join(out_dir, adabn.STATS_FILE), "bn_stats.rejected.npz")
            c.delete(adabn.STATS_FILE)
    except BaseException:
        c.abort()
        raise
    c.delete(TRAIN_STATE)  # finished: a later --resume starts a new adaptation
    c.apply()
    for w in warnings:
        _say(quiet, f"warning: {w}")
    _say(quiet, f"{'kept the current head' if rolled_back else 'kept new head'}: val accuracy "
         f"{acc_before:.3f} -> {acc_after:.3f} ({len(tr)} train / {len(va)} val windows, "
         f"{epochs} epochs, features {feature_seconds * 1000:.0f} ms, "
         f"train {train_seconds * 1000:.0f} ms, peak RSS {report['peak_rss_mb']:.0f} MiB)")
    return report


def infer(bundle_dir: str, data_path: str, *, head_path: str | None = None,
          out_dir: str | None = None, threads: int = 0, trust_key: str | None = None,
          quiet: bool = False, bn_stats: str | None = None) -> dict:
    """Predict labels for ``data_path``; with labels present, also accuracy.

    ``bn_stats``: a ``bn_stats.npz`` of ``run.py recalibrate``; features use its statistics.
    """
    bundle = Bundle(bundle_dir, trust_key=trust_key)
    backend = make_backend(bundle, threads)
    if bn_stats:
        backend = adabn.with_stats(backend, bundle, bn_stats, threads)
    ds = dataio.load(data_path, bundle.manifest, need_labels=False, bundle=bundle)
    head = Head.load(head_path, bundle) if head_path else Head.from_bundle(bundle)
    t0 = time.perf_counter()
    feats = backend.features(dataio.preprocess(ds.x, bundle.manifest))
    pred = _predict(backend, bundle, head, feats)
    seconds = time.perf_counter() - t0
    res = {"n_windows": len(pred), "head": head_path or "bundle", "labels": head.labels,
           "bn_stats": bn_stats,
           "skipped_files": len(ds.skipped), **ds.info,
           "predictions": pred, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if ds.y is not None:
        res["accuracy"] = _accuracy(pred, ds.y)
        res["per_label_accuracy"] = {
            lab: _accuracy([p for p, t in zip(pred, ds.y) if t == lab], [lab] * ds.y.count(lab))
            for lab in dict.fromkeys(ds.y)}
    if out_dir:
        from edgerun.files import make_folder

        make_folder(out_dir, "output folder", "predictions.json", "--out")
        write_json(os.path.join(out_dir, "predictions.json"), res)
    acc = f", accuracy {res['accuracy']:.3f}" if "accuracy" in res else ""
    _say(quiet, f"{len(pred)} windows in {seconds * 1000:.0f} ms{acc}")
    return res
