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
__global__ void pgd_step_kernel(KPtr<T> out, KPtr<const T> x, KPtr<const T> g, KPtr<const T> x0, T a, T e, T lo,
                                T hi, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = math::pgd_step_elem(x[i], g[i], x0[i], a, e, lo, hi);
}

void pgd_step_into(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                   double lower, double upper) {
  const int64_t n = x.numel();
  if (n == 0) return;
  if (cuda_emulation_enabled()) clear_kernel_regions();
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>(launch::kMaxBlocks, launch::ceil_div(n, launch::kThreads)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pgd_step_kernel", [&] {
    const scalar_t* xp = kernel_ptr<scalar_t>(x);
    const scalar_t* gp = kernel_ptr<scalar_t>(g);
    const scalar_t* x0p = kernel_ptr<scalar_t>(x0);
    scalar_t* op = kernel_ptr<scalar_t>(out);
    LGM_LAUNCH(pgd_step_kernel<scalar_t>, blocks, launch::kThreads, 0, kernel_stream(), op, xp, gp, x0p,
               scalar_t(alpha), scalar_t(eps), scalar_t(lower), scalar_t(upper), n);
  });
}

}  // namespace
}  // namespace lgm_ext
