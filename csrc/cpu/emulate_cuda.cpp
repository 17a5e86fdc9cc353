// Test-only CPU driver of the CUDA kernels in csrc/cuda: the same device
// functions (include/lgm_ext/math.h) over the same grid / block / warp / lane
// decomposition (include/lgm_ext/launch.h), with warp shuffles replaced by an
// exact emulation of the __shfl_xor_sync butterfly (same operand order, so the
// same rounding).  No GPU runs our CUDA code in CI; this is how the test suite
// exercises its decomposition.  Keep each function in step with its kernel.
#include "emulate_cuda.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <vector>

#include "../args.h"
#include "lgm_ext/launch.h"
#include "lgm_ext/math.h"

namespace lgm_ext {
namespace {

using namespace lgm_ext::math;
using namespace lgm_ext::launch;

std::atomic<bool> g_emulate{false};

template <typename T>
using Lanes = std::array<T, kWarp>;

// v_l += shfl_xor(v, o) for o = 16, 8, 4, 2, 1, all lanes at once.
template <typename T>
Lanes<T> warp_sum(Lanes<T> v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const Lanes<T> u = v;
    for (int l = 0; l < kWarp; ++l) v[l] = u[l] + u[l ^ o];
  }
  return v;
}

template <typename T>
Lanes<T> warp_max(Lanes<T> v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const Lanes<T> u = v;
    for (int l = 0; l < kWarp; ++l) v[l] = u[l ^ o] > u[l] ? u[l ^ o] : u[l];
  }
  return v;
}

// Row kernels: blocks of kRowsPerBlock warps, one warp per row (or class).
template <typename F>
void for_each_warp_row(int64_t rows, F body) {
  for (int64_t b = 0; b < ceil_div(rows, kRowsPerBlock); ++b)
    for (int ty = 0; ty < kRowsPerBlock; ++ty) {
      const int64_t n = b * kRowsPerBlock + ty;
      if (n < rows) body(n);
    }
}

// Elementwise kernels: grid-stride loops over kThreads-thread blocks.
template <typename F>
void for_each_grid_stride(int64_t count, F body) {
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, ceil_div(count, kThreads)));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t t = 0; t < kThreads; ++t)
      for (int64_t i = b * kThreads + t; i < count; i += blocks * kThreads) body(i);
}

template <typename T>
void row_finish(const Args<T>& a, int64_t n, int64_t y, const Lanes<T>& d_y) {
  if (y < 0) return;
  T* out = a.logits + n * a.K;
  const T hl_y = a.hl != nullptr ? a.hl[y] : T(0);
  Lanes<T> l_y;
  for (int l = 0; l < kWarp; ++l) l_y[l] = margin_logit(d_y[l], hl_y, a.alpha);
  if (a.margin_out) out[y] = l_y[y % kWarp];
  if (a.lse == nullptr) return;
  Lanes<T> m, s;
  for (int l = 0; l < kWarp; ++l) m[l] = row_max_partial(out, a.K, y, l_y[l], l, kWarp);
  m = warp_max(m);
  for (int l = 0; l < kWarp; ++l) s[l] = row_sumexp_partial(out, a.K, y, l_y[l], m[l], l, kWarp);
  s = warp_sum(s);
  const T v = lse_from_parts(m[0], s[0]);  // lane 0 writes
  a.lse[n] = v;
  a.loss[n] = row_loss(v, l_y[0], d_y[0], hl_y, a.lambda);
}

template <typename T>
void direct_rows_t(const Args<T>& a) {
  const int64_t K = a.K, D = a.D;
  for_each_warp_row(a.N, [&](int64_t n) {
    const T* xr = a.x + n * D;
    const int64_t y = a.y != nullptr ? a.y[n] : -1;
    T* out = a.logits + n * K;
    Lanes<T> d_y{};
    for (int64_t k = 0; k < K; ++k) {
      Lanes<T> part;
      for (int l = 0; l < kWarp; ++l)
        part[l] = sqdist_partial(xr, a.mu + k * D, a.w != nullptr ? a.w + k * D : nullptr, D, l, kWarp);
      const Lanes<T> sum = warp_sum(part);
      const int owner = static_cast<int>(k % kWarp);
      out[k] = free_logit(dist_from_sqdist(sum[owner]), a.hl != nullptr ? a.hl[k] : T(0));
      if (k == y)
        for (int l = 0; l < kWarp; ++l) d_y[l] = dist_from_sqdist(sum[l]);
    }
    row_finish(a, n, y, d_y);
  });
}

template <typename T>
void gemm_rows_t(const Args<T>& a) {
  const int64_t K = a.K;
  for_each_warp_row(a.N, [&](int64_t n) {
    T* m = a.logits + n * K;
    const int64_t y = a.y != nullptr ? a.y[n] : -1;
    Lanes<T> d_y;
    d_y.fill(y >= 0 ? dist_from_expansion(m[y], a.c[y]) : T(0));
    for (int l = 0; l < kWarp; ++l)
      for (int64_t k = l; k < K; k += kWarp)
        m[k] = free_logit(dist_from_expansion(m[k], a.c[k]), a.hl != nullptr ? a.hl[k] : T(0));
    row_finish(a, n, y, d_y);
  });
}

template <typename T>
void coefficients_t(const Args<T>& a) {
  const int64_t K = a.K;
  for_each_warp_row(a.N, [&](int64_t n) {
    T* gr = a.g + n * K;
    const T* glr = a.grad_logits != nullptr ? a.grad_logits + n * K : nullptr;
    const int64_t yn = a.y != nullptr ? a.y[n] : -1;
    for (int l = 0; l < kWarp; ++l) {
      if (a.saved_lse != nullptr) {
        const T* lr = a.saved_logits + n * K;
        const T lse = a.saved_lse[n], c = a.scale[n * a.scale_stride] * a.scale_mult;
        const T p_y = prob(margin_from_free(lr[yn], a.hl != nullptr ? a.hl[yn] : T(0), a.alpha), lse);
        for (int64_t k = l; k < K; k += kWarp) {
          T v = k == yn ? coef_g_label(p_y, a.alpha, a.lambda, c) : coef_g_other(prob(lr[k], lse), c);
          if (glr != nullptr) v = coef_add_logit_grad(v, glr[k]);
          gr[k] = v;
        }
        if (l == 0) a.r[n] = coef_r(p_y, a.alpha, c);
      } else {
        for (int64_t k = l; k < K; k += kWarp) gr[k] = coef_g_logit(glr[k], k == yn, a.alpha);
        if (l == 0) a.r[n] = yn >= 0 ? coef_r_logit(glr[yn], a.alpha) : T(0);
      }
    }
  });
}

template <typename T>
void direct_grads_t(const Args<T>& a) {
  const int64_t N = a.N, K = a.K, D = a.D;
  // grad_x_kernel: warp per row, lanes over j.
  for_each_warp_row(N, [&](int64_t n) {
    for (int l = 0; l < kWarp; ++l)
      for (int64_t j = l; j < D; j += kWarp)
        a.gx[n * D + j] = grad_x_elem(a.g + n * K, a.x[n * D + j], a.mu + j, a.w != nullptr ? a.w + j : nullptr, K, D);
  });
  // class_partial_kernel: grid (K, ceil(D / kClassThreads), chunks).
  const int64_t chunks = ceil_div(N, kChunkRows);
  std::vector<T> p1(chunks * K * D), p2(chunks * K * D), ph(chunks * K);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t by = 0; by < ceil_div(D, kClassThreads); ++by)
      for (int64_t chunk = 0; chunk < chunks; ++chunk)
        for (int64_t t = 0; t < kClassThreads; ++t) {
          const int64_t j = by * kClassThreads + t;
          const int64_t n0 = chunk * kChunkRows, n1 = std::min(N, n0 + kChunkRows);
          T a1 = T(0), a2 = T(0), hs = T(0);
          const T muj = j < D ? a.mu[k * D + j] : T(0);
          for (int64_t n = n0; n < n1; ++n) {
            const T gk = a.g[n * K + k];
            hs += gk;
            if (a.y != nullptr && a.y[n] == k) hs += a.r[n];
            if (j < D) class_accum(a1, a2, gk, a.x[n * D + j], muj);
          }
          if (j < D) {
            p1[(chunk * K + k) * D + j] = a1;
            p2[(chunk * K + k) * D + j] = a2;
          }
          if (j == 0) ph[chunk * K + k] = hs;
        }
  // class_finalize_kernel: grid-stride over K * D, chunks added in order.
  for_each_grid_stride(K * D, [&](int64_t i) {
    const int64_t k = i / D;
    T A1 = T(0), A2 = T(0), hs = T(0);
    for (int64_t c = 0; c < chunks; ++c) {
      A1 += p1[c * K * D + i];
      A2 += p2[c * K * D + i];
      hs += ph[c * K + k];
    }
    const T wj = a.w != nullptr ? a.w[i] : T(1);
    a.gmu[i] = grad_mu_final(A1, wj);
    if (a.gs != nullptr) a.gs[i] = grad_log_var_final(A2, wj, hs);
  });
}

template <typename T>
void tables_t(const Args<T>& a) {
  const int64_t D = a.D;
  for_each_warp_row(a.K, [&](int64_t k) {
    Lanes<T> h{};
    for (int l = 0; l < kWarp; ++l)
      for (int64_t j = l; j < D; j += kWarp) {
        const T s = a.mu[k * D + j];
        a.op_b[k * D + j] = inv_var(s);
        h[l] += half_logdet_term(s);
      }
    a.op_c[k] = warp_sum(h)[0];
  });
}

template <typename T>
void operands_t(const Args<T>& a) {
  const int64_t D = a.D;
  for_each_grid_stride(a.N * D, [&](int64_t i) {
    const int64_t n = i / D, j = i % D;
    operand_a(a.x[i], a.op_a[n * 2 * D + j], a.op_a[n * 2 * D + D + j]);
  });
  for_each_warp_row(a.K, [&](int64_t k) {
    Lanes<T> c{};
    for (int l = 0; l < kWarp; ++l)
      for (int64_t j = l; j < D; j += kWarp)
        operand_b(a.mu[k * D + j], a.w[k * D + j], a.op_b[k * 2 * D + j], a.op_b[k * 2 * D + D + j], c[l]);
    a.op_c[k] = warp_sum(c)[0];
  });
}

template <typename T>
void gemm_grad_x_t(const Args<T>& a) {
  const int64_t D = a.D;
  for_each_grid_stride(a.N * D, [&](int64_t i) {
    const int64_t n = i / D, j = i % D;
    a.gx[i] = grad_x_from_moments(a.x[i], a.moments[n * 2 * D + j], a.moments[n * 2 * D + D + j]);
  });
}

template <typename T>
void gemm_class_grads_t(Args<T> a) {
  const int64_t K = a.K, D = a.D;
  std::vector<T> gsum(K), hsum(K);
  for_each_grid_stride(K, [&](int64_t k) {  // column_sums_kernel: thread per class
    T gs = T(0), rs = T(0);
    for (int64_t n = 0; n < a.N; ++n) {
      gs += a.g[n * K + k];
      if (a.y != nullptr && a.y[n] == k) rs += a.r[n];
    }
    gsum[k] = gs;
    hsum[k] = gs + rs;
  });
  for_each_grid_stride(K * D, [&](int64_t i) {  // gemm_class_kernel
    const int64_t k = i / D, j = i % D;
    T A1, A2;
    class_sums_from_moments(a.moments[k * 2 * D + j], a.moments[k * 2 * D + D + j], gsum[k], a.mu[i], A1, A2);
    a.gmu[i] = grad_mu_final(A1, a.w[i]);
    a.gs[i] = grad_log_var_final(A2, a.w[i], hsum[k]);
  });
}

// ------------------------------------------------------------------ Backend adapters
void direct_rows(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& lse,
                 Tensor& row_loss) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_direct_rows", [&] {
    auto a = row_args<scalar_t>(in, alpha, lambda, margin_out, logits, lse, row_loss);
    direct_rows_t(a);
  });
}

void gemm_rows(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
               Tensor& lse, Tensor& row_loss) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_gemm_rows", [&] {
    auto a = row_args<scalar_t>(in, alpha, lambda, margin_out, m, lse, row_loss, c);
    gemm_rows_t(a);
  });
}

void coefficients(const Inputs& in, const Tensor& logits, const Tensor& lse, const Tensor& scale,
                  int64_t scale_stride, double scale_mult, const Tensor& grad_logits, double alpha, double lambda,
                  Tensor& g, Tensor& r) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_coefficients", [&] {
    auto a = coefficient_args<scalar_t>(in, logits, lse, scale, scale_stride, scale_mult, grad_logits, alpha,
                                        lambda, g, r);
    coefficients_t(a);
  });
}

void direct_grads(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                  Tensor& grad_s) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_direct_grads", [&] {
    auto a = grad_args<scalar_t>(in, g, r, grad_x, grad_mu, grad_s);
    direct_grads_t(a);
  });
}

void class_tables(const Tensor& s, Tensor& w, Tensor& hl) {
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "emu_class_tables", [&] { tables_t(make_table_args<scalar_t>(s, w, hl)); });
}

void gemm_operands(const Inputs& in, Tensor& op_a, Tensor& op_b, Tensor& c) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_gemm_operands", [&] {
    auto a = operand_args<scalar_t>(in, op_a, op_b, c);
    operands_t(a);
  });
}

void gemm_grad_x(const Inputs& in, const Tensor& t, Tensor& grad_x) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_gemm_grad_x", [&] {
    auto a = grad_args<scalar_t>(in, Tensor(), Tensor(), grad_x, Tensor(), Tensor(), t);
    gemm_grad_x_t(a);
  });
}

void gemm_class_grads(const Inputs& in, const Tensor& s, const Tensor& g, const Tensor& r, Tensor& grad_mu,
                      Tensor& grad_s) {
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "emu_gemm_class_grads", [&] {
    auto a = grad_args<scalar_t>(in, g, r, Tensor(), grad_mu, grad_s, s);
    gemm_class_grads_t(a);
  });
}

bool set_cuda_emulation(bool on) { return g_emulate.exchange(on); }

}  // namespace

bool cuda_emulation_enabled() { return g_emulate.load(std::memory_order_relaxed); }

const Backend& emulated_cuda_backend() {
  static const Backend be{&direct_rows,  &gemm_rows,    &coefficients,  &direct_grads,    &check_labels_aminmax,
                          &class_tables, &gemm_operands, &gemm_grad_x,  &gemm_class_grads};
  return be;
}

void emulated_pgd_step(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                       double lower, double upper) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_pgd_step", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *x0p = x0.data_ptr<T>();
    T* op = out.data_ptr<T>();
    for_each_grid_stride(x.numel(), [&](int64_t i) {
      op[i] = pgd_step_elem(xp[i], gp[i], x0p[i], T(alpha), T(eps), T(lower), T(upper));
    });
  });
}

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  // Test-only: route CPU kernels through the emulation of the CUDA kernels; returns the previous setting.
  m.def("_set_cuda_emulation(bool on) -> bool", &set_cuda_emulation);
}

}  // namespace lgm_ext
