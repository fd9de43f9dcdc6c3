"""Signed bundles: an Ed25519 signature over ``manifest.json``, checked on the device.

The manifest lists every bundle file with its sha256, so signing its exact bytes signs the
whole bundle. ``manifest.sig`` holds the raw 64-byte signature; keys are PEM files
(``edgetl keygen``: private key mode 0600, public key to ship with the device runner).
"""

from __future__ import annotations

import os
from pathlib import Path

from edgetl.errors import BundleError, ConfigError, require
from edgetl.manifest import MANIFEST

SIGNATURE = "manifest.sig"


def keygen(out: Path, name: str = "edgetl") -> tuple[Path, Path]:
    """Write ``name.key`` (private, 0600) and ``name.pub`` into ``out``; refuse to overwrite."""
    require("cryptography", "sign")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv, pub):
        if p.exists():
            raise ConfigError(f"{p} exists; keys are never overwritten (pick another --out or "
                              "--name)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def sign_bundle(bundle: Path, key_path: Path) -> Path:
    """Sign ``bundle/manifest.json`` with the private key at ``key_path``."""
    require("cryptography", "sign")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{key_path} is not a readable PEM private key ({e}); make one with "
                          "`edgetl keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{key_path} is not an Ed25519 key; make one with `edgetl keygen`")
    sig = Path(bundle) / SIGNATURE
    data = key.sign((Path(bundle) / MANIFEST).read_bytes())
    tmp = sig.with_name(f".{SIGNATURE}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, sig)  # an old signature is replaced whole, never half-written
    return sig


def verify_bundle(bundle: Path, pub_path: Path) -> None:
    """Raise :class:`BundleError` unless ``manifest.sig`` verifies with the public key."""
    require("cryptography", "sign")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    sig = Path(bundle) / SIGNATURE
    if not sig.is_file():
        raise BundleError(f"{bundle} is not signed (no {SIGNATURE})")
    pub = serialization.load_pem_public_key(Path(pub_path).read_bytes())
    try:
        pub.verify(sig.read_bytes(), (Path(bundle) / MANIFEST).read_bytes())
    except InvalidSignature:
        raise BundleError(f"{bundle}: the signature does not verify with {pub_path}") from None
