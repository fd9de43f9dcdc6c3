"""``edgetl fleet``: federated head training over a simulated fleet, then a new bundle version.

Flower (``flwr``) runs the rounds: every device is a Flower client that trains the bundle's
head on its own data with the device runner's code (numpy + the runtime) and sends back only
the head parameters and its sample count; the server aggregates them (FedAvg, or FedProx
with a ``head.l2sp`` bundle, whose anchors are the proximal term). The simulation runs in
the fleet environment (``make venv-fleet``, ``$EDGETL_FLEET_PYTHON``) over gRPC on loopback.

Clients are non-IID: each is a contiguous slice, in recording order, of one held-out HAPT
user's windows (so a client sees a few activities of one person). Each device keeps half of
its windows (per label, the later ones) as its test part; the report gives, per round, the
pooled accuracy on the devices' test parts of the aggregated head, against the shipped head
and against each device's own personalised head (the runner's gated ``adapt`` alone), and the
bytes each client sent and received per round. The last aggregated head becomes version n+1
of the bundle (:func:`edgetl.versioning.publish_head`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import ConfigError, MissingBackendError

INSTALL = "make venv-fleet (creates .venv-fleet with flwr, numpy and onnxruntime)"


def fleet_python() -> str:
    """The fleet environment's interpreter, or a clear error saying how to make it."""
    env = os.environ.get("EDGETL_FLEET_PYTHON")
    cands = [Path(env)] if env else [Path(".venv-fleet/bin/python"),
                                     Path(__file__).resolve().parents[1] / ".venv-fleet/bin/python"]
    for p in cands:
        if p.is_file():
            return str(p)
    raise MissingBackendError(
        "edgetl fleet runs Flower in its own environment (flwr pins typer < 0.21, edgetl uses "
        f"0.29): {INSTALL}; or set EDGETL_FLEET_PYTHON to a python with flwr")


@dataclass(frozen=True)
class ClientData:
    """One simulated device: raw windows, label names and where they come from."""

    name: str
    x: np.ndarray
    y: np.ndarray
    user: int


def hapt_clients(recipe, n_clients: int) -> list[ClientData]:
    """``n_clients`` non-IID devices from the recipe's held-out (device) users.

    Each user's windows, in recording order, are cut into ``ceil(n / users)`` contiguous
    slices; each slice is one device.
    """
    from edgetl.data import hapt

    if recipe.data.is_files or recipe.data.kind != "timeseries":
        raise ConfigError("edgetl fleet simulates devices from the HAPT recipe's held-out "
                          "users; recipes over your own files run their devices with "
                          "`edgetl run`")
    users = list(recipe.data.device_users)
    if n_clients < 2:
        raise ConfigError(f"--clients must be at least 2, got {n_clients}")
    per_user = math.ceil(n_clients / len(users))
    w = hapt.load_hapt(recipe.data.window, recipe.data.stride)
    out: list[ClientData] = []
    for u in users:
        s = w.users([u])
        if len(s) < 4 * per_user:
            raise ConfigError(f"user {u} has {len(s)} windows: too few for {per_user} devices "
                              "of at least 4 windows; use fewer --clients")
        labels = np.asarray(s.labels)
        for k, idx in enumerate(np.array_split(np.arange(len(s)), per_user)):
            out.append(ClientData(f"u{u:02d}-{k:02d}", s.x[idx], labels[s.y[idx]], u))
    # Round-robin over users, so any prefix of the list is spread across users.
    out.sort(key=lambda c: (int(c.name.split("-")[1]), c.user))
    return out[:n_clients]


def server_val_windows(recipe, out: Path) -> Path:
    """The recipe's server-validation users' windows as one device ``.npz`` (``x``, ``y``).

    These users never trained the server model and are not the fleet's devices: they judge
    whether the aggregated head may be published (:func:`publish_gate`).
    """
    from edgetl.data import hapt

    users = list(recipe.data.server_val_users)
    if recipe.data.is_files or not users:
        raise ConfigError("the fleet's publication gate needs the recipe's server-validation "
                          "users (data.server_val_users)")
    s = hapt.load_hapt(recipe.data.window, recipe.data.stride).users(users)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=s.x.astype(np.float32), y=np.asarray(s.labels)[s.y],
             channels=np.asarray(s.channels))
    return out


def publish_gate(bundle: Path, params: dict, data: Path, work: Path, *,
                 alpha: float | None = None) -> dict:
    """Whether the aggregated head ``params`` may replace ``bundle``'s shipped head.

    Both heads predict ``data`` (labelled windows no device trained on) through the device
    runner; the device's own gate rule (:func:`edgerun.gate.decide`, level ``alpha``,
    default the bundle's ``adapt.gate.alpha``) compares the paired predictions.
    """
    from edgerun import gate
    from edgerun.adapt import gate_settings
    from edgerun.bundle import Bundle
    from edgerun.head import Head

    from edgetl.adapt import run_runner

    b = Bundle(str(bundle))
    shipped = Head.from_bundle(b)
    rule = gate_settings(b.manifest, alpha, None, None, None)[0]  # the device's own rule
    work.mkdir(parents=True, exist_ok=True)
    path = work / "aggregated_head.npz"
    Head({k: np.asarray(v, np.float32) for k, v in params.items()},
         list(shipped.labels)).save(str(path), b)
    with np.load(data) as z:
        y = z["y"].astype(str)
    old = np.asarray(run_runner("infer", bundle, "--data", str(data))["predictions"]) == y
    new = np.asarray(run_runner("infer", bundle, "--data", str(data), "--head",
                                str(path))["predictions"]) == y
    verdict = gate.decide(old, new, alpha=rule["alpha"], rule=rule["rule"])
    return {**verdict, "data": str(data), "shipped_accuracy": float(old.mean()),
            "aggregated_accuracy": float(new.mean())}


def _write_clients(clients: list[ClientData], folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)  # device states of an earlier run would be reused otherwise
    for c in clients:
        d = folder / c.name
        d.mkdir(parents=True)
        np.savez(d / "local.npz", x=c.x.astype(np.float32), y=np.asarray(c.y, dtype=str))


def run_fleet(bundle: Path, clients: list[ClientData], out: Path, *, rounds: int = 10,
              local_epochs: int = 5, personal_epochs: int = 30, strategy: str = "fedavg",
              proximal_mu: float = 0.0, seed: int = 0, python: str | None = None,
              sign_key: Path | None = None, gate_data: Path | None = None,
              gate_alpha: float | None = None) -> dict:
    """Run the federated rounds in the fleet environment; write the report and bundle v+1.

    Returns the report (also ``out/fleet.json``); ``out/fleet.md`` and ``out/fleet.png`` next
    to it, the new bundle version in ``out/bundle-v<N>`` — only if the aggregated head passes
    the device's gate rule against the shipped head on ``gate_data`` (the server-validation
    users: :func:`server_val_windows`; ``None``: published unchecked). Otherwise the report
    says aggregation bought nothing and the shipped head stays (``published``: false).

    Raises:
        ConfigError: bad options; MissingBackendError: no fleet environment.
    """
    from edgetl.adapt import run_json
    from edgetl.manifest import Manifest
    from edgetl.versioning import publish_head

    if rounds < 1 or local_epochs < 1 or personal_epochs < 0:
        raise ConfigError("need --rounds >= 1, --local-epochs >= 1, --personal-epochs >= 0")
    if strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"--strategy: expected fedavg or fedprox, got {strategy!r}")
    if (strategy == "fedprox") != (proximal_mu > 0):
        raise ConfigError("FedProx takes --proximal-mu > 0, FedAvg none")
    bundle, out = Path(bundle), Path(out)
    m = Manifest.read(bundle)
    m.verify(bundle)
    if strategy == "fedprox" and "l2sp" not in m.train_step["hparam_inputs"]:
        raise ConfigError(f"{bundle}: FedProx needs a train step with anchor inputs (a bundle "
                          "exported with head.l2sp > 0); use --strategy fedavg")
    if m.target != "onnx":
        raise ConfigError(f"{bundle} is a {m.target} bundle; the fleet environment has "
                          "onnxruntime only: use an ONNX bundle")
    py = python or fleet_python()
    out.mkdir(parents=True, exist_ok=True)
    _write_clients(clients, out / "devices")
    sim = Path(__file__).with_name("_fleet_sim.py")
    t0 = time.perf_counter()
    run_json([py, str(sim), str(bundle.resolve()), str((out / "devices").resolve()),
              str((out / "sim.json").resolve()), "--rounds", str(rounds),
              "--local-epochs", str(local_epochs), "--personal-epochs", str(personal_epochs),
              "--strategy", strategy, "--proximal-mu", str(proximal_mu), "--seed", str(seed)],
             "fleet simulation")
    wall = time.perf_counter() - t0
    rep = json.loads((out / "sim.json").read_text())
    with np.load(out / "sim.npz") as z:
        final = {n: z[f"round{rounds}.{n}"] for n in rep["param_names"]}
    new = out / f"bundle-v{m.version + 1}"
    last = rep["rounds"][-1]
    verdict = (publish_gate(bundle, final, gate_data, out / "gate", alpha=gate_alpha)
               if gate_data is not None else None)
    if verdict is None or verdict["keep"]:
        man = publish_head(bundle, new, final, sign_key=sign_key, note={
            "how": f"Flower {rep['strategy']} over {len(clients)} devices, {rounds} rounds",
            "global_accuracy": last["accuracy_accuracy"],
            "original_accuracy": last["original_accuracy"],
            **({"gate": verdict["reason"]} if verdict else {})})
        rep.update(published=True, new_bundle=str(new), new_version=man.version)
    else:
        if new.exists():
            shutil.rmtree(new)  # a version of an earlier run must not look like this run's
        rep.update(published=False, new_bundle=None, new_version=None)
    rep.update(bundle=str(bundle), parent_version=m.version, gate=verdict,
               backbone_unchanged=True, wall_seconds=wall,
               local_epochs=local_epochs, personal_epochs=personal_epochs,
               users=sorted({c.user for c in clients}), n_clients=len(clients))
    (out / "fleet.json").write_text(json.dumps(rep, indent=2))
    (out / "fleet.md").write_text(markdown(rep))
    plot(rep, out / "fleet.png")
    return rep


def markdown(rep: dict) -> str:
    """Per-round table of the fleet report."""
    r0 = rep["rounds"][0]
    head = (f"Flower {rep['flwr']} {rep['strategy']}, {rep['n_clients']} devices (users "
            f"{rep['users'][0]}-{rep['users'][-1]}), {rep['local_epochs']} local epochs a "
            f"round; {rep['transport']}; wall {rep['wall_seconds']:.0f} s\n\n"
            f"Pooled accuracy on the devices' test parts ({r0['n_test']} windows): shipped "
            f"head {r0['original_accuracy']:.4f}, per-device personalisation "
            f"{r0['personal_accuracy']:.4f}.\n\n"
            "| round | global head | shipped head | personalised | bytes up / client | "
            "bytes down / client | seconds |\n|---|---|---|---|---|---|---|\n")
    rows = [f"| {r['round']} | {r['accuracy_accuracy']:.4f} | {r['original_accuracy']:.4f} | "
            f"{r['personal_accuracy']:.4f} | {r['bytes_up_per_client']:,.0f} | "
            f"{r['bytes_down_per_client']:,} | {r['seconds']:.1f} |" for r in rep["rounds"]]
    g = rep.get("gate")
    judged = ("" if not g else
              f"\n\nPublication gate on the server-validation users ({g['n']} windows): shipped "
              f"{g['shipped_accuracy']:.4f}, aggregated {g['aggregated_accuracy']:.4f}; "
              f"{g['reason']}.")
    if rep.get("published", True):
        tail = (f"{judged}\n\nNew bundle: {rep['new_bundle']} (version {rep['new_version']}, "
                f"parent version {rep['parent_version']}, same backbone: devices keep their "
                "personal heads).\n")
    else:
        tail = (f"{judged}\n\nNot published: aggregation bought nothing the gate can see; the "
                f"shipped head (version {rep['parent_version']}) stays.\n")
    return head + "\n".join(rows) + tail


def plot(rep: dict, path: Path) -> Path:
    """Accuracy per round: aggregated head vs shipped head vs per-device personalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rep["rounds"]
    xs = [0] + [x["round"] for x in r]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, [r[0]["original_accuracy"]] + [x["accuracy_accuracy"] for x in r], "o-",
            label=f"global head ({rep['strategy']})")
    ax.axhline(r[0]["original_accuracy"], color="grey", ls="--", label="shipped head")
    ax.axhline(r[0]["personal_accuracy"], color="tab:green", ls=":",
               label="per-device personalisation")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on the devices' test windows")
    ax.set_title(f"{rep['n_clients']} devices, {r[0]['bytes_up_per_client']:,.0f} B up / "
                 "client / round")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `edgetl fleet`")
