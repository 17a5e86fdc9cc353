"""Inputs a model should reject, none of them downloaded (issue 25; docs/SPEC.md section 8), and the
splits the detection protocol needs.

Out-of-distribution images for a Fashion-MNIST model (:data:`OOD_SETS`, :func:`ood_images`):

- ``digits``: scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels with values 0..16),
  scaled to [0, 1] and resized to the model's image size with ``torch.nn.functional.interpolate``
  (bilinear).  *Not* inverted: like Fashion-MNIST's items, the strokes are bright on a dark (0) background;
- ``noise``: i.i.d. uniform pixels in [0, 1];
- ``gaussian``: i.i.d. N(0.5, 1) pixels clipped to [0, 1] (the Gaussian noise of Hendrycks and Gimpel 2017);
- ``inverted``: ``1 - x`` of in-distribution images;
- ``photos``: natural-image patches (far OOD): square crops of scikit-learn's two bundled sample photographs
  (``load_sample_images``: a temple in China and a flower, 427x640 RGB), of a side drawn uniformly in
  :data:`PHOTO_CROP_SIDES` pixels at a uniform position, converted to grey (ITU-R 601 luma) for
  one-channel data, resized to the model's image size (bilinear, antialiased).

Any other images a user has: :func:`image_folder` (``lgm ood --ood-data DIR``, ``lgm detect score --images``),
read as :data:`IMAGE_CONVERSION` says (scaled by bit depth; an unreadable file or a decompression bomb skipped
and named).

Held-out classes: a model trained on some classes only (``TrainConfig.classes``) sees
:func:`restrict_classes` of its data (the chosen classes, renumbered 0..k-1); the images of the other
classes (:func:`other_classes`) are its unknown inputs.

The clean split (:func:`split_clean`): a test set's images go to *calibration* (the threshold is chosen
there) or *evaluation* (the realised false-rejection rate is measured there) by the parity of their index
in the full test set, so the two never overlap whatever ``subset`` selected.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["external_ood_set", "OODSet", "parse_ood_data", "conform_images", "OOD_SETS", "DIGITS_SIZE",
           "PHOTO_CROP_SIDES", "digits_images", "photo_patches", "ood_images", "ClassSubset", "restrict_classes",
           "other_classes", "dataset_labels", "base_indices", "split_clean", "image_folder", "read_image",
           "ImageFolder", "IMAGE_SUFFIXES", "IMAGE_CONVERSION"]

OOD_SETS = ("digits", "noise", "gaussian", "inverted", "photos")
PHOTO_CROP_SIDES = (32, 160)  # the crops' side in pixels, inclusive
DIGITS_SIZE = 1797  # images in scikit-learn's digits


def digits_images(shape=(1, 28, 28), n: int | None = None) -> Tensor:
    """scikit-learn's digits as (N, C, H, W) float32 images in [0, 1] of ``shape`` (bilinear resize of the
    8x8 images, the grey value repeated over C channels); the first ``n`` (default all 1,797)."""
    from sklearn.datasets import load_digits

    c, h, w = shape
    images = torch.from_numpy(load_digits().images[:n]).to(torch.float32).div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return images.expand(-1, c, -1, -1).contiguous()


def photo_patches(shape=(1, 28, 28), n: int = 1000, *, seed: int = 0) -> Tensor:
    """``n`` natural-image patches as (n, C, H, W) float32 in [0, 1] of ``shape`` (the ``photos`` set above),
    drawn with a generator seeded by ``seed``.  C is 1 (grey) or 3 (RGB)."""
    from sklearn.datasets import load_sample_images

    c, h, w = shape
    if c not in (1, 3):
        raise ValueError(f"photo patches have 1 or 3 channels, not {c}")
    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
              for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    lo, hi = PHOTO_CROP_SIDES
    out = torch.empty((n, c, h, w))
    for i in range(n):
        p = photos[int(torch.randint(len(photos), (1,), generator=g))]
        side = int(torch.randint(lo, hi + 1, (1,), generator=g))
        top = int(torch.randint(p.shape[1] - side + 1, (1,), generator=g))
        left = int(torch.randint(p.shape[2] - side + 1, (1,), generator=g))
        out[i] = conform_images(p[None, :, top:top + side, left:left + side], shape)[0]  # grey, resized
    return out


def ood_images(name: str, in_distribution: Tensor, *, n: int | None = None, seed: int = 0) -> Tensor:
    """``n`` images of the set ``name`` (:data:`OOD_SETS`) shaped like ``in_distribution`` (N, C, H, W)
    (default ``n``: as many as it has; ``digits`` has at most 1,797, ``inverted`` at most N), on its device.
    The noise sets are drawn with a generator seeded by ``seed``."""
    if name not in OOD_SETS:
        raise ValueError(f"unknown out-of-distribution set {name!r}; choose one of {', '.join(OOD_SETS)}")
    if not isinstance(in_distribution, Tensor) or in_distribution.dim() != 4:
        raise ValueError("in_distribution must be an (N, C, H, W) tensor of images")
    n = len(in_distribution) if n is None else int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shape = tuple(in_distribution.shape[1:])
    dev, dtype = in_distribution.device, in_distribution.dtype
    if name == "digits":
        return digits_images(shape, n).to(device=dev, dtype=dtype)
    if name == "inverted":
        return 1.0 - in_distribution[:n]
    if name == "photos":
        return photo_patches(shape, n, seed=seed).to(device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    if name == "noise":
        x = torch.rand((n, *shape), generator=g)
    else:
        x = (0.5 + torch.randn((n, *shape), generator=g)).clamp_(0.0, 1.0)
    return x.to(device=dev, dtype=dtype)


def dataset_labels(dataset: Dataset) -> Tensor:
    """The labels of a dataset as a (N,) long tensor (read from the tensors where possible)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].to(torch.long)
    if isinstance(dataset, ClassSubset):
        return dataset.labels
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def base_indices(dataset: Dataset) -> list[int]:
    """Each sample's index in the underlying full dataset (through Subset and ClassSubset)."""
    if isinstance(dataset, (Subset, ClassSubset)):
        inner = base_indices(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(range(len(dataset)))


class ClassSubset(Dataset):
    """The samples of ``dataset`` whose label is in ``classes``, labelled by their position in ``classes``
    (``relabel=True``: class ``classes[j]`` becomes j) or with their own labels (``relabel=False``)."""

    def __init__(self, dataset: Dataset, classes, *, relabel: bool = True) -> None:
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
            raise ValueError(f"classes must be distinct non-negative class indices, got {classes}")
        labels = dataset_labels(dataset)
        top = max(classes + [int(labels.max()) if len(labels) else 0]) + 1
        lookup = torch.full((top,), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes)) if relabel else torch.tensor(classes)
        keep = lookup[labels] >= 0
        self.dataset, self.classes = dataset, tuple(classes)
        self.indices = torch.nonzero(keep).flatten().tolist()
        self.labels = lookup[labels[keep]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image = self.dataset[self.indices[i]][0]
        return image, self.labels[i]


def restrict_classes(dataset: Dataset, classes) -> Dataset:
    """``dataset`` restricted to ``classes`` (renumbered 0..k-1 in the given order); ``classes=None``
    returns it unchanged.  What a run with ``TrainConfig.classes`` trains and is tested on."""
    return dataset if classes is None else ClassSubset(dataset, classes)


def other_classes(dataset: Dataset, classes, num_classes: int) -> Dataset:
    """The samples of ``dataset`` whose class is *not* in ``classes`` (their labels unchanged): the
    unknown inputs of a model trained on ``classes``."""
    rest = [c for c in range(num_classes) if c not in set(classes)]
    if not rest:
        raise ValueError("classes name every class of the dataset: no class is held out")
    return ClassSubset(dataset, rest, relabel=False)


def split_clean(dataset: Dataset) -> tuple[Subset, Subset]:
    """(calibration, evaluation): the samples at even and at odd indices of the full dataset."""
    idx = base_indices(dataset)
    cal = [i for i, b in enumerate(idx) if b % 2 == 0]
    ev = [i for i, b in enumerate(idx) if b % 2 == 1]
    return Subset(dataset, cal), Subset(dataset, ev)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# How a user's image becomes the model's input (said in `lgm detect score --images` and `lgm ood --ood-data`).
IMAGE_CONVERSION = ("converted as the dataset is: grey or RGB, resized to its size (bilinear), scaled to [0, 1] by "
                    "the image's bit depth (8-bit / 255, 16-bit / 65535; float images must already lie in [0, 1])")


class ImageFolder(NamedTuple):
    """What :func:`image_folder` read: ``images`` (N, C, size, size) float32 in [0, 1], ``files`` (the file of
    each image, in order) and ``skipped`` (``(file, reason)`` for each file that could not be read: damaged, a
    decompression bomb, values out of range; ``reason`` is one line)."""

    images: Tensor
    files: list
    skipped: list


class _BadPixels(ValueError):
    """An image read but refused: its pixels are not what its bit depth allows."""


def _depth_scaled(im, channels: int, size: int):
    """A high-depth single-channel image (16-bit, 32-bit integer, float) as float32 in [0, 1], resized: scaled
    by its bit depth, never clipped (an 8-bit conversion would clip all but the darkest 16-bit values to 1)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise _BadPixels("a float image with non-finite pixels")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise _BadPixels(f"a float image with pixels in [{a.min():.4g}, {a.max():.4g}], not in [0, 1] (a float "
                             "image is read as it is, never rescaled)")
    else:
        tag = getattr(im, "tag_v2", None)
        bits = int((tag.get(258) or (32,))[0]) if tag is not None and im.mode == "I" else 16
        top = float(2 ** bits - 1)
        a = a.astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > top):
            raise _BadPixels(f"pixels in [{a.min():.0f}, {a.max():.0f}], outside the {bits}-bit range [0, {top:.0f}]")
        a = (a / top).astype(np.float32)
    a = np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)
    a = np.clip(a, 0.0, 1.0)  # bilinear weights sum to 1: only rounding can step out
    return np.repeat(a[:, :, None], 3, axis=2) if channels == 3 else a


def _bomb_reason(err: Exception) -> str:
    import re

    from PIL import Image

    m = re.search(r"\((\d+) pixels\)", str(err))
    pixels = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
    return (f"{pixels}, more than the {Image.MAX_IMAGE_PIXELS:,} read safely (a decompression bomb?); make it "
            "smaller")


def read_image(path, *, channels: int, size: int) -> Tensor:
    """One image file as the dataset's tensors are (:data:`IMAGE_CONVERSION`): (channels, size, size) float32
    in [0, 1].  A file that cannot be read -- damaged, not an image, a decompression bomb (more pixels than
    PIL's ``MAX_IMAGE_PIXELS``: refused before it is decoded), pixels out of their range -- raises
    :class:`ValueError` whose text is the one-line reason."""
    import warnings

    import numpy as np
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a damaged file's warnings are the reason, not lines of their own
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                    a = _depth_scaled(im, channels, size)
                else:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(_bomb_reason(err)) from err
    except MemoryError as err:
        raise ValueError("too large to read into memory") from err
    except _BadPixels:
        raise
    except Exception as err:  # noqa: BLE001 -- whatever a damaged file makes a decoder raise (OSError, SyntaxError,
        # struct.error, IndexError, ZeroDivisionError, ...)
        first = " ".join(str(err).split())[:120]
        raise ValueError(f"not a readable image ({type(err).__name__}" + (f": {first}" if first else "") + ")") \
            from err
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()


def image_folder(path, *, channels: int, size: int, limit: int | None = None, what: str = "--images") -> ImageFolder:
    """The images in a folder (PNG, JPEG, ... -- files only, sorted by name, not recursive) or one image file, as
    the dataset's tensors are: converted to grey (``channels`` 1) or RGB (3), resized to ``size`` x ``size``
    (bilinear), scaled to [0, 1] by their bit depth (:func:`read_image`).  In a folder a file that cannot be read
    is skipped and named in ``skipped``; the others are read.  Raises :class:`ValueError` naming ``what`` (the
    option) and the path: no such folder or file, a folder with no image or none readable, an image file given
    alone that cannot be read."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        try:
            image = read_image(path, channels=channels, size=size)
        except ValueError as err:
            raise ValueError(f"{what} {path}: {err}") from err
        return ImageFolder(image.unsqueeze(0), [path], [])
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a folder or an image file")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what} {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:limit] if limit else files
    out, read, skipped = [], [], []
    for p in files:
        try:
            out.append(read_image(p, channels=channels, size=size))
            read.append(p)
        except ValueError as err:
            skipped.append((p, str(err)))
    if not out:
        first, reason = skipped[0]
        raise ValueError(f"{what} {path}: none of its {len(files)} images could be read ({first.name}: {reason}"
                         + (f"; and {len(skipped) - 1} more" if len(skipped) > 1 else "") + ")")
    return ImageFolder(torch.stack(out), read, skipped)


def conform_images(x: Tensor, shape) -> Tensor:
    """Images (N, C', H', W') in [0, 1] as ``shape`` (C, H, W): grey from RGB by ITU-R 601 luma, RGB from
    grey by repetition, resized bilinearly (antialiased) -- what another dataset's images need to be fed to a
    model of this one."""
    c, h, w = shape
    if x.shape[1] == 3 and c == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, True)
    elif x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != c:
        raise ValueError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).contiguous()


def parse_ood_data(spec: str):
    """``(dataset, folder)`` of an ``--ood-data`` spec (:func:`external_ood_set`): ``(name, Path or None)`` for
    ``DATASET`` / ``DATASET:`` / ``DATASET:DIR``, ``(None, Path)`` for a folder of images or an image file -- the
    folder it reads, if any.  An empty spec, and a bare ``DATASET`` while a folder of that name is in the working
    directory (which one is meant?), raise :class:`ValueError`."""
    from pathlib import Path

    from .config import DATASETS

    if not spec.strip():
        raise ValueError("--ood-data is empty: give a folder of images, an image file, or DATASET[:DIR] "
                         f"({', '.join(DATASETS)})")
    name, sep, folder = spec.partition(":")
    if name in DATASETS:
        if not sep and Path(spec).exists():
            raise ValueError(f"--ood-data {spec} names both the dataset {name} and ./{spec} here: give ./{spec} for "
                             f"the images in that folder, or {name}: for the dataset (its default folder, downloaded "
                             f"where there is a network) or {name}:DIR")
        return name, Path(folder) if folder else None
    return None, Path(spec)


class OODSet(NamedTuple):
    """A user's abnormal inputs (:func:`external_ood_set`): its ``name``, the ``images`` (N, C, H, W) and the
    image files ``skipped`` as unreadable (``(file, reason)``, :class:`ImageFolder`; none for a dataset)."""

    name: str
    images: Tensor
    skipped: list


def external_ood_set(spec: str, shape, *, n: int | None = None, seed: int = 0) -> OODSet:
    """A user's out-of-distribution images (``lgm ood --ood-data SPEC``), as an :class:`OODSet` (name, (N, C, H,
    W) images conformed to ``shape`` (:func:`conform_images`), the files skipped), at most ``n`` of them (a
    seeded choice):

    - ``DIR``: the images in a folder (:func:`image_folder`: a file that cannot be read is skipped and named),
      or one image ``FILE``; the set is named after it;
    - ``DATASET``, ``DATASET:`` or ``DATASET:DIR``: the test split of a dataset the lab knows (``mnist``,
      ``fashion-mnist``, ``cifar10``), from its default folder (downloaded where there is a network) or from
      ``DIR`` (as ``--data-dir``); named after the dataset."""
    from .config import DATASETS
    from .data import load_dataset
    from .tensors import stack_dataset

    name, path = parse_ood_data(spec)
    if name is not None:
        ds = load_dataset(name, False, data_dir=str(path) if path else None, subset=n, seed=seed)
        return OODSet(name, conform_images(stack_dataset(ds)[0], shape), [])
    if not path.exists():
        raise ValueError(f"--ood-data {spec}: neither a folder of images, an image file nor one of the datasets "
                         f"{', '.join(DATASETS)} (DATASET or DATASET:DIR)")
    c, h, w = shape
    found = image_folder(path, channels=3 if c == 3 else 1, size=h, what="--ood-data")
    x = found.images
    if n is not None and len(x) > n:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]
    return OODSet(path.resolve().name or str(path), conform_images(x, shape), found.skipped)
