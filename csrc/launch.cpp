// lgm-ext: the CUDA launches' adjustable limit and the test and benchmark hooks that act on the production
// kernels (the real CUDA ones and the CPU loops; the SIMT executor's hooks are in lgm_ext._simt, csrc/simt/).
#include <torch/library.h>

#include <atomic>

#include "gemm.h"
#include "lgm_ext/launch.h"

namespace lgm_ext {
namespace {
std::atomic<int64_t> g_max_grid_z{launch::kMaxGridYZ};
}  // namespace

// launch.h: the z extent of one launch, for the CUDA kernels and (in lgm_ext._simt) the executor.
int64_t launch::max_grid_z() { return g_max_grid_z.load(std::memory_order_relaxed); }
int64_t launch::set_max_grid_z(int64_t z) {
  TORCH_CHECK_VALUE(z >= 1 && z <= kMaxGridYZ, "max_grid_z must be in [1, ", kMaxGridYZ, "], got ", z);
  return g_max_grid_z.exchange(z);
}

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  // Test-only: the z extent one launch may use (launch.h max_grid_z; CUDA's limit 65,535 by default), for the
  // real CUDA kernels and the executor; returns the previous value.
  m.def("_set_max_grid_z(int z) -> int", [](int64_t z) { return launch::set_max_grid_z(z); });
  // Test-only: how many 16-bit (tensor-core) GEMMs the GEMM path has run (gemm.h), on any backend.
  m.def("_mm16_calls() -> int", []() { return mm16_calls(); });
  // Test/benchmark hook: the GEMM path's tensor-core mode on or off (gemm.h; off by default); returns the
  // previous setting.
  m.def("_set_tensor_core_gemms(bool on) -> bool", [](bool on) { return set_tensor_core_gemms(on); });
}

}  // namespace lgm_ext
