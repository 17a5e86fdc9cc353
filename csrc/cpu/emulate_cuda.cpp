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
#include "../gemm.h"
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

// CUDA refuses a launch whose grid exceeds its limits ("invalid configuration argument"); so does the
// emulation, so a launch that could not run on a GPU fails here too.
void check_grid(int64_t x, int64_t y = 1, int64_t z = 1) {
  TORCH_CHECK(x >= 1 && x <= kMaxGridX && y >= 1 && y <= kMaxGridYZ && z >= 1 && z <= max_grid_z(),
              "emulated CUDA launch: invalid configuration argument (grid ", x, " x ", y, " x ", z, ")");
}

// Row kernels: blocks of kRowsPerBlock warps, one warp per row (or class).
template <typename F>
void for_each_warp_row(int64_t rows, F body) {
  check_grid(ceil_div(rows, kRowsPerBlock));
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
  if (a.stats == nullptr && (y < 0 || !a.margin_out)) return;
  T* out = a.logits + n * a.K;
  const T hl_y = y >= 0 && a.hl != nullptr ? a.hl[y] : T(0);
  Lanes<T> l_y;
  for (int l = 0; l < kWarp; ++l) l_y[l] = labelled_logit(y, d_y[l], hl_y, a.alpha);
  if (a.margin_out && y >= 0) out[y] = l_y[y % kWarp];
  if (a.stats == nullptr) return;
  Lanes<T> m, s;
  for (int l = 0; l < kWarp; ++l) m[l] = row_max_partial(out, a.K, y, l_y[l], l, kWarp);
  m = warp_max(m);
  for (int l = 0; l < kWarp; ++l) s[l] = row_sumexp_others_partial(out, a.K, y, m[l], l, kWarp);
  s = warp_sum(s);
  T lse, q;
  row_stats(m[0], s[0], l_y[0], lse, q);  // lane 0 writes
  a.stats[2 * n] = lse;
  a.stats[2 * n + 1] = q;
  a.loss[n] = row_loss(y, lse, l_y[0], d_y[0], hl_y, a.lambda);
}

template <typename T>
void direct_rows_t(const Args<T>& a) {
  const int64_t K = a.K, D = a.D;
  for_each_warp_row(a.N, [&](int64_t n) {
    const T* xr = a.x + n * D;
    const int64_t y = label_column(a.y, n, a.K);
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

// d[n, kk] on the GEMM path from the expansion entry m (math::dist_gemm).
template <typename T>
T gemm_dist(const Args<T>& a, int64_t n, int64_t kk, T m, T c) {
  return dist_gemm(m, c, a.x + n * a.D, a.mu + kk * a.D, a.s != nullptr ? a.s + kk * a.D : nullptr, a.D);
}

template <typename T>
void gemm_rows_t(const Args<T>& a) {
  const int64_t K = a.K;
  for_each_warp_row(a.N, [&](int64_t n) {
    T* m = a.logits + n * K;
    const int64_t y = label_column(a.y, n, a.K);
    Lanes<T> d_y;
    d_y.fill(y >= 0 ? gemm_dist(a, n, y, m[y], a.c[y]) : T(0));
    for (int l = 0; l < kWarp; ++l)
      for (int64_t k = l; k < K; k += kWarp)
        m[k] = free_logit(gemm_dist(a, n, k, m[k], a.c[k]), a.hl != nullptr ? a.hl[k] : T(0));
    row_finish(a, n, y, d_y);
  });
}

template <typename T>
void coefficients_t(const Args<T>& a) {
  const int64_t kt = a.kt, k0 = a.k0;
  for_each_warp_row(a.N, [&](int64_t n) {
    T* gr = a.g + n * kt;
    const T* glr = a.grad_logits != nullptr ? a.grad_logits + n * a.ld_grad : nullptr;
    const int64_t yl = a.y != nullptr ? a.y[n] - k0 : -1;
    const bool in_tile = yl >= 0 && yl < kt;
    for (int l = 0; l < kWarp; ++l) {
      if (a.saved_stats != nullptr) {
        const T* lr = a.saved_logits + n * a.ld_logits;
        const T lse = a.saved_stats[2 * n], q = a.saved_stats[2 * n + 1];
        const T c = a.scale[n * a.scale_stride] * a.scale_mult;
        for (int64_t k = l; k < kt; k += kWarp) {
          T v;
          if (k == yl) {
            v = coef_g_label(q, a.alpha, a.lambda, c);
          } else {
            const T l0 = a.c != nullptr
                             ? free_logit(gemm_dist(a, n, k0 + k, lr[k], a.c[k]), a.hl != nullptr ? a.hl[k0 + k] : T(0))
                             : lr[k];
            v = coef_g_other(prob(l0, lse), c);
          }
          if (glr != nullptr) v = coef_add_logit_grad(v, glr[k]);
          gr[k] = v;
        }
        if (l == 0 && in_tile) a.r[n] = coef_r(q, a.alpha, c);
      } else {
        for (int64_t k = l; k < kt; k += kWarp) gr[k] = coef_g_logit(glr[k], k == yl, a.alpha);
        if (l == 0 && in_tile) a.r[n] = coef_r_logit(glr[yl], a.alpha);
      }
    }
  });
}

template <typename T>
void direct_grads_t(const Args<T>& a, int64_t by_blocks) {
  const int64_t N = a.N, K = a.K, D = a.D;
  // grad_x_kernel: warp per row, lanes over j.
  if (a.gx != nullptr)
    for_each_warp_row(N, [&](int64_t n) {
      for (int l = 0; l < kWarp; ++l)
        for (int64_t j = l; j < D; j += kWarp)
          a.gx[n * D + j] =
              grad_x_elem(a.g + n * K, a.x[n * D + j], a.mu + j, a.w != nullptr ? a.w + j : nullptr, K, D);
    });
  if (a.gmu == nullptr && a.gs == nullptr) return;
  // class_partial_kernel: grid (K, ceil(D / kClassThreads), chunks), launched in z pieces.
  const int64_t chunks = ceil_div(N, kChunkRows);
  std::vector<T> p1(chunks * K * D), p2(chunks * K * D), ph(chunks * K);
  for_each_z_launch(chunks, [&](int64_t z0, int64_t nz) {
    check_grid(K, by_blocks, nz);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t by = 0; by < by_blocks; ++by)
        for (int64_t bz = 0; bz < nz; ++bz)
          for (int64_t t = 0; t < kClassThreads; ++t) {
            const int64_t chunk = z0 + bz;
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
  });
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
    if (a.gmu != nullptr) a.gmu[i] = grad_mu_final(A1, wj);
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
        if (a.op_b != nullptr) a.op_b[k * D + j] = inv_var(s);
        h[l] += half_logdet_term(s);
      }
    a.op_c[k] = warp_sum(h)[0];
  });
}

template <typename T>
void operands_t(const Args<T>& a) {
  const int64_t D = a.D;
  if (a.op_a != nullptr)  // operands_a_kernel
    for_each_grid_stride(a.N * D, [&](int64_t i) {
      const int64_t n = i / D, j = i % D;
      operand_a(a.x[i], a.op_a[n * 2 * D + j], a.op_a[n * 2 * D + D + j]);
    });
  if (a.op_b != nullptr)  // operands_b_kernel: warp per tile class
    for_each_warp_row(a.kt, [&](int64_t k) {
      const int64_t kk = a.k0 + k;
      Lanes<T> c{};
      for (int l = 0; l < kWarp; ++l)
        for (int64_t j = l; j < D; j += kWarp)
          operand_b(a.mu[kk * D + j], inv_var(a.s[kk * D + j]), a.op_b[k * a.ld_b + j], a.op_b2[k * a.ld_b + j],
                    c[l]);
      a.op_c[k] = warp_sum(c)[0];
    });
}

template <typename T>
void gemm_grad_x_t(const Args<T>& a) {
  const int64_t D = a.D;
  for_each_grid_stride(a.N * D, [&](int64_t i) {
    const int64_t n = i / D, j = i % D;
    a.gx[i] = grad_x_from_moments(a.x[i], a.moments[n * a.ld_moments + j], a.moments2[n * a.ld_moments + j]);
  });
}

template <typename T>
void gemm_class_grads_t(Args<T> a) {
  const int64_t kt = a.kt, k0 = a.k0, D = a.D;
  std::vector<T> gsum(kt), hsum(kt);
  for_each_grid_stride(kt, [&](int64_t k) {  // column_sums_kernel: thread per tile class
    double gs = 0.0, rs = 0.0;
    for (int64_t n = 0; n < a.N; ++n) {
      gs += static_cast<double>(a.g[n * kt + k]);
      if (a.y != nullptr && a.y[n] == k0 + k) rs += static_cast<double>(a.r[n]);
    }
    gsum[k] = static_cast<T>(gs);
    hsum[k] = static_cast<T>(gs + rs);
  });
  for_each_grid_stride(kt * D, [&](int64_t i) {  // gemm_class_kernel
    const int64_t k = i / D, j = i % D, o = k0 * D + i;
    T A1, A2;
    class_sums_from_moments(a.moments[k * a.ld_moments + j], a.moments2[k * a.ld_moments + j], gsum[k], a.mu[o], A1, A2);
    const T wj = inv_var(a.s[o]);
    if (a.gmu != nullptr) a.gmu[o] = grad_mu_final(A1, wj);
    if (a.gs != nullptr) a.gs[o] = grad_log_var_final(A2, wj, hsum[k]);
  });
}

// ------------------------------------------------------------------ Backend adapters
template <typename scalar_t>
void direct_rows(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& stats,
                 Tensor& row_loss) {
  direct_rows_t(row_args<scalar_t>(in, alpha, lambda, margin_out, logits, stats, row_loss));
}

template <typename scalar_t>
void gemm_rows(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
               Tensor& stats, Tensor& row_loss) {
  gemm_rows_t(row_args<scalar_t>(in, alpha, lambda, margin_out, m, stats, row_loss, c));
}

template <typename scalar_t>
void coefficients(const Inputs& in, const Coef& cf, Tensor& g, Tensor& r) {
  coefficients_t(coefficient_args<scalar_t>(in, cf, g, r));
}

template <typename scalar_t>
void direct_grads(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                  Tensor& grad_s) {
  auto a = grad_args<scalar_t>(in, g, r, grad_x, grad_mu, grad_s);
  direct_grads_t(a, a.gmu != nullptr || a.gs != nullptr ? class_blocks_y(in) : 0);
}

template <typename scalar_t>
void class_tables(const Tensor& s, Tensor& w, Tensor& hl) {
  tables_t(make_table_args<scalar_t>(s, w, hl));
}

template <typename scalar_t>
void gemm_operands(const Inputs& in, Tensor& op_a, int64_t k0, int64_t kt, Tensor& b1, Tensor& b2, Tensor& c) {
  operands_t(operand_args<scalar_t>(in, op_a, k0, kt, b1, b2, c));
}

template <typename scalar_t>
void gemm_grad_x(const Inputs& in, const Tensor& t1, const Tensor& t2, Tensor& grad_x) {
  gemm_grad_x_t(grad_args<scalar_t>(in, Tensor(), Tensor(), grad_x, Tensor(), Tensor(), t1, t2));
}

template <typename scalar_t>
void gemm_class_grads(const Inputs& in, int64_t k0, int64_t kt, const Tensor& s1, const Tensor& s2,
                      const Tensor& g, const Tensor& r, Tensor& grad_mu, Tensor& grad_s) {
  gemm_class_grads_t(grad_args<scalar_t>(in, g, r, Tensor(), grad_mu, grad_s, s1, s2, k0, kt));
}

bool set_cuda_emulation(bool on) { return g_emulate.exchange(on); }

std::atomic<int64_t> g_max_grid_z{kMaxGridYZ};

}  // namespace

// launch.h: the z extent of one launch, for the CUDA kernels and their emulation.
int64_t launch::max_grid_z() { return g_max_grid_z.load(std::memory_order_relaxed); }
int64_t launch::set_max_grid_z(int64_t z) {
  TORCH_CHECK_VALUE(z >= 1 && z <= kMaxGridYZ, "max_grid_z must be in [1, ", kMaxGridYZ, "], got ", z);
  return g_max_grid_z.exchange(z);
}

bool cuda_emulation_enabled() { return g_emulate.load(std::memory_order_relaxed); }

namespace {
template <typename T>
const Backend& emulated_for() {
  static const Backend be{&direct_rows<T>, &gemm_rows<T>, &coefficients<T>, &direct_grads<T>, &check_labels_aminmax,
                          &class_tables<T>, &gemm_operands<T>, &gemm_grad_x<T>, &gemm_class_grads<T>,
                          &mm16_widened};
  return be;
}
}  // namespace

const Backend& emulated_cuda_backend(at::ScalarType acc) {
  return acc == at::kDouble ? emulated_for<double>() : emulated_for<float>();
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
  // Test-only: the z extent one launch may use (launch.h max_grid_z; CUDA's limit 65,535 by default), for the
  // emulated and the real CUDA kernels; returns the previous value.
  m.def("_set_max_grid_z(int z) -> int", [](int64_t z) { return set_max_grid_z(z); });
  // Test-only: how many 16-bit (tensor-core) GEMMs the GEMM path has run (gemm.h), on any backend.
  m.def("_mm16_calls() -> int", []() { return mm16_calls(); });
  // Test/benchmark hook: the GEMM path's tensor-core mode on or off (gemm.h; off by default); returns the
  // previous setting.
  m.def("_set_tensor_core_gemms(bool on) -> bool", [](bool on) { return set_tensor_core_gemms(on); });
}

}  // namespace lgm_ext
