// lgm-ext CPU backend: the row and class loops around include/lgm_ext/math.h,
// parallel over rows (or classes) with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../host.h"
#include "lgm_ext/math.h"

namespace lgm_ext {
namespace {

using namespace lgm_ext::math;

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_or_null(Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Rows per task so that a task holds at least ~32k multiply-adds.
int64_t grain(int64_t work_per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row)); }

// One row of logits from its distances; shared by the direct and GEMM paths.
// dist(k) returns d[n,k].
template <typename T, typename Dist>
void row_pass(int64_t n, int64_t K, const T* hl, const int64_t* labels, T alpha, T lambda, bool margin_out,
              Dist dist, T* logits, T* lse, T* row_loss) {
  const int64_t y = labels != nullptr ? labels[n] : -1;
  Lse<T> st = lse_init<T>();
  T d_y = T(0), l_y = T(0);
  T* out = logits + n * K;
  for (int64_t k = 0; k < K; ++k) {
    const T d = dist(k);
    const T h = hl != nullptr ? hl[k] : T(0);
    const T l0 = free_logit(d, h);
    const T l = k == y ? margin_logit(d, h, alpha) : l0;
    out[k] = margin_out ? l : l0;
    if (lse != nullptr) lse_push(st, l);
    if (k == y) {
      d_y = d;
      l_y = l;
    }
  }
  if (lse != nullptr) {
    const T v = lse_value(st);
    lse[n] = v;
    row_loss[n] = math::row_loss(v, l_y, d_y, hl != nullptr ? hl[y] : T(0), lambda);
  }
}

void direct_rows(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& lse,
                 Tensor& row_loss) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "lgm_direct_rows", [&] {
    using T = scalar_t;
    const int64_t K = in.K, D = in.D;
    const T *x = in.x.data_ptr<T>(), *mu = in.mu.data_ptr<T>(), *w = ptr_or_null<T>(in.w);
    const T* hl = ptr_or_null<T>(in.hl);
    const int64_t* y = ptr_or_null<int64_t>(in.labels);
    T *L = logits.data_ptr<T>(), *lse_p = mut_or_null<T>(lse), *loss_p = mut_or_null<T>(row_loss);
    at::parallel_for(0, in.N, grain(K * D), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const T* xr = x + n * D;
        auto dist = [&](int64_t k) {
          return dist_from_sqdist(sqdist_partial(xr, mu + k * D, w != nullptr ? w + k * D : nullptr, D, 0, 1));
        };
        row_pass<T>(n, K, hl, y, T(alpha), T(lambda), margin_out, dist, L, lse_p, loss_p);
      }
    });
  });
}

void gemm_rows(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
               Tensor& lse, Tensor& row_loss) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "lgm_gemm_rows", [&] {
    using T = scalar_t;
    const int64_t K = in.K;
    const T* hl = ptr_or_null<T>(in.hl);
    const T* cp = c.data_ptr<T>();
    const int64_t* y = ptr_or_null<int64_t>(in.labels);
    T *M = m.data_ptr<T>(), *lse_p = mut_or_null<T>(lse), *loss_p = mut_or_null<T>(row_loss);
    at::parallel_for(0, in.N, grain(4 * K), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const T* mr = M + n * K;  // read before row_pass overwrites entry k
        auto dist = [&](int64_t k) { return dist_from_expansion(mr[k], cp[k]); };
        row_pass<T>(n, K, hl, y, T(alpha), T(lambda), margin_out, dist, M, lse_p, loss_p);
      }
    });
  });
}

void coefficients(const Inputs& in, const Tensor& logits, const Tensor& lse, const Tensor& scale,
                  const Tensor& grad_logits, double alpha_, double lambda_, Tensor& g, Tensor& r) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "lgm_coefficients", [&] {
    using T = scalar_t;
    const int64_t K = in.K;
    const T alpha = T(alpha_), lambda = T(lambda_);
    const T* hl = ptr_or_null<T>(in.hl);
    const int64_t* y = ptr_or_null<int64_t>(in.labels);
    const T *L = ptr_or_null<T>(logits), *lse_p = ptr_or_null<T>(lse), *sc = ptr_or_null<T>(scale);
    const T* gl = ptr_or_null<T>(grad_logits);
    T *G = g.data_ptr<T>(), *R = r.data_ptr<T>();
    at::parallel_for(0, in.N, grain(8 * K), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        T* gr = G + n * K;
        const T* glr = gl != nullptr ? gl + n * K : nullptr;
        const int64_t yn = y != nullptr ? y[n] : -1;
        if (lse_p != nullptr) {  // loss mode
          const T* lr = L + n * K;
          const T l = lse_p[n], c = sc[n];
          const T p_y = prob(margin_from_free(lr[yn], hl != nullptr ? hl[yn] : T(0), alpha), l);
          for (int64_t k = 0; k < K; ++k) gr[k] = coef_g_other(prob(lr[k], l), c);
          gr[yn] = coef_g_label(p_y, alpha, lambda, c);
          if (glr != nullptr)
            for (int64_t k = 0; k < K; ++k) gr[k] = coef_add_logit_grad(gr[k], glr[k]);
          R[n] = coef_r(p_y, alpha, c);
        } else {  // logits mode
          for (int64_t k = 0; k < K; ++k) gr[k] = coef_g_logit(glr[k], k == yn, alpha);
          R[n] = yn >= 0 ? coef_r_logit(glr[yn], alpha) : T(0);
        }
      }
    });
  });
}

void direct_grads(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                  Tensor& grad_s) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "lgm_direct_grads", [&] {
    using T = scalar_t;
    const int64_t N = in.N, K = in.K, D = in.D;
    const T *x = in.x.data_ptr<T>(), *mu = in.mu.data_ptr<T>(), *w = ptr_or_null<T>(in.w);
    const int64_t* y = ptr_or_null<int64_t>(in.labels);
    const T *G = g.data_ptr<T>(), *R = r.data_ptr<T>();
    // dL/dx: rows in parallel, classes accumulated along the row.
    T* gx = grad_x.data_ptr<T>();
    at::parallel_for(0, N, grain(K * D), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        T* out = gx + n * D;
        std::fill(out, out + D, T(0));
        for (int64_t k = 0; k < K; ++k) {
          const T gk = G[n * K + k];
          if (gk != T(0)) grad_x_axpy(out, gk, x + n * D, mu + k * D, w != nullptr ? w + k * D : nullptr, D);
        }
      }
    });
    // dL/dmu and dL/dlog_var: classes in parallel, samples accumulated.
    T* gmu = grad_mu.data_ptr<T>();
    T* gs = mut_or_null<T>(grad_s);
    at::parallel_for(0, K, std::max<int64_t>(1, grain(N * D)), [&](int64_t b, int64_t e) {
      std::vector<T> a1(D), a2(D);
      for (int64_t k = b; k < e; ++k) {
        std::fill(a1.begin(), a1.end(), T(0));
        std::fill(a2.begin(), a2.end(), T(0));
        T* A1 = a1.data();
        T* A2 = a2.data();
        const T* muk = mu + k * D;
        T hsum = T(0);
        for (int64_t n = 0; n < N; ++n) {
          const T gk = G[n * K + k];
          hsum += gk;
          if (y != nullptr && y[n] == k) hsum += R[n];
          if (gk == T(0)) continue;
          const T* xr = x + n * D;
          LGM_SIMD
          for (int64_t j = 0; j < D; ++j) class_accum(A1[j], A2[j], gk, xr[j], muk[j]);
        }
        for (int64_t j = 0; j < D; ++j) {
          const T wj = w != nullptr ? w[k * D + j] : T(1);
          gmu[k * D + j] = grad_mu_final(A1[j], wj);
          if (gs != nullptr) gs[k * D + j] = grad_log_var_final(A2[j], wj, hsum);
        }
      }
    });
  });
}

const Backend& cpu_backend() {
  static const Backend be{&direct_rows, &gemm_rows, &coefficients, &direct_grads};
  return be;
}

std::tuple<Tensor, Tensor, Tensor> loss_forward_cpu(const Tensor& x, const Tensor& mu,
                                                    const std::optional<Tensor>& s, const Tensor& y, double alpha,
                                                    double lambda, int64_t reduction, int64_t impl) {
  return loss_forward(cpu_backend(), x, mu, s, y, alpha, lambda, reduction, impl);
}

std::tuple<Tensor, Tensor, Tensor> loss_backward_cpu(const Tensor& gloss, const std::optional<Tensor>& glogits,
                                                     const Tensor& x, const Tensor& mu,
                                                     const std::optional<Tensor>& s, const Tensor& y,
                                                     const Tensor& logits, const Tensor& lse, double alpha,
                                                     double lambda, int64_t reduction, int64_t impl) {
  return loss_backward(cpu_backend(), gloss, glogits, x, mu, s, y, logits, lse, alpha, lambda, reduction, impl);
}

Tensor logits_cpu(const Tensor& x, const Tensor& mu, const std::optional<Tensor>& s,
                  const std::optional<Tensor>& y, double alpha, int64_t impl) {
  return logits_forward(cpu_backend(), x, mu, s, y, alpha, impl);
}

std::tuple<Tensor, Tensor, Tensor> logits_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& mu,
                                                       const std::optional<Tensor>& s,
                                                       const std::optional<Tensor>& y, double alpha, int64_t impl) {
  return logits_backward(cpu_backend(), grad, x, mu, s, y, alpha, impl);
}

std::tuple<Tensor, Tensor> log_likelihood_cpu(const Tensor& x, const Tensor& mu, const std::optional<Tensor>& s,
                                              int64_t impl) {
  return log_likelihood(cpu_backend(), x, mu, s, impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(lgm_ext, CPU, m) {
  m.impl("lgm_loss_forward", &loss_forward_cpu);
  m.impl("lgm_loss_backward", &loss_backward_cpu);
  m.impl("lgm_logits", &logits_cpu);
  m.impl("lgm_logits_backward", &logits_backward_cpu);
  m.impl("lgm_log_likelihood", &log_likelihood_cpu);
}

}  // namespace lgm_ext
