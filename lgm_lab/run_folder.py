"""The files of a run folder: one writer at a time (an exclusive lock), atomic writes through temporaries
of their own, and the cleanup of temporaries a killed writer left -- only files this project wrote."""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import secrets
import socket
import stat
import sys
from pathlib import Path

__all__ = ["RunFolderBusy", "LOCK_NAME", "TMP_SUFFIX", "locked", "write_atomically", "save_json", "save_text",
           "remove_stale_temporaries", "is_own_temporary", "make_folder", "remove_if_empty", "same_file", "in_folder",
           "create_temporary"]

LOCK_NAME = ".lgm-run.lock"
TMP_SUFFIX = ".lgm-tmp"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder (a second writer is refused, never interleaved)."""


def _open_lock(path: Path, mode: int) -> int | None:
    """Open ``path`` and ``flock`` it with ``mode`` (non-blocking); None when another process holds it.
    The lock file is removed by its last holder (:func:`_release`), so after the lock is taken the path
    must still name the file locked: otherwise a holder removed it meanwhile, and the lock is taken anew."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            holder = json.loads(f.read(4096).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or not holder:
        return "another process"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
            f" ({holder.get('command', '?')}{', reading' if holder.get('shared') else ''})")


def _release(fd: int, path: Path) -> None:
    """Drop the lock; the last holder (the one that can take it exclusively) removes the lock file, so a
    finished or refused command leaves no lock behind."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except OSError:
            pass
    except OSError:  # another holder (a reader) still has it: it removes the file
        pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def locked(folder: Path, *, shared: bool = False):
    """Hold a lock on ``folder`` (``flock`` on ``folder/.lgm-run.lock``) for the block: exclusive for a
    writer (training, writing a detector file), ``shared=True`` for a reader (reusing a finished run): any
    number of readers together, never with a writer.  A conflicting holder is refused at once with
    :class:`RunFolderBusy` naming the writer (pid, host, start, command).  The lock goes with its process (a
    killed run leaves no stale lock) and its file is removed by the last holder."""
    path = Path(folder) / LOCK_NAME
    fd = _open_lock(path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    if fd is None:
        what = "written" if shared else "in use"
        raise RunFolderBusy(f"{folder} is {what} by another run: {_holder(path)}; wait for it to finish or use "
                            "another --out")
    try:
        # who holds it (of several readers, the last to come), for the message of a refused writer
        info = {"pid": os.getpid(), "host": socket.gethostname(), "shared": shared,
                "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        _release(fd, path)


def create_temporary(path: Path) -> tuple[int, Path]:
    """A new temporary of its own beside ``path`` (``.NAME.XXXX.lgm-tmp``), open for writing: ``(fd, its
    path)``.  Created as a plain ``open`` creates a file (mode ``0o666``, less what the umask or the folder's
    default ACL takes away), not private as :func:`tempfile.mkstemp` makes it; where ``path`` is a regular
    file, its permission bits are carried over (best effort: a filesystem that refuses it keeps the default).

    The temporary is locked (``flock``, exclusive) through ``fd`` for as long as it is open: a writer renames it
    into place (or removes it) before closing it, so that :func:`remove_stale_temporaries` tells a live writer's
    temporary (locked) from one a killed writer left (the lock goes with its process)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(tmp).st_ino == os.fstat(fd).st_ino  # not removed by a sweep before it was locked
        except OSError:
            held = False
        if not held:  # a sweep took it for a killed writer's between its creation and the lock: another name
            os.close(fd)
            continue
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.fchmod(fd, st.st_mode & 0o777)
        except OSError:
            pass
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name where it names none (a full disk fails in ``write``, whose error
    names no file: "No space left on device" alone does not say which write failed)."""
    if err.filename is None and err.errno is not None:
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    return err


def write_atomically(path: Path, write) -> None:
    """``write(file)`` into a temporary of its own beside ``path`` (:func:`create_temporary`), fsync, then
    rename it over ``path``: a reader sees the old file or the new one, never a partial one, and two
    writers never share a temporary.  A symbolic link at ``path`` is replaced, not followed.  The file gets
    the permissions a plain ``open`` would give it (a regular file it replaces keeps its own), not a
    temporary's private ``0o600``.  Temporaries of ``path`` that a killed writer left are removed afterwards
    (:func:`remove_stale_temporaries`; a live writer's stay).  An :class:`OSError` (a full disk) names ``path``."""
    path = Path(path)
    try:
        fd, tmp = create_temporary(path)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while the temporary is open, and so locked: a sweep never takes it
    except OSError as err:  # a full disk: the previous file stays, no partial temporary is left
        tmp.unlink(missing_ok=True)
        raise _naming(err, path) from err
    except BaseException:  # an interrupt, a failing writer
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_temporaries(path.parent, [path.name])


def save_json(path: Path, obj, indent: int = 2, **kwargs) -> None:
    """``obj`` as JSON, written atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=indent, **kwargs).encode()))


def in_folder(path, folder) -> str:
    """``path`` relative to ``folder`` (a report's files as its JSON records them, so that a committed or
    moved report names no folder of the machine that wrote it); ``path`` as given if it is outside."""
    try:
        return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return str(path)


def save_text(path: Path, text: str) -> None:
    """``text`` (UTF-8), written atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: f.write(text.encode()))


def _temporary_pattern(name: str) -> re.Pattern:
    # 8 hex digits (create_temporary); 8 of [a-z0-9_] as tempfile.mkstemp named them (lgm-ext 0.2)
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-z_]{{8}}{re.escape(TMP_SUFFIX)}")


def _remove_if_unheld(path: Path) -> bool:
    """Remove the temporary ``path`` unless a live writer holds it (its lock, :func:`create_temporary`): locked
    here exclusively before it is removed, and still the file locked.  Anything but a regular file stays."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:  # held by a live writer, or gone
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, names, *, legacy: bool = False) -> list[Path]:
    """Remove the temporaries a killed writer of ``names`` left in ``folder``: ``.NAME.XXXXXXXX.lgm-tmp`` (8
    characters), a name only :func:`create_temporary` gives, and only one that no live writer holds (its lock);
    with ``legacy`` (a run folder being resumed, whose checkpoint is ours; call it holding the folder's lock)
    also ``NAME.tmp`` as lgm-ext 0.2 named them -- in any other folder such a file may be a user's and stays.
    Any other file stays."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pattern = _temporary_pattern(name)
        for entry in entries:
            if pattern.fullmatch(entry) and _remove_if_unheld(Path(folder) / entry):
                removed.append(Path(folder) / entry)
        old = Path(folder) / f"{name}.tmp"
        if legacy and old.is_file() and not old.is_symlink():
            old.unlink(missing_ok=True)
            removed.append(old)
    return removed


def is_own_temporary(path: Path) -> bool:
    """A temporary :func:`write_atomically` names (``.NAME.XXXX.lgm-tmp``)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created (outermost first), so that a
    command refused afterwards removes them again (:func:`remove_if_empty`) and leaves nothing behind."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_if_empty(created: list[Path]) -> None:
    """Remove the folders :func:`make_folder` created, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one existing file (by device and inode: links and other spellings of a
    path count as the same file)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
