"""The ``torch.ops.lgm_ext`` operators: importing this module loads them (``lgm_ext._C``, C++/CUDA kernels of
``csrc/``) and registers their fake kernels (for ``torch.compile``), autograd formulas and autocast policy
(:mod:`lgm_ext._register`).

Without the compiled extension (installed with ``LGM_EXT_NO_BUILD=1``, or where it could not be built: no
compiler, a torch it was not built for) the package still works: a warning says so once, and the functional API,
the modules, attacks and detector run the pure-PyTorch path (:mod:`lgm_ext.reference`) with the same API, checks
and gradients; only the class-sharded head and the private test hooks need the kernels."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

#: Set to 1, the package ignores its compiled extension and runs the pure-PyTorch path, exactly what an
#: installation without the extension (``LGM_EXT_NO_BUILD=1``, no compiler) runs (``make test-reference``).
DISABLE_ENV = "LGM_EXT_DISABLE_KERNELS"

# The pure-PyTorch path's cost, measured (benchmarks/bench_fallback.py, docs/library.md): the L-GM loss's
# forward+backward at N=256, K=10, D=100, float32, CPU.
FALLBACK_SLOWDOWN = 25  # 0.109 vs 2.682 ms (24.5x; 14-30x per round), benchmarks/RESULTS.md section fallback-cpu
FALLBACK_COST = (f"~{FALLBACK_SLOWDOWN}x slower than the fused kernels for the loss's forward+backward at N=256, K=10, "
                 "D=100 (14-30x measured)")


def _extension_files() -> list[Path]:
    return sorted(Path(__file__).parent.glob("_C.*"))


if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
    _C = None
    sys.modules[__package__ + "._C"] = None  # unimportable, as where it is absent (an import raises ImportError)
    BUILD_ERROR = f"{DISABLE_ENV}={os.environ[DISABLE_ENV].strip()} is set"
    WHY_NO_KERNELS = f"{DISABLE_ENV} is set"
else:
    try:
        from . import _C  # loads the operator library (schemas + kernels)
    except ImportError as _err:
        _C = None
        BUILD_ERROR = f"{type(_err).__name__}: {str(_err).splitlines()[0][:200]}"
        if not _extension_files():  # installed with LGM_EXT_NO_BUILD=1, or the compile failed: nothing to load
            WHY_NO_KERNELS = "it was installed without its compiled extension (LGM_EXT_NO_BUILD=1, or no C++ compiler)"
            BUILD_ERROR = "the package " + WHY_NO_KERNELS[3:]
        else:  # built for another torch, or a library it links is missing
            WHY_NO_KERNELS = (f"its compiled extension did not load ({BUILD_ERROR}; built for another torch? "
                              "reinstall to rebuild it)")
    else:
        BUILD_ERROR = WHY_NO_KERNELS = None

#: Whether the fused C++/CUDA kernels are loaded (False: the pure-PyTorch path runs).
HAVE_KERNELS = _C is not None

if not HAVE_KERNELS:
    warnings.warn(f"lgm_ext runs the pure-PyTorch path (lgm_ext.reference: the same API, checks and gradients), "
                  f"because {WHY_NO_KERNELS}; it is {FALLBACK_COST}.", RuntimeWarning, stacklevel=2)

ops = torch.ops.lgm_ext

# Codes shared with the C++ operators; defined once, in csrc/host.h, and exported by _C (without the kernels
# no operator reads them; the names stay for the API).
REDUCTIONS = ({"none": _C.REDUCTION_NONE, "mean": _C.REDUCTION_MEAN, "sum": _C.REDUCTION_SUM} if HAVE_KERNELS
              else {"none": 0, "mean": 1, "sum": 2})
KERNEL_IMPLS = ({"auto": _C.IMPL_AUTO, "direct": _C.IMPL_DIRECT, "gemm": _C.IMPL_GEMM} if HAVE_KERNELS
                else {"auto": 0, "direct": 1, "gemm": 2})
DIRECT_MAX_KD = _C.DIRECT_MAX_KD if HAVE_KERNELS else 8192
"""``impl="auto"`` runs the fused per-row loop when ``K * D <= DIRECT_MAX_KD`` (8192), the GEMM path above."""
# The values of the ``impl=`` argument of the functional API and the modules.
IMPLS = (*KERNEL_IMPLS, "reference")
"""The values of ``impl=``: ``"auto"``, ``"direct"``, ``"gemm"`` (the fused operators) and ``"reference"``."""


def has_fused_kernels() -> bool:
    """Whether the compiled extension (the fused CPU kernels, and CUDA kernels where built) is loaded.

    Returns:
        False when the package runs the pure-PyTorch path (installed without a compiler).
    """
    return HAVE_KERNELS


def has_cuda_kernels() -> bool:
    """Whether this build of the extension has CUDA kernels.

    Returns:
        True when this build registered CUDA kernels for the operators (a GPU need not be present);
        False for a CPU-only build (``LGM_EXT_CPU_ONLY=1``, or no CUDA toolkit at build time) and for an
        installation without the compiled kernels (:func:`has_fused_kernels`).
    """
    return HAVE_KERNELS and ops.lgm_loss_forward.default.has_kernel_for_dispatch_key("CUDA")


def require_kernels(what: str) -> None:
    """Raise a clear RuntimeError when ``what`` needs the compiled kernels and they are missing."""
    if not HAVE_KERNELS:
        raise RuntimeError(f"{what} needs lgm-ext's compiled kernels, which this installation lacks ({BUILD_ERROR}); "
                           "reinstall with a C++ compiler")


# The dtype seam (csrc/host.h): features, means and log_var share one storage dtype; the kernels compute
# in its accumulation type, in which loss, logits, row statistics and log-likelihoods are returned;
# gradients come back in the storage dtype (the dtypes: kStorageTypes in csrc/host.h).


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and output) dtype of the operators for inputs of ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def keep_logits_for_backward(n: int, k: int, d: int, impl: int) -> bool:
    """Whether the L-GM loss saves its (N, K) logits for the backward (True) or
    the backward recomputes them one class tile at a time (False, memory-lean).

    The direct path (K*D <= 8192, or impl=1) always saves them: they are small and
    recomputing is a second pass over N*K*D.  The GEMM path recomputes a tile's
    logits with one extra GEMM when the saved logits would outweigh a class
    parameter tensor (N > D: N*K > K*D); otherwise it keeps them (the extra GEMM
    costs ~1/3 more arithmetic to save N*K elements).  See docs/internals.md ("How it is built").
    The rule is C++ (csrc/host.h), where the loss's autograd formula applies it.
    """
    require_kernels("keep_logits_for_backward")
    return _C.keep_logits_for_backward(int(n), int(k), int(d), int(impl))



if HAVE_KERNELS:
    from . import _register  # noqa: E402,F401  (fake kernels, autograd, autocast)
