// lgm-ext CUDA backend: the kernels and their launches are lgm_kernels.cuh (the only copy: the SIMT executor
// runs the same source on the CPU for the `cuda-emulated` tests); this file gives them the current CUDA
// stream and ATen's tensor-core GEMM, and registers them for the CUDA key.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gemm.h"
#include "../host.h"

namespace lgm_ext {
namespace {
cudaStream_t kernel_stream() { return c10::cuda::getCurrentCUDAStream(); }
Mm16Fn kernel_mm16() { return has_mm_dtype() ? &mm16_aten : nullptr; }
}  // namespace
}  // namespace lgm_ext

#include "lgm_kernels.cuh"

namespace lgm_ext {

TORCH_LIBRARY_IMPL(lgm_ext, CUDA, m) { register_lgm_ops<&kernel_backend>(m); }

}  // namespace lgm_ext
