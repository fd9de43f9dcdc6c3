"""Fleet simulation for ``edgetl fleet``: a Flower server and N device clients on loopback.

Runs in the fleet environment (``make venv-fleet``: flwr + numpy + onnxruntime; flwr's pins
conflict with edgetl's typer) and imports neither edgetl nor torch::

    python _fleet_sim.py BUNDLE CLIENTS_DIR OUT.json --rounds 10 --local-epochs 5

``CLIENTS_DIR`` holds one folder per device with its ``local.npz`` (raw windows ``x``, label
names ``y``), written by ``edgetl fleet``; the device's state (personal head) goes there too.
The server (``flwr.server.start_server``, main thread, 127.0.0.1 on a free port) runs
Flower's FedAvg or FedProx strategy; every device is a ``flwr.client.start_client`` gRPC
client in a thread of this process, running ``device_runners/edgerun/fleet_client.py`` (one
shared runtime session: the simulated devices share this machine's CPU). Writes the report
JSON (per round: accuracies, bytes per client each way, seconds) and ``OUT.npz`` (the
aggregated head after every round). Prints one JSON line: the report's path.
"""

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # edgetl's own modules must not shadow the packages below
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "device_runners"))

import numpy as np  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the Flower server did not listen on 127.0.0.1:{port}")


def _payload(parameters) -> int:
    """Bytes of Flower's serialised parameters (the ndarrays as Flower sends them)."""
    return int(sum(len(t) for t in parameters.tensors))


def make_strategy(base, n: int, rounds: list, heads: list, args):
    """``base`` (FedAvg or FedProx) that also records bytes, heads and accuracies."""
    import flwr as fl

    def weighted(metrics):
        tot = sum(n for n, _ in metrics)
        return {k: sum(n * m[k] for n, m in metrics if k in m) / max(tot, 1)
                for k in ("accuracy", "original", "personal")}

    class Recording(base):
        def configure_fit(self, server_round, parameters, client_manager):
            self._t0 = time.perf_counter()
            self._down = _payload(parameters)
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"{len(failures)} client(s) failed in round {server_round}: "
                                   f"{failures[0]!r}")
            up = [_payload(r.parameters) for _, r in results]
            extra = [sorted(r.metrics) for _, r in results if r.metrics]
            agg, metrics = super().aggregate_fit(server_round, results, failures)
            heads.append(fl.common.parameters_to_ndarrays(agg))
            rounds.append({"round": server_round, "clients": len(results),
                           "bytes_up_per_client": float(np.mean(up)),
                           "bytes_down_per_client": self._down,
                           "fit_metrics_keys": extra, "n_train": int(sum(
                               r.num_examples for _, r in results))})
            return agg, metrics

        def aggregate_evaluate(self, server_round, results, failures):
            loss, metrics = super().aggregate_evaluate(server_round, results, failures)
            rec = next(r for r in rounds if r["round"] == server_round)
            rec.update(loss=loss, **{f"{k}_accuracy": v for k, v in metrics.items()},
                       n_test=int(sum(r.num_examples for _, r in results)),
                       seconds=time.perf_counter() - self._t0)
            return loss, metrics

    kw = {"proximal_mu": args.proximal_mu} if args.strategy == "fedprox" else {}
    return Recording(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n,
                     min_evaluate_clients=n, min_available_clients=n,
                     on_fit_config_fn=lambda r: {"local_epochs": args.local_epochs,
                                                 "server_round": r},
                     evaluate_metrics_aggregation_fn=weighted,
                     initial_parameters=fl.common.ndarrays_to_parameters(args.initial), **kw)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("clients")
    p.add_argument("out")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--personal-epochs", type=int, default=30)
    p.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    p.add_argument("--proximal-mu", type=float, default=0.0)
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import flwr as fl

    logging.getLogger("flwr").setLevel(logging.ERROR)
    from edgerun.backends import make_backend
    from edgerun.bundle import Bundle
    from edgerun.fleet_client import FleetDevice, join

    t0 = time.perf_counter()
    backend = make_backend(Bundle(args.bundle), 1)
    names = sorted(d for d in os.listdir(args.clients)
                   if os.path.isfile(os.path.join(args.clients, d, "local.npz")))
    devices = [FleetDevice(args.bundle, os.path.join(args.clients, d, "local.npz"),
                           os.path.join(args.clients, d), test_fraction=args.test_fraction,
                           seed=args.seed, backend=backend) for d in names]
    for dev in devices:
        dev.personalise(args.personal_epochs)
    setup_s = time.perf_counter() - t0
    args.initial = devices[0].params()
    rounds, heads = [], []
    base = fl.server.strategy.FedProx if args.strategy == "fedprox" else \
        fl.server.strategy.FedAvg
    strategy = make_strategy(base, len(devices), rounds, heads, args)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    errors = []

    def device(dev):
        try:
            join(address, dev)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    def launch():
        _wait_port(port)
        for dev in devices:
            threading.Thread(target=device, args=(dev,), daemon=True).start()

    threading.Thread(target=launch, daemon=True).start()
    t1 = time.perf_counter()
    fl.server.start_server(server_address=address, strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=args.rounds))
    fed_s = time.perf_counter() - t1
    if errors or len(rounds) != args.rounds:
        print(f"error: fleet run incomplete ({len(rounds)} of {args.rounds} rounds): "
              f"{errors[:3]}", file=sys.stderr)
        return 1
    per_dev = [{"client": n, "n_train": int(len(d.train_idx)), "n_test": int(len(d.test_idx)),
                "labels": sorted({d.labels[i] for i in d.y.tolist()}),
                "personal": d.personal_note} for n, d in zip(names, devices, strict=True)]
    report = {"flwr": fl.__version__, "transport": f"gRPC, loopback {address}",
              "strategy": args.strategy, "proximal_mu": args.proximal_mu,
              "rounds": rounds, "clients": per_dev, "setup_seconds": setup_s,
              "federated_seconds": fed_s, "param_names": devices[0].names,
              "param_bytes": int(sum(a.nbytes for a in args.initial))}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    np.savez(os.path.splitext(args.out)[0] + ".npz",
             **{f"round{r + 1}.{n}": a for r, h in enumerate(heads)
                for n, a in zip(devices[0].names, h, strict=True)})
    print(json.dumps({"report": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
