"""Datasets: Fashion-MNIST (default; offline from Debian's ``dataset-fashion-mnist``),
MNIST and CIFAR-10 (downloaded where there is a network, or found in ``data_dir``).

Parsing is torchvision's.  The MNIST-like sets are small enough to hold in
memory as float tensors, so training reads batches without per-image PIL work;
CIFAR-10 keeps torchvision's transforms (pad-4 crop and flip when training).
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import DATASETS, dataset_info

__all__ = ["DATASETS", "DatasetUnavailable", "load_dataset", "dataset_info", "default_data_dir"]

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable here."""


def default_data_dir() -> Path:
    return Path(os.environ.get("LGM_DATA_DIR", Path.home() / ".cache" / "lgm-ext" / "data"))


def _stage_idx(src: Path, root: Path, folder: str) -> bool:
    """Copy (and un-gzip) IDX files from ``src`` into torchvision's ``root/folder/raw`` layout."""
    raw = root / folder / "raw"
    if all((raw / f).exists() for f in IDX_FILES):
        return True
    if not all((src / f).exists() or (src / f"{f}.gz").exists() for f in IDX_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for f in IDX_FILES:
        tmp = raw / f"{f}.tmp"
        if (src / f).exists():
            shutil.copyfile(src / f, tmp)
        else:
            with gzip.open(src / f"{f}.gz", "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        os.replace(tmp, raw / f)
    return True


def _staging_root(src: Path) -> Path:
    """Where IDX files found in ``src`` are unpacked: a cache folder per source, so
    a read-only source (the Debian package) is never written to and different
    sources never mix."""
    key = re.sub(r"[^A-Za-z0-9]+", "_", str(src.resolve())).strip("_")
    return default_data_dir() / "staged" / key


def _mnist_like(name: str, train: bool, root: Path, data_dir: Path | None, download: bool) -> Dataset:
    import torchvision

    cls_name = DATASETS[name][0]
    if not (data_dir is not None and (data_dir / cls_name / "raw").is_dir()):  # not already torchvision's layout
        sources = [p for p in (data_dir, data_dir / cls_name if data_dir else None) if p is not None]
        if name == "fashion-mnist":
            sources.append(SYSTEM_FASHION_MNIST)
        for src in sources:
            if src.is_dir() and all((src / f).exists() or (src / f"{f}.gz").exists() for f in IDX_FILES):
                root = _staging_root(src)
                _stage_idx(src, root, cls_name)
                break
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(str(root), train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError when absent and offline
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
    images = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return TensorDataset(images, ds.targets.to(torch.long))


def _cifar10(train: bool, root: Path, download: bool, augment: bool) -> Dataset:
    import torchvision
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train and augment:
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] + steps
    try:
        return torchvision.datasets.CIFAR10(str(root), train=train, download=download, transform=v2.Compose(steps))
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
    root = data_dir if data_dir is not None else default_data_dir()
    if name == "cifar10":
        ds = _cifar10(train, root, download, augment)
    else:
        ds = _mnist_like(name, train, root, data_dir, download)
    if subset is not None:
        if subset <= 0:
            raise ValueError(f"subset must be positive, got {subset}")
        if subset < len(ds):
            g = torch.Generator().manual_seed(seed + (0 if train else 1))
            ds = Subset(ds, torch.randperm(len(ds), generator=g)[:subset].tolist())
    return ds
