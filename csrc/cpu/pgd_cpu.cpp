// lgm-ext CPU projected sign step: one vectorised, parallel pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../host.h"
#include "lgm_ext/math.h"

namespace lgm_ext {
namespace {

void step_into(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
               double lower, double upper) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pgd_step_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *x0p = x0.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T a = T(alpha), e = T(eps), lo = T(lower), hi = T(upper);
    at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t b, int64_t end) {
      LGM_SIMD
      for (int64_t i = b; i < end; ++i) op[i] = math::pgd_step_elem(xp[i], gp[i], x0p[i], a, e, lo, hi);
    });
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
