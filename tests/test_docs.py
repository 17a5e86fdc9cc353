"""The README as a user reads it: every Python block runs verbatim; every `lgm` command line in it parses;
the examples run (issue 9)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_python_blocks():
    assert len(_blocks("python")) >= 2


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs_verbatim(index, tmp_path):
    code = _blocks("python")[index]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README python block {index} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"


def _lgm_lines():
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("lgm "):
                yield line


def test_readme_lgm_command_lines_parse():
    """Each `lgm ...` line names a real command and real options (checked by click's parser, nothing run)."""
    import shlex

    from typer.main import get_command

    from lgm_cli.app import app

    cli = get_command(app)
    lines = list(_lgm_lines())
    assert lines
    for line in lines:
        args = [a for a in shlex.split(line)[1:] if a not in ("[", "]")]
        args = [a.strip("[]") for a in args if a.strip("[]")]
        if args == ["--version"]:
            continue
        name, rest = args[0], args[1:]
        assert name in cli.commands, f"README names an unknown command: {line}"
        cmd = cli.commands[name]
        while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:  # a command group: lgm detect fit
            name, cmd, rest = rest[0], cmd.commands[rest[0]], rest[1:]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for a in rest:
            if a.startswith("-"):
                assert a.split("=")[0] in known, f"README uses an unknown option {a!r} of `lgm {name}`: {line}"
        # choices and types parse as click would (no callback runs)
        ctx = cmd.make_context(name, [a for a in rest if "*" not in a], resilient_parsing=True)
        assert ctx is not None


def test_example_core_loop_trains_and_rejects_noise():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_core
    finally:
        sys.path.pop(0)
    res = train_core.main(["--steps", "200"])
    assert res["test_error"] < 0.2
    assert res["noise_rejected"] > 0.5


def test_example_ddp_runs_with_two_processes():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_ddp.py"), "--nproc", "2", "--epochs", "1",
                        "--port", "29531"], capture_output=True, text=True, timeout=300, cwd=ROOT / "examples")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 processes)" in r.stdout and "test error" in r.stdout


def _layout_block() -> str:
    section = README.split("## Layout", 1)[1]
    return re.search(r"```\n(.*?)```", section, flags=re.S).group(1)


def test_readme_layout_matches_the_tree():
    """The README's layout section names every Python file of the library, lab, CLI, benchmarks and examples,
    and every file or folder it names exists (so it cannot drift from the tree)."""
    block = _layout_block()
    listed = set(re.findall(r"[\w./-]+", block))
    files = [p for top in ("lgm_ext", "lgm_lab", "lgm_cli", "benchmarks", "examples")
             for p in sorted((ROOT / top).rglob("*.py"))]
    missing = [str(p.relative_to(ROOT)) for p in files if p.name not in listed]
    assert not missing, f"README layout does not list {missing}"
    names = {p.name for p in files} | {p.name for p in ROOT.rglob("*") if ".git" not in p.parts}
    stale = sorted(n for n in listed if n.endswith(".py") and n not in names)
    assert not stale, f"README layout lists files that do not exist: {stale}"
    for folder in re.findall(r"^\s*([\w-]+)/", block, flags=re.M):
        assert any(p.is_dir() and p.name == folder for p in [ROOT / folder, *ROOT.rglob(folder)]), folder


def _walkthrough() -> list[str]:
    section = README.split("## CLI\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


# Options that make each command of the walk-through run in seconds on tiny data (appended to the line).
_TINY = {
    "train": ["--subset", "64", "--test-subset", "32", "--epochs", "1", "--batch-size", "32", "--no-progress"],
    "eval": ["--subset", "16", "--no-progress"], "attack": ["--subset", "16", "--no-progress"],
    "verify": ["--subset", "16", "--no-progress"], "centers": ["--subset", "16", "--no-progress"],
    "embed": ["--points", "64", "--fgsm", "4", "--no-progress"], "reproduce": ["--no-progress"],
    "detect": ["--subset", "32", "--no-progress"],
    "ood": ["--subset", "32", "--fit-subset", "64", "--attack-subset", "4", "--eps", "0.1", "--no-adaptive",
            "--no-progress"],
}


def test_readme_cli_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    """The README's CLI section runs in order: every run a line needs was made by a line above it, and no two
    lines collide (before, it named runs/softmax, runs/a, runs/b, runs/lgm2d, runs/center that nothing made)."""
    import shlex

    from helpers import write_idx
    from typer.testing import CliRunner

    from lgm_cli.app import app
    from lgm_lab.config import REPRODUCE_PRESETS

    src = write_idx(tmp_path / "idx", n_train=96, n_test=64)
    monkeypatch.setenv("LGM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(REPRODUCE_PRESETS, "quick", dict(
        train=dict(subset=64, test_subset=32, epochs=1, batch_size=32), seeds=(0,),
        models100=("softmax", "center", "lgm-a1"), models2=(), attack_subset=16, embed_points=32))
    import numpy as np
    from PIL import Image

    (tmp_path / "my-images").mkdir()  # the user's own images the walk-through scores
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "my-images" / f"{i}.png")
    lines = _walkthrough()
    assert lines[0] == "lgm --version" and any(ln.startswith("lgm reproduce") for ln in lines)
    for line in lines:
        args = shlex.split(line)[1:]
        name = args[0] if not args[0].startswith("-") else None
        extra = list(_TINY.get(name, []))
        if name == "train" and "--resume" not in args or name == "reproduce":
            extra += ["--data-dir", str(src)]
        if name == "train" and "--resume" in args:
            extra = ["--no-progress"]
        r = CliRunner().invoke(app, args + extra)
        assert r.exit_code == 0, f"README line failed: {line}\n{r.output[-3000:]}"
    assert (tmp_path / "runs" / "reproduce" / "report.md").exists()
    assert (tmp_path / "runs" / "embed" / "embedding.png").exists()


def _attribute_docstring(module, name: str) -> str | None:
    """The string literal right after ``name = ...`` in ``module``'s source (the attribute docstring that
    mkdocstrings renders for a constant)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(module)).body
    for stmt, nxt in zip(body, body[1:]):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            return nxt.value.value
    return None


def test_every_public_name_has_a_docstring():
    """Every name of ``lgm_ext.__all__`` has a docstring (the API reference is generated from them); every
    function and class that takes arguments documents them in an Args section, and every function with a
    result says what it returns."""
    import importlib
    import inspect

    import lgm_ext

    problems = []
    for name in lgm_ext.__all__:
        obj = getattr(lgm_ext, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if not doc or not doc.strip():
                problems.append(f"{name}: no docstring")
                continue
            sig = inspect.signature(obj)
            params = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
            if params and "Args" not in doc:
                problems.append(f"{name}: no Args section")
            if inspect.isfunction(obj) and sig.return_annotation not in (None, "None") and "Returns:" not in doc:
                problems.append(f"{name}: no Returns section")
        else:  # a constant: the attribute docstring in the module that defines it
            defining = [m for m in (importlib.import_module(f"lgm_ext.{n}") for n in ("_ops", "_version", "defaults"))
                        if name in vars(m)]
            if not defining or not _attribute_docstring(defining[0], name):
                problems.append(f"{name}: no attribute docstring")
    assert not problems, problems
