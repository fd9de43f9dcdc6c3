"""Read and verify a bundle's ``manifest.json`` with the standard library only."""

from __future__ import annotations

import hashlib
import json
import os

from edgerun import SCHEMA_VERSION, RunnerError

REQUIRED = ("schema_version", "target", "precision", "files", "input", "features", "labels",
            "head", "optimizer", "train_step", "infer", "test_vectors")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_signature(root: str, manifest_path: str, pub_path: str) -> None:
    """Check ``manifest.sig`` (Ed25519 over manifest.json's bytes) against a PEM public key.

    The manifest pins every file's sha256, so a valid signature plus :meth:`Bundle.verify`
    authenticates the whole bundle. Needs ``cryptography`` (only when a key is given).
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise RunnerError("--trust-key needs the cryptography package: pip install "
                          "cryptography") from None
    try:
        with open(pub_path, "rb") as f:
            pub = serialization.load_pem_public_key(f.read())
    except (OSError, ValueError) as e:
        raise RunnerError(f"--trust-key {pub_path} is not a readable PEM public key "
                          f"({e})") from None
    sig_path = os.path.join(root, "manifest.sig")
    if not os.path.isfile(sig_path):
        raise RunnerError(f"bundle {root} is not signed (no manifest.sig) but --trust-key was "
                          "given; refusing it. Export it with `edgetl export --sign-key`")
    with open(sig_path, "rb") as f:
        sig = f.read()
    with open(manifest_path, "rb") as f:
        body = f.read()
    try:
        pub.verify(sig, body)
    except (InvalidSignature, TypeError, ValueError):
        raise RunnerError(f"bundle {root}: manifest.json's signature does not verify with "
                          f"{pub_path} (wrong key, or the manifest was modified); refusing "
                          "it") from None


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise RunnerError(f"manifest.json: {what}; the bundle is damaged or not an edgetl "
                          "bundle, re-export it")


def _check_structure(m: dict) -> None:
    """Types of the fields everything else relies on, so garbage fails here, clearly."""
    _expect(isinstance(m["target"], str) and isinstance(m["precision"], str),
            "'target' and 'precision' must be strings")
    files = m["files"]
    _expect(isinstance(files, dict) and len(files) > 0, "'files' must map roles to files")
    for role, e in files.items():
        _expect(isinstance(e, dict) and isinstance(e.get("path"), str)
                and isinstance(e.get("sha256"), str),
                f"files[{role!r}] needs 'path' and 'sha256' strings")
    labels = m["labels"]
    _expect(isinstance(labels, list) and len(labels) > 0
            and all(isinstance(v, str) for v in labels), "'labels' must be a list of names")
    for k in ("input", "features", "head", "optimizer", "train_step", "infer",
              "test_vectors"):
        _expect(isinstance(m[k], dict), f"{k!r} must be an object")


class Bundle:
    """A verified bundle: ``manifest`` (dict) and ``path(role)`` for its files."""

    def __init__(self, root: str, verify: bool = True, trust_key: str | None = None):
        self.root = root
        mpath = os.path.join(root, "manifest.json")
        if not os.path.isdir(root):
            raise RunnerError(f"bundle {root} is not a directory; pass the folder that "
                              "`edgetl export` wrote")
        if not os.path.isfile(mpath):
            raise RunnerError(f"{root} has no manifest.json; is it an edgetl bundle?")
        try:
            with open(mpath, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise RunnerError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
        if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
            found = m.get("schema_version") if isinstance(m, dict) else type(m).__name__
            raise RunnerError(f"manifest schema_version {found!r} is not supported by this "
                              f"runner (expects {SCHEMA_VERSION}); update the runner or "
                              "re-export the bundle")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise RunnerError(f"manifest.json lacks {missing}; re-export the bundle")
        _check_structure(m)
        self.manifest = m
        if trust_key:
            verify_signature(root, mpath, trust_key)
        if verify:
            self.verify()

    def path(self, role: str) -> str:
        """Absolute path of the file with ``role`` (e.g. ``backbone``)."""
        try:
            rel = self.manifest["files"][role]["path"]
        except KeyError:
            raise RunnerError(f"manifest lists no file for role {role!r}; known roles: "
                              f"{sorted(self.manifest['files'])}") from None
        full = os.path.normpath(os.path.join(self.root, rel))
        real = os.path.realpath(full)  # a symlink inside the bundle may point anywhere
        if (os.path.isabs(rel) or os.path.dirname(full) != os.path.normpath(self.root)
                or os.path.dirname(real) != os.path.realpath(self.root)):
            raise RunnerError(f"manifest file {rel!r} points outside the bundle; refusing it")
        return full

    def verify(self) -> None:
        """Every listed file exists and matches its sha256, else :class:`RunnerError`."""
        for role, entry in self.manifest["files"].items():
            p = self.path(role)
            if not os.path.isfile(p):
                raise RunnerError(f"bundle file {entry['path']} ({role}) is missing from "
                                  f"{self.root}")
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise RunnerError(
                    f"bundle file {entry['path']} ({role}) fails its hash check: sha256 "
                    f"{digest[:12]}… but manifest.json says {entry['sha256'][:12]}…; the file was "
                    "modified or corrupted. Re-download the bundle")

    @property
    def labels(self) -> list[str]:
        """Class names of the bundle's head, in logit order."""
        return list(self.manifest["labels"])
