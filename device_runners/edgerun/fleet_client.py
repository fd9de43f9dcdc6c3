"""A device in a Flower fleet: train the head locally, send only its parameters and counts.

Needs numpy, the bundle's runtime and ``flwr`` (imported only by :func:`numpy_client` /
:func:`join`; ``make venv-fleet``). The device computes backbone features once, keeps its
data local and splits it (per label, in recording order) into a train part and a test part:

* ``fit``: start from the server's head, ``local_epochs`` epochs of the bundle's own train
  step on the train part, return ``(new head parameters, number of train windows, {})``.
  With ``proximal_mu`` > 0 (FedProx) the L2-SP train step's anchors are the server's head,
  so ``mu/2 ||w - w_global||^2`` is exactly FedProx's proximal term; it needs a bundle
  exported with ``head.l2sp`` > 0.
* ``evaluate``: accuracy of the server's head on the test part, plus (for the fleet report)
  the shipped head's and the device's own personalised head's accuracy there.
* :meth:`FleetDevice.personalise`: the runner's ``adapt`` (gated, on the train part) from the
  shipped head, into the device's state folder: the per-device baseline.
"""

from __future__ import annotations

import os

import numpy as np

from edgerun import RunnerError
from edgerun import adapt as ad
from edgerun import data as dataio
from edgerun.backends import make_backend
from edgerun.bundle import Bundle
from edgerun.head import Head


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class FleetDevice:
    """One device's local data, cached features and head training (no flwr needed)."""

    def __init__(self, bundle_dir: str, data_path: str, state_dir: str, *,
                 test_fraction: float = 0.5, seed: int = 0, threads: int = 1, backend=None):
        self.bundle = Bundle(bundle_dir)
        m = self.bundle.manifest
        self.backend = backend or make_backend(self.bundle, threads)
        self.state_dir, self.seed = state_dir, seed
        ds = dataio.load(data_path, m, need_labels=True)
        self.shipped = Head.from_bundle(self.bundle)
        self.labels = self.shipped.labels
        keep = np.asarray([lab in self.labels for lab in ds.y], bool)
        if not keep.any():
            raise RunnerError(f"{data_path}: no window has a label of this bundle's head "
                              f"{self.labels}; a fleet aggregates one shared label set")
        x = ds.x[keep]
        self.y = np.asarray([self.labels.index(lab) for lab, k in zip(ds.y, keep) if k])
        self.feats = self.backend.features(dataio.preprocess(x, m))
        self.train_idx, self.test_idx = dataio.stratified_split(self.y, test_fraction, seed)
        os.makedirs(state_dir, exist_ok=True)
        self.train_data = os.path.join(state_dir, "train.npz")
        tr = self.train_idx
        np.savez(self.train_data, x=x[tr], y=np.asarray(self.labels)[self.y[tr]])
        self.names = [p["name"] for p in m["head"]["params"]]
        self.personal: Head | None = None
        self.personal_note = "not personalised"

    # -- parameters ------------------------------------------------------------------------
    def params(self, head: Head | None = None) -> list:
        """Head parameters in manifest order (what the device sends)."""
        h = head or self.shipped
        return [h.params[n] for n in self.names]

    def _head(self, arrays: list) -> Head:
        if len(arrays) != len(self.names):
            raise RunnerError(f"the server sent {len(arrays)} arrays; this head has "
                              f"{len(self.names)} parameters {self.names}")
        return Head({n: np.asarray(a, np.float32) for n, a in zip(self.names, arrays)},
                    self.labels)

    # -- training and evaluation ---------------------------------------------------------------
    def train(self, arrays: list, *, epochs: int, batch_size: int = 32,
              proximal_mu: float = 0.0, rnd: int = 0) -> tuple[list, int, float]:
        """``epochs`` of the bundle's train step on the train part; ``(params, n, loss)``."""
        m = self.bundle.manifest
        ts = m["train_step"]
        head = self._head(arrays)
        hp = dict(m["optimizer"]["hparams"])
        anchors = ad.anchors_of(m, head.params)  # FedProx: the server's head is the anchor
        if proximal_mu > 0:
            if "l2sp" not in ts["hparam_inputs"]:
                raise RunnerError("FedProx (proximal_mu > 0) needs a bundle whose train step "
                                  "takes anchors: export it with head.l2sp > 0")
            hp["l2sp"] = proximal_mu
        elif "l2sp" in hp:
            hp["l2sp"] = 0.0  # plain FedAvg: no pull toward the server's head
        state = ad._zero_state(m, head.params)
        fixed = ts.get("batch_size")
        bs = int(fixed) if fixed else batch_size
        n_cls = head.rows(m["head"]["class_params"])
        eye = np.eye(n_cls, dtype=np.float32)
        rng = np.random.default_rng([self.seed, rnd])
        tr, total = self.train_idx, 0.0
        for _ in range(epochs):
            order = rng.permutation(tr)
            for i in range(0, len(order), bs):
                b = order[i : i + bs]
                f, t = self.feats[b], eye[self.y[b]]
                w = np.ones(len(b), np.float32)
                if fixed and len(b) < bs:  # fixed-batch runtimes: pad with weight 0
                    pad = bs - len(b)
                    f = np.concatenate([f, np.zeros((pad, f.shape[1]), np.float32)])
                    t = np.concatenate([t, np.zeros((pad, n_cls), np.float32)])
                    w = np.concatenate([w, np.zeros(pad, np.float32)])
                total = ad._step(self.backend, ts, hp, f, t, w, head.params, state, anchors)
        return self.params(head), int(len(tr)), float(total)

    def evaluate(self, head: Head) -> tuple[float, float, int]:
        """``(loss, accuracy, n)`` of ``head`` on the test part."""
        te = self.test_idx
        if len(te) == 0:
            return 0.0, 0.0, 0
        logits = ad._infer(self.backend, self.bundle, head, self.feats[te])["logits"]
        logits = logits[:, : len(self.labels)]
        loss = float(-_log_softmax(logits)[np.arange(len(te)), self.y[te]].mean())
        return loss, float((logits.argmax(1) == self.y[te]).mean()), int(len(te))

    def personalise(self, epochs: int) -> None:
        """The runner's gated ``adapt`` from the shipped head on the train part (state folder)."""
        if len(set(self.y[self.train_idx].tolist())) < 2:
            self.personal, self.personal_note = self.shipped, "one label only: shipped head"
            return
        rep = ad.adapt(self.bundle.root, self.train_data, self.state_dir, epochs=epochs,
                       seed=self.seed, quiet=True)
        self.personal = Head.load(os.path.join(self.state_dir, "head.npz"), self.bundle)
        self.personal_note = "rolled back" if rep["rolled_back"] else "adapted"

    def evaluate_all(self, arrays: list) -> tuple[float, int, dict]:
        """Flower's ``evaluate``: the server's head, plus the report's two references."""
        loss, acc, n = self.evaluate(self._head(arrays))
        metrics = {"accuracy": acc, "original": self.evaluate(self.shipped)[1]}
        if self.personal is not None:
            metrics["personal"] = self.evaluate(self.personal)[1]
        return loss, n, metrics


def numpy_client(device: FleetDevice, *, batch_size: int = 32):
    """A ``flwr.client.NumPyClient`` for ``device``: fit sends only parameters and a count."""
    import flwr as fl

    class DeviceClient(fl.client.NumPyClient):
        def get_parameters(self, config):
            return device.params()

        def fit(self, parameters, config):
            params, n, _ = device.train(parameters, epochs=int(config.get("local_epochs", 1)),
                                        batch_size=batch_size,
                                        proximal_mu=float(config.get("proximal_mu", 0.0)),
                                        rnd=int(config.get("server_round", 0)))
            return params, n, {}  # nothing but the head and the sample count leaves

        def evaluate(self, parameters, config):
            return device.evaluate_all(parameters)

    return DeviceClient()


def join(server_address: str, device: FleetDevice, *, batch_size: int = 32) -> None:
    """Connect ``device`` to a Flower server (gRPC) and serve it until the server is done."""
    import flwr as fl

    fl.client.start_client(server_address=server_address,
                           client=numpy_client(device, batch_size=batch_size).to_client(),
                           insecure=True)
