// lgm-ext CPU projected sign step: one vectorised, parallel pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../host.h"
#include "cpu_kernels.h"
#include "lgm_ext/math.h"

namespace lgm_ext {
namespace {

template <typename T>
LGM_ALWAYS_INLINE void step_block_t(T* out, const T* x, const T* g, const T* x0, T a, T e, T lo, T hi, int64_t b,
                                    int64_t end) {
  LGM_SIMD
  for (int64_t i = b; i < end; ++i) out[i] = math::pgd_step_elem(x[i], g[i], x0[i], a, e, lo, hi);
}

#define LGM_STEP_BLOCK(T)                                                                                   \
  LGM_CPU_CLONES void step_block(T* out, const T* x, const T* g, const T* x0, T a, T e, T lo, T hi, int64_t b, \
                                 int64_t end) {                                                            \
    step_block_t<T>(out, x, g, x0, a, e, lo, hi, b, end);                                                  \
  }
LGM_STEP_BLOCK(float)
LGM_STEP_BLOCK(double)
#undef LGM_STEP_BLOCK

void step_into(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
               double lower, double upper) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pgd_step_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *x0p = x0.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T a = T(alpha), e = T(eps), lo = T(lower), hi = T(upper);
    at::parallel_for(0, x.numel(), 1 << 15,
                     [&](int64_t b, int64_t end) { step_block(op, xp, gp, x0p, a, e, lo, hi, b, end); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lgm_ext, CPU, m) { register_pgd_ops<&step_into>(m); }

}  // namespace lgm_ext
