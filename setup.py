"""Build lgm-ext: the CPU extension always; the CUDA kernels when torch has CUDA and
a toolkit is found.

Environment switches:
  LGM_EXT_NO_BUILD=1    build no extension: a pure-Python package whose operators run the pure-PyTorch path
                        (lgm_ext.reference; `import lgm_ext` warns once, `lgm info` says so)
  LGM_EXT_REQUIRE_BUILD=1  a failing compile is an error (the Makefile sets it); without it, a machine that cannot
                        build the extension (no compiler, a torch it does not build against) still gets a working
                        package on the pure-PyTorch path, with a warning
  LGM_EXT_CPU_ONLY=1    skip CUDA sources (fast iteration build)
  LGM_EXT_FORCE_CUDA=1  build CUDA sources even if detection says no (fails if no toolkit)
  LGM_EXT_ONLY_SIMT=1   build only the test module lgm_ext._simt, against the lgm_ext._C built in place (the
                        mutation check)
  TORCH_CUDA_ARCH_LIST  CUDA targets (default "8.0;9.0+PTX": sm_80, sm_90 and PTX)
  MAX_JOBS              parallel compile jobs (ninja)
  LGM_EXT_EXTRA_CXXFLAGS  extra host-compiler flags, appended (`make test-sanitize`: -fsanitize=address,undefined;
                        the mutation check: -O0); LGM_EXT_EXTRA_LDFLAGS likewise for the link
"""
import glob
import os

# /usr/local/bin/nvcc may be a wrapper script: torch would then guess CUDA_HOME=/usr/local.
# Prefer the real toolkit directory when the caller did not choose one.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = os.path.realpath("/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def build_cuda():
    if _flag("LGM_EXT_CPU_ONLY"):
        return False
    if _flag("LGM_EXT_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The test module lgm_ext._simt: the SIMT executor, the CUDA kernels compiled for it (the `cuda-emulated`
    # backend) and its deliberately faulty kernels.  Never part of lgm_ext._C: it links against it (the operator
    # bodies, the host layer) and is loaded only by the tests or whoever asks (lgm_ext._testing).
    simt_sources = sorted(glob.glob("csrc/simt/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # -fno-trapping-math: lets GCC if-convert the float compares and selects in math.h (fast_expf's
    # clamps, safe_exp's flush, the NaN passes) so the `omp simd` loops vectorise; it changes no
    # computed value (no reassociation, no finite-math assumption), only the FP-exception flags.
    # -fno-loop-unroll-and-jam: jammed, the register-blocked backward loops of lgm_cpu.cpp keep their running
    # sums in memory (a store-to-load chain per class), ~1.5x slower.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-loop-unroll-and-jam", "-DNDEBUG", "-std=c++20"]
    cxx += os.environ.get("LGM_EXT_EXTRA_CXXFLAGS", "").split()
    ldflags = ["-fopenmp"] + os.environ.get("LGM_EXT_EXTRA_LDFLAGS", "").split()
    if build_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-DNDEBUG", "-Xptxas=-v", "--expt-relaxed-constexpr", "-lineinfo"]
        core = CUDAExtension(
            "lgm_ext._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("LGM_EXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=ldflags,
        )
    else:
        core = CppExtension("lgm_ext._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                            extra_link_args=ldflags)
    # LGM_EXT_SIMT: math.h as the kernels have it under nvcc where the host compiler can follow (sums in source
    # order, the C library's exp instead of the CPU loops' polynomial; docs/CUDA.md "What is bitwise").
    simt = CppExtension("lgm_ext._simt", simt_sources, include_dirs=include_dirs, define_macros=[("LGM_EXT_SIMT", "1")],
                        extra_compile_args={"cxx": cxx}, extra_link_args=list(ldflags))
    # LGM_EXT_ONLY_SIMT=1: only the executor's module, against the lgm_ext._C already built in place (the mutation
    # check rebuilds it for each mutant of a kernel).
    return [simt] if _flag("LGM_EXT_ONLY_SIMT") else [core, simt]


class OptionalBuildExtension(BuildExtension):
    """torch's BuildExtension; where the compile fails and LGM_EXT_REQUIRE_BUILD is not set, the package is
    installed without the extension (the pure-PyTorch path) and the failure is reported, not raised."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # noqa: BLE001 -- any compiler or toolchain failure
            if _flag("LGM_EXT_REQUIRE_BUILD"):
                raise
            print(f"WARNING: lgm-ext's C++ extension could not be built ({type(err).__name__}: {err}); installing "
                  "the pure-PyTorch path (set LGM_EXT_REQUIRE_BUILD=1 to make this an error)")

    def build_extension(self, ext):
        if ext.name == "lgm_ext._simt":
            # Linked against the _C this build made, found at run time next to it ($ORIGIN): one copy of the
            # operator bodies and of their state in the process.
            # (this build's _C; with LGM_EXT_ONLY_SIMT, the one already in the source tree)
            core = os.path.abspath(self.get_ext_fullpath("lgm_ext._C"))
            if not os.path.exists(core):
                core = os.path.join(HERE, "lgm_ext", os.path.basename(core))
            ext.library_dirs = [os.path.dirname(core)]
            ext.libraries = [":" + os.path.basename(core)]
            ext.extra_link_args = [*ext.extra_link_args, "-Wl,-rpath,$ORIGIN"]
        try:
            super().build_extension(ext)
        except Exception:
            if _flag("LGM_EXT_REQUIRE_BUILD"):
                raise
            print("WARNING: lgm-ext's C++ extension could not be built; installing the pure-PyTorch path")


setup(
    packages=find_packages(include=["lgm_ext", "lgm_ext.*", "lgm_lab", "lgm_lab.*", "lgm_cli", "lgm_cli.*"]),
    ext_modules=[] if _flag("LGM_EXT_NO_BUILD") else extensions(),
    cmdclass={"build_ext": OptionalBuildExtension},
)
