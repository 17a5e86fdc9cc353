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

// Read-write races: thread `writer` writes slot 0 and thread `reader` reads it in the same barrier interval
// (lanes of one warp, or threads of two warps), in shared or in global memory; `sync` puts the barrier that
// orders them (__syncwarp within a warp, __syncthreads across warps) between the two accesses.
__global__ void read_write_kernel(KPtr<float> out, int writer, int reader, bool shared, bool sync) {
  LGM_SHARED(float, buf, 64);
  const int t = threadIdx.x;
  if (shared) buf[t] = 0.0f;
  __syncthreads();
  const bool same_warp = writer / 32 == reader / 32;
  const auto slot = shared ? buf : out + 32;  // global: out[32..63] is this kernel's scratch
  float v = 0.0f;
  if (writer < reader) {  // written first (in index order), then read: read-after-write
    if (t == writer) slot[0] = 1.0f;
    if (sync) same_warp ? __syncwarp() : __syncthreads();
    if (t == reader) v = slot[0];
  } else {  // read first, then written: write-after-read
    if (t == reader) v = slot[0];
    if (sync) same_warp ? __syncwarp() : __syncthreads();
    if (t == writer) slot[0] = 1.0f;
  }
  __syncthreads();
  if (t == reader) out[0] = v;  // what the reader saw
}

// Block 0 writes out[0], block 1 reads it: blocks of a launch are unordered.
__global__ void read_across_blocks_kernel(KPtr<float> out) {
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 0) out[0] = 1.0f;
  if (blockIdx.x == 1) out[1] = out[0];
}

// Every element but the last written: an output left unwritten.
__global__ void short_loop_kernel(KPtr<float> out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n - 1; i += blockDim.x) out[i] = 1.0f;
}

// Threads 0-2 atomically add 1, 1e8, -1e8 to out[0]: float addition does not associate, so the sum depends
// on the order the threads run in (1 in reverse order, 0 in index order).
__global__ void order_dependent_sum_kernel(KPtr<float> out) {
  const float v[3] = {1.0f, 1e8f, -1e8f};
  if (threadIdx.x < 3) atomicAdd(out, v[threadIdx.x]);
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
  } else if (kind.rfind("raw_", 0) == 0 || kind.rfind("war_", 0) == 0) {
    // raw_/war_ + warp/block + _shared/_global, and "_ordered" with the barrier that makes it correct
    const bool war = kind[0] == 'w', warp = kind.find("warp") != std::string::npos;
    const bool shared = kind.find("shared") != std::string::npos, sync = kind.find("ordered") != std::string::npos;
    const int a = 1, b = warp ? 2 : 33;  // two lanes of warp 0, or a lane of warp 0 and one of warp 1
    LGM_LAUNCH(read_write_kernel, 1, 64, 0, stream, o, war ? b : a, war ? a : b, shared, sync);
  } else if (kind == "read_across_blocks") {
    LGM_LAUNCH(read_across_blocks_kernel, 2, 32, 0, stream, o);
  } else if (kind == "unwritten_output") {
    simt::CallCheck check("_simt_fault(unwritten_output)");
    check.output(out, "out");
    LGM_LAUNCH(short_loop_kernel, 1, 32, 0, stream, o, int64_t(64));
    check.verify();
  } else if (kind == "written_output") {
    simt::CallCheck check("_simt_fault(written_output)");
    check.output(out, "out");
    LGM_LAUNCH(short_loop_kernel, 1, 32, 0, stream, o, int64_t(65));
    check.verify();
  } else if (kind == "order_dependent_sum") {
    LGM_LAUNCH(order_dependent_sum_kernel, 1, 32, 0, stream, o);
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
