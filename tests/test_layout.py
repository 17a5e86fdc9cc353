"""The library/application split (issue 9): import direction, dependencies, one head interface,
one implementation selector, the CLI generated from the config, the L-GM warm-up in the module."""
import ast
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib
import torch

import lgm_ext
from lgm_lab.config import HEAD_NAMES

ROOT = Path(__file__).resolve().parents[1]
APP_ONLY = {"typer", "rich", "matplotlib", "sklearn", "torchvision", "pytorch_ood"}
STDLIB = set(sys.stdlib_module_names)


def _imports(path: Path) -> set[str]:
    """Top-level names a module imports (absolute imports only; relative ones stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout


def test_core_imports_only_torch_numpy_and_the_stdlib():
    for path in sorted((ROOT / "lgm_ext").rglob("*.py")):
        bad = _imports(path) - STDLIB - {"torch", "numpy", "lgm_ext"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the core may import torch (and numpy) only"


def test_application_never_imports_the_cli():
    for path in sorted((ROOT / "lgm_lab").rglob("*.py")):
        assert "lgm_cli" not in _imports(path), f"{path.relative_to(ROOT)} imports the CLI"


def test_import_lgm_ext_loads_no_application_dependency():
    out = _run("import sys, lgm_ext\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
               f"{sorted(APP_ONLY)!r} or m.startswith('lgm_lab')))")
    assert out.strip() == "[]"


def test_required_dependencies_are_torch_and_numpy_only():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in meta["dependencies"]}
    assert names == {"torch", "numpy"}
    torch_req = next(d for d in meta["dependencies"] if d.startswith("torch"))
    assert ">=" in torch_req and "==" not in torch_req, "torch is a lower bound, not a pin"
    lab = set(meta["optional-dependencies"]["lab"])
    assert {d.split(">")[0] for d in lab} >= {"typer", "rich", "torchvision", "matplotlib", "scikit-learn"}


def test_typed_marker_and_version():
    assert (ROOT / "lgm_ext" / "py.typed").exists()
    assert lgm_ext.__version__ == _run("from lgm_ext._version import __version__; print(__version__)").strip()


def test_lgm_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom lgm_cli.app import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "v = CliRunner().invoke(app, ['--version'])\nassert v.exit_code == 0, v.output\n"
            "t = CliRunner().invoke(app, ['train', '--help'])\nassert t.exit_code == 0, t.output\n"
            "print('torch' in sys.modules)\nprint(v.output.strip())")
    loaded, version = _run(code).strip().splitlines()
    assert loaded == "False"
    assert version == f"lgm-ext {lgm_ext.__version__}"


def test_train_options_come_from_the_config():
    from typer.main import get_command

    from lgm_cli.app import app
    from lgm_lab.config import TrainConfig

    cmd = get_command(app).commands["train"]
    opts = {p.name: p for p in cmd.params}
    for f in fields(TrainConfig):
        assert f.name in opts, f"TrainConfig.{f.name} has no `lgm train` option"
    assert "--augment" in opts["augment"].opts and "--no-augment" in opts["augment"].secondary_opts
    assert "--lambda" in opts["lambda_"].opts
    from typer.testing import CliRunner

    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}).output
    for f in fields(TrainConfig):
        for choice in f.metadata.get("choices", ()):
            assert choice in help_text, f"`lgm train --help` does not list {choice!r} for --{f.name}"
    bad = CliRunner().invoke(app, ["train", "--head", "arcface"])
    assert bad.exit_code == 2 and "arcface" in bad.output


def test_registries_are_keyed_by_the_config_names():
    from lgm_lab import config, heads, models

    assert tuple(heads.HEADS) == config.HEAD_NAMES
    assert tuple(models.MODELS) == config.MODEL_NAMES
    from lgm_ext.modules import LIKELIHOODS

    assert config.LIKELIHOODS == LIKELIHOODS  # the torch-free copy of the library's choices


@pytest.mark.parametrize("kind", HEAD_NAMES)
def test_every_head_implements_the_interface(kind):
    from lgm_lab.heads import HEADS, Head, build_head

    head = build_head(kind, 4, 3)
    assert isinstance(head, Head) and isinstance(head, HEADS[kind]) and head.num_classes == 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4))
    images, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    extra = head.prepare(model, images, y)  # what the training loop passes (inverse adversaries, ...)
    x = model(images)
    loss, logits = head(x, y, **extra)
    assert loss.dim() == 0 and logits.shape == (5, 3)
    assert head.predict(x).shape == (5,) and head.log_score(x).shape == (5,)
    assert head.log_likelihood(x).shape == (5,)
    c = head.centers()
    assert c is None or c.shape == (3, 4)
    assert torch.isfinite(head.score(x)).all()


def test_unknown_head_arguments_raise():
    from lgm_lab.heads import build_head

    with pytest.raises(TypeError, match="alpha"):
        build_head("softmax", 4, 3, alpha=1.0)
    with pytest.raises(TypeError, match="lambda_c"):
        build_head("lgm", 4, 3, lambda_c=0.1)
    with pytest.raises(ValueError, match="unknown head"):
        build_head("arcface", 4, 3)


def test_config_rejects_unknown_keys_and_bad_choices():
    from lgm_lab.config import config_from_preset

    with pytest.raises(TypeError, match="unknown configuration"):
        config_from_preset(None, lamda=0.1)
    with pytest.raises(ValueError, match="head"):
        config_from_preset(None, head="arcface")
    with pytest.raises(ValueError, match="lr"):
        config_from_preset(None, lr=float("nan"))


def test_impl_is_the_one_selector():
    x, mu, s = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), \
        0.3 * torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    want = lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, impl="reference")
    for impl in ("auto", "direct", "gemm"):
        torch.testing.assert_close(lgm_ext.lgm_loss(x, mu, s, y, alpha=1.0, lambda_=0.1, impl=impl), want)
        torch.testing.assert_close(lgm_ext.lgm_logits(x, mu, s, impl=impl),
                                   lgm_ext.lgm_logits(x, mu, s, impl="reference"))
        torch.testing.assert_close(lgm_ext.lgm_log_likelihood(x, mu, s, impl=impl),
                                   lgm_ext.lgm_log_likelihood(x, mu, s, impl="reference"))
    with pytest.raises(ValueError, match="impl"):
        lgm_ext.lgm_loss(x, mu, s, y, impl="triton")
    with pytest.raises(ValueError, match="labels"):
        lgm_ext.lgm_loss(x, mu, s, y + 4, impl="reference")
    assert not hasattr(lgm_ext, "force_impl")
    assert "impl" in inspect.signature(lgm_ext.LGMLoss).parameters


@pytest.mark.kernels
def test_constants_are_read_from_the_extension():
    from lgm_ext import _C, _ops

    assert lgm_ext.DIRECT_MAX_KD == _C.DIRECT_MAX_KD == 8192
    assert _ops.REDUCTIONS == {"none": 0, "mean": 1, "sum": 2}
    assert lgm_ext.IMPLS == ("auto", "direct", "gemm", "reference")


@pytest.mark.kernels
def test_test_hooks_are_private():
    documented = {"lgm_loss_forward", "lgm_loss_backward", "lgm_logits", "lgm_logits_backward",
                  "lgm_log_likelihood", "pgd_step", "pgd_step_"}
    registered = {op.split("::")[1].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
                  if op.startswith("lgm_ext::")}
    assert {n for n in registered if not n.startswith("_")} <= documented
    assert {"_flush_denormal_all_threads", "_set_max_grid_z", "_set_tensor_core_gemms", "_mm16_calls"} <= registered
    from lgm_ext._testing import cuda_emulation, executor

    executor()  # the SIMT executor's module registers its own private operators
    registered = {op.split("::")[1].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
                  if op.startswith("lgm_ext::")}
    assert {n for n in registered if not n.startswith("_")} <= documented
    assert {"_set_cuda_emulation", "_simt_set_orders", "_simt_fault"} <= registered

    with cuda_emulation():
        assert torch.ops.lgm_ext._set_cuda_emulation(True) is True
    assert torch.ops.lgm_ext._set_cuda_emulation(False) is False


def test_lgm_warmup_ramps_alpha_and_lambda_in_the_module():
    head = lgm_ext.LGMLoss(3, 2, alpha=1.0, lambda_=0.1, warmup_steps=4)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []
    for _ in range(6):
        seen.append((head.current_alpha, head.current_lambda))
        want = lgm_ext.lgm_loss(x, head.means, head.log_var, y, alpha=head.current_alpha,
                                lambda_=head.current_lambda)
        torch.testing.assert_close(head(x, y)[0], want)
    assert [a for a, _ in seen] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert seen[2][1] == pytest.approx(0.05)
    head.eval()
    head(x, y)
    assert int(head.step) == 6, "the ramp advances only in training mode"
    clone = lgm_ext.LGMLoss(3, 2, warmup_steps=4)
    clone.load_state_dict(head.state_dict())
    assert int(clone.step) == 6 and clone.current_alpha == 1.0
    assert lgm_ext.LGMLoss(3, 2).current_alpha == 1.0  # no ramp by default
    with pytest.raises(ValueError, match="warmup_steps"):
        lgm_ext.LGMLoss(3, 2, warmup_steps=-1)


def test_param_groups_put_the_head_at_its_own_rate():
    net, head = torch.nn.Linear(3, 2), lgm_ext.LGMLoss(4, 2)
    groups = lgm_ext.param_groups(net, head, lr=0.01, head_lr_mult=10, weight_decay=5e-4, head_weight_decay=0.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(head.means), id(head.log_var)}
    opt = torch.optim.SGD(groups, lr=0.01)
    assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="head_lr_mult"):
        lgm_ext.param_groups(net, head, lr=0.01, head_lr_mult=-1)
    with pytest.raises(ValueError, match="share"):
        lgm_ext.param_groups(net, net, lr=0.01)


def _project_python_files(*tops: str):
    for top in tops:
        yield from sorted((ROOT / top).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _absolute(module: str | None, level: int, path: Path) -> str:
    if level == 0:
        return module or ""
    pkg = _module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    base = pkg[: len(pkg) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def test_no_import_cycle_in_the_lab():
    """Module-level and function-level imports between lgm_lab modules form no cycle (experiments are
    siblings: only reproduce knows them all)."""
    graph = {}
    for path in _project_python_files("lgm_lab"):
        name = _module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(node.module, node.level, path)
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    deps.add(full if (ROOT / Path(*full.split("."))).with_suffix(".py").exists() else mod)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d.startswith("lgm_lab") and d != name and d != "lgm_lab"}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in graph.get(n, ()):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [])
    experiments = {n for n in graph if n.startswith("lgm_lab.experiments.")}
    shared = {"lgm_lab.experiments.stats", "lgm_lab.experiments.measure", "lgm_lab.experiments.runs"}

    def experiment(n):  # an experiment is a module or a package of modules (detection, detection.report)
        return n.split(".")[2]

    for n in experiments - shared - {"lgm_lab.experiments.reproduce"}:
        others = {d for d in graph[n] & (experiments - shared) if experiment(d) != experiment(n)}
        assert not others, f"{n} imports the experiments {sorted(others)}: experiments never import each other"
    for n in shared:
        assert not graph.get(n, set()) & (experiments - shared), f"{n} (shared) imports an experiment"


def test_no_private_name_crosses_a_module():
    """The lab, the CLI, the benchmarks and the examples use each other's (and the library's) public names
    only: no `from m import _x` of a name defined in another project module, no `m._x` on an imported module."""
    project = ("lgm_ext", "lgm_lab", "lgm_cli")
    bad = []
    for path in _project_python_files("lgm_lab", "lgm_cli", "benchmarks", "examples"):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(node.module, node.level, path)
                if mod.split(".")[0] not in project:
                    continue
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    is_module = (ROOT / Path(*full.split("."))).with_suffix(".py").exists() or \
                        (ROOT / Path(*full.split("."))).is_dir()
                    if is_module:
                        aliases.add(a.asname or a.name)
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{path.relative_to(ROOT)}: from {mod} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in project:
                        aliases.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_python_files_stay_under_500_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _project_python_files("lgm_ext", "lgm_lab", "lgm_cli")
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, f"files over 500 lines: {long}"


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), "ruff is not installed next to this Python: pip install 'lgm-ext[test]' (make install does)"
    r = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_no_private_torch_c_name_in_the_package():
    """Issue 43: `pgd_step_` called torch._C._debug_has_internal_overlap, which torch 2.14.1 no longer has, so the
    compiler-free install's PGD failed with an AttributeError.  The package uses torch's public API only: no
    `torch._C` name anywhere in lgm_ext, lgm_lab or lgm_cli."""
    import re

    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in _project_python_files("lgm_ext", "lgm_lab", "lgm_cli")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\btorch\._C\b|from torch import _C\b", line)]
    assert not found, "private torch._C names:\n" + "\n".join(found)
