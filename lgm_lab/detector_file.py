"""Detector files: what ``lgm detect fit`` writes and ``lgm detect score`` / ``lgm ood`` read -- a
:class:`lgm_ext.LikelihoodDetector` with the fingerprint of the checkpoint it was fitted to, how it was fitted
and calibrated, and a SHA-256 of all of it (as checkpoints carry), checked on every load.

Loading one in Python is one call::

    det, info = load_detector_file("detector.pt")              # any model
    det, info = load_detector_file("detector.pt", trained)     # checked against this model (lgm_lab.Trained)

A file that is not a detector file, a damaged or edited one (its digest), a crafted one (wrong types,
missing keys, a threshold that is not finite) or one fitted to another model (its checkpoint's SHA-256,
classes and feature dimension) raises :class:`DetectorFileError` naming what is wrong; nothing in the file
is executed (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch

from .checkpoints import add_signature, check_signature, checkpoint_digest, content_digest, load_plain
from .run_folder import write_atomically

__all__ = ["DETECTOR_FORMAT", "DetectorFileError", "save_detector_file", "load_detector_file", "is_detector_file"]

# v2: the file carries "sha256", a digest of everything else in it (lgm-ext 0.2's v1 files carried none).
DETECTOR_FORMAT = "lgm-detector-file/2"

# The keys of a detector file besides the detector's state and the digest, with their types.
_FIELDS = {"checkpoint_sha256": str, "checkpoint": str, "dataset": str, "classes": (str, type(None)), "head": str,
           "covariance": str, "split": str, "fpr": float, "fit_images": int, "calibration_images": int,
           "num_classes": int, "feat_dim": int}


class DetectorFileError(ValueError):
    """A detector file that cannot be used: not one, damaged, edited, crafted, or fitted to another model."""


def save_detector_file(path: str | os.PathLike, detector, **info) -> None:
    """Write ``detector`` (calibrated: it has a threshold) with ``info`` (the keys of ``_FIELDS`` but
    ``num_classes``/``feat_dim``, which are the detector's) atomically, its SHA-256 added."""
    if detector.threshold is None:
        raise ValueError("the detector has no threshold: calibrate it before saving")
    file = {"format": DETECTOR_FORMAT, "detector": detector.to("cpu").state_dict(),
            "num_classes": int(detector.num_classes), "feat_dim": int(detector.feat_dim), **info}
    _check_fields(file, Path(path))
    add_signature(file, purpose="lgm-ext detector file")  # where a signing key is set (lgm_lab.signing)
    file["sha256"] = content_digest(file)
    buf = io.BytesIO()
    torch.save(file, buf)
    write_atomically(Path(path), lambda f: f.write(buf.getbuffer()))


def _check_fields(file: dict, path: Path) -> None:
    for key, kind in _FIELDS.items():
        if key not in file:
            raise DetectorFileError(f"{path} is not a valid detector file: it lacks {key!r}")
        value = file[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise DetectorFileError(f"{path} is not a valid detector file: {key!r} is {type(value).__name__}")
    if not (math.isfinite(file["fpr"]) and 0 < file["fpr"] < 1):
        raise DetectorFileError(f"{path} is not a valid detector file: fpr {file['fpr']!r} is not in (0, 1)")
    if not isinstance(file.get("detector"), dict):
        raise DetectorFileError(f"{path} is not a valid detector file: no detector state in it")


def is_detector_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file ``lgm detect fit`` wrote (any version; it is not verified here)."""
    try:
        file = load_plain(Path(path), DetectorFileError, "a detector file")
    except DetectorFileError:
        return False
    return isinstance(file, dict) and str(file.get("format", "")).startswith("lgm-detector-file/")


def load_detector_file(path: str | os.PathLike, trained=None):
    """The detector in a file ``lgm detect fit`` wrote, and the rest of the file (a dict: the checkpoint it
    was fitted to and its SHA-256, dataset, head, covariance, split, fpr, image counts).  With ``trained``
    (an :class:`lgm_lab.checkpoints.Trained`, e.g. ``load_trained(checkpoint)``) it must be that model's:
    the same checkpoint (SHA-256), classes and feature dimension.

    Returns:
        ``(detector, info)``: a calibrated :class:`lgm_ext.LikelihoodDetector` on the CPU and a dict.

    Raises:
        DetectorFileError: the file is missing, not a detector file, damaged or edited (its SHA-256), crafted
            (missing keys, wrong types, a non-finite threshold), or fitted to another model.
    """
    from lgm_ext import LikelihoodDetector

    path = Path(path)
    if not path.is_file():
        raise DetectorFileError(f"no detector file at {path}")
    file = load_plain(path, DetectorFileError, "a detector file written by lgm detect fit")
    if not isinstance(file, dict) or not str(file.get("format", "")).startswith("lgm-detector-file/"):
        raise DetectorFileError(f"{path} is not a detector file written by lgm detect fit")
    if file["format"] != DETECTOR_FORMAT:
        raise DetectorFileError(f"{path} is a detector file of an older lgm-ext ({file['format']}, without a content "
                                "digest): fit it again with lgm detect fit")
    stored = file.pop("sha256", None)
    if stored != content_digest(file):
        raise DetectorFileError(f"refusing to load {path}: its content does not match its SHA-256 (the file is "
                                "corrupted or was modified)")
    check_signature(file, purpose="lgm-ext detector file", path=path, error=DetectorFileError)
    _check_fields(file, path)
    try:
        det = LikelihoodDetector.from_state_dict(file["detector"])
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, IndexError) as err:
        raise DetectorFileError(f"{path} holds an invalid detector: {' '.join(str(err).split())}") from err
    threshold = det.threshold
    if threshold is None or not math.isfinite(threshold):
        raise DetectorFileError(f"{path} holds a detector without a finite threshold ({threshold})")
    if (det.num_classes, det.feat_dim) != (file["num_classes"], file["feat_dim"]):
        raise DetectorFileError(f"{path} is not consistent: its detector has {det.num_classes} classes of "
                                f"{det.feat_dim}-D features, the file says {file['num_classes']} of {file['feat_dim']}")
    info = {k: v for k, v in file.items() if k != "detector"}
    if trained is not None:
        check_detector_matches(info, det, trained, path)
    return det, info


def check_detector_matches(info: dict, det, trained, path: Path) -> None:
    """Refuse a detector fitted to another model than ``trained``: its checkpoint SHA-256, then its classes and
    feature dimension (a detector crafted for another model has another digest, and other shapes)."""
    digest = checkpoint_digest(trained.checkpoint)
    k, d = trained.head.num_classes, trained.config.feat_dim
    if (det.num_classes, det.feat_dim) != (k, d):
        raise DetectorFileError(f"{path} is a detector for {det.num_classes} classes of {det.feat_dim}-D features; "
                                f"this model has {k} classes of {d}-D features")
    if info["checkpoint_sha256"] != digest:
        raise DetectorFileError(f"{path} was fitted to another model (checkpoint SHA-256 "
                                f"{info['checkpoint_sha256'][:12]}..., this one has {digest[:12]}...); fit it "
                                "again with lgm detect fit")
