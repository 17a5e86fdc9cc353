"""A small sweep of the L-GM warm-up length and of lambda (issue 10), at the quick preset's budget.

Each point trains LeNet++ (100-D, linear feature layer, L-GM alpha=1, means at 10x lr) on the quick
preset's Fashion-MNIST subset for one seed and reports the clean error and the FGSM-verification EER
(default score).  Writes a markdown table.

    python benchmarks/sweep_warmup.py --out runs/sweep [--write docs/standard-report/sweep.md]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lgm_lab.config import REPRODUCE_PRESETS, config_from_preset
from lgm_lab.data import load_dataset
from lgm_lab.experiments import _train_or_reuse, evaluate_run
from lgm_lab.tensors import stack_dataset
from lgm_lab.train import load_trained

GRID = [  # (warmup_epochs, lambda_)
    (1.0, 0.1),   # the default
    (0.0, 0.1),   # no ramp
    (0.25, 0.1),
    (2.0, 0.1),
    (1.0, 0.01),
    (1.0, 0.3),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--write", type=Path, default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    P = REPRODUCE_PRESETS["quick"]
    test = load_dataset("fashion-mnist", False, subset=P["train"]["test_subset"])
    x, y = stack_dataset(test)
    x, y = x[: P["attack_subset"]], y[: P["attack_subset"]]
    rows = []
    for warm, lam in GRID:
        cfg = config_from_preset("report", feat_dim=100, head="lgm", alpha=1.0, lambda_=lam, warmup_epochs=warm,
                                 **P["train"])
        run = args.out / f"warm{warm:g}-lambda{lam:g}"
        t0 = time.perf_counter()
        try:
            _train_or_reuse(cfg, run, print)
        except RuntimeError as err:  # TrainingDiverged: record it
            rows.append((warm, lam, None, None, str(err).split(";")[0]))
            print(warm, lam, "diverged")
            continue
        model, head, _, _ = load_trained(run / "checkpoint.pt")
        ev = evaluate_run(model, head, test, x, y)
        rows.append((warm, lam, ev["error"], ev["verification"]["eer_percent"], f"{time.perf_counter() - t0:.0f} s"))
        print(rows[-1])
    lines = ["| warm-up (epochs) | lambda | test error % | FGSM-verification EER % | note |", "|---|---|---|---|---|"]
    for warm, lam, err, e, note in rows:
        lines.append(f"| {warm:g} | {lam:g} | {'-' if err is None else f'{err:.2f}'} | "
                     f"{'-' if e is None else f'{e:.1f}'} | {note} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "sweep.json").write_text(json.dumps(rows))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(
            "# L-GM warm-up and lambda sweep\n\n"
            f"LeNet++ 100-D, linear feature layer, L-GM alpha=1, head lr x10; Fashion-MNIST, "
            f"{P['train']['subset']} training images, {P['train']['epochs']} epochs, seed 0; test error on "
            f"{len(test)} images, FGSM eps=0.3 verification on {len(x)}. Command: "
            f"`python benchmarks/sweep_warmup.py --write {args.write}`.\n\n" + table + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
