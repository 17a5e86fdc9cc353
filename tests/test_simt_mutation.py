"""The mutation check: the `cuda-emulated` tests run the CUDA kernels' own source (csrc/cuda/*.cuh on the SIMT
executor), so a one-point mistake in a kernel must fail them.  Each mutant below is one substitution in a
kernel source, of a distinct kind; the test copies the sources to a temporary folder, applies it, builds only the
executor's module lgm_ext._simt there (against this checkout's lgm_ext._C, copied beside it) and runs the fast
emulated tests on it: they must fail.

`make mutation-check` runs every mutant (LGM_MUTATION_CHECK=1; docs/CUDA.md has the time of one round); the slow
tier runs the first one.  Adding a mutant: append (kind, file, text, replacement) to MUTANTS -- the text must
occur exactly once in the file -- and run `make mutation-check`.  Any other change, by hand:

    LGM_MUTATE_FILE=csrc/cuda/lgm_kernels.cuh LGM_MUTATE_FROM='kk = a.k0 + k' LGM_MUTATE_TO='kk = k' \\
        python -m pytest -q -m slow tests/test_simt_mutation.py -k by_hand
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LGM = "csrc/cuda/lgm_kernels.cuh"
PGD = "csrc/cuda/pgd_kernels.cuh"

MUTANTS = [
    ("lane offset: the warp butterfly's last step adds a lane to itself", LGM,
     "v += __shfl_xor_sync(kFullMask, v, o);", "v += __shfl_xor_sync(kFullMask, v, o >> 1);"),
    ("missing barrier: gemm_rows overwrites m[y] while other lanes still read it (write-after-read)", LGM,
     "  __syncwarp();  // every lane has read m[y] before it is overwritten\n", "\n"),
    ("stride: the class tables' lanes step half a warp (two lanes write one entry)", LGM,
     "  for (int64_t j = lane; j < D; j += kWarp) {\n    const T s = a.log_var[k * D + j];",
     "  for (int64_t j = lane; j < D; j += kWarp / 2) {\n    const T s = a.log_var[k * D + j];"),
    ("grid rounding: the row kernels' grid rounded down (the last rows get no warp)", LGM,
     "return dim3(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)));",
     "return dim3(static_cast<unsigned>(rows / kRowsPerBlock + (rows < kRowsPerBlock)));"),
    ("loop bound: the direct class kernel drops the last row of every full 256-row chunk", LGM,
     "const int64_t n1 = n0 + kChunkRows < a.N ? n0 + kChunkRows : a.N;",
     "const int64_t n1 = n0 + kChunkRows < a.N ? n0 + kChunkRows - 1 : a.N;"),
    ("swapped bounds: the class kernel's guard on j selects the wrong branch", LGM,
     "const T muj = j < D ? a.mu[k * D + j] : T(0);", "const T muj = j < D ? T(0) : a.mu[k * D + j];"),
    ("wrong output index: the second partial's column mirrored", LGM,
     "p2[(chunk * K + k) * D + j] = a2;", "p2[(chunk * K + k) * D + (D - 1 - j)] = a2;"),
    ("dropped write: the first class's operand c is never written", LGM,
     "if (lane == 0) a.mu_sq_sum[k] = c;", "if (lane == 0 && k > 0) a.mu_sq_sum[k] = c;"),
    ("off-by-one comparison: a label in the tile's first column is taken for outside it", LGM,
     "const bool in_tile = yl >= 0 && yl < kt;", "const bool in_tile = yl > 0 && yl < kt;"),
    ("loop bound: the logits-mode coefficients stop one column short (an output left unwritten)", LGM,
     "for (int64_t k = lane; k < kt; k += kWarp) gr[k] = coef_g_logit(",
     "for (int64_t k = lane; k + 1 < kt; k += kWarp) gr[k] = coef_g_logit("),
    ("wrong operand: the PGD step projects around x instead of x_orig", PGD,
     "a.grad[i], a.x_orig[i], a.alpha", "a.grad[i], a.x[i], a.alpha"),
]
# The fast emulated tests a mutant must fail.
TEST_FILES = ["tests/test_lgm_ops.py", "tests/test_lgm_ops_edge_cases.py", "tests/test_emulated_boundaries.py",
              "tests/test_pgd_step.py", "tests/test_dtypes.py"]
TESTS = "cuda-emulated or emulated_kernels"


def _build_mutant(tmp: Path, path: str, old: str, new: str) -> dict:
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp / name)
    shutil.copytree(ROOT / "csrc", tmp / "csrc")
    shutil.copytree(ROOT / "lgm_ext", tmp / "lgm_ext", ignore=shutil.ignore_patterns("_simt*.so", "__pycache__"))
    shutil.copytree(ROOT / "tests", tmp / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    source = (tmp / path).read_text()
    assert source.count(old) == 1, f"{old!r} must occur exactly once in {path} (found {source.count(old)})"
    (tmp / path).write_text(source.replace(old, new))
    env = {**os.environ, "LGM_EXT_ONLY_SIMT": "1", "LGM_EXT_CPU_ONLY": "1", "LGM_EXT_REQUIRE_BUILD": "1",
           "LGM_EXT_EXTRA_CXXFLAGS": "-O1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "PYTHONPATH": str(tmp),
           "OMP_NUM_THREADS": "1"}
    env.pop("LGM_EXT_FORCE_CUDA", None)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", "build/mut"],
                           cwd=tmp, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return env


def _assert_killed(tmp: Path, env: dict, tests: str = TESTS) -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          "-k", tests, *TEST_FILES], cwd=tmp, env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    where = subprocess.run([sys.executable, "-c", "import lgm_ext._testing as t; print(t.executor().__file__)"],
                           cwd=tmp, env=env, capture_output=True, text=True).stdout
    assert str(tmp) in where, f"the mutant's tests must load the mutant's executor: {where}"
    assert run.returncode == 1 and " failed" in out, f"the mutant passed the emulated tests:\n{out[-3000:]}"


MUTATION_CHECK = os.environ.get("LGM_MUTATION_CHECK") == "1"


@pytest.mark.slow
@pytest.mark.parametrize("kind, path, old, new", [pytest.param(*m, id=f"mutant{i}") for i, m in enumerate(MUTANTS)])
def test_a_kernel_mutation_fails_the_emulated_tests(tmp_path, kind, path, old, new, request):
    if not MUTATION_CHECK and request.node.callspec.id != "mutant0":
        pytest.skip("make mutation-check runs every mutant (LGM_MUTATION_CHECK=1); the slow tier runs the first")
    env = _build_mutant(tmp_path, path, old, new)
    _assert_killed(tmp_path, env)


@pytest.mark.slow
def test_by_hand(tmp_path):
    if "LGM_MUTATE_FROM" not in os.environ:
        pytest.skip("set LGM_MUTATE_FILE, LGM_MUTATE_FROM and LGM_MUTATE_TO")
    env = _build_mutant(tmp_path, os.environ.get("LGM_MUTATE_FILE", LGM), os.environ["LGM_MUTATE_FROM"],
                        os.environ.get("LGM_MUTATE_TO", ""))
    _assert_killed(tmp_path, env, os.environ.get("LGM_MUTATE_TESTS", TESTS))


def test_every_mutant_applies_to_the_sources():
    """Each mutant's text occurs exactly once in its file, and the kinds are distinct (a kernel edit that moves a
    mutant's text must move the mutant too)."""
    assert len(MUTANTS) >= 8 and len({k.split(":")[0] for k, *_ in MUTANTS}) >= 8
    for kind, path, old, _new in MUTANTS:
        assert (ROOT / path).read_text().count(old) == 1, kind
