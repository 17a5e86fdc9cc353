// lgm-ext: the CUDA kernels' thread decomposition, shared with the CPU
// emulation of those kernels (csrc/simt/emulate_cuda.cpp) so both iterate the
// same grid / block / lane structure.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>

namespace lgm_ext {
namespace launch {

constexpr int kWarp = 32;            // lanes per warp
constexpr int kRowsPerBlock = 4;     // row kernels: one warp per row, 4 warps per block
constexpr int kClassThreads = 128;   // class kernels: threads over D per block
constexpr int64_t kChunkRows = 256;  // direct class kernel: rows summed per partial
constexpr int kThreads = 256;        // elementwise kernels: threads per block
constexpr int64_t kMaxBlocks = 4096; // elementwise kernels: grid-stride beyond this

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CUDA's limits on a launch's grid: gridDim.x < 2^31, gridDim.y and gridDim.z <= 65535.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

// The z extent one launch may use: kMaxGridYZ, unless a test lowered it (torch.ops.lgm_ext._set_max_grid_z,
// lgm_ext._testing.max_grid_z) to run the split below on small inputs.  Defined in csrc/launch.cpp.
int64_t max_grid_z();
int64_t set_max_grid_z(int64_t z);  // returns the previous value

constexpr int64_t kMaxBlockThreads = 1024;  // threads per block
constexpr int64_t kMaxBlockXY = 1024, kMaxBlockZ = 64;
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // dynamic shared memory without an opt-in attribute

// CUDA refuses such a launch ("invalid configuration argument"); so does the executor, before it runs, and
// so does LGM_LAUNCH before <<<>>> on a GPU.
template <typename Dim>
inline void check_launch(const char* kernel, const Dim& grid, const Dim& block, size_t smem) {
  const int64_t gx = grid.x, gy = grid.y, gz = grid.z, bx = block.x, by = block.y, bz = block.z;
  TORCH_CHECK(gx >= 1 && gx <= kMaxGridX && gy >= 1 && gy <= kMaxGridYZ && gz >= 1 && gz <= max_grid_z() &&
                  bx >= 1 && bx <= kMaxBlockXY && by >= 1 && by <= kMaxBlockXY && bz >= 1 && bz <= kMaxBlockZ &&
                  bx * by * bz <= kMaxBlockThreads && static_cast<int64_t>(smem) <= kMaxSharedBytes,
              "CUDA launch of ", kernel, ": invalid configuration argument (grid ", gx, " x ", gy, " x ", gz,
              ", block ", bx, " x ", by, " x ", bz, ", ", smem, " bytes of shared memory; limits: grid.x < 2^31, ",
              "grid.y <= ", kMaxGridYZ, ", grid.z <= ", max_grid_z(), ", block <= 1024 x 1024 x 64 and ",
              kMaxBlockThreads, " threads, shared memory <= ", kMaxSharedBytes, " bytes)");
}

// A grid whose z extent `blocks_z` may exceed the limit is launched in pieces: f(z0, nz) for consecutive
// ranges [z0, z0 + nz) of at most max_grid_z() blocks each (the kernel adds z0 to blockIdx.z).
template <typename F>
void for_each_z_launch(int64_t blocks_z, F f) {
  const int64_t step = max_grid_z();
  for (int64_t z0 = 0; z0 < blocks_z; z0 += step) f(z0, blocks_z - z0 < step ? blocks_z - z0 : step);
}

}  // namespace launch
}  // namespace lgm_ext
