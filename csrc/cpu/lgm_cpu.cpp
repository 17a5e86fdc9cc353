// lgm-ext CPU backend: the row and class loops around include/lgm_ext/math.h,
// parallel over rows (or classes) with at::parallel_for.  Each loop body is a
// block function cloned per ISA (cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../args.h"
#include "../host.h"
#include "cpu_kernels.h"
#include "lgm_ext/math.h"

namespace lgm_ext {
namespace {

using namespace lgm_ext::math;
using cpu::grain;

// One row of logits from its distances (the GEMM path; block_rows below does the
// same for the direct path, kRows rows at a time).  dist(k) returns d[n,k] (and may read the row before it is overwritten, so
// d_y is taken first).  The row is written (free logits, or margin logits when
// margin_out), then lse and 1 - P[n,y] over the margin logits in two passes.
template <typename T, typename Dist>
LGM_ALWAYS_INLINE void row_pass(const RowArgs<T>& a, int64_t n, Dist dist) {
  const int64_t K = a.K;
  const int64_t y = label_column(a.labels, n, K);
  T* out = a.logits + n * K;
  const T d_y = y >= 0 ? dist(y) : T(0);
  dist.fill(out);
  if (a.stats == nullptr && (y < 0 || !a.margin_out)) return;
  const T hl_y = y >= 0 && a.half_logdet != nullptr ? a.half_logdet[y] : T(0);
  const T l_y = labelled_logit(y, d_y, hl_y, a.alpha);
  if (a.margin_out && y >= 0) out[y] = l_y;
  if (a.stats == nullptr) return;
  const T m = row_max_partial(out, K, y, l_y, 0, 1);
  T lse, q;
  row_stats(m, row_sumexp_others_partial(out, K, y, m, 0, 1), l_y, lse, q);
  a.stats[2 * n] = lse;
  a.stats[2 * n + 1] = q;
  a.row_loss[n] = row_loss(y, lse, l_y, d_y, hl_y, a.lambda);
}

// The direct loops vectorise over kRows rows at a time: the block's features are
// transposed into a small buffer (xt[j * kRows + r] = x[n0 + r, j]), so one
// vector lane carries one row through the sum over j -- no horizontal sum per
// distance, no tail in D -- while the class tables are read once per block.
constexpr int kRows = 8;

// Rows [n0, n0 + rows) of x (D columns) transposed into xt (D x kRows); lanes
// past `rows` repeat the last row (finite values, never stored).
template <typename T>
LGM_ALWAYS_INLINE void transpose_rows(const T* x, int64_t D, int64_t n0, int64_t rows, T* xt) {
  for (int r = 0; r < kRows; ++r) {
    const T* xr = x + (n0 + std::min<int64_t>(r, rows - 1)) * D;
    for (int64_t j = 0; j < D; ++j) xt[j * kRows + r] = xr[j];
  }
}

// Features summed per partial of a distance: the sum over j runs in order per
// lane, in chunks whose partials are then added (the rounding of a long row stays
// that of a short one).
constexpr int64_t kSumChunk = 64;

// sq[c][r] = sum_j (x[n0 + r, j] - mu[k + c, j])^2 w[k + c, j] for C classes
// (W false: identity covariance).  Plain arrays with an `omp simd` lane loop: the
// compiler keeps them in registers and broadcasts the table entries from memory.
template <typename T, int C, bool W>
LGM_ALWAYS_INLINE void block_sqdist(const RowArgs<T>& a, const T* xt, int64_t k, T (&sq)[C][kRows]) {
  const int64_t D = a.D;
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < kRows; ++r) sq[c][r] = T(0);
  for (int64_t j0 = 0; j0 < D; j0 += kSumChunk) {
    const int64_t j1 = std::min(D, j0 + kSumChunk);
    T acc[C][kRows] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const T* xj = xt + j * kRows;
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const int64_t o = (k + c) * D + j;
        const T m = a.mu[o], w = W ? a.inv_var[o] : T(1);
        LGM_SIMD
        for (int r = 0; r < kRows; ++r) acc[c][r] += sqdist_term(xj[r], m, w);
      }
    }
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < kRows; ++r) sq[c][r] += acc[c][r];
  }
}

// Distances d[n0 + r, k .. k + C) of a row block into dt[k][r] (dt: K x kRows).
template <typename T, int C>
LGM_ALWAYS_INLINE void block_dists(const RowArgs<T>& a, const T* xt, int64_t k, T* dt) {
  T sq[C][kRows];
  if (a.inv_var != nullptr)
    block_sqdist<T, C, true>(a, xt, k, sq);
  else
    block_sqdist<T, C, false>(a, xt, k, sq);
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < kRows; ++r) dt[(k + c) * kRows + r] = dist_from_sqdist(sq[c][r]);
}

// What row_pass does for one row, for the kRows rows of a block at once (one
// lane per row) from their distances dt (K x kRows), which become the free logits:
// the logits rows (margin in the labelled column when margin_out), and when stats
// are wanted lse, 1 - P[n,y] and the row loss.
template <typename T>
LGM_ALWAYS_INLINE void block_rows(const RowArgs<T>& a, int64_t n0, int64_t rows, T* dt) {
  const int64_t K = a.K;
  int64_t y[kRows];
  T d_y[kRows], hl_y[kRows], l_y[kRows], m[kRows], others[kRows];
  for (int r = 0; r < kRows; ++r) {
    y[r] = r < rows ? label_column(a.labels, n0 + r, K) : -1;
    d_y[r] = y[r] >= 0 ? dt[y[r] * kRows + r] : T(0);
    hl_y[r] = y[r] >= 0 && a.half_logdet != nullptr ? a.half_logdet[y[r]] : T(0);
    l_y[r] = labelled_logit(y[r], d_y[r], hl_y[r], a.alpha);
    m[r] = neg_inf<T>();
    others[r] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    T* lk = dt + k * kRows;
    const T hl = a.half_logdet != nullptr ? a.half_logdet[k] : T(0);
    LGM_SIMD
    for (int r = 0; r < kRows; ++r) {
      lk[r] = free_logit(lk[r], hl);
      const T v = k == y[r] ? l_y[r] : lk[r];  // row_max_partial's terms
      m[r] = v > m[r] ? v : m[r];
    }
  }
  if (a.stats != nullptr) {
    for (int64_t k = 0; k < K; ++k) {
      const T* lk = dt + k * kRows;
      LGM_SIMD
      for (int r = 0; r < kRows; ++r) others[r] += k == y[r] ? T(0) : safe_exp(lk[r] - m[r]);  // row_sumexp_others
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      T lse, q;
      row_stats(m[r], others[r], l_y[r], lse, q);
      a.stats[2 * n] = lse;
      a.stats[2 * n + 1] = q;
      a.row_loss[n] = row_loss(y[r], lse, l_y[r], d_y[r], hl_y[r], a.lambda);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* out = a.logits + (n0 + r) * K;
    for (int64_t k = 0; k < K; ++k) out[k] = dt[k * kRows + r];
    if (a.margin_out && y[r] >= 0) out[y[r]] = l_y[r];
  }
}

// Free logits of columns [0, kt) of a tile from the expansion row m (may alias
// out): a vectorised pass, then the rare non-finite entries again by the direct
// formula (math::dist_gemm).  Classes are k0 + k; A: RowArgs or CoefArgs.
template <typename T, typename A>
LGM_ALWAYS_INLINE void logits_from_expansion(const A& a, int64_t n, const T* m, const T* c, int64_t k0,
                                             int64_t kt, T* out) {
  const T* hl = a.half_logdet != nullptr ? a.half_logdet + k0 : nullptr;
  const T* xr = a.x + n * a.D;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  int64_t bad = 0;
  LGM_SIMD_SUM(bad)
  for (int64_t k = 0; k < kt; ++k) {
    const T mk = m[k];
    const bool ok = is_finite(mk + c[k]);
    bad += ok ? 0 : 1;
    out[k] = ok ? free_logit(dist_from_expansion(mk, c[k]), hl != nullptr ? hl[k] : T(0)) : nan;  // NaN: redo below
  }
  if (bad == 0) return;
  for (int64_t k = 0; k < kt; ++k) {
    if (out[k] == out[k]) continue;
    const int64_t kk = k0 + k;
    const T d = dist_from_sqdist(sqdist_partial_logvar(
        xr, a.mu + kk * a.D, a.log_var != nullptr ? a.log_var + kk * a.D : nullptr, a.D, int64_t(0), int64_t(1)));
    out[k] = free_logit(d, hl != nullptr ? hl[k] : T(0));
  }
}

template <typename T>
struct GemmRow {
  const RowArgs<T>& a;
  int64_t n;
  T* mr;
  T operator()(int64_t k) const {
    return dist_gemm(mr[k], a.mu_sq_sum[k], a.x + n * a.D, a.mu + k * a.D,
                     a.log_var != nullptr ? a.log_var + k * a.D : nullptr, a.D);
  }
  void fill(T* out) const { logits_from_expansion(a, n, mr, a.mu_sq_sum, 0, a.K, out); }
};

// Rows [b, e) (b a multiple of kRows): distances by row blocks, then the blocks' logits and statistics.
template <typename T>
LGM_ALWAYS_INLINE void direct_rows_block_t(const RowArgs<T>& a, int64_t b, int64_t e) {
  std::vector<T> xt(a.D * kRows), dt(a.K * kRows);
  for (int64_t n0 = b; n0 < e; n0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, e - n0);
    transpose_rows(a.x, a.D, n0, rows, xt.data());
    int64_t k = 0;
    for (; k + 4 <= a.K; k += 4) block_dists<T, 4>(a, xt.data(), k, dt.data());
    for (; k + 2 <= a.K; k += 2) block_dists<T, 2>(a, xt.data(), k, dt.data());
    for (; k < a.K; ++k) block_dists<T, 1>(a, xt.data(), k, dt.data());
    block_rows(a, n0, rows, dt.data());
  }
}

template <typename T>
LGM_ALWAYS_INLINE void gemm_rows_block_t(const RowArgs<T>& a, int64_t b, int64_t e) {
  for (int64_t n = b; n < e; ++n) row_pass(a, n, GemmRow<T>{a, n, a.logits + n * a.K});
}

// Coefficients of the class tile [k0, k0 + kt): g (N, kt), r[n] where y_n is in the tile.
template <typename T>
LGM_ALWAYS_INLINE void coefficients_block_t(const CoefArgs<T>& a, int64_t b, int64_t e) {
  const int64_t kt = a.kt, k0 = a.k0;
  for (int64_t n = b; n < e; ++n) {
    T* gr = a.coef + n * kt;
    const T* glr = a.grad_logits != nullptr ? a.grad_logits + n * a.ld_grad : nullptr;
    const int64_t yl = a.labels != nullptr ? a.labels[n] - k0 : -1;  // label's column in the tile
    const bool in_tile = yl >= 0 && yl < kt;
    if (a.stats != nullptr) {  // loss mode
      const T* lr = a.logits + n * a.ld_logits;
      const T lse = a.stats[2 * n], q = a.stats[2 * n + 1];
      const T c = a.scale[n * a.scale_stride] * a.scale_mult;
      if (a.mu_sq_sum != nullptr) {  // recompute: lr holds the tile's expansion m
        logits_from_expansion(a, n, lr, a.mu_sq_sum, k0, kt, gr);
        LGM_SIMD
        for (int64_t k = 0; k < kt; ++k) gr[k] = coef_g_other(prob(gr[k], lse), c);
      } else {
        LGM_SIMD
        for (int64_t k = 0; k < kt; ++k) gr[k] = coef_g_other(prob(lr[k], lse), c);
      }
      if (in_tile) {
        gr[yl] = coef_g_label(q, a.alpha, a.lambda, c);
        a.label_coef[n] = coef_r(q, a.alpha, c);
      }
      if (glr != nullptr) {
        LGM_SIMD
        for (int64_t k = 0; k < kt; ++k) gr[k] = coef_add_logit_grad(gr[k], glr[k]);
      }
    } else {  // logits mode
      for (int64_t k = 0; k < kt; ++k) gr[k] = coef_g_logit(glr[k], k == yl, a.alpha);
      if (in_tile) a.label_coef[n] = coef_r_logit(glr[yl], a.alpha);
    }
  }
}

// Column blocks of the backward loops: CB columns of running sums in registers
// (plain arrays with an `omp simd` loop over them) while the loop walks the
// classes (dL/dx) or the rows (class sums).  Blocks of 4 vectors, then 1, then a
// half vector, then single columns.
template <typename T>
constexpr int kVecLanes = 32 / int(sizeof(T));

// dL/dx[n, j0 .. j0 + CB): sum over classes k, in order per column, of g w (x - mu).
template <typename T, int CB, bool W>
LGM_ALWAYS_INLINE void grad_x_columns(const DirectGradArgs<T>& a, int64_t n, int64_t j0) {
  const int64_t K = a.K, D = a.D;
  const T* xr = a.x + n * D + j0;
  const T* gr = a.coef + n * K;
  T acc[CB] = {}, xv[CB];
  for (int j = 0; j < CB; ++j) xv[j] = xr[j];
  for (int64_t k = 0; k < K; ++k) {
    const T g = gr[k];
    const T* mk = a.mu + k * D + j0;
    const T* wk = W ? a.inv_var + k * D + j0 : nullptr;
    LGM_SIMD
    for (int j = 0; j < CB; ++j) acc[j] += grad_x_term(g, W ? wk[j] : T(1), xv[j], mk[j]);
  }
  T* out = a.grad_features + n * D + j0;
  for (int j = 0; j < CB; ++j) out[j] = acc[j];
}

template <typename T, bool W>
LGM_ALWAYS_INLINE void grad_x_rows(const DirectGradArgs<T>& a, int64_t b, int64_t e) {
  constexpr int L = kVecLanes<T>;
  const int64_t D = a.D;
  for (int64_t n = b; n < e; ++n) {
    int64_t j0 = 0;
    for (; j0 + 4 * L <= D; j0 += 4 * L) grad_x_columns<T, 4 * L, W>(a, n, j0);
    for (; j0 + L <= D; j0 += L) grad_x_columns<T, L, W>(a, n, j0);
    for (; j0 + L / 2 <= D; j0 += L / 2) grad_x_columns<T, L / 2, W>(a, n, j0);
    for (; j0 < D; ++j0) grad_x_columns<T, 1, W>(a, n, j0);
  }
}

template <typename T>
LGM_ALWAYS_INLINE void grad_x_block_t(const DirectGradArgs<T>& a, int64_t b, int64_t e) {
  if (a.inv_var != nullptr)
    grad_x_rows<T, true>(a, b, e);
  else
    grad_x_rows<T, false>(a, b, e);
}

// Per-class sums of the coefficients of a tile (kt columns, classes k0 + k),
// one row-major pass over g (a column walk would miss the cache on every
// element): gsum[k] = sum_n g[n,k] (when gsum is given) and
// hsum[k] = sum_n g[n,k] + sum_{n: y_n = k0 + k} r[n], the log-det coefficient.
// (The sums are accumulated in double: gsum is multiplied by mu and subtracted
// from the GEMM's sum_n g x, so its rounding would not cancel.)
// A: DirectGradArgs (the tile is all K classes) or GemmClassArgs.
template <typename T, typename A>
void coefficient_column_sums(const A& a, int64_t k0, int64_t kt, T* gsum, T* hsum) {
  std::vector<double> acc(kt, 0.0);
  for (int64_t n = 0; n < a.N; ++n) {
    const T* gr = a.coef + n * kt;
    LGM_SIMD
    for (int64_t k = 0; k < kt; ++k) acc[k] += static_cast<double>(gr[k]);
  }
  if (gsum != nullptr)
    for (int64_t k = 0; k < kt; ++k) gsum[k] = static_cast<T>(acc[k]);
  if (a.labels != nullptr)
    for (int64_t n = 0; n < a.N; ++n) {
      const int64_t yl = a.labels[n] - k0;
      if (yl >= 0 && yl < kt) acc[yl] += static_cast<double>(a.label_coef[n]);
    }
  for (int64_t k = 0; k < kt; ++k) hsum[k] = static_cast<T>(acc[k]);
}

// Class k's gradients from its sample sums A1, A2 (w[j] = w_of(j)); A: DirectGradArgs or GemmClassArgs.
template <typename T, typename A, typename W>
LGM_ALWAYS_INLINE void class_final(const A& a, int64_t k, const T* A1, const T* A2, T hsum, W w_of) {
  const int64_t D = a.D;
  for (int64_t j = 0; j < D; ++j) {
    const T wj = w_of(j);
    if (a.grad_means != nullptr) a.grad_means[k * D + j] = grad_mu_final(A1[j], wj);
    if (a.grad_log_var != nullptr) a.grad_log_var[k * D + j] = grad_log_var_final(A2[j], wj, hsum);
  }
}

// Class k's sample sums A1, A2 over columns [j0, j0 + CB): sums over n in order per column.
template <typename T, int CB>
LGM_ALWAYS_INLINE void class_columns(const DirectGradArgs<T>& a, int64_t k, int64_t j0, T* A1, T* A2) {
  const int64_t K = a.K, D = a.D;
  T s1[CB] = {}, s2[CB] = {}, m[CB];
  for (int j = 0; j < CB; ++j) m[j] = a.mu[k * D + j0 + j];
  for (int64_t n = 0; n < a.N; ++n) {
    const T g = a.coef[n * K + k];
    const T* xr = a.x + n * D + j0;
    LGM_SIMD
    for (int j = 0; j < CB; ++j) class_accum(s1[j], s2[j], g, xr[j], m[j]);
  }
  for (int j = 0; j < CB; ++j) A1[j0 + j] = s1[j], A2[j0 + j] = s2[j];
}

template <typename T>
LGM_ALWAYS_INLINE void class_block_t(const DirectGradArgs<T>& a, int64_t b, int64_t e) {
  constexpr int L = kVecLanes<T>;
  const int64_t D = a.D;
  std::vector<T> a1v(D), a2v(D);
  T* A1 = a1v.data();
  T* A2 = a2v.data();
  for (int64_t k = b; k < e; ++k) {
    int64_t j0 = 0;
    for (; j0 + 4 * L <= D; j0 += 4 * L) class_columns<T, 4 * L>(a, k, j0, A1, A2);
    for (; j0 + L <= D; j0 += L) class_columns<T, L>(a, k, j0, A1, A2);
    for (; j0 + L / 2 <= D; j0 += L / 2) class_columns<T, L / 2>(a, k, j0, A1, A2);
    for (; j0 < D; ++j0) class_columns<T, 1>(a, k, j0, A1, A2);
    class_final(a, k, A1, A2, a.logdet_coef_sum[k],
                [&](int64_t j) { return a.inv_var != nullptr ? a.inv_var[k * D + j] : T(1); });
  }
}

template <typename T>
LGM_ALWAYS_INLINE void tables_block_t(const TableArgs<T>& a, int64_t b, int64_t e) {
  const int64_t D = a.D;
  for (int64_t k = b; k < e; ++k) {
    const T* sk = a.log_var + k * D;
    T* wk = a.inv_var != nullptr ? a.inv_var + k * D : nullptr;
    T h = T(0);
    if (wk != nullptr) {
      LGM_SIMD
      for (int64_t j = 0; j < D; ++j) wk[j] = inv_var(sk[j]);
    }
    LGM_SIMD_SUM(h)
    for (int64_t j = 0; j < D; ++j) h += half_logdet_term(sk[j]);
    a.half_logdet[k] = h;
  }
}

template <typename T>
LGM_ALWAYS_INLINE void operands_a_block_t(const OperandArgs<T>& a, int64_t b, int64_t e) {
  const int64_t D = a.D;
  for (int64_t n = b; n < e; ++n) {
    const T* xr = a.x + n * D;
    T* ar = a.operand_a + n * 2 * D;
    LGM_SIMD
    for (int64_t j = 0; j < D; ++j) operand_a(xr[j], ar[j], ar[D + j]);
  }
}

// Operand b and c of the tile's classes k0 + k, k in [b, e); w = exp(-log_var) computed here.
template <typename T>
LGM_ALWAYS_INLINE void operands_b_block_t(const OperandArgs<T>& a, int64_t b, int64_t e) {
  const int64_t D = a.D;
  for (int64_t k = b; k < e; ++k) {
    const T *muk = a.mu + (a.k0 + k) * D, *sk = a.log_var + (a.k0 + k) * D;
    T *b1 = a.operand_b1 + k * a.ld_b, *b2 = a.operand_b2 + k * a.ld_b;
    T c = T(0);
    LGM_SIMD_SUM(c)
    for (int64_t j = 0; j < D; ++j) operand_b(muk[j], inv_var(sk[j]), b1[j], b2[j], c);
    a.mu_sq_sum[k] = c;
  }
}

template <typename T>
LGM_ALWAYS_INLINE void gemm_grad_x_block_t(const GemmGradXArgs<T>& a, int64_t b, int64_t e) {
  const int64_t D = a.D;
  for (int64_t n = b; n < e; ++n) {
    const T *xr = a.x + n * D, *t1 = a.moments1 + n * a.ld_moments, *t2 = a.moments2 + n * a.ld_moments;
    T* out = a.grad_features + n * D;
    LGM_SIMD
    for (int64_t j = 0; j < D; ++j) out[j] = grad_x_from_moments(xr[j], t1[j], t2[j]);
  }
}

// Gradient rows of the tile's classes k0 + k, k in [b, e), from its moments' halves (a row is read whole
// before the same row of the gradients is written: the moments may live there).
template <typename T>
LGM_ALWAYS_INLINE void gemm_class_block_t(const GemmClassArgs<T>& a, int64_t b, int64_t e) {
  const int64_t D = a.D;
  std::vector<T> a1v(D), a2v(D);
  T* A1 = a1v.data();
  T* A2 = a2v.data();
  for (int64_t k = b; k < e; ++k) {
    const int64_t kk = a.k0 + k;
    const T *s1 = a.moments1 + k * a.ld_moments, *s2 = a.moments2 + k * a.ld_moments;
    const T *muk = a.mu + kk * D, *sk = a.log_var + kk * D;
    const T gsum = a.coef_sum[k];
    LGM_SIMD
    for (int64_t j = 0; j < D; ++j) class_sums_from_moments(s1[j], s2[j], gsum, muk[j], A1[j], A2[j]);
    class_final(a, kk, A1, A2, a.logdet_coef_sum[k], [&](int64_t j) { return inv_var(sk[j]); });
  }
}

// Per-ISA clones of each block (over its family's argument struct), for both dtypes.
#define LGM_CPU_BLOCK(name, ArgStruct)                                                                  \
  LGM_CPU_CLONES void name(const ArgStruct<float>& a, int64_t b, int64_t e) { name##_t<float>(a, b, e); } \
  LGM_CPU_CLONES void name(const ArgStruct<double>& a, int64_t b, int64_t e) { name##_t<double>(a, b, e); }
LGM_CPU_BLOCK(direct_rows_block, RowArgs)
LGM_CPU_BLOCK(gemm_rows_block, RowArgs)
LGM_CPU_BLOCK(coefficients_block, CoefArgs)
LGM_CPU_BLOCK(grad_x_block, DirectGradArgs)
LGM_CPU_BLOCK(class_block, DirectGradArgs)
LGM_CPU_BLOCK(tables_block, TableArgs)
LGM_CPU_BLOCK(operands_a_block, OperandArgs)
LGM_CPU_BLOCK(operands_b_block, OperandArgs)
LGM_CPU_BLOCK(gemm_grad_x_block, GemmGradXArgs)
LGM_CPU_BLOCK(gemm_class_block, GemmClassArgs)
#undef LGM_CPU_BLOCK

template <typename scalar_t>
void direct_rows(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& stats,
                 Tensor& row_loss) {
  auto a = row_args<scalar_t>(in, alpha, lambda, margin_out, logits, stats, row_loss);
  const int64_t blocks = (in.N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, grain(kRows * in.K * in.D),
                   [&](int64_t b, int64_t e) { direct_rows_block(a, b * kRows, std::min(e * kRows, in.N)); });
}

template <typename scalar_t>
void gemm_rows(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
               Tensor& stats, Tensor& row_loss) {
  auto a = row_args<scalar_t>(in, alpha, lambda, margin_out, m, stats, row_loss, c);
  at::parallel_for(0, in.N, grain(8 * in.K), [&](int64_t b, int64_t e) { gemm_rows_block(a, b, e); });
}

template <typename scalar_t>
void coefficients(const Inputs& in, const Coef& cf, Tensor& g, Tensor& r) {
  auto a = coefficient_args<scalar_t>(in, cf, g, r);
  at::parallel_for(0, in.N, grain(8 * cf.kt), [&](int64_t b, int64_t e) { coefficients_block(a, b, e); });
}

template <typename scalar_t>
void direct_grads(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                  Tensor& grad_s) {
  auto a = direct_grad_args<scalar_t>(in, g, r, grad_x, grad_mu, grad_s);
  // dL/dx: rows in parallel.  dL/dmu, dL/dlog_var: classes in parallel.
  if (a.grad_features != nullptr)
    at::parallel_for(0, in.N, grain(in.K * in.D), [&](int64_t b, int64_t e) { grad_x_block(a, b, e); });
  if (a.grad_means != nullptr || a.grad_log_var != nullptr) {
    std::vector<scalar_t> hsum(in.K);
    coefficient_column_sums(a, 0, in.K, static_cast<scalar_t*>(nullptr), hsum.data());
    a.logdet_coef_sum = hsum.data();
    at::parallel_for(0, in.K, grain(in.N * in.D), [&](int64_t b, int64_t e) { class_block(a, b, e); });
  }
}

template <typename scalar_t>
void class_tables(const Tensor& s, Tensor& w, Tensor& hl) {
  auto a = table_args<scalar_t>(s, w, hl);
  at::parallel_for(0, a.K, grain(8 * a.D), [&](int64_t b, int64_t e) { tables_block(a, b, e); });
}

template <typename scalar_t>
void gemm_operands(const Inputs& in, Tensor& op_a, int64_t k0, int64_t kt, Tensor& b1, Tensor& b2, Tensor& c) {
  auto a = operand_args<scalar_t>(in, op_a, k0, kt, b1, b2, c);
  if (a.operand_a != nullptr)
    at::parallel_for(0, in.N, grain(2 * in.D), [&](int64_t b, int64_t e) { operands_a_block(a, b, e); });
  if (a.operand_b1 != nullptr)
    at::parallel_for(0, kt, grain(16 * in.D), [&](int64_t b, int64_t e) { operands_b_block(a, b, e); });
}

template <typename scalar_t>
void gemm_grad_x(const Inputs& in, const Tensor& t1, const Tensor& t2, Tensor& grad_x) {
  auto a = gemm_grad_x_args<scalar_t>(in, t1, t2, grad_x);
  at::parallel_for(0, in.N, grain(2 * in.D), [&](int64_t b, int64_t e) { gemm_grad_x_block(a, b, e); });
}

template <typename scalar_t>
void gemm_class_grads(const Inputs& in, int64_t k0, int64_t kt, const Tensor& s1, const Tensor& s2,
                      const Tensor& g, const Tensor& r, Tensor& grad_mu, Tensor& grad_s) {
  auto a = gemm_class_args<scalar_t>(in, k0, kt, s1, s2, g, r, grad_mu, grad_s);
  std::vector<scalar_t> gsum(kt), hsum(kt);
  coefficient_column_sums(a, k0, kt, gsum.data(), hsum.data());
  a.coef_sum = gsum.data(), a.logdet_coef_sum = hsum.data();
  at::parallel_for(0, kt, grain(16 * in.D), [&](int64_t b, int64_t e) { gemm_class_block(a, b, e); });
}

void check_labels_cpu(const Inputs& in) {
  const int64_t* y = in.labels.data_ptr<int64_t>();
  int64_t lo = y[0], hi = y[0];
  for (int64_t n = 1; n < in.N; ++n) {
    lo = std::min(lo, y[n]);
    hi = std::max(hi, y[n]);
  }
  check_label_range(lo, hi, in.K);
}

template <typename T>
const Backend& cpu_loops_for() {
  static const Backend be{&direct_rows<T>, &gemm_rows<T>, &coefficients<T>, &direct_grads<T>, &check_labels_cpu,
                          &class_tables<T>, &gemm_operands<T>, &gemm_grad_x<T>, &gemm_class_grads<T>,
                          nullptr};
  return be;
}

// The CPU backend's one dtype dispatch: the loops of the accumulation type.  (The `cuda-emulated` tests
// replace these registrations while they run: csrc/simt/emulate_cuda.cpp, in the separate lgm_ext._simt.)
const Backend& cpu_backend(at::ScalarType acc) {
  return acc == at::kDouble ? cpu_loops_for<double>() : cpu_loops_for<float>();
}

}  // namespace

TORCH_LIBRARY_IMPL(lgm_ext, CPU, m) { register_lgm_ops<&cpu_backend>(m); }

}  // namespace lgm_ext
