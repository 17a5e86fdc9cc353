#!/usr/bin/env python
"""Where the demo's minutes go: ``lgm reproduce`` of a preset, timed by stage (issue 24).

Runs the preset from scratch into a temporary folder (nothing reused; the staged dataset cache is used as any run
uses it) and prints, per stage group, the seconds and the share of the job:

    python benchmarks/bench_demo.py                        # the quick preset (make demo's job)
    python benchmarks/bench_demo.py --write                # also rewrite the "demo-stages" section of RESULTS.md
    python benchmarks/bench_demo.py --label "before" --train '{"subset": 2000, "epochs": 4, "steps": null,
        "warmup_steps": null, "test_subset": 1000}' --attack-subset 500 --write   # an older budget, as a row

Each invocation with --write adds (or replaces) its --label's row in the section's table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile
import time

import torch
from results_file import replace_section

from lgm_lab.config import REPRODUCE_PRESETS
from lgm_lab.experiments.reproduce import reproduce

GROUPS = ("training", "evaluating", "figures", "centers", "report/embeddings")
SECTION = "demo-stages"


def group_of(stage: str) -> str:
    word = stage.split()[0].rstrip(":")
    return word if word in GROUPS else "report/embeddings"


def profile(preset: str, train: dict | None, attack_subset: int | None, data_dir=None, out=None) -> dict:
    """Run the preset (with the overrides) from scratch into ``out`` (a temporary folder when None, which must
    not hold runs: nothing may be reused) and group its stage seconds."""
    saved = REPRODUCE_PRESETS[preset]
    P = dict(saved, train={k: v for k, v in dict(saved["train"], **(train or {})).items() if v is not None})
    if attack_subset is not None:
        P["attack_subset"] = attack_subset
    REPRODUCE_PRESETS[preset] = P
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = reproduce(out or tmp, preset=preset, data_dir=data_dir, progress=lambda m: None)
            wall = time.perf_counter() - t0
        if res["models_reused"]:
            raise RuntimeError(f"{out} held finished runs: a profile must train everything; use an empty folder")
    finally:
        REPRODUCE_PRESETS[preset] = saved
    by_group = {g: 0.0 for g in GROUPS}
    for stage, seconds in res["stage_seconds"]:
        by_group[group_of(stage)] += seconds
    steps = sorted({v["steps"] for v in res["sgd_steps"].values()})
    return {"preset": preset, "train": P["train"], "attack_subset": P["attack_subset"], "models": res["models"],
            "steps": steps, "seconds": wall, "groups": by_group, "stages": res["stage_seconds"],
            "n_test": res["n_test"], "n_attack": res["n_attack"]}


def row(label: str, r: dict) -> str:
    cells = " | ".join(f"{r['groups'][g]:.0f} ({100 * r['groups'][g] / r['seconds']:.0f}%)" for g in GROUPS)
    t = r["train"]
    budget = (f"{r['steps'][0]} SGD steps" if len(r["steps"]) == 1 else f"{r['steps']} SGD steps") + \
        f" ({t.get('subset') or 'all 60,000'} training images)"
    return (f"| {label} | {r['models']} models, {budget}; test {r['n_test']}, attacks {r['n_attack']} | {cells} | "
            f"{r['seconds'] / 60:.1f} min |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=list(REPRODUCE_PRESETS))
    p.add_argument("--train", type=json.loads, default=None, help="JSON overrides of the preset's train dict")
    p.add_argument("--attack-subset", type=int, default=None)
    p.add_argument("--label", default="now")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="keep the run (report.md, results.json) in this empty folder")
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = profile(a.preset, a.train, a.attack_subset, a.data_dir, a.out)
    line = row(a.label, r)
    print(line)
    for stage, seconds in r["stages"]:
        print(f"  {seconds:7.1f} s  {stage}")
    if a.write:
        path = pathlib.Path(__file__).with_name("RESULTS.md")
        text = path.read_text()
        old = re.search(rf"<!-- section:{SECTION} -->\n(.*?)<!-- end:{SECTION} -->", text, re.S)
        rows = [ln for ln in (old.group(1).splitlines() if old else []) if ln.startswith("| ")
                and not ln.startswith("| run ") and not ln.startswith(f"| {a.label} |")]
        head = ["`lgm reproduce` by stage (seconds, share of the job), 2 threads, from scratch in a temporary folder "
                "(`python benchmarks/bench_demo.py [--label L --train JSON] --write`; one row per label). "
                f"torch {torch.__version__}.", "",
                "| run | budget | " + " | ".join(GROUPS) + " | job |", "|---|---|" + "---|" * len(GROUPS) + "---|"]
        replace_section(path, SECTION, "\n".join(head + rows + [line]))


if __name__ == "__main__":
    sys.exit(main())
