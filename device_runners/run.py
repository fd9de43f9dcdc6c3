#!/usr/bin/env python3
"""edgetl device runner: fine-tune a bundle's head on local data, run it, self-test it.

Needs only numpy, the standard library and onnxruntime::

    python run.py adapt BUNDLE --data local.npz --out state/
    python run.py infer BUNDLE --data new.csv --head state/head.npz
    python run.py recalibrate BUNDLE --data unlabelled.npz --out state/
    python run.py selftest BUNDLE
    python run.py bench BUNDLE --threads 1
    python run.py update NEW_BUNDLE --state state/ [--data local.npz]

Exit code 0 on success, 1 with a one-line ``error:`` message on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from edgerun import RunnerError  # noqa: E402

#: Numeric flags: name -> (low, high) bounds, each ``(value, inclusive)`` or ``None``.
#: Every value given must also be finite; a flag not given (``None``) is fine.
LIMITS = {
    "epochs": ((0, True), None), "batch_size": ((1, True), None),
    "seed": ((0, True), (2**63 - 1, True)), "val_fraction": ((0, False), (1, False)),
    "lr": ((0, True), None), "l2sp": ((0, True), None),
    "backbone_lr_scale": ((0, False), None), "max_data_mb": ((0, False), None),
    "checkpoint_every": ((0, True), None), "max_seconds": ((0, False), None),
    "max_memory_mb": ((0, False), None), "threads": ((0, True), (4096, True)),
    "repeats": ((1, True), (10**6, True)), "batch": ((1, True), (1 << 16, True)),
    "gate_alpha": ((0, True), (1, True)), "patience": ((0, True), None),
    "gate_folds": ((1, True), (20, True)),
}


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a numeric flag that is NaN, infinite or out of its range (:data:`LIMITS`)."""
    import math

    for name, (low, high) in LIMITS.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        ok = math.isfinite(v)
        want = []
        if low is not None:
            ok = ok and (v >= low[0] if low[1] else v > low[0])
            want.append(f"{'>=' if low[1] else '>'} {low[0]}")
        if high is not None:
            ok = ok and (v <= high[0] if high[1] else v < high[0])
            want.append(f"{'<=' if high[1] else '<'} {high[0]}")
        if not ok:
            raise RunnerError(f"--{name.replace('_', '-')} must be a finite number "
                              f"{' and '.join(want)}, got {v!r}")


def parse_mix(text):
    """``--mix 0.5,1`` -> ``(0.5, 1.0)``; ``None`` stays ``None`` (the bundle's default)."""
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise RunnerError(f"--mix takes comma-separated weights in (0, 1], got {text!r}") from None


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line and exit 1 (not a usage dump, 2).

    The runner's contract is exit 1 with one ``error:`` line for every bad input; argparse's
    default (usage dump, exit 2) broke it for ``--epochs x``, unknown flags and missing
    arguments. ``--help`` still prints the usage. Sub-parsers inherit this class.
    """

    def error(self, message: str):
        self.exit(1, f"error: {message} (`{self.prog} --help` lists the arguments)\n")


#: Flags that name files or folders.
PATHS = ("bundle", "data", "out", "state", "head", "trust_key", "unlabelled", "bn_stats")


def check_paths(args: argparse.Namespace) -> None:
    """Refuse an empty path, or one holding a NUL byte (no file can; the OS calls raise).

    A shell cannot pass one, but a program calling :func:`main` (or a manifest) can.
    """
    for name in PATHS:
        v = getattr(args, name, None)
        flag = name if name == "bundle" else "--" + name.replace("_", "-")
        if v == "":  # would mean the current folder to some calls and nothing to others
            raise RunnerError(f"{flag} is empty; pass a path")
        if v is not None and "\x00" in v:
            raise RunnerError(f"{flag} {v!r} contains a NUL byte; no file name can hold one: "
                              "pass the path without it")


def main(argv=None) -> int:
    """Parse arguments and run one command."""
    p = Parser(prog="run.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("adapt", help="fine-tune the head on labelled local data")
    a.add_argument("bundle")
    a.add_argument("--data", required=True, help=".npz (x, y) windows or .csv sensor log")
    a.add_argument("--out", required=True, help="folder for head.npz and report.json")
    a.add_argument("--epochs", type=int, default=None,
                   help="0: only imprint new labels, no training (default: the bundle's "
                        "adapt.epochs)")
    a.add_argument("--batch-size", type=int, default=None,
                   help="default: the bundle's adapt.batch_size")
    a.add_argument("--val-fraction", type=float, default=None,
                   help="default: the bundle's adapt.val_fraction")
    a.add_argument("--lr", type=float, default=None, help="override the bundle's learning rate")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--head", default=None, help="continue from this head checkpoint")
    a.add_argument("--trainer", choices=("stateless", "ort-training"), default=None,
                   help="default: the bundle's (manifest train_step.trainer)")
    a.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="weight windows n / (K * n_label): rare labels count as much as common")
    a.add_argument("--l2sp", type=float, default=None,
                   help="override the L2-SP pull toward the starting head (head.l2sp bundles)")
    a.add_argument("--backbone-lr-scale", type=float, default=None,
                   help="bundles that train backbone tensors (manifest trainable): their lr "
                        "as a multiple of the head's (default: the bundle's)")
    a.add_argument("--gate-alpha", type=float, default=None,
                   help="level of the gate's one-sided McNemar test: the adapted head replaces "
                        "the current one only if better with p <= this (default: the bundle's "
                        "adapt.gate.alpha)")
    a.add_argument("--freeze-absent", action=argparse.BooleanOptionalAction, default=None,
                   help="labels the head knows but the local data lacks keep their shipped "
                        "class rows (default: the bundle's adapt.freeze_absent)")
    a.add_argument("--replay-weight", type=float, default=None,
                   help="total weight of the bundle's replay set (server features trained "
                        "beside the local windows) relative to the local training windows; "
                        "0: off (default: the bundle's adapt.replay.weight)")
    a.add_argument("--max-forget", type=float, default=None,
                   help="points of accuracy on the bundle's replay set (server data) an adapted "
                        "head may lose and still be kept; negative: no check (default: the "
                        "bundle's adapt.gate.max_forget)")
    a.add_argument("--gate-folds", type=int, default=None,
                   help="pool the gate's evidence over this many validation folds, each from "
                        "another training run (1: the run's own split only; default: the "
                        "bundle's adapt.gate.folds)")
    a.add_argument("--no-gate", action="store_true",
                   help="keep the adapted head whatever it scored (experiments only)")
    a.add_argument("--mix", default=None,
                   help="comma-separated weights of the adapted head mixed with the starting "
                        "one, the lowest validation loss wins (default: the bundle's adapt.mix; "
                        "1: no mixing)")
    a.add_argument("--max-data-mb", type=float, default=2048.0,
                   help="refuse data files larger than this (MiB)")
    a.add_argument("--resume", action="store_true",
                   help="continue a killed adaptation from OUT/train_state.npz")
    a.add_argument("--checkpoint-every", type=float, default=1.0,
                   help="seconds between training-state saves (0: every epoch)")
    a.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: stop and keep the best head so far")
    a.add_argument("--max-memory-mb", type=float, default=None,
                   help="resident-memory budget: stop and keep the best head so far")
    a.add_argument("--unlabelled", default=None,
                   help="first recalibrate the backbone's BatchNorm statistics on these "
                        "unlabelled windows (as `recalibrate`, into --out)")
    r = sub.add_parser("recalibrate", help="re-estimate the backbone's BatchNorm statistics "
                       "from unlabelled local windows (AdaBN) into OUT/bn_stats.npz")
    r.add_argument("bundle")
    r.add_argument("--data", required=True,
                   help=".npz windows (x; labels ignored) or .csv sensor log")
    r.add_argument("--out", required=True, help="state folder for bn_stats.npz; adapt --out "
                   "with the same folder then uses the statistics")
    r.add_argument("--max-data-mb", type=float, default=2048.0,
                   help="refuse data files larger than this (MiB)")
    i = sub.add_parser("infer", help="predict labels (and accuracy if labelled)")
    i.add_argument("bundle")
    i.add_argument("--data", required=True)
    i.add_argument("--head", default=None, help="head checkpoint (default: the bundle's)")
    i.add_argument("--out", default=None, help="folder for predictions.json")
    i.add_argument("--bn-stats", default=None,
                   help="bn_stats.npz of `recalibrate`: features with these BN statistics")
    s = sub.add_parser("selftest", help="check this runtime against the bundle's test vectors")
    s.add_argument("bundle")
    s.add_argument("--trainer", choices=("stateless", "ort-training"), default=None)
    u = sub.add_parser("update", help="take a new bundle version: keep the personal head if "
                       "the backbone is unchanged, else re-adapt (with --data) or reset")
    u.add_argument("bundle")
    u.add_argument("--state", required=True, help="the adaptation folder (head.npz)")
    u.add_argument("--data", default=None, help="local data to re-adapt on if needed")
    u.add_argument("--epochs", type=int, default=None, help="default: the bundle's adapt.epochs")
    b = sub.add_parser("bench", help="backbone latency at batch 1, throughput, bundle size")
    b.add_argument("bundle")
    b.add_argument("--repeats", type=int, default=300)
    b.add_argument("--batch", type=int, default=32, help="batch size of the throughput run")
    for sp in (a, u):
        sp.add_argument("--patience", type=int, default=None,
                        help="stop after this many epochs without a lower validation loss (0: "
                             "never; default: the bundle's adapt.patience)")
        sp.add_argument("--allow-downgrade", action="store_true",
                        help="accept a bundle older than one this state folder accepted "
                             "(a deliberate rollback; refused otherwise: replay protection)")
    for sp in (a, r, i, s, b, u):
        sp.add_argument("--threads", type=int, default=0, help="runtime threads (0: default)")
        sp.add_argument("--trust-key", default=None,
                        help="Ed25519 public key (PEM): refuse bundles it did not sign")
        sp.add_argument("--quiet", action="store_true")
        sp.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = p.parse_args(argv)
    try:
        check_numbers(args)
        check_paths(args)
        from edgerun import adapt as ad
        from edgerun.bundle import Bundle

        if args.cmd == "recalibrate" or getattr(args, "unlabelled", None):
            from edgerun.adabn import recalibrate

            res = recalibrate(args.bundle, args.data if args.cmd == "recalibrate"
                              else args.unlabelled, args.out, threads=args.threads,
                              trust_key=args.trust_key, max_data_mb=args.max_data_mb,
                              quiet=args.quiet)
        if args.cmd == "adapt":
            res = ad.adapt(args.bundle, args.data, args.out, epochs=args.epochs,
                           batch_size=args.batch_size, val_fraction=args.val_fraction,
                           lr=args.lr, seed=args.seed, head_path=args.head,
                           threads=args.threads, trainer=args.trainer,
                           max_seconds=args.max_seconds, max_memory_mb=args.max_memory_mb,
                           trust_key=args.trust_key, resume=args.resume,
                           max_data_mb=args.max_data_mb,
                           checkpoint_every=args.checkpoint_every,
                           class_balanced=args.class_balanced, l2sp=args.l2sp,
                           backbone_lr_scale=args.backbone_lr_scale,
                           allow_downgrade=args.allow_downgrade,
                           gate_alpha=args.gate_alpha, gate_rule="none" if args.no_gate else None,
                           patience=args.patience, mix=parse_mix(args.mix),
                           freeze_absent=args.freeze_absent,
                           replay_weight=args.replay_weight, max_forget=args.max_forget,
                           gate_folds=args.gate_folds, quiet=args.quiet)
        elif args.cmd == "infer":
            res = ad.infer(args.bundle, args.data, head_path=args.head, out_dir=args.out,
                           threads=args.threads, trust_key=args.trust_key, quiet=args.quiet,
                           bn_stats=args.bn_stats)
        elif args.cmd == "update":
            from edgerun.update import update

            res = update(args.bundle, args.state, data_path=args.data,
                         trust_key=args.trust_key, quiet=args.quiet, epochs=args.epochs,
                         patience=args.patience,
                         threads=args.threads, allow_downgrade=args.allow_downgrade)
        elif args.cmd == "bench":
            from edgerun.bench import bench

            res = bench(args.bundle, repeats=args.repeats, threads=args.threads,
                        batch=args.batch, trust_key=args.trust_key)
            if not args.quiet:
                print(f"{res['target']}/{res['precision']}: backbone p50 "
                      f"{res['backbone_ms_p50']:.3f} ms (p95 {res['backbone_ms_p95']:.3f}), "
                      f"{res['throughput_per_s']:.0f}/s at batch {res['batch']}, "
                      f"bundle {res['bundle_bytes'] / 1024:.0f} KiB", file=sys.stderr)
        elif args.cmd == "selftest":
            from edgerun import adabn
            from edgerun.backends import make_backend

            b = Bundle(args.bundle, trust_key=args.trust_key)
            be = make_backend(b, args.threads, args.trainer)
            fwd, train = ad.selftest_forward(b, be), ad.selftest_train(b, be)
            bn = adabn.selftest(b, args.threads)
            res = {"ok": True, "max_abs_err": max(fwd, train),
                   "train_max_abs_err": train, "backend": be.name,
                   "trainer": be.trainer, "trainer_version": be.trainer_version,
                   "adabn_max_abs_err": bn}
            if not args.quiet:
                print(f"self-test passed (max abs err {res['max_abs_err']:.2g}, "
                      f"{be.trainer} train steps {res['train_max_abs_err']:.2g})",
                      file=sys.stderr)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full or read-only disk met outside a commit: still one line
        from edgerun.commit import disk_error

        err = disk_error(e, os.path.basename(e.filename or "") or "a file",
                         os.path.dirname(os.path.abspath(e.filename or ".")))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
