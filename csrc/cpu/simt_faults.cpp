// Test-only: small deliberately wrong kernels, each the kind of fault the SIMT executor must report (a GPU
// would hide it or crash), and one correct kernel using shared memory, barriers and shuffles.  Compiled for
// the executor only (never by nvcc); torch.ops.lgm_ext._simt_fault(kind) runs one (tests/test_simt.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../args.h"
#include "lgm_ext/simt.h"

namespace lgm_ext {
namespace {

// Reads one element past the end of x (thread n of the last block, n = x's size).
__global__ void oob_read_kernel(KPtr<float> out, KPtr<const float> x, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[i < n ? i : 0] = x[i];  // `<=`: the off-by-one
}

// Writes one element past the end of out.
__global__ void oob_write_kernel(KPtr<float> out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i + 1] = 1.0f;
}

// Every thread of every block writes out[0]: a write-write race in global memory.
__global__ void global_race_kernel(KPtr<float> out) { out[0] = static_cast<float>(threadIdx.x); }

// Two warps write the same shared slot without a barrier between them (race); with the barrier (ordered)
// it is fine.
__global__ void shared_race_kernel(KPtr<float> out, bool ordered) {
  LGM_SHARED(float, buf, 64);
  if (threadIdx.x == 0) buf[0] = 1.0f;
  if (ordered) __syncthreads();
  if (threadIdx.x == 32) buf[0] = 2.0f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = buf[0];
}

// Half the block reaches a __syncthreads the other half skips.
__global__ void divergent_barrier_kernel(KPtr<float> out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// One thread returns early; the others wait at the barrier for it.
__global__ void exit_before_barrier_kernel(KPtr<float> out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A full-mask butterfly that only lanes 0-15 reach.
__global__ void partial_shuffle_kernel(KPtr<float> out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lanes 0-15 shuffle among themselves (mask 0xffff) but read lane l ^ 16, outside the mask.
__global__ void shuffle_outside_mask_kernel(KPtr<float> out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
  out[threadIdx.x] = v;
}

// Correct: a block of 64 threads sums x (64 values) through shared memory, a barrier and a warp butterfly;
// every thread writes the total to out[thread].
__global__ void block_sum_kernel(KPtr<float> out, KPtr<const float> x) {
  LGM_SHARED(float, part, 2);
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = x[t];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  out[t] = part[0] + part[1];
}

at::Tensor simt_fault(const std::string& kind) {
  at::Tensor out = at::zeros({64}, at::kFloat);
  at::Tensor x = at::arange(64, at::kFloat);
  const auto o = simt::CheckedPtrs::make<float>(out, "out");
  const auto xp = simt::CheckedPtrs::make<const float>(x, "x");
  void* stream = nullptr;
  if (kind == "ok") {
    LGM_LAUNCH(block_sum_kernel, 1, 64, 0, stream, o, xp);
  } else if (kind == "oob_read") {
    LGM_LAUNCH(oob_read_kernel, 2, 48, 0, stream, o, xp, int64_t(64));
  } else if (kind == "oob_write") {
    LGM_LAUNCH(oob_write_kernel, 2, 32, 0, stream, o, int64_t(64));
  } else if (kind == "global_race") {
    LGM_LAUNCH(global_race_kernel, 2, 32, 0, stream, o);
  } else if (kind == "shared_race") {
    LGM_LAUNCH(shared_race_kernel, 1, 64, 0, stream, o, false);
  } else if (kind == "shared_ordered") {
    LGM_LAUNCH(shared_race_kernel, 1, 64, 0, stream, o, true);
  } else if (kind == "divergent_barrier") {
    LGM_LAUNCH(divergent_barrier_kernel, 1, 64, 0, stream, o);
  } else if (kind == "exit_before_barrier") {
    LGM_LAUNCH(exit_before_barrier_kernel, 1, 64, 0, stream, o);
  } else if (kind == "partial_shuffle") {
    LGM_LAUNCH(partial_shuffle_kernel, 1, 32, 0, stream, o);
  } else if (kind == "shuffle_outside_mask") {
    LGM_LAUNCH(shuffle_outside_mask_kernel, 1, 32, 0, stream, o);
  } else if (kind == "block_too_large") {
    LGM_LAUNCH(global_race_kernel, 1, 1025, 0, stream, o);
  } else if (kind == "grid_too_large") {
    LGM_LAUNCH(global_race_kernel, dim3(1, 65536), 32, 0, stream, o);
  } else if (kind == "too_much_shared_memory") {
    LGM_LAUNCH(global_race_kernel, 1, 32, 64 * 1024, stream, o);
  } else {
    TORCH_CHECK_VALUE(false, "_simt_fault: unknown kind '", kind, "'");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  // Test-only: run one small kernel on the SIMT executor -- "ok" (a correct block sum of arange(64); returns
  // it in every element) or a deliberate fault the executor must report (tests/test_simt.py).
  m.def("_simt_fault(str kind) -> Tensor", &simt_fault);
}

}  // namespace lgm_ext
