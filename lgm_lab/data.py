"""Datasets: Fashion-MNIST (default; offline from Debian's ``dataset-fashion-mnist``),
MNIST and CIFAR-10 (downloaded where there is a network, or found in ``data_dir``).

Parsing is torchvision's.  The MNIST-like sets are small enough to hold in
memory as float tensors, so training reads batches without per-image PIL work;
CIFAR-10 keeps torchvision's transforms (pad-4 crop and flip when training).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DATASETS, dataset_info
from .data_cache import (  # the cache (staging, downloads, lgm cache); re-exported where callers found them
    DOWNLOAD_MARK,  # noqa: F401
    IDX_FILES,
    ROOT_MARK,  # noqa: F401
    STAGED_KEEP,  # noqa: F401
    STAGED_MARK,  # noqa: F401
    Cleared,
    DatasetUnavailable,
    cache_root,
    cache_size,
    clear_cache,
    default_data_dir,
    drop_copy,
    marked_download,
    prune_staged,
    using_copy,
)
from .run_folder import create_temporary

__all__ = ["DATASETS", "DatasetUnavailable", "load_dataset", "dataset_info", "default_data_dir", "fingerprint",
           "cache_size", "clear_cache", "Cleared"]

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _source_file(src: Path, f: str) -> Path | None:
    for p in (src / f, src / f"{f}.gz"):
        if p.is_file():
            return p
    return None


def _stage_idx(src: Path, root: Path, folder: str) -> bool:
    """Copy (and un-gzip) IDX files from ``src`` into torchvision's ``root/folder/raw`` layout.
    A damaged source (a truncated or invalid .gz) raises :class:`DatasetUnavailable`."""
    raw = root / folder / "raw"
    if all((raw / f).exists() for f in IDX_FILES):
        return True
    if not all(_source_file(src, f) for f in IDX_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for f in IDX_FILES:
        path = _source_file(src, f)
        # a temporary of its own: two runs staging the same source at once each write theirs and rename
        # it into place (the same bytes; a rename is atomic), neither sees a half-written file
        fd, tmp = create_temporary(raw / f)  # as a plain copy would be: a shared data folder stays readable
        try:
            with os.fdopen(fd, "wb") as fout:
                if path.suffix != ".gz":
                    with open(path, "rb") as fin:
                        shutil.copyfileobj(fin, fout)
                else:
                    with gzip.open(path, "rb") as fin:
                        shutil.copyfileobj(fin, fout)
                fout.flush()
                os.replace(tmp, raw / f)  # while open, and so locked (run_folder.create_temporary)
        except (EOFError, OSError, gzip.BadGzipFile) as err:
            tmp.unlink(missing_ok=True)
            raise DatasetUnavailable(f"cannot read {path}: {err} (a truncated or damaged file? fetch it "
                                     "again)") from err
    return True


def _staging_root(src: Path) -> Path:
    """Where IDX files found in ``src`` are unpacked: a cache folder per source and per content (the
    files' names, sizes and modification times), so a read-only source (the Debian package) is never
    written to, different sources never mix, and a changed or repaired source is staged again."""
    key = re.sub(r"[^A-Za-z0-9]+", "_", str(src.resolve())).strip("_")
    sig = hashlib.sha256()
    for f in IDX_FILES:
        p = _source_file(src, f)
        st = p.stat()
        sig.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return cache_root() / "staged" / key / sig.hexdigest()[:16]


def _mnist_like(name: str, train: bool, root: Path, data_dir: Path | None, download: bool) -> Dataset:
    import torchvision

    cls_name = DATASETS[name][0]
    staged_from = None
    hold = contextlib.ExitStack()  # the staged copy's in-use lock, until its files are read
    if not (data_dir is not None and (data_dir / cls_name / "raw").is_dir()):  # not already torchvision's layout
        sources = [p for p in (data_dir, data_dir / cls_name if data_dir else None) if p is not None]
        if name == "fashion-mnist" and data_dir is None:  # the system copy only when no folder was named
            sources.append(SYSTEM_FASHION_MNIST)
        for src in sources:
            if src.is_dir() and all(_source_file(src, f) for f in IDX_FILES):
                root = _staging_root(src)
                hold.enter_context(using_copy(root))
                try:
                    _stage_idx(src, root, cls_name)
                except DatasetUnavailable:
                    hold.close()
                    drop_copy(root)  # a damaged source leaves no copy behind
                    raise
                os.utime(root)  # most recently used
                prune_staged(root)
                staged_from = src
                break
        else:
            if data_dir is not None:
                found = [f for f in IDX_FILES if _source_file(data_dir, f)]
                if found:  # some files but not all: never mix with another copy
                    missing = [f for f in IDX_FILES if f not in found]
                    raise DatasetUnavailable(f"{data_dir} lacks {', '.join(missing)} (or .gz) of {name}")
    cls = getattr(torchvision.datasets, cls_name)
    download = download and staged_from is None and data_dir is None
    try:
        # a named data_dir is only read: never created into, never downloaded into (downloads go to the cache)
        with hold:
            if download:
                with marked_download(root, cls_name):
                    ds = cls(str(root), train=train, download=True)
            else:
                ds = cls(str(root), train=train, download=False)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError when absent and offline
        if staged_from is not None:
            drop_copy(root)  # an unreadable copy is not kept in the cache
            raise DatasetUnavailable(f"cannot read the {name} files in {staged_from}: "
                                     f"{type(err).__name__}: {' '.join(str(err).split())}") from err
        if data_dir is not None:
            raise DatasetUnavailable(f"{name} is not in {data_dir}: put the four IDX files ({', '.join(IDX_FILES)}, "
                                     f"optionally .gz) there, or torchvision's {cls_name}/raw folder; a --data-dir "
                                     "is only read (without one, lgm downloads to its cache)") from err
        hint = (
            "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; `make install` does), "
            if name == "fashion-mnist"
            else ""
        )
        raise DatasetUnavailable(
            f"{name} is not available: not found in {root / cls_name / 'raw'}"
            + (f" or {data_dir}" if data_dir else "")
            + f" and the download failed ({type(err).__name__}: {err}). To fix: {hint}"
            f"put the four IDX files ({', '.join(IDX_FILES)}, optionally .gz) in a folder and pass --data-dir, "
            "or run where the network is reachable."
        ) from err
    where = staged_from or root
    k = dataset_info(name)["num_classes"]
    if len(ds.data) != len(ds.targets):
        raise DatasetUnavailable(f"the {name} files in {where} disagree: {len(ds.data)} images but "
                                 f"{len(ds.targets)} labels ({'train' if train else 'test'} set)")
    if len(ds.targets) and not (0 <= int(ds.targets.min()) and int(ds.targets.max()) < k):
        raise DatasetUnavailable(f"the {name} labels in {where} are out of range: {int(ds.targets.min())}.."
                                 f"{int(ds.targets.max())}, expected 0..{k - 1}")
    size = dataset_info(name)["image_size"]
    if ds.data.dim() != 3 or tuple(ds.data.shape[1:]) != (size, size):
        raise DatasetUnavailable(f"the {name} images in {where} are {'x'.join(map(str, ds.data.shape[1:]))}, "
                                 f"expected {size}x{size} ({'train' if train else 'test'} set)")
    images = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return TensorDataset(images, ds.targets.to(torch.long))


def _cifar10(train: bool, root: Path, download: bool, augment: bool) -> Dataset:
    import torchvision
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train and augment:
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] + steps
    try:
        if not download:
            return torchvision.datasets.CIFAR10(str(root), train=train, download=False, transform=v2.Compose(steps))
        with marked_download(root, "cifar-10-batches-py", ("cifar-10-python.tar.gz",)):
            return torchvision.datasets.CIFAR10(str(root), train=train, download=True, transform=v2.Compose(steps))
    except Exception as err:
        raise DatasetUnavailable(
            f"cifar10 is not available in {root} and the download failed ({type(err).__name__}: {err}). "
            "Put cifar-10-batches-py in --data-dir, or run where the network is reachable."
        ) from err


def load_dataset(
    name: str = "fashion-mnist",
    train: bool = True,
    *,
    data_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    augment: bool = True,
    download: bool = True,
    seed: int = 0,
) -> Dataset:
    """A dataset of ``(image in [0, 1], label)``.  ``subset=N`` keeps N samples
    (a seeded random choice, the same every time)."""
    dataset_info(name)
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise DatasetUnavailable(f"--data-dir {data_dir} does not exist (or is not a folder)")
    root = data_dir if data_dir is not None else default_data_dir()
    if name == "cifar10":
        ds = _cifar10(train, root, download and data_dir is None, augment)  # a named data_dir is only read
    else:
        ds = _mnist_like(name, train, root, data_dir, download)
    if subset is not None:
        if subset <= 0:
            raise ValueError(f"subset must be positive, got {subset}")
        if subset < len(ds):
            g = torch.Generator().manual_seed(seed + (0 if train else 1))
            ds = Subset(ds, torch.randperm(len(ds), generator=g)[:subset].tolist())
    return ds


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(ds: Dataset) -> str:
    """SHA-256 of the samples of ``ds`` in order (images and labels): what a run trained on, so a resume
    on other data is refused.  In-memory datasets (and subsets of them) are hashed as tensors; any other
    dataset item by item (its items must be tensors or numbers)."""
    h = hashlib.sha256()
    indices = None
    base = ds
    if isinstance(ds, Subset):
        indices, base = torch.as_tensor(ds.indices, dtype=torch.long), ds.dataset
    if isinstance(base, TensorDataset):
        for t in base.tensors:
            _hash_tensor(h, t if indices is None else t.index_select(0, indices))
        return h.hexdigest()
    for i in range(len(ds)):
        for v in ds[i]:
            _hash_tensor(h, torch.as_tensor(v))
    return h.hexdigest()


