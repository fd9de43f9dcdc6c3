"""Trainable coverage cells: a case x target x ``--trainable SPEC`` (fp32), in a process each.

Steps (a failed ``build`` or ``export`` skips the rest):

build     the case's factory (as the head-only cells: init check, server-side head fit)
export    ``edgetl.export_model(..., export=ExportConfig(trainable=SPEC))``: the cut, the
          autodiff train step, its lowering, and the export's own checks (the train step
          against the float64 torch step, ``edgetl.tolerances.train_step_bound``)
selftest  ``device_runners/run.py selftest``: the shipped reference steps on the device side
parity    the oracle of issue 18: 20 train steps through the device runner's own backend
          (``edgerun``: features from the bundle's backbone graph, ``adapt._step``) against
          ``torch.optim`` on the whole PyTorch model (eval mode, only the SPEC's tensors and
          the head require grad) on the case's labelled data; the loss of every step and every
          final trainable tensor (class rows in use) are compared with the same torch loop in
          float64 within ``train_step_bound(atol, value, noise)``, ``noise`` being torch
          float32's own distance to the float64 loop (float64 impossible: the float32 loop
          within ``atol * max(1, |v|)``)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from tools.coverage.cell import CLASS_CAPACITY, N_CALIB, N_HELDOUT, Row, exc_reason

STEPS = ("build", "export", "selftest", "parity")
BLOCKING = ("build", "export")
#: The SPECs and targets a full run covers (fp32: int8 only quantises the frozen prefix).
SPECS = ("bias", "last:1", "all")
TARGETS = ("onnx", "tflite")
PRECISION = "fp32"
PARITY_STEPS = 20
#: Rows of each parity batch given sample weight 0 (the runner's padding).
PADDED = 3


def cell_main(case_name: str, target: str, spec: str, folder: str) -> None:
    """The child: run every step of one trainable cell, saving the row as it goes."""
    from tools.coverage.cell import child_setup

    d = Path(folder)
    child_setup(d)
    row = Row(d / "result.json", case_name, target, PRECISION, steps=STEPS,
              extra={"spec": spec})
    t0 = time.perf_counter()
    try:
        _steps(row, d, case_name, target, spec)
    finally:
        row.metric(cell_s=time.perf_counter() - t0)


def _graph_stats(bundle: Path, m) -> dict:
    """The train graph's file, size and node count.

    ONNX: graph nodes; TFLite: operators of the file's first subgraph.
    """
    ts = m.train_step
    path = bundle / m.files[ts["file"]].path
    out = {"train_graph": path.name, "train_graph_bytes": path.stat().st_size}
    try:
        if path.suffix == ".onnx":
            import onnx

            out["train_graph_nodes"] = len(onnx.load(str(path)).graph.node)
        else:
            from ai_edge_litert.interpreter import Interpreter

            interp = Interpreter(model_path=str(path))
            out["train_graph_nodes"] = len(interp._get_ops_details())  # noqa: SLF001
    except Exception:  # noqa: BLE001 - a count is a nicety, never a failure
        pass
    return out


def _steps(row: Row, d: Path, case_name: str, target: str, spec: str) -> None:
    import edgetl
    from edgetl.config import ExportConfig
    from tools.coverage.cell import build_case, runner_json

    case = build_case(row, case_name)
    if case is None:
        return
    row.data.update(source=case.source, input=case.spec)
    row.set("build", "ok")
    calib = case.data(N_CALIB, 2, case.labels)[0]
    heldout = case.data(N_HELDOUT, 1, case.labels)

    bundle = d / "bundle"
    row.set("export", "running")
    t = time.perf_counter()
    try:
        kw = {"call": case.call} if case.call is not None else {}
        m = edgetl.export_model(
            case.model, example=case.example, labels=case.labels, out=bundle, head=case.head,
            target=target, precision=PRECISION, calibration=calib, heldout=heldout,
            mean=case.mean, std=case.std, layout=case.layout, name=case_name,
            export=ExportConfig(class_capacity=CLASS_CAPACITY, trainable=spec), **kw)
    except Exception as e:  # noqa: BLE001
        row.metric(export_s=time.perf_counter() - t)
        row.set("export", "failed", exc_reason(e))
        for s in ("selftest", "parity"):
            row.set(s, "skipped")
        return
    tr = m.trainable or {}
    row.metric(export_s=time.perf_counter() - t,
               train_step_max_abs_err=m.checks.get("train_step_max_abs_err"),
               heldout_torch=(m.checks.get("accuracy") or {}).get("reference_accuracy"),
               heldout_bundle=(m.checks.get("accuracy") or {}).get("bundle"),
               cut=(tr.get("cut") or {}).get("node"), cut_dim=m.features.get("dim"),
               trainable_tensors=len(tr.get("params", [])),
               trainable_params=int(sum(np.prod(p["shape"]) for p in m.head["params"])),
               lr=m.optimizer["hparams"]["lr"], **_graph_stats(bundle, m))
    row.set("export", "ok")

    row.set("selftest", "running")
    try:
        out = runner_json("selftest", bundle)
        row.metric(selftest_train_max_abs_err=out.get("train_max_abs_err"))
        row.set("selftest", "ok" if out.get("ok") else "failed",
                "" if out.get("ok") else f"self-test not ok: {out}")
    except Exception as e:  # noqa: BLE001
        row.set("selftest", "failed", exc_reason(e))

    row.set("parity", "running")
    try:
        res = parity(case, bundle, m)
        row.metric(**{k: v for k, v in res.items() if k != "failed"})
        row.set("parity", "failed" if res["failed"] else "ok", res["failed"])
    except Exception as e:  # noqa: BLE001
        row.set("parity", "failed", exc_reason(e))


def _torch_loop(edge, names: list[str], hp: dict, x, targets, weights, dtype):
    """``PARITY_STEPS`` of torch.optim.SGD/Adam on ``edge`` (a copy, in ``dtype``)."""
    import torch

    from edgetl.trainable.step import param_groups

    m = copy.deepcopy(edge).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    bp = dict(m.backbone.named_parameters())
    head = m.head_state()
    train = [bp[n] for n in names] + list(m.head.parameters())
    for p in train:
        p.requires_grad_(True)
    train = param_groups(list(m.head.parameters()), [bp[n] for n in names], hp)
    if "momentum" in hp:
        opt = torch.optim.SGD(train, lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.Adam(train, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                               eps=hp["eps"], weight_decay=hp["weight_decay"])
    losses = []
    for i in range(len(x)):
        opt.zero_grad()
        xi = x[i] if not x[i].is_floating_point() else x[i].to(dtype)
        logp = torch.log_softmax(m(xi), 1)
        w = weights[i].to(dtype) / weights[i].sum()
        loss = -(w[:, None] * targets[i].to(dtype) * logp).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    final = {f"backbone.{n}": bp[n].detach().double().numpy() for n in names}
    final.update({k: v.detach().double().numpy() for k, v in head.items()})
    return np.asarray(losses), final


def parity(case, bundle: Path, m) -> dict:
    """20 steps: the device runner's backend vs torch.optim (float32 and float64); metrics."""
    import dataclasses

    import torch
    from edgerun import adapt as ad

    from edgetl.export.bundle import device_session
    from edgetl.export.model import as_edge_model, call_positional
    from edgetl.tolerances import parity_atol, train_step_bound

    md = dataclasses.asdict(m)
    ts, hp = md["train_step"], md["optimizer"]["hparams"]
    batch, rows, k = ts["batch_size"], md["head"]["capacity"], len(case.labels)
    x, y = case.data(PARITY_STEPS * batch, 7, case.labels)
    xn = case.normalize(x)
    ids = np.array([case.labels.index(str(v)) for v in y])
    g = torch.Generator().manual_seed(3)
    targets = torch.zeros(PARITY_STEPS * batch, k)
    targets[torch.arange(len(ids)), torch.from_numpy(ids)] = 1.0
    targets = targets.reshape(PARITY_STEPS, batch, k)
    weights = torch.rand(PARITY_STEPS, batch, generator=g) + 0.5
    weights[:, -PADDED:] = 0.0
    xt = torch.from_numpy(xn).reshape(PARITY_STEPS, batch, *xn.shape[1:])

    sess = device_session(bundle, md, threads=1)
    with np.load(bundle / md["files"]["head_init"]["path"]) as z:
        params = {p["name"]: z[p["name"]].copy() for p in md["head"]["params"]}
    state = ad._zero_state(md, params)  # noqa: SLF001 - the runner's own step
    t_pad = np.zeros((PARITY_STEPS, batch, rows), np.float32)
    t_pad[..., :k] = targets.numpy()
    got_l = []
    for i in range(PARITY_STEPS):
        f = sess.features(xn[i * batch:(i + 1) * batch])
        got_l.append(ad._step(sess, ts, hp, f, t_pad[i], weights[i].numpy(),  # noqa: SLF001
                              params, state))
    edge, _, _ = as_edge_model(case.model, head=case.head, labels=case.labels,
                               call=case.call or call_positional)
    names = [p["name"].removeprefix("backbone.") for p in md["trainable"]["params"]]
    hp_t = {**hp, **({"beta1": hp.get("beta1"), "beta2": hp.get("beta2")} if "beta1" in hp
                     else {})}
    l32, p32 = _torch_loop(edge, names, hp_t, xt, targets, weights, torch.float32)
    try:
        l64, p64 = _torch_loop(edge, names, hp_t, xt, targets, weights, torch.float64)
    except Exception as e:  # noqa: BLE001 - a model that cannot run in float64
        l64, p64 = None, None
        note = f"no float64 loop ({type(e).__name__}: {str(e)[:80]})"
    else:
        note = ""
    atol = parity_atol(md["target"])
    cls = set(md["head"]["class_params"])

    def cut(name, v):
        return v[:k] if name in cls else v

    got = {n: cut(n, params[n]).astype(np.float64) for n in p32}
    vals = {"loss": (np.asarray(got_l, np.float64), l32, l64)}
    vals.update({n: (got[n], p32[n], None if p64 is None else p64[n]) for n in p32})
    def worse(a: float, b: float) -> float:  # NaN wins: a diverged run is no 0.0
        return float("nan") if np.isnan(a) or np.isnan(b) else max(a, b)

    err32 = err64 = noise_max = 0.0
    failed = []
    for n, (rt, t32, t64) in vals.items():
        e32 = float(np.abs(rt - t32).max())
        err32 = worse(err32, e32)
        if t64 is None:
            bound, e = train_step_bound(atol, t32), e32
        else:
            noise = float(np.abs(t32 - t64).max())
            noise_max = worse(noise_max, noise)
            bound, e = train_step_bound(atol, t64, noise), float(np.abs(rt - t64).max())
            err64 = worse(err64, e)
        if not np.isfinite(e) or e > bound:
            failed.append(f"{n}: {e:.3g} > {bound:.2g}")
    diverged = [name for name, arr in (("torch.optim", l32), ("the runner", got_l))
                if not np.all(np.isfinite(arr))]
    if diverged:  # a NaN trajectory says nothing about the graph: say who diverged
        first = int(np.argmax(~np.isfinite(np.asarray(l32 if diverged[0] == "torch.optim"
                                                      else got_l, np.float64))))
        failed.insert(0, f"{' and '.join(diverged)} diverged (loss not finite from step "
                         f"{first}; lr {hp['lr']})")
    return {"parity_loss_err32": float(np.abs(vals["loss"][0] - l32).max()),
            "parity_err32": err32, "parity_err64": err64 if p64 is not None else None,
            "parity_noise32": noise_max if p64 is not None else None,
            "parity_note": note or None,
            "failed": ("20 steps vs torch.optim: " + "; ".join(failed[:4])) if failed else ""}


def passed(row: dict) -> bool:
    """Every step ok."""
    return all(row["steps"][s] == "ok" for s in STEPS)


def cells(names: list[str], specs: list[str], targets: list[str]) -> list[tuple]:
    """(case, target, spec) of a run, in table order."""
    return [(c, t, s) for c in names for t in targets for s in specs]


def folder_name(target: str, spec: str) -> str:
    """A cell's work folder name (``onnx-fp32-last1``)."""
    safe = "".join(ch if ch.isalnum() else "" for ch in spec)
    return f"{target}-{PRECISION}-tr-{safe}"



def merge(old: dict | None, new_rows: list[dict], order: list[str], *, command: str, date: str,
          commit: str, seconds: float, timeout: float) -> dict:
    """The JSON's ``trainable`` block: ``new_rows`` replace the old rows of their cells."""
    def key(r):
        return (r["case"], r["target"], r["spec"])

    fresh = {key(r) for r in new_rows}
    rows = [r for r in (old or {}).get("rows", []) if key(r) not in fresh] + new_rows
    spec_order = list(SPECS)
    rows.sort(key=lambda r: (order.index(r["case"]) if r["case"] in order else len(order),
                             r["target"], spec_order.index(r["spec"]) if r["spec"] in spec_order
                             else len(spec_order), r["spec"]))
    runs = [*(old or {}).get("runs", []),
            {"command": command, "date": date, "commit": commit, "seconds": seconds,
             "cells": len(new_rows)}]
    return {"precision": PRECISION, "steps": list(STEPS), "parity_steps": PARITY_STEPS,
            "timeout_s": timeout, "specs": sorted({r["spec"] for r in rows}, key=lambda s: (
                spec_order.index(s) if s in spec_order else len(spec_order), s)),
            "targets": sorted({r["target"] for r in rows}), "runs": runs, "rows": rows,
            "summary": {"pass": sum(r["pass"] for r in rows), "cells": len(rows)}}
