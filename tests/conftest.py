"""Every test that takes `device` runs on:
  cpu            -- the CPU kernels;
  cuda-emulated  -- CPU tensors through the CUDA kernels' own source (csrc/cuda/*.cuh) compiled as C++
                    and run by the SIMT executor (csrc/include/lgm_ext/simt.h: fibers per thread,
                    CUDA's barrier and shuffle semantics, bounds and race checks), since CI has no GPU;
  cuda           -- the real CUDA kernels, when a GPU is present."""
import os
import tempfile

import pytest
import torch

# The tests decide what a command sees of the terminal: variables that make rich colour or wrap output printed to a
# pipe (FORCE_COLOR, TTY_COMPATIBLE, ...), a width, or a rendezvous left in the environment would change what
# subprocesses print or where gloo connects.
for _name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "PY_COLORS", "CLICOLOR_FORCE",
              "COLUMNS", "LINES", "TERMINAL_WIDTH", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
    os.environ.pop(_name, None)

# A fresh inductor cache per test session: a cache left on the machine by an older build of the operators
# (another output shape, same op name) would otherwise be reused by the torch.compile tests.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lgm-ext-inductor-"))

import lgm_ext  # noqa: E402 (loads the operators, after the environment above)
from lgm_ext._testing import cuda_emulation  # noqa: E402

# (an installation without the compiled kernels has no emulation: its pure-PyTorch path is the cpu backend)
BACKENDS = ["cpu"] + (["cuda-emulated"] if lgm_ext.has_fused_kernels() else []) \
    + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", BACKENDS, indirect=True)


@pytest.fixture
def device(request):
    if request.param == "cuda-emulated":
        with cuda_emulation():
            yield "cpu"
    else:
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests in tiers (issue 36): `make test` runs the fast tier (operators, API, modules, detector, attacks, CLI
# errors at small sizes); the slow tier (`make test-slow`; `make test-all` runs both, as CI does) holds what
# trains on real data, starts several processes (gloo, torchrun, races), runs commands end to end, installs or
# builds packages, and the few parameters marked ``slow`` in place.
SLOW_MODULES = {
    "test_budget", "test_data", "test_detect_cli", "test_detection_experiment", "test_distributed", "test_docs",
    "test_experiments", "test_first_hour", "test_inverse", "test_launch", "test_no_build", "test_no_loss",
    "test_packaging", "test_partial_fc", "test_run_folder", "test_runs", "test_train", "test_trust",
}


# Tests of the compiled kernels themselves (marker ``kernels``) skip, saying so, where the package runs the
# pure-PyTorch path: an installation without a compiler, and `make test-reference` (LGM_EXT_DISABLE_KERNELS=1),
# which runs the fast tier as such a user has it.
NO_KERNELS = None if lgm_ext.has_fused_kernels() else pytest.mark.skip(
    reason="needs lgm-ext's compiled kernels; this run uses the pure-PyTorch path "
           f"({lgm_ext._ops.WHY_NO_KERNELS})")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if NO_KERNELS is not None and item.get_closest_marker("kernels"):
            item.add_marker(NO_KERNELS)
