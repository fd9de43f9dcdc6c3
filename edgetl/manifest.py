"""``manifest.json``: the whole contract between server and device.

The schema itself lives on the device side, in ``edgerun.manifest`` (one ``TypedDict`` per
block, ``SCHEMA_VERSION``, sha256, the path guard); this module is the server's typed
*writer* on top of it. Every manifest the server writes or reads is checked with the device's
own :func:`edgerun.manifest.check`, so the two sides cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerun import RunnerError
from edgerun import manifest as schema

from edgetl.errors import BundleError

SCHEMA_VERSION = schema.SCHEMA_VERSION
MANIFEST = schema.MANIFEST
sha256_file = schema.sha256_file


@dataclass(frozen=True)
class FileEntry:
    """One bundle file: its role, relative path, sha256 and size."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """Typed view of ``manifest.json``; ``docs/bundle-format.md`` lists every field."""

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
    #: Adaptation defaults for the device (the recipe's ``[adapt]``): epochs, batch_size,
    #: val_fraction.
    adapt: dict[str, Any]
    quantization: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: Bundle versioning (edgetl.versioning): 1 and null for an export.
    version: int = 1
    parent: dict[str, Any] | None = None
    #: AdaBN graphs and BN layers (``edgetl.export.adabn``); None: absent (older bundles).
    adabn: dict[str, Any] | None = None
    #: Trainable tensors beyond the head and the cut (``edgetl.trainable``); None: head only.
    trainable: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Stable, human-readable JSON, checked against the device schema first."""
        raw = dataclasses.asdict(self)
        for k in ("adabn", "trainable"):  # optional blocks: absent, never null
            if raw[k] is None:
                del raw[k]
        _checked(raw)
        return json.dumps(raw, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check against the device schema (version, keys, types)."""
        body = text.encode() if isinstance(text, str) else text
        try:
            raw = schema.parse(body)
        except RunnerError as e:
            raise BundleError(str(e)) from None
        raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        """Read ``bundle/manifest.json`` (a regular file, size-capped, read once)."""
        try:
            body = schema.read_bytes(str(bundle))
        except RunnerError as e:
            raise BundleError(str(e)) from None
        return cls.from_json(body)

    def verify(self, bundle: Path) -> None:
        """Every listed file is inside the bundle, present and matches its sha256.

        The device's own check: no ``..``, no symlink leading out of the bundle.
        """
        try:
            schema.verify_files(str(bundle), dataclasses.asdict(self))
        except RunnerError as e:
            raise BundleError(str(e)) from None

    def path(self, bundle: Path, role: str) -> Path:
        """The file of ``role`` inside ``bundle``, through the device's path guard."""
        try:
            return Path(schema.safe_path(str(bundle), self.files[role].path))
        except KeyError:
            raise BundleError(f"manifest lists no file for role {role!r}; known roles: "
                              f"{sorted(self.files)}") from None
        except RunnerError as e:
            raise BundleError(str(e)) from None


def _checked(raw: dict) -> None:
    try:
        schema.check(raw)
    except RunnerError as e:
        raise BundleError(f"edgetl wrote a manifest its own schema refuses: {e}") from None


def file_entry(bundle: Path, rel: str) -> FileEntry:
    """A :class:`FileEntry` for ``bundle/rel``."""
    p = Path(bundle) / rel
    return FileEntry(rel, sha256_file(p), p.stat().st_size)
