"""What ``edgetl bench`` compares the device runner against, each in a process of its own.

- ``torch``: the PyTorch tutorial loop a user would write on the device instead: frozen
  backbone, head trained with autograd, the backbone recomputed on every batch of every epoch.
  ``--trainable SPEC`` trains the same parameter subset as a ``--trainable`` bundle (head +
  the backbone parameters :func:`edgetl.trainable.spec.select` picks); ``--cache-prefix``
  is the fair loop: the frozen prefix (up to the bundle's cut) computed once under
  ``no_grad`` and only the tail recomputed per step, as the device runner does.
- ``peak``: the machine's measured fp32 matmul peak (GFLOP/s) at a thread count, the
  denominator of the physical limit.
- :func:`backbone_flops`: the backbone's FLOPs per input (multiply-adds count 2), counted by
  torch's ``FlopCounterMode`` on the checkpoint.

Run as ``python -m edgetl.baselines torch|peak ...``; each prints one JSON line. Every process
reports its own peak resident memory (``VmHWM``, which resets at exec, so a parent's memory is
never counted).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def vm_hwm_mb() -> float | None:
    """Peak resident memory of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def backbone_flops(checkpoint: Path, x=None) -> int:
    """FLOPs of one forward pass of the checkpoint's backbone on one input.

    ``x``: that input (1, ...) as the model takes it; default zeros of the input shape. Text
    inputs differ in length, so the bench passes its reference text cut to its own length:
    the useful work (padding a runtime computes on top counts against it).
    """
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgetl.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    bb = ck.model.backbone.eval()
    x = torch.zeros((1, *ck.input_shape)) if x is None else torch.from_numpy(np.asarray(x))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        bb(x)
    return int(counter.get_total_flops())


def _best_seconds(fn, seconds: float) -> float:
    for _ in range(3):
        fn()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(threads: int, sizes: tuple[int, ...] = (512, 1024, 2048),
                seconds: float = 0.7) -> dict:
    """Best fp32 GFLOP/s and int8 GOP/s of square matmuls (torch's kernels) at ``threads``.

    The best over a few sizes, each timed for ``seconds``. int8 (``torch._int_mm``, int8 ×
    int8 → int32) is the denominator for int8 backbones: with VNNI it is several times the
    fp32 peak; None where this torch build lacks it.
    """
    import torch

    torch.set_num_threads(threads)
    fp32 = int8 = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        fp32 = max(fp32, 2 * n ** 3 / _best_seconds(lambda: a @ b, seconds) / 1e9)  # noqa: B023
        try:
            qa = torch.randint(-128, 128, (n, n), dtype=torch.int8)
            qb = torch.randint(-128, 128, (n, n), dtype=torch.int8)
            int8 = max(int8, 2 * n ** 3 / _best_seconds(
                lambda: torch._int_mm(qa, qb), seconds) / 1e9)  # noqa: B023
        except (RuntimeError, AttributeError):
            pass
    return {"threads": threads, "sizes": list(sizes), "gflops": fp32, "int8_gops": int8 or None,
            "backend": f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"}


def torch_eager(checkpoint: Path, data: Path, *, epochs: int, batch: int, threads: int,
                optimizer: str, hparams: dict, seed: int = 0, trainable: str = "head",
                cache_prefix: bool = False) -> dict:
    """The tutorial loop: frozen backbone recomputed every batch, head trained with autograd.

    ``trainable``: also train these backbone parameters (a ``--trainable`` SPEC). With
    ``cache_prefix`` the frozen prefix (the whole backbone for ``head``) runs once over the
    training windows under ``no_grad`` (its time, ``prefix_seconds``, is in
    ``train_seconds``) and each step recomputes only the tail.

    ``data`` is the ``.npz`` ``edgetl bench`` prepares from the device's data through the
    runner's own loader: ``x_train``/``y_train`` (the runner's training split), ``x_eval``/
    ``y_eval``, and ``init.<param>`` head parameters (the bundle's head, or a fresh linear
    layer when the device brings labels the server head does not have).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edgetl.checkpoint import load_checkpoint
    from edgetl.trainable.cut import split
    from edgetl.trainable.spec import select
    from edgetl.trainable.step import param_groups

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ck = load_checkpoint(checkpoint)
    model = ck.model.eval()  # BN statistics and dropout frozen, as in the device bundle
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    names = select(model.backbone, trainable)
    bb = dict(model.backbone.named_parameters())
    for n in names:
        bb[n].requires_grad_(True)
    with np.load(data, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    head = model.head
    init = {k[5:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("init.")}
    named = {n.removeprefix("fc."): p for n, p in head.named_parameters()}  # device names
    if set(init) <= set(named) and all(init[k].shape == named[k].shape for k in init):
        with torch.no_grad():
            for k, v in init.items():
                named[k].copy_(v)
    else:  # new label set: a fresh nn.Linear on the features, as a tutorial would add
        n_cls = int(arrays["n_classes"])
        feat = int(arrays["feature_dim"])
        head = torch.nn.Linear(feat, n_cls)
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]).long()
    params = param_groups([p for p in head.parameters() if p.requires_grad],
                          [bb[n] for n in names], hparams)
    prefix, tail = None, model.backbone
    if cache_prefix:
        prefix, tail = model.backbone, torch.nn.Identity()
        if names:
            cut = split(model.backbone, names, x[:2])
            prefix, tail = cut.prefix, cut.tail
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=hparams["lr"], betas=(hparams["beta1"],
                               hparams["beta2"]), eps=hparams["eps"],
                               weight_decay=hparams.get("weight_decay", 0.0))
    else:
        opt = torch.optim.SGD(params, lr=hparams["lr"], momentum=hparams.get("momentum", 0.0),
                              weight_decay=hparams.get("weight_decay", 0.0))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    feats = x
    if cache_prefix:
        with torch.no_grad():
            feats = torch.cat([prefix(x[i : i + 256]) for i in range(0, len(x), 256)])
    prefix_seconds = time.perf_counter() - t0
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(head(tail(feats[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        xe = torch.from_numpy(arrays["x_eval"])
        pred = torch.cat([head(model.backbone(xe[i : i + 256])).argmax(1)
                          for i in range(0, len(xe), 256)]).numpy()
    return {"name": "pytorch-eager", "threads": threads, "epochs": epochs, "steps": steps,
            "n_train": len(x), "train_seconds": train_seconds, "trainable": trainable,
            "cache_prefix": cache_prefix, "prefix_seconds": prefix_seconds,
            "n_trainable": sum(p.numel() for g in params for p in g["params"]),
            "accuracy_after": float((pred == arrays["y_eval"]).mean()),
            "peak_rss_mb": vm_hwm_mb(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    """``python -m edgetl.baselines torch|peak ...``: print one JSON result line."""
    p = argparse.ArgumentParser(prog="python -m edgetl.baselines")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("torch")
    t.add_argument("--checkpoint", required=True, type=Path)
    t.add_argument("--data", required=True, type=Path)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--optimizer", default="sgd")
    t.add_argument("--hparams", default="{}", help="JSON, the bundle's optimizer hparams")
    t.add_argument("--trainable", default="head", help="SPEC: the parameters to train")
    t.add_argument("--cache-prefix", action="store_true",
                   help="compute the frozen prefix once (no_grad), recompute only the tail")
    pk = sub.add_parser("peak")
    for s in (t, pk):
        s.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.cmd == "torch":
        res = torch_eager(a.checkpoint, a.data, epochs=a.epochs, batch=a.batch,
                          threads=a.threads, optimizer=a.optimizer,
                          hparams=json.loads(a.hparams), trainable=a.trainable,
                          cache_prefix=a.cache_prefix)
    else:
        res = matmul_peak(a.threads)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
