"""`lgm --help` and every command's --help at 80 columns, as a new user reads them (issue 43): a command's summary
is not cut at an abbreviation's period, no Python type (``<list[Path]>``), no renamed choice, one default per
option, and pixel steps as ``4/255`` rather than ``0.01568627450980392``."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every command's help, rendered by the real app in one process (lgm --help loads no torch) at 80 columns.
_ALL_HELP = r'''
import sys
from typer.main import get_command
from lgm_cli.app import app
cli = get_command(app)
paths = [[]]
for name, cmd in cli.commands.items():
    paths.append([name])
    paths += [[name, sub] for sub in getattr(cmd, "commands", {})]
for path in paths:
    print("=== " + " ".join(["lgm", *path]), flush=True)
    try:
        app([*path, "--help"], prog_name="lgm")
    except SystemExit:
        pass
'''


def _helps() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _ALL_HELP], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = re.split(r"^=== (lgm.*)$", r.stdout, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2]))


def test_every_help_reads_well_at_80_columns():
    helps = _helps()
    assert {"lgm", "lgm train", "lgm embed", "lgm ood", "lgm detect fit"} <= set(helps)
    for cmd, text in helps.items():
        assert "list[" not in text, f"`{cmd} --help` shows a Python type:\n{text}"
        assert not re.search(r"\d\.\d{7,}", text), f"`{cmd} --help` shows a raw float:\n{text}"
        assert max(len(line) for line in text.splitlines()) <= 80, f"`{cmd} --help` is wider than 80 columns"
        # one option's help (its lines up to the next option) names its default once
        for option in re.split(r"\n  (?=-)", text):
            assert option.count("(default:") + option.count("[default:") <= 1, f"{cmd}: two defaults in {option}"
    # the command list: no summary stops at an abbreviation's period ("embed   Paper Fig.")
    commands = helps["lgm"].split("Commands:")[1]
    for line in commands.strip().splitlines():
        assert not re.search(r"\b(Fig|Eq|al|e\.g|i\.e|cf|vs)\.$", line.strip()), line
    assert re.search(r"^  embed +The paper's Figure 1: the 2-D feature", commands, flags=re.M), commands
    train = helps["lgm train"]
    assert "--preset <report|paper|small>" in train  # `quick` (renamed small) still works but is not offered
    assert re.search(r"use N training images, a seeded choice\s+\(default: all, or the\s+preset's\)", train), train
    assert re.search(r"\(default:\s+4/255, or the preset's\)", train) and "2/255" in train
    assert "--data-dir <path>" in train
    assert "<path>..." in helps["lgm attack"] and "<str>..." in helps["lgm ood"]
