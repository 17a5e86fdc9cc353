// The `cuda-emulated` backend: the CUDA kernels' own source (csrc/cuda/*.cuh), compiled by the host compiler
// and run on the SIMT executor (include/lgm_ext/simt.h, cpu/simt.cpp) -- every thread of every block, with
// CUDA's barrier and warp-shuffle semantics, bounds-checked pointers and a write-race check.  There is no
// second copy of a kernel here: what the tests run is what nvcc compiles.
#include "emulate_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>

#include "../args.h"
#include "../gemm.h"

namespace lgm_ext {
namespace {
std::atomic<bool> g_emulate{false};
std::atomic<int64_t> g_max_grid_z{launch::kMaxGridYZ};
}  // namespace
}  // namespace lgm_ext

#include "lgm_ext/simt.h"

namespace lgm_ext {
namespace {
cudaStream_t kernel_stream() { return nullptr; }
// The tensor-core GEMM of the emulation: the bf16 parts widened exactly to float32 (gemm.h).
Mm16Fn kernel_mm16() { return &mm16_widened; }
}  // namespace
}  // namespace lgm_ext

#include "../cuda/lgm_kernels.cuh"
#include "../cuda/pgd_kernels.cuh"

namespace lgm_ext {
namespace {

bool set_cuda_emulation(bool on) { return g_emulate.exchange(on); }

}  // namespace

// launch.h: the z extent of one launch, for the CUDA kernels and the executor.
int64_t launch::max_grid_z() { return g_max_grid_z.load(std::memory_order_relaxed); }
int64_t launch::set_max_grid_z(int64_t z) {
  TORCH_CHECK_VALUE(z >= 1 && z <= kMaxGridYZ, "max_grid_z must be in [1, ", kMaxGridYZ, "], got ", z);
  return g_max_grid_z.exchange(z);
}

bool cuda_emulation_enabled() { return g_emulate.load(std::memory_order_relaxed); }

const Backend& emulated_cuda_backend(at::ScalarType acc) { return kernel_backend(acc); }

void emulated_pgd_step(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                       double lower, double upper) {
  pgd_step_into(out, x, g, x0, alpha, eps, lower, upper);
}

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  // Test-only: route CPU kernels through the CUDA kernels on the SIMT executor; returns the previous setting.
  m.def("_set_cuda_emulation(bool on) -> bool", &set_cuda_emulation);
  // Test-only: the z extent one launch may use (launch.h max_grid_z; CUDA's limit 65,535 by default), for the
  // executor and the real CUDA kernels; returns the previous value.
  m.def("_set_max_grid_z(int z) -> int", [](int64_t z) { return set_max_grid_z(z); });
  // Test-only: how many 16-bit (tensor-core) GEMMs the GEMM path has run (gemm.h), on any backend.
  m.def("_mm16_calls() -> int", []() { return mm16_calls(); });
  // Test/benchmark hook: the GEMM path's tensor-core mode on or off (gemm.h; off by default); returns the
  // previous setting.
  m.def("_set_tensor_core_gemms(bool on) -> bool", [](bool on) { return set_tensor_core_gemms(on); });
}

}  // namespace lgm_ext
