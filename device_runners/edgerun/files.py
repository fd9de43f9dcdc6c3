"""Opening files a user names (data, heads, keys): regular files only, sizes capped first.

Standard library only (numpy is imported by the ``.npz`` functions when they run), so the
manifest and signature code can use it.

Every file the runner reads on a user's say-so goes through :func:`open_regular`: a FIFO,
``/dev/zero`` or another device would block the runner forever or feed it endless bytes, so
it is refused before a single byte is read. ``.npz`` files go through :func:`read_npz`, which
checks the sizes the zip and ``.npy`` headers declare *before* decompressing anything (a
small zip can unpack to gigabytes), refuses object arrays, and turns a corrupt or truncated
archive into one :class:`RunnerError`.
"""

from __future__ import annotations

import os
import stat

from edgerun import RunnerError

#: Head checkpoints and keys are small; anything larger is not one.
MAX_HEAD_BYTES = 256 << 20
MAX_KEY_BYTES = 64 << 10
#: Arrays in one ``.npz``: more members than this is not device data.
MAX_NPZ_MEMBERS = 1024


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def open_regular(path, what: str = "file", max_bytes: int | None = None, *,
                 limit_flag: str | None = None):
    """Open ``path`` for binary reading if it is a regular file of at most ``max_bytes``.

    The file is opened non-blocking (a FIFO with no writer does not hang the open), then
    checked with ``fstat`` on the open descriptor (no race with a swapped path): a FIFO,
    socket, device or folder is refused, as is a file above ``max_bytes``.

    Args:
        what: how messages name the file (``"data file"``, ``"--head"``).
        limit_flag: the flag that raises ``max_bytes``, named in the message.

    Returns:
        A binary file object (the caller closes it).
    """
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RunnerError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise RunnerError(f"{what} {path} is a folder, expected a file") from None
    except OSError as e:
        raise RunnerError(f"{what} {path} cannot be opened ({e.strerror or e})") from None
    except ValueError:  # an embedded NUL byte: no file can have that name
        raise RunnerError(f"{what} {path!r} contains a NUL byte; no file name can hold "
                          "one") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise RunnerError(f"{what} {path} is a folder, expected a file")
        if not stat.S_ISREG(st.st_mode):
            raise RunnerError(f"{what} {path} is not a regular file (a FIFO, socket or "
                              "device); refusing to read it")
        if max_bytes is not None and st.st_size > max_bytes:
            fix = f"; raise {limit_flag}" if limit_flag else ""
            raise RunnerError(f"{what} {path} is {_mib(st.st_size)}, above the "
                              f"{max_bytes / 2**20:g} MiB limit{fix}")
        if flags & getattr(os, "O_NONBLOCK", 0):
            import fcntl  # present wherever O_NONBLOCK is

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path, what: str = "file", max_bytes: int = MAX_KEY_BYTES) -> bytes:
    """The whole content of a small regular file (see :func:`open_regular`)."""
    with open_regular(path, what, max_bytes) as f:
        return f.read(max_bytes + 1)[:max_bytes]


def _npy_header(fp):
    """``(shape, dtype)`` from the header of the ``.npy`` stream ``fp`` (nothing else read)."""
    import numpy as np

    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(fp)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return shape, dtype


def npz_sizes(f, path: str, what: str = "file"):
    """``{name: (shape, dtype, declared bytes)}`` of the arrays in the zip ``f``, headers only.

    Raises :class:`RunnerError` for object arrays (they would need pickle) and for members
    that are not ``.npy`` arrays.
    """
    import zipfile

    import numpy as np

    out = {}
    with zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise RunnerError(f"{what} {path} holds {len(infos)} arrays (more than "
                              f"{MAX_NPZ_MEMBERS}); not a data file")
        for info in infos:
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with zf.open(info) as m:
                try:
                    shape, dtype = _npy_header(m)
                except ValueError as e:
                    raise RunnerError(f"{what} {path}: member {info.filename!r} is not a numpy "
                                      f"array ({e}); save the file with np.savez") from None
            if dtype.hasobject:
                raise RunnerError(f"{what} {path}: array {name!r} holds Python objects (dtype "
                                  f"{dtype}), which cannot be read without pickle; save "
                                  "numbers as numeric arrays and names as np.array(names, "
                                  "dtype=str)")
            n = int(np.prod(shape, dtype=object)) * dtype.itemsize
            out[name] = (shape, dtype, max(n, info.file_size))
    return out


def read_npz(path, what: str = "file", max_bytes: int | None = None, *,
             limit_flag: str | None = None, hint: str = "") -> dict:
    """Every array of the ``.npz`` at ``path``, loaded without pickle, sizes checked first.

    The uncompressed size the zip directory and the ``.npy`` headers declare must be at most
    ``max_bytes`` before anything is decompressed. Any damage (not a zip, truncated, bad CRC,
    short data) is one :class:`RunnerError`; ``hint`` says how to write a good file.
    """
    import zipfile
    import zlib

    import numpy as np

    path = os.fspath(path)
    fix = f"; {hint}" if hint else ""
    with open_regular(path, what, max_bytes, limit_flag=limit_flag) as f:
        if f.read(2) != b"PK":  # np.load would call any non-zip file "pickled data"
            raise RunnerError(f"{what} {path} is not a readable .npz file (no zip header){fix}")
        f.seek(0)
        try:
            sizes = npz_sizes(f, path, what)
            total = sum(s[2] for s in sizes.values())
            if max_bytes is not None and total > max_bytes:
                more = f"; raise {limit_flag}" if limit_flag else ""
                raise RunnerError(f"{what} {path} declares {_mib(total)} uncompressed, above "
                                  f"the {max_bytes / 2**20:g} MiB limit{more}")
            f.seek(0)
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except RunnerError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError,
                NotImplementedError, RuntimeError) as e:
            raise RunnerError(f"{what} {path} is not a readable .npz file (corrupt or "
                              f"truncated: {type(e).__name__}: {str(e)[:160]}){fix}") from None


def make_folder(path, what: str, holds: str, flag: str) -> None:
    """Create the output folder ``path`` (and parents) unless it is one; refuse a file there.

    ``what``/``holds``/``flag`` word the message: "state folder X is a file; expected a
    folder for head.npz and report.json: pass another --out / --state".
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunnerError(f"{what} {path} is a file; expected a folder for {holds}: pass "
                          f"another {flag}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunnerError(f"{what} {path} cannot be created ({e.strerror or e}); pass a "
                          f"writable {flag}") from None


#: The lock file in a state folder (``adapt --out``, ``update --state``).
LOCK_FILE = ".lock"
_held: set = set()  # state folders this process holds (a nested adapt inside update)


class state_lock:  # noqa: N801 (used as a context manager, like open)
    """Exclusive, non-blocking lock on a state folder for one ``adapt`` or ``update`` run.

    POSIX: ``fcntl.flock`` on ``FOLDER/.lock``, which holds the owner's pid while locked (empty
    otherwise). A second run on the same folder fails at once with a :class:`RunnerError`
    naming that pid, instead of both writing and one result being lost. The kernel drops the
    lock when its process exits, killed or not, so a crash never leaves the folder locked.
    The same process may re-enter (``update`` re-adapting in its own state folder).

    Platforms without ``fcntl`` (Windows): no lock is taken and runs proceed unguarded; do
    not start two runs on one folder there.
    """

    def __init__(self, folder):
        self.folder = os.path.realpath(os.fspath(folder))
        self.fd = None

    def __enter__(self):
        make_folder(self.folder, "state folder", "head.npz and report.json",
                    "--out / --state")
        try:
            import fcntl
        except ImportError:  # no flock here: proceed without a lock (see the docstring)
            return self
        if self.folder in _held:
            return self
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:  # a read-only or foreign folder: say so before any work is done
            raise RunnerError(f"state folder {self.folder} is not writable ({e.strerror or e}): "
                              "nothing was written; make it writable or pass another --out / "
                              "--state") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunnerError(f"{self.folder} is in use by another run (pid {owner}); wait "
                              "for it to finish, or use another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _held.add(self.folder)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _held.discard(self.folder)
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # releases the lock
            self.fd = None
