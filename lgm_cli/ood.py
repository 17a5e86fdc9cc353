"""`lgm ood` (issues 25, 35, 42): every detector of the detection protocol on given models, without training --
tables, results.json and an ROC figure (lgm_lab.detection_protocol)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .options import (
    batch_opt,
    check_common,
    check_fpr_option,
    check_not_input,
    check_out_folder,
    check_positive,
    console,
    device_opt,
    envelope,
    err_console,
    fail,
    format_opt,
    is_command_output,
    json_opt,
    load_runs,
    out_folder,
    parse_eps,
    progress_bar,
    progress_opt,
    write_json,
)


def _parse_fprs(text: str) -> tuple[float, ...]:
    """``--fpr``: comma-separated false-rejection rates, each in (0, 1), distinct."""
    out = []
    for part in str(text).split(","):
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"--fpr must be comma-separated numbers in (0, 1), got {text!r}") from None
        check_fpr_option(v)
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"--fpr lists a rate twice: {text!r}")
    return tuple(out)



def _check_not_own_data(spec: str, found, name: str, cfg, data: dict) -> None:
    """Refuse an --ood-data set that is the model's own data: its dataset by name, or images identical to its
    own test images (its dataset under another name or in a folder): they are not abnormal inputs."""
    import torch

    from lgm_lab.ood_data import parse_ood_data

    held = " (the classes it was not trained on are measured already, as held-out classes)" if cfg.classes else ""
    if parse_ood_data(spec)[0] == cfg.dataset:
        raise ValueError(f"--ood-data {spec}: {cfg.dataset} is the dataset {name} was trained on; its test images "
                         f"are the model's own inputs, not abnormal ones{held}")
    own = {row.numpy().tobytes() for row in torch.cat([data["clean"][0], data["calibration"]]).flatten(1).cpu()}
    same = sum(row.numpy().tobytes() in own for row in found.images.to(data["clean"][0].dtype).flatten(1).cpu())
    if same:
        raise ValueError(f"--ood-data {spec}: {same} of its {len(found.images)} images are test images of "
                         f"{cfg.dataset}, the data {name} was trained on: not abnormal inputs{held}")


def ood(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint.pt files of trained models (any heads)"),
    out: Path = typer.Option(Path("runs/ood"), "--out", help="folder for the ROC figure and results.json"),
    eps: str = typer.Option("0.1,0.3", help="FGSM, PGD-10 and adaptive-attack magnitudes, comma-separated"),
    fpr: str = typer.Option("0.05,0.01", help="the operating points: false-rejection rates the thresholds are "
                                               "calibrated for, comma-separated"),
    adaptive: bool = typer.Option(True, "--adaptive/--no-adaptive", help="attack each detector adaptively "
                                                                          "(AdaptivePGD, the PGD-10 budget)"),
    ood_data: Optional[list[str]] = typer.Option(None, "--ood-data", help="also measure these abnormal inputs "
                                                                          "(repeatable): DIR, a folder of images "
                                                                          "(or one image FILE), or DATASET, "
                                                                          "DATASET: or DATASET:DIR, the test images "
                                                                          "of mnist, fashion-mnist or cifar10 (not "
                                                                          "the models' own). Images are converted "
                                                                          "as the dataset is: grey or RGB, resized "
                                                                          "(bilinear), scaled to [0, 1] by their "
                                                                          "bit depth (8-bit / 255, 16-bit / 65535; "
                                                                          "float images must lie in [0, 1]); a "
                                                                          "file that cannot be read is skipped and "
                                                                          "named"),
    subset: Optional[int] = typer.Option(None, "--subset", help="use N test images (the seeded selection of `lgm "
                                                                "train --test-subset N`): half calibrate, half "
                                                                "are measured (default: all)"),
    fit_subset: Optional[int] = typer.Option(2000, "--fit-subset", help="fit Mahalanobis on the first N training "
                                                                        "images"),
    attack_subset: Optional[int] = typer.Option(500, "--attack-subset", help="attack the first N measured images"),
    detectors: Optional[list[Path]] = typer.Option(None, "--detector", help="also a detector file written by `lgm "
                                                                          "detect fit` for one of the checkpoints "
                                                                          "(repeatable): measured beside the "
                                                                          "protocol's, re-calibrated at --fpr"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (default: the runs')"),
    fmt: str = format_opt(),
    device: Optional[str] = device_opt(),
    batch_size: int = batch_opt(),
    json_out: Optional[Path] = json_opt(),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that holds files: "
                                                              "results.json and detection_roc.FORMAT (of an "
                                                              "earlier lgm ood) are replaced, nothing else is "
                                                              "touched"),
    progress: bool = progress_opt(),
) -> None:
    """Out-of-distribution and adversarial detection of given models, without training: each detector (L-GM
    likelihood and mixture; Mahalanobis, KNN, ViM, Energy, MaxLogit, max-softmax, center distance; Mahalanobis-L2
    and Mahalanobis combined) calibrated at each --fpr, then rejections, AUROC, AUPR, FPR at 95% TPR (both
    conventions) and EER on digits, noise, Gaussian noise, inverted images, natural-image patches, held-out classes
    (runs trained with --classes), --ood-data, FGSM and PGD-10; the adaptive attack's success with each detector
    on."""
    from lgm_lab.checkpoints import CheckpointError, checkpoint_digest, load_checkpoint
    from lgm_lab.data import DatasetUnavailable
    from lgm_lab.detection_protocol import detection_data, detector_names, measure_network
    from lgm_lab.detector_file import DetectorFileError, load_detector_file
    from lgm_lab.experiments.measure import operating_point_key
    from lgm_lab.figures import detection_roc_figure
    from lgm_lab.ood_data import external_ood_set, parse_ood_data
    from lgm_lab.run_folder import same_file

    try:
        fprs = _parse_fprs(fpr)
        eps_list = [e for e in parse_eps(eps) if e > 0]
        for v, name in ((fit_subset, "--fit-subset"), (attack_subset, "--attack-subset")):
            check_positive(v, name)
        dev = check_common(device, batch_size, subset, json_out, fmt, inputs=[*checkpoints, *(detectors or [])])
        for ck in checkpoints:
            check_not_input(out / "results.json", [ck], "--out")
        for spec in ood_data or []:  # results and figures never go into a folder of images it reads
            folder = parse_ood_data(spec)[1]
            if folder is not None and same_file(out, folder):
                raise ValueError(f"--out {out} is the --ood-data folder {spec}, which this command reads: give "
                                 "another output folder")
        # a folder of the user's files is not taken for ood's (issue 42): its own files only, with --overwrite
        check_out_folder(out, {"results.json": lambda p: is_command_output(p, "ood"),
                               f"detection_roc.{fmt}": None}, overwrite, "lgm ood")
        out_folder(out)
        runs = load_runs(checkpoints, dev)
        extra = {name: {} for name in runs}
        if detectors:  # each goes with the checkpoint it was fitted to (its SHA-256)
            digests = {checkpoint_digest(load_checkpoint(ck)): name for ck, name in zip(checkpoints, runs)}
            for path in detectors:
                det, info = load_detector_file(path)
                name = digests.get(info["checkpoint_sha256"])
                if name is None:
                    raise DetectorFileError(f"--detector {path} was fitted to none of the checkpoints given (it was "
                                            f"fitted to {info['checkpoint']})")
                _m, head, cfg = runs[name]
                if (info["num_classes"], info["feat_dim"]) != (head.num_classes, cfg.feat_dim):
                    raise DetectorFileError(f"--detector {path} does not fit {name}'s classes and features")
                extra[name][f"{path.name} ({info['detector_name']})"] = det.to(dev)
        data = {name: detection_data(cfg, data_dir=data_dir, test_subset=subset, fit_points=fit_subset)
                for name, (_m, _h, cfg) in runs.items()}
        for spec in ood_data or []:
            for name, d in data.items():
                x0 = d["clean"][0]
                found = external_ood_set(spec, tuple(x0.shape[1:]), n=len(x0))
                _check_not_own_data(spec, found, name, runs[name][2], d)
                if found.name in d["abnormal"]:
                    raise ValueError(f"--ood-data {spec}: a set named {found.name!r} is measured already")
                d["abnormal"][found.name] = found.images.to(x0.dtype)
            for path, why in found.skipped:  # the others are measured
                err_console.print(f"--ood-data {spec}: skipped {path}: {why}", markup=False, highlight=False,
                                  soft_wrap=True)
    except (CheckpointError, DatasetUnavailable, ValueError, OSError) as err:
        fail(err)
    results, curves = {}, {}
    with progress_bar(progress) as bar:
        per = {n: min(len(d["clean"][0]), attack_subset or len(d["clean"][0])) for n, d in data.items()}
        total = sum(per[n] * len(eps_list) * (2 + (len(detector_names(h, c.feat_dim)) + len(extra[n])
                                                   if adaptive else 0))
                    for n, (_m, h, c) in runs.items())
        task = bar.add_task("attacks", total=total)
        for name, (model, head, cfg) in runs.items():
            bar.update(task, description=f"detection on {name}")
            try:
                m = measure_network(model, head, data[name], eps=eps_list, attack_subset=attack_subset, fprs=fprs,
                                    adaptive=adaptive, seed=cfg.seed, batch=batch_size,
                                    tick=lambda k: bar.update(task, advance=k), extra=extra[name])
            except ValueError as err:
                fail(err)
            results[name] = {"network": m["network"], "detectors": m["detectors"]}
            for det, rocs in m["roc"].items():
                for s, roc in rocs.items():
                    curves.setdefault(s, {})[f"{det} ({name})"] = roc
    sets = list(curves)
    op = operating_point_key(fprs[0])
    for title, get in ((f"rejected % at the threshold calibrated for {op}% false rejections",
                        lambda m: m["rejected"][op]), ("AUROC % (clean vs each set)", lambda m: m["auroc"])):
        t = Table(title=title)
        for c in ("detector", "clean rejected %", *sets):
            t.add_column(c, justify="left" if c == "detector" else "right")
        for name, r in results.items():
            for det, d in r["detectors"].items():
                t.add_row(f"{det} ({name})", f"{d['false_rejection'][op]:.1f}",
                          *(f"{get(d['sets'][s]):.1f}" if s in d["sets"] else "-" for s in sets))
        console.print(t)
    if adaptive and eps_list:
        t = Table(title=f"attack success with the detector on (% misclassified and accepted, at the {op}% "
                        "operating point)")
        t.add_column("detector")
        for e in eps_list:
            t.add_column(f"PGD-10 {e:g}", justify="right")
            t.add_column(f"adaptive {e:g}", justify="right")
        for name, r in results.items():
            for det, d in r["detectors"].items():
                t.add_row(f"{det} ({name})", *(f"{d['adaptive'][f'{e:g}'][k][op]:.1f}" for e in eps_list
                                                for k in ("pgd", "adaptive")))
        console.print(t)
    try:
        fig = detection_roc_figure(curves, out / "detection_roc", fmt=fmt)
    except OSError as err:  # a full disk, a folder made read-only meanwhile
        fail(err)
    payload = envelope("ood", results, dataset=next(iter(runs.values()))[2].dataset,
                       checkpoints=checkpoints, device=dev, n=len(next(iter(data.values()))["clean"][0]), eps=eps_list,
                       fprs=list(fprs), adaptive=adaptive)
    write_json(out / "results.json", payload)
    write_json(json_out, payload)
    console.print(f"figure: {fig}")
