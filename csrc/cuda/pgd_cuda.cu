// lgm-ext CUDA projected sign step: a grid-stride elementwise kernel over
// include/lgm_ext/math.h's pgd_step_elem (emulated on the CPU in
// csrc/cpu/emulate_cuda.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../host.h"
#include "lgm_ext/launch.h"
#include "lgm_ext/math.h"

namespace lgm_ext {
namespace {

using namespace lgm_ext::launch;

template <typename T>
__global__ void pgd_step_kernel(T* out, const T* x, const T* g, const T* x0, T a, T e, T lo, T hi, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = math::pgd_step_elem(x[i], g[i], x0[i], a, e, lo, hi);
}

void step_into(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
               double lower, double upper) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(kMaxBlocks, ceil_div(n, kThreads)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pgd_step_cuda", [&] {
    pgd_step_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(),
        scalar_t(alpha), scalar_t(eps), scalar_t(lower), scalar_t(upper), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lgm_ext, CUDA, m) { register_pgd_ops<&step_into>(m); }

}  // namespace lgm_ext
