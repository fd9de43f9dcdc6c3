"""Run the standalone device runner (``device_runners/run.py``) as a subprocess.

Here the runner is exercised exactly as a device would run it, in a separate process that only
has numpy and the runtime loaded (edgetl imports ``edgerun`` only for shared code: the
manifest schema, data readers, text packing and the backends of its parity checks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgetl.errors import EdgetlError


def runner_path() -> Path:
    """``device_runners/run.py`` (``$EDGETL_RUNNER`` overrides)."""
    env = os.environ.get("EDGETL_RUNNER")
    p = Path(env) if env else Path(__file__).resolve().parents[1] / "device_runners" / "run.py"
    if not p.is_file():
        raise EdgetlError(f"device runner not found at {p}; set EDGETL_RUNNER to run.py")
    return p


def run_runner(command: str, bundle: Path, *args: str, python: str | None = None,
               quiet: bool = True) -> dict:
    """Run ``run.py COMMAND BUNDLE ARGS --json`` and return its JSON result.

    Raises:
        EdgetlError: the runner exited non-zero; its ``error:`` line is the message.
    """
    cmd = [python or sys.executable, str(runner_path()), command, str(bundle), *args, "--json"]
    if quiet:
        cmd.append("--quiet")
    return run_json(cmd, "device runner", echo_stderr=not quiet)


def run_json(cmd: list[str], what: str, *, echo_stderr: bool = False) -> dict:
    """Run ``cmd`` and parse the JSON on the last line of its stdout.

    Raises:
        EdgetlError: the process exited non-zero; its last stderr line (an ``error:`` line
            from the runner) is the message, prefixed with ``what``.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
        raise EdgetlError(f"{what} failed: {last}")
    if echo_stderr and proc.stderr:
        print(proc.stderr, end="", file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def adapt(bundle: Path, data: Path, out: Path, *, epochs: int = 30, batch_size: int = 32,
          val_fraction: float = 0.25, lr: float | None = None, seed: int = 0,
          head: Path | None = None, class_balanced: bool | None = None,
          freeze_absent: bool | None = None, l2sp: float | None = None,
          gate_alpha: float | None = None, patience: int | None = None,
          mix: tuple[float, ...] | None = None, replay_weight: float | None = None,
          max_forget: float | None = None, gate_folds: int | None = None,
          quiet: bool = True) -> dict:
    """Personalise ``bundle``'s head on ``data`` in a runner subprocess; return its report.

    ``gate_alpha``, ``patience``, ``mix``, ``replay_weight``, ``max_forget``, ``gate_folds``:
    override the bundle's ``adapt`` block.
    """
    args = ["--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--val-fraction", str(val_fraction),
            "--seed", str(seed)]
    if lr is not None:
        args += ["--lr", str(lr)]
    if head is not None:
        args += ["--head", str(head)]
    if class_balanced is not None:
        args.append("--class-balanced" if class_balanced else "--no-class-balanced")
    if freeze_absent is not None:
        args.append("--freeze-absent" if freeze_absent else "--no-freeze-absent")
    if l2sp is not None:
        args += ["--l2sp", str(l2sp)]
    if gate_alpha is not None:
        args += ["--gate-alpha", str(gate_alpha)]
    if patience is not None:
        args += ["--patience", str(patience)]
    if mix is not None:
        args += ["--mix", ",".join(f"{w:g}" for w in mix)]
    if replay_weight is not None:
        args += ["--replay-weight", str(replay_weight)]
    if max_forget is not None:
        args += ["--max-forget", str(max_forget)]
    if gate_folds is not None:
        args += ["--gate-folds", str(gate_folds)]
    return run_runner("adapt", bundle, *args, quiet=quiet)


def infer(bundle: Path, data: Path, *, head: Path | None = None,
          bn_stats: Path | None = None) -> dict:
    """Predictions (and accuracy for labelled data) from a runner subprocess.

    ``bn_stats``: features with these recalibrated BN statistics (:func:`recalibrate`).
    """
    args = ["--data", str(data)] + (["--head", str(head)] if head else [])
    args += ["--bn-stats", str(bn_stats)] if bn_stats else []
    return run_runner("infer", bundle, *args)


def can_recalibrate(bundle: Path) -> bool:
    """Whether ``bundle`` ships AdaBN graphs (fp32 backbones with BatchNorm layers)."""
    import json

    block = json.loads((Path(bundle) / "manifest.json").read_text()).get("adabn") or {}
    return "stats" in block


def recalibrate(bundle: Path, data: Path, out: Path) -> dict:
    """AdaBN on the device: ``run.py recalibrate`` (labels in ``data`` unused); its report."""
    return run_runner("recalibrate", bundle, "--data", str(data), "--out", str(out))
