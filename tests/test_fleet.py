"""Flower fleet: devices send only head parameters and counts, the server's FedAvg is the
weighted mean of their updates, and the result ships as bundle version 2.

The simulation runs in the fleet environment (``make venv-fleet``; ``make test`` points
``EDGETL_FLEET_PYTHON`` at it): a Flower server and 6 gRPC clients on loopback, 2 rounds.
"""

import io
import json
import sys

import numpy as np
import pytest

from edgetl.config import HeadConfig
from edgetl.data.synthetic import make_windows
from edgetl.errors import ConfigError, MissingBackendError
from edgetl.fleet import ClientData, fleet_python, run_fleet
from edgetl.manifest import MANIFEST, Manifest, sha256_file

from .conftest import LABELS, RUNNER, export_tiny, tiny_checkpoint

try:
    FLEET_PY, NO_ENV = fleet_python(), ""
except MissingBackendError as e:  # only outside `make test`, which creates the environment
    FLEET_PY, NO_ENV = None, f"no fleet environment: {e}"

# A skip per test, not per module: `-m unit` then deselects these quietly.
pytestmark = [pytest.mark.env_fleet, pytest.mark.skipif(FLEET_PY is None, reason=NO_ENV)]


def _clients(n: int = 6) -> list[ClientData]:
    """Non-IID devices: each its own sensor shift and a label mix skewed to one label."""
    out = []
    for k in range(n):
        x, y = make_windows(60, window=32, seed=10 + k, gain=1.0 + 0.15 * k,
                            offset=0.2 * (k % 3) - 0.2)
        keep = (y == k % 3) | (np.arange(len(y)) % 3 == 0)  # mostly label k % 3
        out.append(ClientData(f"c{k}", x[keep], np.asarray(LABELS)[y[keep]], k))
    return out


def _npy_bytes(params) -> int:
    """What Flower sends for a list of ndarrays: each serialised with np.save."""
    total = 0
    for a in params:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        total += len(buf.getvalue())
    return total


def _fedavg_round1(bundle, clients, tmp, epochs):
    """Round 1 recomputed in-process with the device code: the weighted mean of updates."""
    sys.path.insert(0, str(RUNNER.parent))
    from edgerun.fleet_client import FleetDevice

    updates, counts = [], []
    for c in clients:
        d = tmp / c.name
        d.mkdir(parents=True)
        np.savez(d / "local.npz", x=c.x.astype(np.float32), y=np.asarray(c.y, dtype=str))
        dev = FleetDevice(str(bundle), str(d / "local.npz"), str(d))
        p, n, _ = dev.train(dev.params(), epochs=epochs, rnd=1)
        updates.append(p)
        counts.append(n)
    w = np.asarray(counts, np.float64) / sum(counts)
    return [sum(wi * u[i] for wi, u in zip(w, updates)) for i in range(len(updates[0]))]


def test_fleet_fedavg_sends_only_heads_and_ships_version_2(tiny_bundle, tmp_path):
    clients = _clients()
    rep = run_fleet(tiny_bundle, clients, tmp_path / "fleet", rounds=2, local_epochs=2,
                    personal_epochs=5, python=FLEET_PY)
    assert [r["round"] for r in rep["rounds"]] == [1, 2]
    m = Manifest.read(tiny_bundle)
    with np.load(tiny_bundle / m.files["head_init"].path) as z:
        shipped = [z[p["name"]] for p in m.head["params"]]
    for r in rep["rounds"]:
        assert r["clients"] == 6 and r["fit_metrics_keys"] == []  # nothing but params + count
        assert r["bytes_up_per_client"] == r["bytes_down_per_client"] == _npy_bytes(shipped)
        for k in ("accuracy_accuracy", "original_accuracy", "personal_accuracy"):
            assert 0.0 <= r[k] <= 1.0
    # The server's aggregate after round 1 is FedAvg of what the devices computed.
    with np.load(tmp_path / "fleet" / "sim.npz") as z:
        agg1 = [z[f"round1.{p['name']}"] for p in m.head["params"]]
        agg2 = {p["name"]: z[f"round2.{p['name']}"] for p in m.head["params"]}
    want = _fedavg_round1(tiny_bundle, clients, tmp_path / "check", epochs=2)
    for got, exp, init in zip(agg1, want, shipped):
        assert np.abs(got - exp).max() < 1e-5
        assert np.abs(got - init).max() > 1e-3  # the devices did train
    # Version 2: the round-2 head on the same backbone, parent = the shipped bundle.
    new = tmp_path / "fleet" / "bundle-v2"
    m2 = Manifest.read(new)
    assert (m2.version, m2.parent["manifest_sha256"]) == (2, sha256_file(tiny_bundle / MANIFEST))
    assert m2.files["backbone"].sha256 == m.files["backbone"].sha256
    with np.load(new / m2.files["head_init"].path) as z:
        assert all(np.array_equal(z[k], v) for k, v in agg2.items())
    saved = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert saved["new_version"] == 2 and saved["n_clients"] == 6
    assert "| 2 |" in (tmp_path / "fleet" / "fleet.md").read_text()
    assert (tmp_path / "fleet" / "fleet.png").stat().st_size > 1000
    # Each device's personal head (the per-device baseline) is in its state folder.
    assert all((tmp_path / "fleet" / "devices" / c.name / "head.npz").is_file() for c in clients)


def test_fedprox_pulls_toward_the_server_head(tmp_path):
    bundle = export_tiny(tiny_checkpoint(HeadConfig(lr=0.1, l2sp=0.1)), tmp_path / "l2sp")
    clients = _clients()
    dist = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 5.0)):
        run_fleet(bundle, clients, tmp_path / strategy, rounds=1, local_epochs=3,
                  personal_epochs=0, strategy=strategy, proximal_mu=mu, python=FLEET_PY)
        m = Manifest.read(bundle)
        with np.load(tmp_path / strategy / "sim.npz") as z, \
                np.load(bundle / m.files["head_init"].path) as h:
            dist[strategy] = sum(float(np.abs(z[f"round1.{k}"] - h[k]).sum()) for k in h.files)
    assert dist["fedprox"] < 0.8 * dist["fedavg"], dist


def test_fleet_refuses_fedprox_without_anchors(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="anchor inputs"):
        run_fleet(tiny_bundle, _clients(2), tmp_path, strategy="fedprox", proximal_mu=0.1,
                  python=FLEET_PY)
