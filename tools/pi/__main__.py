"""``python -m tools.pi``: run the emulated aarch64 check, or ``--preflight`` only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tools.pi
from edgetl.errors import EdgetlError
from tools.pi.common import QEMU_CPU, default_cache
from tools.pi.host import preflight
from tools.pi.suite import PiConfig, run_pi_check

SKIP = 3  # --preflight exit code: this machine cannot run the emulated check


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.pi``: run the check, or ``--preflight`` only."""
    p = argparse.ArgumentParser(prog="python -m tools.pi",
                                description=tools.pi.__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/pi"))
    p.add_argument("--cache", type=Path, default=None,
                   help="rootfs cache (default $EDGETL_PI_CACHE or ~/.cache/edgetl/pi)")
    p.add_argument("--bundles", type=Path, default=None,
                   help="test these bundles (e.g. runs/har/bundles) instead of fresh small ones")
    p.add_argument("--mirror", default=None, help="Debian mirror (default: the host's)")
    p.add_argument("--cpu", default=QEMU_CPU,
                   help="QEMU_CPU: cortex-a72 (Pi 4), cortex-a76 (Pi 5)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rebuild", action="store_true", help="ignore the cached rootfs")
    p.add_argument("--preflight", action="store_true",
                   help=f"only say whether this machine can run it (exit 0) or why not ({SKIP})")
    args = p.parse_args(argv)
    if args.preflight:
        why = preflight()
        print(f"cannot run: {why}" if why else "ok: root, Linux x86_64, binfmt_misc available")
        return SKIP if why else 0
    try:
        s = run_pi_check(PiConfig(out=args.out, cache=args.cache or default_cache(),
                                  bundles=args.bundles, mirror=args.mirror, cpu=args.cpu,
                                  epochs=args.epochs, rebuild=args.rebuild))
    except EdgetlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((args.out / "summary.md").read_text())
    bad = [c for c in s["checks"] if not c["ok"]]
    for c in bad:
        print(f"FAIL {c['bundle']}: {c['name']}"
              + (f" = {c['value']:.3g} (limit {c['limit']:.3g})" if c["measured"] else "")
              + f" {c['detail']}", file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
