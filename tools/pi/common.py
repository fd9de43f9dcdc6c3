"""What the parts of the check share: paths, the Debian suite, the error type, running commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from edgetl.errors import EdgetlError

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = ROOT / "device_runners"
SUITE = "bookworm"
QEMU_CPU = "cortex-a72"


class PiError(EdgetlError):
    """The emulated aarch64 check could not be set up or run; the message says what to do."""


def say(msg: str) -> None:
    """One progress line on stderr."""
    print(f"[test-pi] {msg}", file=sys.stderr, flush=True)


def run_cmd(cmd: list[str], *, log: Path | None = None, env: dict | None = None,
            check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``log``, append its output there (and show the tail on failure)."""
    kw: dict = {"env": env, "text": True}
    if capture:
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elif log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
        kw.update(stdout=log.open("a"), stderr=subprocess.STDOUT)
    p = subprocess.run(cmd, check=False, **kw)
    if check and p.returncode != 0:
        tail = (p.stderr or "") if capture else (
            "".join(log.read_text().splitlines(True)[-25:]) if log else "")
        raise PiError(f"`{shlex.join(cmd)}` exited {p.returncode}"
                      + (f"; last output:\n{tail}" if tail else ""))
    return p


def default_cache() -> Path:
    """``$EDGETL_PI_CACHE``, else ``$EDGETL_CACHE/pi`` (default ``~/.cache/edgetl/pi``)."""
    from edgetl.data.hapt import cache_dir

    return Path(os.environ.get("EDGETL_PI_CACHE") or cache_dir() / "pi")
