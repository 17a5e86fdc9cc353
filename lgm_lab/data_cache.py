"""The data cache (``LGM_DATA_DIR``, default ``~/.cache/lgm-ext/data``): the staged copies of dataset folders
and the downloads, their marks, and what ``lgm cache`` reports and ``lgm cache --clear`` removes -- only what
the cache can prove it wrote (issue 42).  The datasets themselves: :mod:`lgm_lab.data`."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .config import DATASETS
from .run_folder import save_json

__all__ = ["DatasetUnavailable", "default_data_dir", "cache_size", "clear_cache", "Cleared", "ROOT_MARK", "STAGED_MARK",
           "DOWNLOAD_MARK", "STAGED_KEEP", "IDX_FILES", "cache_root", "using_copy", "remove_copy", "drop_copy",
           "prune_staged", "marked_download"]

IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable here."""


def default_data_dir() -> Path:
    """The data cache: ``LGM_DATA_DIR`` when set and not empty, else ``~/.cache/lgm-ext/data``."""
    value = os.environ.get("LGM_DATA_DIR", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "lgm-ext" / "data"


# What the cache writes, so that `lgm cache` counts that and `lgm cache --clear` removes that and nothing else
# (issue 42: only what it can prove it wrote, never a path a mark merely names):
# - the cache folder itself when lgm-ext created it: ROOT_MARK in it, holding the folder's identity (device,
#   inode), removed only when nothing else is left;
# - each staged copy: the layout only staging writes (staged/<source>/<16 hex digits>/<FashionMNIST|MNIST>/raw/
#   <IDX files>), with STAGED_MARK in it (also the copy's in-use lock);
# - each download folder lgm-ext created: DOWNLOAD_MARK in it, owned by the user, bound to the cache folder and
#   to the download folder (their device and inode) and listing each file the download wrote (in the folder, and
#   beside it among DOWNLOAD_BESIDE) by device, inode, size and modification time.  A copied mark (another
#   folder, another cache), an edited file, a file that replaced one of them, or a mark of lgm-ext 0.2 (names
#   only) proves nothing: what it names stays.
ROOT_MARK = ".lgm-ext-cache"


STAGED_MARK = ".lgm-ext-staged"


DOWNLOAD_MARK = ".lgm-ext-download"


DOWNLOAD_MARK_VERSION = 2


# files a download puts beside its folder (torchvision's archives), the only names a mark may list there
DOWNLOAD_BESIDE = ("cifar-10-python.tar.gz",)


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino]


def _file_identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def cache_root() -> Path:
    """The cache folder, created (with its mark) when missing; a file there is refused."""
    root = default_data_dir()
    if root.exists() and not root.is_dir():
        raise DatasetUnavailable(f"the data cache {root} (LGM_DATA_DIR) is not a folder")
    if not root.exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / ROOT_MARK).write_text(json.dumps({"root": _identity(os.stat(root))}))
    return root


# The staging cache keeps the copies of this many sources (the most recently used); `lgm cache --clear`
# removes them all.
STAGED_KEEP = 3


@contextlib.contextmanager
def using_copy(copy: Path):
    """Hold a shared lock on the staged copy ``copy`` (on its mark) while it is staged and read: pruning and
    `lgm cache --clear` (an exclusive lock) never remove a copy in use.  A copy removed while this waited
    for the lock is staged anew."""
    mark = copy / STAGED_MARK
    while True:
        try:
            copy.mkdir(parents=True, exist_ok=True)
            fd = os.open(mark, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, FileExistsError):  # a pruner removed the source folder or the copy meanwhile
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(mark).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _listdir(folder: Path) -> list[Path]:
    """The entries of ``folder``; none when it is gone (another process may remove it while we look)."""
    try:
        return [folder / name for name in os.listdir(folder)]
    except OSError:
        return []


def _staged_copies(staged: Path) -> list[Path]:
    """``staged/<source>/<copy>`` folders, listed safely while other processes add and remove them."""
    return [c for folder in _listdir(staged) for c in _listdir(folder)]


def _is_staged_copy(copy: Path) -> bool:
    """A copy the cache staged: the layout only staging writes, ``staged/<source>/<16 hex digits>/<FashionMNIST|
    MNIST>/raw/<IDX files>`` (plain files; staging's temporaries) with its mark (lgm-ext 0.2's copies have none):
    a mark alone proves nothing -- a folder of anything else is never taken for a copy."""
    try:
        if not copy.is_dir() or copy.is_symlink() or not re.fullmatch(r"[0-9a-f]{16}", copy.name):
            return False
        inside = [p for p in copy.iterdir() if p.name != STAGED_MARK]
        if (copy / STAGED_MARK).is_symlink() or (copy / STAGED_MARK).exists() and not (copy / STAGED_MARK).is_file():
            return False
        names = {DATASETS[n][0] for n in ("fashion-mnist", "mnist")}  # a source staged as either, or both
        if not inside or any(d.name not in names or d.is_symlink() or not d.is_dir() for d in inside):
            return False
        for d in inside:
            raw = d / "raw"
            if not {p.name for p in d.iterdir()} <= {"raw"} or raw.is_symlink() or not all(
                    (p.name in IDX_FILES or p.name.endswith(".lgm-tmp")) and p.is_file() and not p.is_symlink()
                    for p in (raw.iterdir() if raw.is_dir() else ())):
                return False
        return True
    except OSError:  # removed meanwhile by another process
        return False


def remove_copy(copy: Path) -> bool:
    """Remove a staged copy unless it is in use (its mark's lock held): False if it is, or if it is gone.

    The mark is opened with O_CREAT (a copy staged before marks gets one) and locked exclusively before
    anything is removed, and it must still be the copy's mark once locked: a removal never skips the lock,
    even while another process is creating the mark of a copy it re-staged at the same path (before, a copy
    whose mark was not there yet was renamed away unlocked, under a reader that created and locked it
    meanwhile).  The copy is renamed away while locked, so that a process that waited for it stages a new
    one."""
    mark = copy / STAGED_MARK
    try:
        fd = os.open(mark, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # removed meanwhile by another process
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(mark).st_ino != os.fstat(fd).st_ino:  # renamed away and staged anew meanwhile
            return False
        trash = copy.with_name(f".{copy.name}.{os.getpid()}.lgm-removing")
        os.rename(copy, trash)
    except OSError:  # in use (the lock is held), or gone
        return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def prune_staged(current: Path, keep: int = STAGED_KEEP) -> None:
    """Drop staged copies beyond the ``keep`` most recently used (``current`` always stays; a copy in use by
    another process stays too)."""
    staged = default_data_dir() / "staged"
    copies = {}
    for c in _staged_copies(staged):
        with contextlib.suppress(OSError):  # another process may be removing it
            if _is_staged_copy(c):
                copies[c] = c.stat().st_mtime_ns
    copies = sorted(copies, key=copies.get, reverse=True)
    for old in [c for c in copies if c != current][max(0, keep - 1):]:
        with contextlib.suppress(OSError):
            if remove_copy(old):
                old.parent.rmdir()  # its source folder, once its last copy is gone (only when empty)


def drop_copy(copy: Path) -> None:
    """Remove a copy this process staged and could not read (unless another process is using it), and its
    source folder if that is then empty."""
    if remove_copy(copy):
        with contextlib.suppress(OSError):
            copy.parent.rmdir()


@contextlib.contextmanager
def marked_download(root: Path, folder: str, files: tuple[str, ...] = ()):
    """A download into the cache ``root`` that creates ``folder`` (and ``files`` beside it): marked as the
    cache's (DOWNLOAD_MARK, naming the files), so that `lgm cache --clear` removes it; a folder that was
    there before is the user's and stays unmarked."""
    if root.exists() and not root.is_dir():
        raise DatasetUnavailable(f"the data cache {root} (LGM_DATA_DIR) is not a folder")
    if root == default_data_dir():
        cache_root()
    new = not (root / folder).exists()
    new_files = [f for f in files if not (root / f).exists()]
    try:
        yield
    finally:
        if new and (root / folder).is_dir() and not (root / folder).is_symlink():
            _write_download_mark(root, root / folder, new_files)


def _write_download_mark(root: Path, folder: Path, beside) -> None:
    """Mark ``folder`` as a download of the cache ``root``: their identities and each file the download wrote
    (in ``folder``, and the ``beside`` files it put in ``root``) with its identity, size and modification time."""
    files = {}
    for dirpath, _dirs, names in os.walk(folder):  # links are not followed
        for name in names:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and name != DOWNLOAD_MARK:
                files[p.relative_to(folder).as_posix()] = _file_identity(st)
    near = {}
    for name in beside:
        with contextlib.suppress(OSError):
            st = os.lstat(root / name)
            if stat.S_ISREG(st.st_mode):
                near[name] = _file_identity(st)
    save_json(folder / DOWNLOAD_MARK, {"lgm-ext-download": DOWNLOAD_MARK_VERSION, "root": _identity(os.stat(root)),
                                       "folder": _identity(os.lstat(folder)), "files": files, "beside": near})


def _proven_download(root: Path, folder: Path) -> tuple[dict, str]:
    """The files that ``folder``'s download mark proves the cache ``root`` wrote, ``{path: size}`` (those still
    as written), and ``""``; or ``({}, reason)`` when the mark proves nothing (not the user's, copied from another
    folder or cache, forged, of lgm-ext 0.2)."""
    mark = folder / DOWNLOAD_MARK
    try:
        st = os.lstat(mark)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return {}, "its download mark is not a file of yours"
        saved = json.loads(mark.read_text())
        if not isinstance(saved, dict) or saved.get("lgm-ext-download") != DOWNLOAD_MARK_VERSION:
            return {}, "its download mark names files but proves nothing (an older lgm-ext, or not lgm-ext's)"
        if saved.get("root") != _identity(os.stat(root)) or saved.get("folder") != _identity(os.lstat(folder)):
            return {}, "its download mark was made for another folder or cache (copied or forged)"
        files, near = saved.get("files"), saved.get("beside")
        if not isinstance(files, dict) or not isinstance(near, dict):
            return {}, "its download mark is malformed"
    except (OSError, ValueError):
        return {}, "its download mark cannot be read"
    proven = {}
    candidates = [(folder / rel, ident) for rel, ident in files.items()
                  if isinstance(rel, str) and rel and not rel.startswith("/") and ".." not in rel.split("/")]
    candidates += [(root / name, ident) for name, ident in near.items() if name in DOWNLOAD_BESIDE]
    for path, ident in candidates:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and _file_identity(st) == ident:
                proven[path] = st.st_size
    return proven, ""


def _download_folders(root: Path) -> list[Path]:
    """The folders in ``root`` that hold a download mark (proven or not); unreadable entries are skipped."""
    out = []
    for folder in _listdir(root):
        with contextlib.suppress(OSError):
            if folder.is_dir() and not folder.is_symlink() and os.path.lexists(folder / DOWNLOAD_MARK):
                out.append(folder)
    return sorted(out)


def cache_size() -> int:
    """Bytes the data cache (:func:`default_data_dir`) wrote and :func:`clear_cache` would remove: its staged
    copies and the files its download marks prove it wrote (0 when it does not exist).  Nothing else under
    ``LGM_DATA_DIR`` is counted, or even walked (a cache folder that is ``/`` or a home folder is not)."""
    root = default_data_dir()
    if not root.is_dir():
        return 0
    total = sum(_size(c) for c in _staged_copies(root / "staged") if _is_staged_copy(c)) \
        if (root / "staged").is_dir() and not (root / "staged").is_symlink() else 0
    for folder in _download_folders(root):
        total += sum(_proven_download(root, folder)[0].values())
    return total


def _size(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        if path.is_file():
            return path.stat().st_size
        for dirpath, _dirs, names in os.walk(path):
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, name))
                    total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _own_root(root: Path) -> bool:
    """Whether the cache folder ``root`` was created by lgm-ext: its mark holds its identity (lgm-ext 0.2's empty
    mark is taken as such too: it removes only an empty folder)."""
    try:
        text = (root / ROOT_MARK).read_text() if (root / ROOT_MARK).is_file() else None
        if text is None:
            return False
        return not text.strip() or json.loads(text).get("root") == _identity(os.stat(root))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Cleared:
    """What :func:`clear_cache` did: the paths it ``removed``, the bytes ``freed``, the staged copies it
    ``kept`` because another process was reading them, the folders with a download mark it left as they are
    because the mark proves nothing or they hold files the download did not write (``unproven``: ``(folder,
    reason)``), and a ``note`` when there was nothing to clear."""

    removed: list = field(default_factory=list)
    freed: int = 0
    kept: list = field(default_factory=list)
    unproven: list = field(default_factory=list)
    note: str = ""


def clear_cache() -> Cleared:
    """Remove what the data cache wrote, and nothing else: the staged copies (not one in use by another
    process), the downloads lgm-ext made, and the cache folder itself when lgm-ext created it and it is then
    empty.  A user's files in ``LGM_DATA_DIR`` (and any dataset folder) are never touched.  A missing cache is
    no error (nothing to remove); an ``LGM_DATA_DIR`` that is a file raises :class:`ValueError`."""
    root = default_data_dir()
    out = Cleared()
    if not root.exists():
        out.note = f"{root} does not exist: nothing to remove"
        return out
    if not root.is_dir():
        raise ValueError(f"the data cache {root} (LGM_DATA_DIR) is not a folder: nothing removed")
    staged = root / "staged"
    if staged.is_dir() and not staged.is_symlink():
        for copy in sorted(_staged_copies(staged)):
            if _is_staged_copy(copy):
                size = _size(copy)
                if remove_copy(copy):
                    out.removed.append(copy)
                    out.freed += size
                else:
                    out.kept.append(copy)
        # the source folders (and `staged`) the removed copies leave empty; no other folder
        for folder in [*sorted({c.parent for c in out.removed}), *([staged] if out.removed else [])]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    for folder in _download_folders(root):
        proven, reason = _proven_download(root, folder)
        if reason:
            out.unproven.append((folder, reason + "; left as it is"))
            continue
        for path, size in sorted(proven.items()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                out.freed += size
                if path.parent == root:
                    out.removed.append(path)
        # the folders the download made, now empty (innermost first), its mark, and the folder itself if empty
        for dirpath, _dirs, _names in sorted(os.walk(folder), key=lambda w: -len(w[0])):
            if Path(dirpath) != folder:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        if {p.name for p in folder.iterdir()} == {DOWNLOAD_MARK}:
            (folder / DOWNLOAD_MARK).unlink()
            folder.rmdir()
            out.removed.append(folder)
        else:
            out.removed.extend(p for p in sorted(proven) if p.parent != root)
            out.unproven.append((folder, "holds files the download did not write (or that changed since); they "
                                         "stay"))
    if _own_root(root) and {p.name for p in root.iterdir()} == {ROOT_MARK}:
        (root / ROOT_MARK).unlink()
        root.rmdir()
        out.removed.append(root)
    if not out.removed and not out.kept and not out.unproven:
        out.note = f"nothing in {root} was written by lgm-ext's cache: nothing removed"
    return out
