// lgm-ext: the CUDA kernels' thread decomposition, shared with the CPU
// emulation of those kernels (csrc/cpu/emulate_cuda.cpp) so both iterate the
// same grid / block / lane structure.
#pragma once

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

}  // namespace launch
}  // namespace lgm_ext
