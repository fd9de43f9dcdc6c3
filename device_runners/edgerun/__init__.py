"""edgerun: the device side of edgetl.

Standard library + numpy + one inference runtime (onnxruntime here). Never torch, never the
server package: this folder is copied onto phones, Raspberry Pis and gateways as it is.
"""

import os
import tempfile

__version__ = "0.1.0"


class RunnerError(ValueError):
    """Bad input or a bundle that fails verification; the message says what to do."""


def atomic_write(path: str, write, *, binary: bool = True, prefix: str = ".tmp.",
                 suffix: str = "", durable: bool = True) -> None:
    """Crash-safe write: ``write(f)`` into a temporary file beside ``path``, fsync, rename.

    A reader (or a reboot) sees the old file or the complete new one, never a partial one.
    With ``durable`` the folder is fsynced after the rename too (POSIX), so the new name
    survives a power cut. ``durable=False`` skips both fsyncs (milliseconds on flash) for
    files that are only a cache: after a power cut they may be lost, never half-written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: str) -> None:
    """Fsync a folder so a rename in it is durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows: folders cannot be opened; NTFS journals the rename
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_durable(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` crash-safely (:func:`atomic_write`: temp, fsync, rename)."""
    import shutil

    from edgerun.files import open_regular

    with open_regular(src) as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out), prefix=".copy.")
