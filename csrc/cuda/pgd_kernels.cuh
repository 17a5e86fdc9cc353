// lgm-ext: the projected sign step's kernel and launch -- the only copy, compiled by nvcc (pgd_cuda.cu) and by
// the host compiler for the SIMT executor (cpu/emulate_cuda.cpp; see lgm_kernels.cuh for the conventions): a
// grid-stride elementwise kernel over include/lgm_ext/math.h's pgd_step_elem.  The including file defines
// kernel_stream() in lgm_ext::(anonymous) first.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../args.h"
#include "../host.h"
#include "lgm_ext/launch.h"
#include "lgm_ext/math.h"
#include "lgm_ext/simt.h"

namespace lgm_ext {
namespace {

template <typename T>
__global__ void pgd_step_kernel(PgdStepArgs<T, KPtrs> a) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    a.out[i] = math::pgd_step_elem(a.x[i], a.grad[i], a.x_orig[i], a.alpha, a.eps, a.lower, a.upper);
}

void pgd_step_into(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                   double lower, double upper) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>(launch::kMaxBlocks, launch::ceil_div(n, launch::kThreads)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pgd_step_kernel", [&] {
    const auto a = pgd_step_args<scalar_t, KPtrs>(out, x, g, x0, alpha, eps, lower, upper);
    LGM_LAUNCH(pgd_step_kernel<scalar_t>, blocks, launch::kThreads, 0, kernel_stream(), a);
  });
}

}  // namespace
}  // namespace lgm_ext
