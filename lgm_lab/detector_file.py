"""Detector files: what ``lgm detect fit`` writes and ``lgm detect score`` / ``lgm ood`` read -- a calibrated
detector of the family (:mod:`lgm_ext.detectors`: any member, a combination included) with the fingerprint of
the checkpoint it was fitted to, how it was fitted and calibrated, and a SHA-256 of all of it (as checkpoints
carry), checked on every load.  Format 3 holds any member (by its registry name, ``detector_name``) and the
range of its calibration scores; format-2 files (Gaussians only, by ``covariance``) still load.

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
# v3: any detector of the family ("detector_name", its registry name, instead of v2's "covariance"), its state
# with the range of its calibration scores.
DETECTOR_FORMAT = "lgm-detector-file/3"
_FORMAT_2 = "lgm-detector-file/2"

# The keys of a detector file besides the detector's state and the digest, with their types.
_COMMON = {"checkpoint_sha256": str, "checkpoint": str, "dataset": str, "classes": (str, type(None)), "head": str,
           "split": str, "fpr": float, "fit_images": int, "calibration_images": int, "num_classes": int,
           "feat_dim": int}
_FIELDS = {**_COMMON, "detector_name": str}
_FIELDS_2 = {**_COMMON, "covariance": str}
# A v2 file's covariance, as the registry names the detector.
V2_NAMES = {"head": "lgm-likelihood", "tied": "mahalanobis", "diag": "gaussian-diag", "identity": "gaussian-identity"}


class DetectorFileError(ValueError):
    """A detector file that cannot be used: not one, damaged, edited, crafted, or fitted to another model."""


def save_detector_file(path: str | os.PathLike, detector, *, num_classes: int, feat_dim: int, **info) -> None:
    """Write ``detector`` (calibrated: it has a threshold and its calibration range) with ``info`` (the keys of
    ``_FIELDS``; ``num_classes``/``feat_dim`` are the model's) atomically, its SHA-256 added."""
    if detector.threshold is None or detector.calibration_range is None:
        raise ValueError("the detector has no threshold: calibrate it before saving")
    file = {"format": DETECTOR_FORMAT, "detector": detector.to("cpu").state_dict(),
            "num_classes": int(num_classes), "feat_dim": int(feat_dim), **info}
    _check_fields(file, Path(path), _FIELDS)
    add_signature(file, purpose="lgm-ext detector file")  # where a signing key is set (lgm_lab.signing)
    file["sha256"] = content_digest(file)
    buf = io.BytesIO()
    torch.save(file, buf)
    write_atomically(Path(path), lambda f: f.write(buf.getbuffer()))


def _check_fields(file: dict, path: Path, fields: dict) -> None:
    for key, kind in fields.items():
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
    was fitted to and its SHA-256, dataset, head, ``detector_name`` (the registry's name of the detector), split,
    fpr, image counts).  With ``trained`` (an :class:`lgm_lab.checkpoints.Trained`, e.g.
    ``load_trained(checkpoint)``) it must be that model's: the same checkpoint (SHA-256), classes and feature
    dimension.  A format-2 file (Gaussians only) loads too; its ``detector_name`` is read from its covariance.

    Returns:
        ``(detector, info)``: a calibrated detector of :mod:`lgm_ext.detectors` on the CPU and a dict.

    Raises:
        DetectorFileError: the file is missing, not a detector file, damaged or edited (its SHA-256), crafted
            (missing keys, wrong types, a non-finite threshold, a threshold outside the range of the scores it was
            calibrated on), or fitted to another model.
    """
    from lgm_ext.detectors import Detector, LikelihoodDetector

    path = Path(path)
    if not path.is_file():
        raise DetectorFileError(f"no detector file at {path}")
    file = load_plain(path, DetectorFileError, "a detector file written by lgm detect fit")
    if not isinstance(file, dict) or not str(file.get("format", "")).startswith("lgm-detector-file/"):
        raise DetectorFileError(f"{path} is not a detector file written by lgm detect fit")
    if file["format"] not in (DETECTOR_FORMAT, _FORMAT_2):
        raise DetectorFileError(f"{path} is a detector file of another lgm-ext ({file['format']}; this one reads "
                                f"{DETECTOR_FORMAT} and {_FORMAT_2}): fit it again with lgm detect fit")
    stored = file.pop("sha256", None)
    if stored != content_digest(file):
        raise DetectorFileError(f"refusing to load {path}: its content does not match its SHA-256 (the file is "
                                "corrupted or was modified)")
    check_signature(file, purpose="lgm-ext detector file", path=path, error=DetectorFileError)
    v2 = file["format"] == _FORMAT_2
    _check_fields(file, path, _FIELDS_2 if v2 else _FIELDS)
    try:
        det = LikelihoodDetector.from_state_dict(file["detector"]) if v2 else \
            Detector.from_state_dict(file["detector"])
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError, IndexError) as err:
        raise DetectorFileError(f"{path} holds an invalid detector: {' '.join(str(err).split())}") from err
    threshold = det.threshold
    if threshold is None or not math.isfinite(threshold):
        raise DetectorFileError(f"{path} holds a detector without a finite threshold ({threshold})")
    if not v2:
        rng = det.calibration_range
        if rng is None or not rng[0] <= threshold <= rng[1]:
            raise DetectorFileError(f"{path} holds a threshold ({threshold:.6g}) that its calibration could not give: "
                                    f"it must lie within the range of the clean scores it was calibrated on "
                                    f"({'none recorded' if rng is None else f'{rng[0]:.6g} to {rng[1]:.6g}'})")
    for key, have in (("num_classes", det.num_classes), ("feat_dim", det.feat_dim)):
        if have is not None and have != file[key]:
            raise DetectorFileError(f"{path} is not consistent: its detector has {key} {have}, the file says "
                                    f"{file[key]}")
    info = {k: v for k, v in file.items() if k != "detector"}
    if not v2:
        _check_name(info["detector_name"], det, path)
    if v2:
        name = V2_NAMES.get(info["covariance"])
        if name is None:
            raise DetectorFileError(f"{path}: unknown covariance {info['covariance']!r}")
        info["detector_name"] = name
    if trained is not None:
        check_detector_matches(info, det, trained, path)
    return det, info


def _check_name(name: str, det, path: Path) -> None:
    """A format-3 file's ``detector_name`` is a registry name whose detector is of the kind the state holds."""
    from lgm_ext import detectors

    try:
        detectors.label(name)
    except ValueError as err:
        raise DetectorFileError(f"{path}: its detector_name is not a detector of this lgm-ext ({err})") from None
    parts = name.split("+")
    members = getattr(det, "members", None)
    if (len(parts) > 1) != (members is not None) or (members is not None and len(members) != len(parts)):
        raise DetectorFileError(f"{path} is not consistent: its detector_name {name!r} does not name the detector it "
                                f"holds ({det.name})")


def check_detector_matches(info: dict, det, trained, path: Path) -> None:
    """Refuse a detector fitted to another model than ``trained``: its checkpoint SHA-256, then its classes and
    feature dimension (a detector crafted for another model has another digest, and other shapes)."""
    digest = checkpoint_digest(trained.checkpoint)
    k, d = trained.head.num_classes, trained.config.feat_dim
    if (info["num_classes"], info["feat_dim"]) != (k, d):
        raise DetectorFileError(f"{path} is a detector for {info['num_classes']} classes of {info['feat_dim']}-D "
                                f"features; this model has {k} classes of {d}-D features")
    if info["checkpoint_sha256"] != digest:
        raise DetectorFileError(f"{path} was fitted to another model (checkpoint SHA-256 "
                                f"{info['checkpoint_sha256'][:12]}..., this one has {digest[:12]}...); fit it "
                                "again with lgm detect fit")
