"""``manifest.json``: the whole contract between server and device.

Written by ``export``; read by device runners with the standard library only. Every file of
the bundle is listed with its sha256; names of graph inputs/outputs, parameters and optimizer
state are explicit, never positional conventions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One bundle file: its role, relative path, sha256 and size."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Typed view of ``manifest.json``; see the README's "Bundle format" for every field."""

    edgetl_version: str
    name: str
    target: str
    precision: str
    files: dict[str, FileEntry]
    input: dict[str, Any]
    features: dict[str, Any]
    labels: list[str]
    head: dict[str, Any]
    optimizer: dict[str, Any]
    train_step: dict[str, Any]
    infer: dict[str, Any]
    test_vectors: dict[str, Any]
    quantization: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: Bundle versioning (edgetl.versioning): 1 and null for an export, and for manifests
    #: written before these fields existed.
    version: int = 1
    parent: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Stable, human-readable JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and check the schema version."""
        raw = json.loads(text)
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise BundleError(f"manifest schema_version {raw.get('schema_version')!r} is not "
                              f"supported (expected {SCHEMA_VERSION}); re-export the bundle")
        raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
        return cls(**raw)

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        """Read ``bundle/manifest.json``."""
        path = Path(bundle) / MANIFEST
        if not path.is_file():
            raise BundleError(f"{bundle} has no {MANIFEST}; is it an edgetl bundle?")
        return cls.from_json(path.read_text())

    def verify(self, bundle: Path) -> None:
        """Check every listed file exists and matches its sha256."""
        for role, entry in self.files.items():
            p = Path(bundle) / entry.path
            if not p.is_file():
                raise BundleError(f"bundle file {entry.path} ({role}) is missing")
            digest = sha256_file(p)
            if digest != entry.sha256:
                raise BundleError(f"bundle file {entry.path} ({role}) has sha256 {digest[:12]}…, "
                                  f"manifest says {entry.sha256[:12]}…; the file was modified")


def file_entry(bundle: Path, rel: str) -> FileEntry:
    """A :class:`FileEntry` for ``bundle/rel``."""
    p = Path(bundle) / rel
    return FileEntry(rel, sha256_file(p), p.stat().st_size)
