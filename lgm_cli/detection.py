"""The detection commands (issues 25, 41): `lgm detect fit` (any detector of lgm_ext.detectors, by name, for a
trained model, calibrated at a false-rejection rate, saved with the model's fingerprint) and `lgm detect score` (its
rejection rates on clean and abnormal inputs, a verdict per image of the user's own); `lgm ood` is
:mod:`lgm_cli.ood`."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .options import (
    batch_opt,
    check_common,
    check_eps,
    check_fpr_option,
    check_not_input,
    check_not_run_file,
    check_output_file,
    check_positive,
    check_writable_folder,
    choices,
    console,
    device_opt,
    envelope,
    err_console,
    fail,
    json_opt,
    progress_bar,
    progress_opt,
    subset_opt,
    write_json,
)

# --data names besides the dataset's
OOD_NAMES = ("digits", "noise", "gaussian", "inverted", "photos", "heldout-classes")
Covariance = choices("DetectorCovariance", ("tied", "diag", "identity", "head"))
Split = choices("CalibrationSplit", ("heldout", "train"))
AttackKind = choices("AttackKind", ("fgsm", "pgd"))

detect_app = typer.Typer(help="Reject abnormal inputs: fit a detector to a trained model (lgm detect fit) and "
                              "measure what it rejects (lgm detect score).", no_args_is_help=True,
                         rich_markup_mode=None)


def _features(model, x, batch: int, bar, task):
    import torch

    from lgm_lab.tensors import batches

    out = []
    with torch.no_grad():
        for s in batches(len(x), batch):
            out.append(model(x[s]))
            bar.update(task, advance=s.stop - s.start)
    return torch.cat(out) if out else model(x[:0])


def _resolve_detector(detector: Optional[str], covariance) -> str:
    """The registry name --detector (or the old --covariance) names; the default for every head otherwise."""
    from lgm_ext import detectors
    from lgm_lab.detector_file import V2_NAMES

    if detector is not None and covariance is not None:
        raise ValueError("give --detector or --covariance (its older spelling), not both")
    if covariance is not None:
        return V2_NAMES[covariance.value]
    if detector is None:
        return detectors.DEFAULT_DETECTOR
    detectors.label(detector)  # ValueError naming an unknown name
    return detector


@detect_app.command("fit")
def fit(
    checkpoint: Path = typer.Argument(..., help="a checkpoint.pt written by `lgm train`"),
    detector: Optional[str] = typer.Option(
        None, "--detector", metavar="NAME",
        help="the detector (lgm_ext.detectors): mahalanobis-l2 (the default for every head: Mahalanobis on "
             "L2-normalised features, which the standard detection report recommends -- it rejects noise, inverted "
             "images and digits at 87.5-100% in every seed at 5% false rejections, docs/detector.md) | mahalanobis "
             "| gaussian-diag | gaussian-identity | lgm-likelihood | lgm-mixture | lgm-distance | lgm-max-posterior "
             "(an L-GM head's own Gaussians) | lgm-paper (the L-GM paper's identity-covariance distance) | "
             "knn | vim (a head with a linear classifier) | energy | max-logit | max-softmax | center-distance; or "
             "two or more joined by '+', e.g. mahalanobis-l2+mahalanobis (rejects when any rejects, calibrated "
             "jointly)"),
    covariance: Optional[Covariance] = typer.Option(None, help="the older spelling of --detector: head "
                                                               "(lgm-likelihood) | tied (mahalanobis) | diag "
                                                               "(gaussian-diag) | identity (gaussian-identity)"),
    fpr: float = typer.Option(0.05, help="false-rejection rate the threshold is calibrated for"),
    split: Split = typer.Option("heldout", help="clean images the threshold is calibrated on: heldout (the "
                                                "test images at even indices; lgm detect score measures on the "
                                                "others) | train (the training images the detector is fitted "
                                                "on: an optimistic threshold)"),
    out: Path = typer.Option(Path("detector.pt"), "--out", help="the detector file to write"),
    fit_subset: Optional[int] = typer.Option(None, "--fit-subset", help="fit on the first N of the run's training "
                                                                        "images (default: all of them)"),
    subset: Optional[int] = typer.Option(None, "--subset", help="use N test images (the seeded selection of `lgm "
                                                                "train --test-subset N`), half of them to "
                                                                "calibrate (default: the whole test set)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    progress: bool = progress_opt(),
) -> None:
    """Fit a detector (lgm_ext.detectors; --detector) to a trained model's features, calibrate its threshold at
    --fpr on clean images and save it with the checkpoint's SHA-256 (lgm detect score checks it).  The file loads
    in Python with lgm_lab.detector_file.load_detector_file and deploys as lgm_ext.RejectingClassifier."""

    from lgm_ext import detectors
    from lgm_lab.checkpoints import CheckpointError, checkpoint_digest, load_trained
    from lgm_lab.data import DatasetUnavailable
    from lgm_lab.detector_file import is_detector_file, save_detector_file
    from lgm_lab.experiments.detection import detection_data
    from lgm_lab.run_folder import RunFolderBusy, locked

    lock = contextlib.ExitStack()
    try:
        check_fpr_option(fpr)
        check_positive(fit_subset, "--fit-subset")
        dev = check_common(device, batch_size, subset)
        name = _resolve_detector(detector, covariance)
        if out.is_dir() or not out.parent.is_dir():
            raise ValueError(f"--out {out}: give a file name in an existing folder")
        check_not_input(out, [checkpoint], "--out")
        check_output_file(out, "--out")  # a FIFO there would block (issue 42)
        if out.exists() and not is_detector_file(out):
            raise ValueError(f"--out {out} exists and is not a detector file; --out replaces only a detector file "
                             "(a checkpoint or any other file is never written over): give another name")
        check_writable_folder(out.parent, "--out")
        # the folder's lock, as a run folder's: not while `lgm train` (or another `detect fit`) writes there
        lock.enter_context(locked(out.parent))
        model, head, cfg, ck = load_trained(checkpoint, dev)
        if not detectors.applies(name, head):
            raise ValueError(f"--detector {name} does not apply to this checkpoint's {head.kind} head "
                             f"(the lgm-* detectors need an L-GM head, vim a linear classifier); the "
                             f"detectors for it: {', '.join(detectors.names_for(head))}")
        need_fit = detectors.needs_fit(name) or split.value == "train"
        data = detection_data(cfg, data_dir=data_dir, test_subset=subset, fit_points=fit_subset if need_fit else 0,
                              sets=())
    except (CheckpointError, DatasetUnavailable, ValueError, OSError, RunFolderBusy) as err:
        lock.close()
        fail(err)
    with lock:  # held until the file is written
        split = split.value
        xf, yf = data["fit"] if data["fit"] is not None else (None, None)
        x_cal = xf if split == "train" else data["calibration"]
        with progress_bar(progress) as bar:
            task = bar.add_task(f"features of {checkpoint.parent.name}", total=(len(xf) if xf is not None else 0)
                                + (len(x_cal) if split != "train" else 0))
            f_fit = _features(model, xf.to(dev), batch_size, bar, task) if xf is not None else None
            f_cal = f_fit if split == "train" else _features(model, x_cal.to(dev), batch_size, bar, task)
        reads_logits = "logits" in detectors.reads(name)
        try:
            import torch

            with torch.no_grad():
                l_fit = head.logits(f_fit) if reads_logits and f_fit is not None else None
                l_cal = head.logits(f_cal) if reads_logits else None
            det = detectors.create(name, head, features=f_fit, labels=None if yf is None else yf.to(dev),
                                   logits=l_fit)
            det.calibrate(f_cal, fpr, logits=l_cal)
        except ValueError as err:
            fail(err)
        try:
            save_detector_file(out, det, checkpoint_sha256=checkpoint_digest(ck), checkpoint=str(checkpoint),
                               dataset=cfg.dataset, classes=cfg.classes, head=head.label, detector_name=name,
                               split=split, fpr=float(fpr), fit_images=0 if f_fit is None else len(f_fit),
                               calibration_images=len(f_cal), num_classes=head.num_classes, feat_dim=cfg.feat_dim)
        except (OSError, ValueError) as err:
            fail(err)
        console.print(f"{detectors.label(name)} detector for {head.label} ({cfg.dataset}): threshold "
                      f"{det.threshold:.4g}, calibrated on {len(f_cal)} {split} images for {100 * fpr:g}% false "
                      "rejections" + (f", fitted on {len(xf)} training images" if detectors.needs_fit(name) else "")
                      + f"; written to {out}", markup=False)


def _score_inputs(det, head, f):
    """What ``det`` reads of features ``f``: (features, logits)."""
    import torch

    with torch.no_grad():
        return (f if "features" in det.inputs else None), (head.logits(f) if "logits" in det.inputs else None)


@detect_app.command("score")
def score(
    detector: Path = typer.Argument(..., help="a detector file written by `lgm detect fit`"),
    checkpoint: Path = typer.Argument(..., help="the checkpoint.pt the detector was fitted to"),
    data: str = typer.Option("fashion-mnist,digits,noise,gaussian,inverted",
                             help="comma-separated: the run's dataset (its clean test images not used to "
                                  "calibrate) | digits | noise | gaussian | inverted | photos (natural-image "
                                  "patches) | heldout-classes (a run trained on some classes: the test images of "
                                  "the others); none: score only --images (and --attack)"),
    images: Optional[Path] = typer.Option(None, "--images", help="also a folder of your own images (PNG, JPEG, ...; "
                                                                 "or one image file), converted as the dataset is: "
                                                                 "grey or RGB, resized to its size (bilinear), "
                                                                 "scaled to [0, 1] by their bit depth (8-bit / 255, "
                                                                 "16-bit / 65535; float images must lie in [0, 1]): a "
                                                                 "line per image (predicted class, score, threshold, "
                                                                 "margin, accepted); a file that cannot be read is "
                                                                 "skipped and named"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="write the per-image table of --images to this CSV "
                                                               "file"),
    attack: Optional[AttackKind] = typer.Option(None, "--attack", help="also adversarial inputs: fgsm | pgd (PGD-10) "
                                                                      "on the clean measured images, at --eps"),
    eps: float = typer.Option(0.1, "--eps", help="the attack's L-inf magnitude (images in [0, 1])"),
    subset: Optional[int] = subset_opt(),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the run's)"),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    json_out: Optional[Path] = json_opt(),
    progress: bool = progress_opt(),
) -> None:
    """The rejection rates of a detector on clean and abnormal images, your own images (--images: also a verdict
    per image) and adversarial ones (--attack; with the attack's success: misclassified and accepted).  Refused for
    another model's checkpoint.  "rejected %" on clean images is the false-rejection rate the detector was
    calibrated for; on abnormal images, higher is better."""
    import torch

    from lgm_ext import detectors
    from lgm_lab.checkpoints import CheckpointError, load_trained
    from lgm_lab.config import class_names, dataset_info
    from lgm_lab.data import DatasetUnavailable
    from lgm_lab.detector_file import load_detector_file
    from lgm_lab.experiments.detection import HELDOUT_SET, detection_data
    from lgm_lab.ood_data import DIGITS_SIZE, image_folder, ood_images

    try:
        dev = check_common(device, batch_size, subset, json_out, inputs=[detector, checkpoint])
        if csv_out is not None:
            if images is None:
                raise ValueError("--csv writes the per-image table of --images: give --images DIR")
            _check_csv_target(csv_out, [detector, checkpoint, images])
            if json_out is not None and csv_out.resolve() == json_out.resolve():
                raise ValueError(f"--csv and --json name the same file {csv_out}")
        trained = load_trained(checkpoint, dev)
        model, head, cfg, ck = trained
        det, file = load_detector_file(detector, trained)  # checked before any work
        det.to(dev)
        names = [n.strip() for n in data.split(",") if n.strip()]
        if [n.lower() for n in names] == ["none"]:
            names = []
        bad = [n for n in names if n not in (cfg.dataset, *OOD_NAMES)]
        if bad or (not names and data.strip().lower() != "none"):
            raise ValueError(f"--data takes {', '.join((cfg.dataset, *OOD_NAMES))} (comma-separated) or none, got "
                             f"{', '.join(bad) or repr(data)}")
        if not names and images is None and attack is None:
            raise ValueError("--data none scores only --images and --attack: give --images DIR (or --attack)")
        sets = [HELDOUT_SET if n == "heldout-classes" else n for n in names if n != cfg.dataset]
        info = dataset_info(cfg.dataset)
        shape = (info["channels"], info["image_size"])
        inputs, x, imgs, labels = {}, None, None, None
        if names or attack is not None:
            imgs = detection_data(cfg, data_dir=data_dir, test_subset=subset, fit_points=0,
                                  sets=[s for s in sets if s == HELDOUT_SET])
            x = imgs["clean"][0]
            if file.get("split") == "train":  # none of the test images calibrated it
                x = torch.cat([imgs["calibration"], x])
            if cfg.dataset in names:
                inputs[cfg.dataset] = x
            for s in sets:
                inputs[s] = imgs["abnormal"][s] if s == HELDOUT_SET else ood_images(
                    s, x, n=min(len(x), DIGITS_SIZE) if s == "digits" else None, seed=cfg.seed)
        mine = None
        if images is not None:
            found = image_folder(images, channels=shape[0], size=shape[1])
            for path, why in found.skipped:  # one line each, on stderr; the others are scored
                err_console.print(f"--images: skipped {path}: {why}", markup=False, highlight=False, soft_wrap=True)
            files, skipped = found.files, found.skipped
            mine = f"images in {images}"
            inputs[mine] = found.images
        if attack is not None:
            check_eps([eps])
            labels = imgs["clean"][1][: len(imgs["clean"][0])]
    except (CheckpointError, DatasetUnavailable, ValueError, OSError) as err:
        fail(err)
    if attack is not None:  # the attack sees the classifier (images -> logits), not the detector
        from lgm_ext import Classifier
        from lgm_ext.attacks import FGSM, PGD
        from lgm_lab.metrics import attack_in_batches

        xc = imgs["clean"][0].to(dev)
        clf = Classifier(model, head).eval()
        atk = FGSM(clf, eps=eps) if attack.value == "fgsm" else PGD(clf, eps=eps, alpha=2.5 * eps / 10, steps=10,
                                                                     seed=cfg.seed)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{attack.value} eps {eps:g}", total=len(xc))
            adv_name = f"{'FGSM' if attack.value == 'fgsm' else 'PGD-10'} eps {eps:g}"
            inputs[adv_name] = attack_in_batches(atk, xc, labels.to(dev), batch_size,
                                                 lambda k: bar.update(task, advance=k))
    res, per_image = {}, []
    t = det.threshold
    with progress_bar(progress) as bar:
        task = bar.add_task("scoring", total=sum(len(v) for v in inputs.values()))
        for name, batch in inputs.items():
            f = _features(model, batch.to(dev), batch_size, bar, task)
            with torch.no_grad():
                s = det.score(*_score_inputs(det, head, f)).detach().cpu().double()
            accepted = s >= t
            res[name] = {"images": len(s), "rejected_percent": 100.0 * (~accepted).double().mean().item(),
                         "score_mean": s.mean().item(), "score_median": s.median().item(),
                         "score_minus_threshold_median": (s - t).median().item()}
            if name == mine:
                pred = head.predict(f).cpu()
                cls = class_names(cfg.dataset)
                keep = cfg.class_list or range(len(cls))
                for path, p, v, ok in zip(files, pred.tolist(), s.tolist(), accepted.tolist()):
                    per_image.append({"file": path.name, "predicted_class": int(keep[p]),
                                      "class_name": cls[keep[p]], "score": v, "threshold": t, "margin": v - t,
                                      "accepted": bool(ok)})
                res[name]["per_image"] = per_image
                res[name]["skipped"] = [{"file": p.name, "reason": r} for p, r in skipped]
            if attack is not None and name == adv_name:
                wrong = (head.predict(f).cpu() != labels.cpu())
                res[name]["misclassified_percent"] = 100.0 * wrong.double().mean().item()
                res[name]["misclassified_and_accepted_percent"] = 100.0 * (wrong & accepted).double().mean().item()
    label = detectors.label(file["detector_name"])
    if per_image:
        table = Table(title=f"your images ({images}): {label} detector, threshold {t:.4g}")
        for c in ("file", "predicted class", "score", "threshold", "margin", "accepted"):
            table.add_column(c, justify="left" if c in ("file", "predicted class") else "right")
        for r in per_image:
            table.add_row(r["file"], f"{r['predicted_class']} {r['class_name']}", f"{r['score']:.4g}",
                          f"{r['threshold']:.4g}", f"{r['margin']:+.4g}", "yes" if r["accepted"] else "REJECTED")
        console.print(table)
    tab = Table(title=f"{label} detector of {file['head']} (threshold {t:.4g}, calibrated for "
                      f"{100 * file['fpr']:g}% false rejections on {file['split']} images)")
    for c in ("inputs", "images", "rejected %", "median score - threshold"):
        tab.add_column(c, justify="left" if c == "inputs" else "right")
    for name, r in res.items():
        tab.add_row(name + (" (clean)" if name == cfg.dataset else ""), str(r["images"]),
                    f"{r['rejected_percent']:.2f}", f"{r['score_minus_threshold_median']:+.4g}")
    console.print(tab)
    console.print("rejected % of clean images: the false rejections calibrated for; of the others, higher is better. "
                  "Scores: higher = more normal; below the threshold is rejected (margin = score - threshold).",
                  markup=False, highlight=False)
    if attack is not None:
        r = res[adv_name]
        console.print(f"{adv_name}: {r['misclassified_percent']:.1f}% misclassified; "
                      f"{r['misclassified_and_accepted_percent']:.1f}% misclassified and accepted with the detector on "
                      "(the attack does not know the detector: lgm ood measures an adaptive one)", markup=False,
                      highlight=False)
    try:
        if csv_out is not None:
            _write_csv(csv_out, per_image)
        write_json(json_out, envelope("detect score", res, dataset=cfg.dataset, checkpoints=[checkpoint], device=dev,
                                      n=0 if x is None else len(x), detector=str(detector), threshold=t,
                                      fpr=file["fpr"], split=file["split"], detector_name=file["detector_name"]))
    except OSError as err:
        fail(err)


_CSV_FIELDS = ("file", "predicted_class", "class_name", "score", "threshold", "margin", "accepted")


def _is_our_csv(path: Path) -> bool:
    """Whether ``path`` is a per-image table `lgm detect score --csv` wrote (its header line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\r\n") == ",".join(_CSV_FIELDS)
    except OSError:
        return False


def _check_csv_target(path: Path, inputs) -> None:
    """--csv: a file name in an existing folder, none of the command's inputs, not a FIFO or device, not a file
    of a run folder, and, if it is there, a table this command wrote (--csv replaces nothing else)."""
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"--csv {path}: give a file name in an existing folder")
    check_not_input(path, inputs, "--csv")
    check_output_file(path, "--csv")
    check_not_run_file(path, "--csv", replaceable=_is_our_csv)
    if path.exists() and not _is_our_csv(path):
        raise ValueError(f"--csv {path} exists and is not a table lgm detect score wrote; --csv replaces only such a "
                         "table (a file of yours is never written over): give another name")


def _write_csv(path: Path, rows: list) -> None:
    """The per-image table as CSV, written atomically."""
    import csv
    import io

    from lgm_lab.run_folder import write_atomically

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode()
    write_atomically(Path(path), lambda f: f.write(data))
