"""A newcomer's first hour (issue 36, first-hour frictions): a step budget gets a warm-up that fits it, "quick"
means one thing, and every command's --help reads at 80 columns."""
import json
import os
import subprocess
import sys

import pytest
from helpers import write_idx


def _lgm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lgm_cli.app", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_a_step_budget_gets_a_warm_up_that_fits(tmp_path, monkeypatch):
    """`lgm train --head lgm --steps 256` was refused: the default warm-up (1 epoch = 469 steps) is longer."""
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))
    src = write_idx(tmp_path / "idx", n_train=640, n_test=32)  # 20 steps an epoch at batch 32
    out = tmp_path / "runs" / "lgm"
    r = _lgm("train", "--head", "lgm", "--feat-dim", 2, "--steps", 8, "--batch-size", 32, "--data-dir", src,
             "--test-subset", 32, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["warmup_steps"] == 2  # a quarter of the run
    # a warm-up the user gives is kept, and one that cannot finish is refused, leaving nothing behind
    bad = tmp_path / "runs" / "bad"
    r = _lgm("train", "--head", "lgm", "--feat-dim", 2, "--steps", 8, "--batch-size", 32, "--data-dir", src,
             "--warmup-epochs", 1, "--out", bad, "--no-progress")
    assert r.returncode == 2 and "warm-up" in r.stderr and not bad.exists(), r.stderr


def test_quick_names_one_preset():
    from lgm_lab.config import PRESETS, REPRODUCE_PRESETS, config_from_preset

    assert "quick" in REPRODUCE_PRESETS and "quick" not in PRESETS
    with pytest.warns(DeprecationWarning, match="small"):
        assert config_from_preset("quick") == config_from_preset("small")
    r = _lgm("train", "--preset", "quick", "--momentum", "2")  # refused later: only the note and the error print
    assert "--preset quick is now --preset small" in r.stderr


def _commands():
    from typer.main import get_command

    from lgm_cli.app import app

    root = get_command(app)
    out = []
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        out += [(name, sub) for sub in subs] if subs else [(name,)]
    return out


@pytest.mark.parametrize("cmd", _commands(), ids=" ".join)
def test_every_help_reads_at_80_columns(cmd):
    from typer.testing import CliRunner

    from lgm_cli.app import app

    r = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}, color=False)
    assert r.exit_code == 0, r.output
    long = [ln for ln in r.output.splitlines() if len(ln) > 80]
    assert not long, f"lgm {' '.join(cmd)} --help has lines over 80 columns: {long[:3]}"
    assert "…" not in r.output, f"lgm {' '.join(cmd)} --help truncates text"
    options = [ln for ln in r.output.splitlines() if ln.startswith("  -")]
    # each option's help starts on its line or the next, never squeezed into a column of a few characters
    assert options and all(len(ln.rstrip()) > 20 for ln in options)
