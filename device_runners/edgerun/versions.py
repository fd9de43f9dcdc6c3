"""Rollback protection: a device never goes back to an older version of a bundle it accepted.

TUF's rule for replay and downgrade attacks: a signed but *older* bundle (a mirror serving
yesterday's files, or an attacker replaying a bundle with a known flaw) is as authentic as
the newest one, so a signature alone cannot refuse it. The device keeps the highest version
it accepted per bundle name in ``STATE/versions.json`` and refuses a lower one, unless the
user rolls back on purpose (``--allow-downgrade``). The record is only raised after the
command that accepted the bundle succeeded.
"""

from __future__ import annotations

import json
import os

from edgerun import RunnerError, atomic_write
from edgerun.files import open_regular

VERSIONS_FILE = "versions.json"
MAX_VERSIONS_BYTES = 1 << 20


def _path(state_dir: str) -> str:
    return os.path.join(state_dir, VERSIONS_FILE)


def accepted(state_dir: str) -> dict[str, int]:
    """``{bundle name: highest accepted version}`` of a state folder (empty when new)."""
    path = _path(state_dir)
    if not os.path.lexists(path):
        return {}
    with open_regular(path, "version record", MAX_VERSIONS_BYTES) as f:
        raw = f.read()
    try:
        seen = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunnerError(f"version record {path} is not readable JSON ({e}); it guards "
                          "against old bundles replayed to this device: restore it, or delete "
                          "it to accept any version again") from None
    if not isinstance(seen, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in seen.items()):
        raise RunnerError(f"version record {path} must map bundle names to integer "
                          "versions; restore it, or delete it to accept any version again")
    return seen


def check(manifest: dict, state_dir: str, *, allow_downgrade: bool = False) -> None:
    """Refuse ``manifest`` if this state folder already accepted a newer version of it."""
    name, version = str(manifest["name"]), int(manifest["version"])
    highest = accepted(state_dir).get(name)
    if highest is not None and version < highest and not allow_downgrade:
        raise RunnerError(f"bundle {name!r} is version {version}, but this device already "
                          f"accepted version {highest} ({_path(state_dir)}): an older bundle is "
                          "refused (replay / downgrade); pass --allow-downgrade to roll back "
                          "on purpose (nothing was written)")


def updated(manifest: dict, state_dir: str, *, allow_downgrade: bool = False) -> dict | None:
    """The record raised to ``manifest``'s version, or ``None`` when it does not change.

    Never lowered, except by an allowed downgrade: a deliberate rollback then becomes the
    version later runs are held to.
    """
    seen = accepted(state_dir)
    name, version = str(manifest["name"]), int(manifest["version"])
    if seen.get(name) == version or (seen.get(name, -1) > version and not allow_downgrade):
        return None
    seen[name] = version
    return seen


def record(manifest: dict, state_dir: str, *, allow_downgrade: bool = False) -> None:
    """Write :func:`updated` (if it changed) to the state folder, atomically."""
    seen = updated(manifest, state_dir, allow_downgrade=allow_downgrade)
    if seen is not None:
        atomic_write(_path(state_dir), lambda f: json.dump(seen, f, indent=2, sort_keys=True),
                     binary=False, suffix=".json")
