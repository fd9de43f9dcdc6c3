"""Read and verify a bundle with the standard library only (schema: :mod:`edgerun.manifest`).

The manifest's bytes are read **once**; the signature (when a key is given) is checked over
those bytes and the same bytes are parsed, so swapping the file between the checks cannot
slip a different manifest past the signature.
"""

from __future__ import annotations

import os

from edgerun import RunnerError
from edgerun.files import MAX_KEY_BYTES, read_small
from edgerun.manifest import (
    SIGNATURE,
    parse,
    read_bytes,
    safe_path,
    sha256_file,
    verify_files,
)

__all__ = ["Bundle", "sha256_file", "verify_signature"]


def verify_signature(root: str, body: bytes, pub_path: str) -> None:
    """Check ``manifest.sig`` (Ed25519 over the manifest's bytes) against a PEM public key.

    The manifest pins every file's sha256, so a valid signature plus :meth:`Bundle.verify`
    authenticates the whole bundle. Needs ``cryptography`` (only when a key is given).
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise RunnerError("--trust-key needs the cryptography package: pip install "
                          "cryptography") from None
    pem = read_small(pub_path, "--trust-key", MAX_KEY_BYTES)
    try:
        pub = serialization.load_pem_public_key(pem)
    except (TypeError, ValueError) as e:
        raise RunnerError(f"--trust-key {pub_path} is not a readable PEM public key "
                          f"({e})") from None
    sig_path = os.path.join(root, SIGNATURE)
    if not os.path.isfile(sig_path):
        raise RunnerError(f"bundle {root} is not signed (no {SIGNATURE}) but --trust-key was "
                          "given; refusing it. Sign it with `edgetl export --sign-key`")
    sig = read_small(sig_path, f"bundle file {SIGNATURE}", 4096)
    try:
        pub.verify(sig, body)
    except (InvalidSignature, TypeError, ValueError):
        raise RunnerError(f"bundle {root}: manifest.json's signature does not verify with "
                          f"{pub_path} (wrong key, or the manifest was modified); refusing "
                          "it") from None


class Bundle:
    """A verified bundle: ``manifest`` (dict) and ``path(role)`` for its files."""

    def __init__(self, root: str, verify: bool = True, trust_key: str | None = None):
        self.root = root
        body = read_bytes(root)
        if trust_key:
            verify_signature(root, body, trust_key)
        self.manifest = parse(body)
        self.manifest_sha256 = _sha256(body)
        if verify:
            self.verify()

    def path(self, role: str) -> str:
        """Absolute path of the file with ``role`` (e.g. ``backbone``), inside the bundle."""
        try:
            rel = self.manifest["files"][role]["path"]
        except KeyError:
            raise RunnerError(f"manifest lists no file for role {role!r}; known roles: "
                              f"{sorted(self.manifest['files'])}") from None
        return safe_path(self.root, rel)

    def arrays(self, role: str, names) -> dict:
        """The arrays of the bundle's ``.npz`` file ``role``, holding at least ``names``.

        Read with :func:`edgerun.files.read_npz` (no pickle; a corrupt, truncated or
        object-array file is one :class:`RunnerError`) and checked to be numeric, so a file
        that passed its sha256 but was written wrong fails here by name, not in numpy.
        """
        from edgerun.files import read_npz

        path = self.path(role)
        name = self.manifest["files"][role]["path"]
        fix = "re-export or re-download the bundle"
        z = read_npz(path, f"bundle file ({role})", hint=fix)
        missing = [n for n in names if n not in z]
        if missing:
            raise RunnerError(f"bundle file {name} ({role}) lacks the arrays {missing} (it "
                              f"holds {sorted(z)[:12]}); {fix}")
        for k, v in z.items():
            if v.dtype.kind not in "biuf" and not (k == "texts" and v.dtype.kind in "US"):
                raise RunnerError(f"bundle file {name} ({role}): array {k!r} is not numeric "
                                  f"({v.dtype}); {fix}")
        return z

    def verify(self) -> None:
        """Every listed file exists and matches its sha256, else :class:`RunnerError`."""
        verify_files(self.root, self.manifest)

    @property
    def labels(self) -> list[str]:
        """Class names of the bundle's head, in logit order."""
        return list(self.manifest["labels"])


def _sha256(body: bytes) -> str:
    import hashlib

    return hashlib.sha256(body).hexdigest()
