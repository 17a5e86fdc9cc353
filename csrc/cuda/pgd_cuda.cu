// lgm-ext CUDA projected sign step: the kernel and its launch are pgd_kernels.cuh (shared with the SIMT
// executor, which runs the same source on the CPU); this file registers them for the CUDA key.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../host.h"

namespace lgm_ext {
namespace {
cudaStream_t kernel_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace
}  // namespace lgm_ext

#include "pgd_kernels.cuh"

namespace lgm_ext {

TORCH_LIBRARY_IMPL(lgm_ext, CUDA, m) { register_pgd_ops<&pgd_step_into>(m); }

}  // namespace lgm_ext
