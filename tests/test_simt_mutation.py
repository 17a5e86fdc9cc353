"""The mutation check: the `cuda-emulated` tests run the CUDA kernels' own source (csrc/cuda/*.cuh on the SIMT
executor), so a one-character mistake in a kernel must fail them.  The test copies the sources to a temporary
folder, applies one substitution to a kernel, builds that copy (CPU only, -O0) and runs the emulated tests there:
they must fail.  It rebuilds the extension (a minute or two), hence `slow`.

Any kernel, any change (csrc/README.md):

    LGM_MUTATE_FILE=csrc/cuda/lgm_kernels.cuh LGM_MUTATE_FROM='kk = a.k0 + k' LGM_MUTATE_TO='kk = k' \\
        python -m pytest -q -m slow tests/test_simt_mutation.py

(LGM_MUTATE_TESTS picks the tests run on the mutant, a pytest -k expression over tests/test_lgm_ops.py.)"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The default mutation: the warp butterfly's lane offset (o -> o >> 1: the last step adds a lane to itself).
DEFAULT = ("csrc/cuda/lgm_kernels.cuh", "v += __shfl_xor_sync(kFullMask, v, o);",
           "v += __shfl_xor_sync(kFullMask, v, o >> 1);")
TESTS = "cuda-emulated and (matches_reference_float64 or float32_no_worse)"


def _copy_sources(dst: Path) -> None:
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    shutil.copytree(ROOT / "lgm_ext", dst / "lgm_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (dst / "tests").mkdir()
    for name in ("conftest.py", "helpers.py", "test_lgm_ops.py"):
        shutil.copy2(ROOT / "tests" / name, dst / "tests" / name)


@pytest.mark.slow
def test_a_kernel_mutation_fails_the_emulated_tests(tmp_path):
    path = os.environ.get("LGM_MUTATE_FILE", DEFAULT[0])
    old = os.environ.get("LGM_MUTATE_FROM", DEFAULT[1])
    new = os.environ.get("LGM_MUTATE_TO", DEFAULT[2])
    tests = os.environ.get("LGM_MUTATE_TESTS", TESTS)
    _copy_sources(tmp_path)
    source = (tmp_path / path).read_text()
    assert source.count(old) == 1, f"{old!r} must occur exactly once in {path} (found {source.count(old)})"
    (tmp_path / path).write_text(source.replace(old, new))

    env = {**os.environ, "LGM_EXT_CPU_ONLY": "1", "LGM_EXT_REQUIRE_BUILD": "1", "LGM_EXT_EXTRA_CXXFLAGS": "-O0",
           "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("LGM_EXT_FORCE_CUDA", None)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", tests,
                          "tests/test_lgm_ops.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert str(tmp_path) in subprocess.run(
        [sys.executable, "-c", "import lgm_ext._C as c; print(c.__file__)"], cwd=tmp_path, env=env,
        capture_output=True, text=True).stdout, "the mutant's tests must import the mutant's build"
    assert run.returncode == 1 and " failed" in out, f"the mutant passed the emulated tests:\n{out[-3000:]}"
