"""Several files of a state folder replaced as one step, and the recovery that finishes it.

A run ends by replacing ``head.npz``, ``head.prev.npz``, ``report.json``, ``versions.json``
(and, for ``update``, ``bundle.json``) and deleting ``train_state.npz``. Replaced one by one,
a kill in between left a new head beside a stale report. A :class:`Commit`:

1. stages every new file as ``.commit.*`` beside its target, fsynced (a full or read-only disk
   fails here, before anything is replaced: the temps are removed, one :class:`RunnerError`);
2. writes the journal ``commit.journal`` (temp, fsync, rename, fsync the folder): from here
   on the commit counts as done;
3. renames the temps in order, deletes the files it drops, fsyncs the folder and deletes the
   journal.

:func:`recover`, called under the state lock when a run opens the folder, finishes a
journaled commit (step 3 again: every rename whose temp still exists, every delete), and
removes temp files no journal names: those of a commit whose journal never became durable
(so that commit is undone: nothing had been replaced yet) and of killed atomic writes.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile

from edgerun import RunnerError, _fsync_dir, atomic_write

JOURNAL = "commit.journal"
FORMAT = "edgerun.commit/1"
#: Temp-file prefixes of this package's writers (atomic_write, heads, training state, copies).
TEMP_PREFIXES = (".commit.", ".tmp.", ".head.", ".train.", ".copy.")
#: Test hook: SIGKILL this process after commit step N (0: staged, 1: journal, 2..: renames).
KILL_AT = "EDGERUN_TEST_KILL_AT_COMMIT_STEP"
_DISK_FIX = {errno.ENOSPC: "free space on the device", errno.EDQUOT: "free space (quota)",
             errno.EROFS: "remount it read-write or pass another --out / --state",
             errno.EACCES: "make it writable or pass another --out / --state",
             errno.EPERM: "make it writable or pass another --out / --state"}


def disk_error(e: OSError, what: str, folder: str) -> RunnerError | None:
    """A :class:`RunnerError` for a full or read-only disk (``None`` for other errors)."""
    fix = _DISK_FIX.get(e.errno)
    if fix is None:
        return None
    return RunnerError(f"cannot write {what} in {folder}: {e.strerror or e}; nothing was "
                       f"replaced (the previous head.npz, report.json and head.prev.npz are "
                       f"intact): {fix}, then run again")


def _hook(step: int) -> None:
    if os.environ.get(KILL_AT) == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class Commit:
    """Stage files into ``folder``, then :meth:`apply` them as one step (see the module)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.renames: list[tuple[str, str]] = []  # (temp name, target name), in order
        self.deletes: list[str] = []

    def stage(self, name: str, write, *, binary: bool = True) -> None:
        """``write(f)`` into a fsynced temp file that :meth:`apply` renames to ``name``."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".commit.")
        try:
            with (os.fdopen(fd, "wb") if binary else
                  os.fdopen(fd, "w", encoding="utf-8")) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            os.unlink(tmp)
            self.abort()
            err = disk_error(e, name, self.folder) if isinstance(e, OSError) else None
            if err is not None:
                raise err from None
            raise
        self.renames.append((os.path.basename(tmp), name))

    def stage_json(self, name: str, obj) -> None:
        self.stage(name, lambda f: json.dump(obj, f, indent=2, sort_keys=True), binary=False)

    def stage_copy(self, src: str, name: str) -> None:
        """A copy of ``src`` (e.g. ``head.npz`` -> ``head.prev.npz``), renamed at apply."""
        import shutil

        from edgerun.files import open_regular

        with open_regular(src) as f:
            self.stage(name, lambda out: shutil.copyfileobj(f, out))

    def delete(self, name: str) -> None:
        """Delete ``name`` once every rename is done (e.g. the finished training state)."""
        self.deletes.append(name)

    def abort(self) -> None:
        """Remove the staged temps; nothing was replaced."""
        for tmp, _ in self.renames:
            try:
                os.unlink(os.path.join(self.folder, tmp))
            except OSError:
                pass
        self.renames = []

    def apply(self) -> None:
        """Journal, rename in order, delete, remove the journal (see the module)."""
        _hook(0)
        journal = {"format": FORMAT, "renames": self.renames, "deletes": self.deletes}
        try:
            atomic_write(os.path.join(self.folder, JOURNAL),
                         lambda f: json.dump(journal, f), binary=False)
        except OSError as e:
            self.abort()
            err = disk_error(e, JOURNAL, self.folder)
            if err is None:
                raise
            raise err from None
        _hook(1)
        try:
            _finish(self.folder, journal, hook=True)
        except OSError as e:  # the journal is durable: the next run finishes the commit
            raise RunnerError(f"committing the results in {self.folder} was interrupted "
                              f"({e.strerror or e}); the next adapt or update on this "
                              "folder finishes it") from None


def _finish(folder: str, journal: dict, hook: bool = False) -> None:
    for i, (tmp, name) in enumerate(journal["renames"]):
        src = os.path.join(folder, tmp)
        if os.path.exists(src):  # absent: renamed before a kill
            os.replace(src, os.path.join(folder, name))
        if hook:
            _hook(2 + i)
    _fsync_dir(folder)
    for name in journal["deletes"]:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    os.unlink(os.path.join(folder, JOURNAL))
    _fsync_dir(folder)


def _unlink(path: str, folder: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise disk_error(e, "the state folder", folder) or RunnerError(
            f"cannot remove {path} ({e.strerror or e})") from None


def recover(folder: str) -> list[str]:
    """Finish a journaled commit in ``folder`` and remove orphan temps; what it did, in words.

    Call with the state lock held (another run's temps are not orphans). A journal that
    cannot be read was never renamed into place by :meth:`Commit.apply` (it writes it
    atomically), so only damage puts one there: it is dropped with its temps, as if the
    commit had not begun.
    """
    if not os.path.isdir(folder):
        return []
    done = []
    path = os.path.join(folder, JOURNAL)
    if os.path.lexists(path):
        try:
            with open(path, encoding="utf-8") as f:
                journal = json.load(f)
            if journal.get("format") != FORMAT:
                raise ValueError("unknown format")
            journal["renames"] = [(str(t), str(n)) for t, n in journal["renames"]]
            journal["deletes"] = [str(n) for n in journal["deletes"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            journal = None
            _unlink(path, folder)
            done.append(f"dropped an unreadable commit journal ({e})")
        if journal is not None:
            try:
                _finish(folder, journal)
            except OSError as e:
                raise disk_error(e, "the interrupted commit", folder) or RunnerError(
                    f"cannot finish the interrupted commit in {folder} ({e.strerror or e}); "
                    "make the folder writable and run again") from None
            done.append(f"finished an interrupted commit ({len(journal['renames'])} files)")
    orphans = 0
    for sub in (folder, os.path.join(folder, "features")):
        if not os.path.isdir(sub):
            continue
        for name in os.listdir(sub):
            if name.startswith(TEMP_PREFIXES):
                try:
                    os.unlink(os.path.join(sub, name))
                    orphans += 1
                except OSError:
                    pass  # a read-only folder: harmless, removed by a later run
    if orphans:
        done.append(f"removed {orphans} orphan temp file(s) of interrupted writes")
    return done
