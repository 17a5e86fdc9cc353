"""The files of a run folder: one writer at a time (an exclusive lock), atomic writes through temporaries
of their own, and the cleanup of temporaries a killed writer left -- only files this project wrote."""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

__all__ = ["RunFolderBusy", "LOCK_NAME", "TMP_SUFFIX", "locked", "write_atomically", "save_json", "save_text",
           "remove_stale_temporaries"]

LOCK_NAME = ".lgm-run.lock"
TMP_SUFFIX = ".lgm-tmp"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder (a second writer is refused, never interleaved)."""


@contextlib.contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (``flock`` on ``folder/.lgm-run.lock``) for the block.  A second
    holder is refused at once with :class:`RunFolderBusy` naming the first (pid, host, start, command).  The
    lock goes with its process: a killed run leaves no stale lock."""
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
               f" ({holder.get('command', '?')})") if holder else "another process"
        raise RunFolderBusy(f"{folder} is in use by another run: {who}; wait for it to finish or use another "
                            "--out") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """``write(file)`` into a temporary of its own beside ``path`` (``.NAME.XXXX.lgm-tmp``), fsync, then
    rename it over ``path``: a reader sees the old file or the new one, never a partial one, and two
    writers never share a temporary.  A symbolic link at ``path`` is replaced, not followed."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the previous file stays, no partial temporary is left
        tmp.unlink(missing_ok=True)
        raise


def save_json(path: Path, obj, indent: int = 2, **kwargs) -> None:
    """``obj`` as JSON, written atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=indent, **kwargs).encode()))


def save_text(path: Path, text: str) -> None:
    """``text`` (UTF-8), written atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(folder: Path, names) -> list[Path]:
    """Remove the temporaries a killed writer of ``names`` left in ``folder`` (call it holding the lock):
    ``.NAME.*.lgm-tmp``, and ``NAME.tmp`` as lgm-ext 0.2 named them.  Any other file stays."""
    removed = []
    for name in names:
        for stale in [*Path(folder).glob(f".{name}.*{TMP_SUFFIX}"), Path(folder) / f"{name}.tmp"]:
            if stale.is_file() and not stale.is_symlink():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed
