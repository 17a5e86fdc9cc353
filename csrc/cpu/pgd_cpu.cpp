// lgm-ext CPU projected sign step: one vectorised, parallel pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../host.h"
#include "cpu_kernels.h"
#include "emulate_cuda.h"
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
  if (cuda_emulation_enabled()) return emulated_pgd_step(out, x, g, x0, alpha, eps, lower, upper);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pgd_step_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *x0p = x0.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T a = T(alpha), e = T(eps), lo = T(lower), hi = T(upper);
    at::parallel_for(0, x.numel(), 1 << 15,
                     [&](int64_t b, int64_t end) { step_block(op, xp, gp, x0p, a, e, lo, hi, b, end); });
  });
}

Tensor pgd_step_cpu(const Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps,
                    double lower, double upper) {
  check_pgd(x, grad, x_orig, alpha, eps, lower, upper);
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  step_into(out, xc, grad.contiguous(), x_orig.contiguous(), alpha, eps, lower, upper);
  return out;
}

void pgd_step_inplace_cpu(Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps,
                          double lower, double upper) {
  check_pgd(x, grad, x_orig, alpha, eps, lower, upper);
  if (x.is_contiguous()) {
    step_into(x, x, grad.contiguous(), x_orig.contiguous(), alpha, eps, lower, upper);
  } else {
    Tensor tmp = x.contiguous();
    step_into(tmp, tmp, grad.contiguous(), x_orig.contiguous(), alpha, eps, lower, upper);
    x.copy_(tmp);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lgm_ext, CPU, m) {
  m.impl("pgd_step", &pgd_step_cpu);
  m.impl("pgd_step_", &pgd_step_inplace_cpu);
}

}  // namespace lgm_ext
