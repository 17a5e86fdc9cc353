// lgm-ext: the per-element and per-row math of every operator, written once.
//
// Everything here is a __host__ __device__ inline function: the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda; on the CPU, the SIMT executor
// runs them: csrc/cpu/simt.cpp) all call these, so a formula
// exists in exactly one place.  Only loops, launches and reductions live in the
// backends.  Notation follows docs/SPEC.md section 1:
//   d[n,k] = 0.5 * sum_j (x[n,j] - mu[k,j])^2 * w[k,j],   w = exp(-log_var)
//   hl[k]  = 0.5 * sum_j log_var[k,j]                      (half log-determinant)
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>
#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LGM_HD __host__ __device__ __forceinline__
#define LGM_SIMD_SUM(var)
#define LGM_SIMD
#elif defined(LGM_EXT_SIMT)
// The SIMT executor's build of the CUDA kernels (lgm_ext._simt): each lane's sums in source order, as nvcc
// keeps them (no reassociating `omp simd reduction`).
#define LGM_HD inline
#define LGM_SIMD_SUM(var)
#define LGM_SIMD
#else
#define LGM_HD inline
#define LGM_PRAGMA_(x) _Pragma(#x)
// Lets the host compiler vectorise a float reduction (needs -fopenmp or -fopenmp-simd).
#define LGM_SIMD_SUM(var) LGM_PRAGMA_(omp simd reduction(+ : var))
#define LGM_SIMD LGM_PRAGMA_(omp simd)
#endif

namespace lgm_ext {
namespace math {

// The element type behind a pointer argument.  The functions below that read arrays take any pointer-like
// type: raw pointers (CPU loops, nvcc), or the SIMT executor's bounds-checked pointers (lgm_ext/simt.h),
// which name their element type.
template <typename P, typename = void>
struct ptr_elem {
  using type = std::remove_cv_t<std::remove_pointer_t<P>>;
};
template <typename P>
struct ptr_elem<P, std::void_t<typename P::element_type>> {
  using type = std::remove_cv_t<typename P::element_type>;
};
template <typename P>
using elem_t = typename ptr_elem<P>::type;

#if !defined(__CUDA_ARCH__)
// Branch-free float exp for host loops, so `omp simd` loops that call it
// vectorise (libm's expf is a scalar call).  Range reduction x = n ln2 + r,
// |r| <= ln2/2, then a degree-6 minimax polynomial for e^r (Cephes
// coefficients); max error ~2 ulp over the normal range.  Full range, never
// clamped: 2^n is applied as 2^n1 * 2^n2 (each a normal float) so results
// below FLT_MIN round once into denormals (or 0 below ~-103.9), results above
// FLT_MAX overflow to +inf, and NaN stays NaN -- exactly like expf.
inline float fast_expf(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);  // exp(-104) rounds to 0, exp(89) to inf
  // round(x log2 e) without std::floor (which blocks vectorisation): adding
  // and subtracting 1.5 * 2^23 rounds to the nearest integer (|x log2 e| < 2^22).
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);  // in [-150, 129]
  const int32_t n1 = ni >> 1, n2 = ni - n1;     // each in [-75, 65]: 2^n1, 2^n2 are normal
  const float v = p * __builtin_bit_cast(float, (n1 + 127) << 23) * __builtin_bit_cast(float, (n2 + 127) << 23);
  return x != x ? x : v;
}
#endif

template <typename T>
LGM_HD T exp_(T v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

#if !defined(__CUDA_ARCH__) && !defined(LGM_EXT_SIMT)
// The CPU loops' float exp; the executor's build of the CUDA kernels keeps the C library's (CUDA's expf is a
// different ~2-ulp function again: docs/CUDA.md "What is bitwise").
template <>
inline float exp_<float>(float v) {
  return fast_expf(v);
}
#endif

template <typename T>
LGM_HD T log_(T v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return std::log(v);
#endif
}

template <typename T>
LGM_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(z) for z <= 0, returning exactly 0 where the result would be a denormal:
// probabilities below the normal range are flushed here so no hot loop ever
// carries a denormal (they slow x86 arithmetic by ~10x).
template <typename T>
LGM_HD T min_log_normal();
template <>
LGM_HD float min_log_normal<float>() {
  return -87.0f;  // exp(-87) = 1.6e-38 > FLT_MIN = 1.18e-38
}
template <>
LGM_HD double min_log_normal<double>() {
  return -708.0;  // exp(-708) = 3.3e-308 > DBL_MIN = 2.2e-308
}

template <typename T>
LGM_HD T safe_exp(T z) {
  const T e = exp_(z);
  return z < min_log_normal<T>() ? T(0) : e;
}

// v, or 0 if |v| is below the normal range (a product of small factors).
template <typename T>
LGM_HD T flush_denormal(T v) {
  const T tiny = std::numeric_limits<T>::min();
  return (v < tiny && v > -tiny) ? T(0) : v;
}

// True for finite v (false for +-inf and NaN), without libm (vectorisable).
template <typename T>
LGM_HD bool is_finite(T v) {
  const T z = v - v;  // 0 for finite v, NaN otherwise
  return z == z;
}

// ---------------------------------------------------------------- class tables
// w = exp(-log_var) (inverse variance); hl = sum_j half_logdet_term(log_var_j).
// exp is full range (never clamped): for float32, |log_var| <= 87 keeps w a
// normal number (full precision); beyond it w is a denormal / 0 (log_var >
// 87.3) or +inf (log_var < -88.7), exactly as the SPEC formula evaluated in
// plain float32 PyTorch -- distances then lose precision, or become inf (NaN
// where x == mu exactly).  See README "Numerics".
template <typename T>
LGM_HD T inv_var(T s) {
  return exp_(-s);
}

template <typename T>
LGM_HD T half_logdet_term(T s) {
  return T(0.5) * s;
}

// ---------------------------------------------------------------- GEMM operands
// One pair of operands serves the forward and the backward GEMMs:
//   A[n] = [-2 x | x^2] (N, 2D),  B[k] = [mu w | w] (K, 2D),  c[k] = sum_j mu^2 w
//   forward   m = A B^T            = sum_j x^2 w - 2 x mu w
//   backward  T = g B   (N, 2D)    = [sum_k g mu w | sum_k g w]
//             S = g^T A (K, 2D)    = [-2 sum_n g x | sum_n g x^2]
// (scaling by -2 is exact in binary floating point).
template <typename T>
LGM_HD void operand_a(T x, T& a1, T& a2) {
  a1 = T(-2) * x;
  a2 = x * x;
}

template <typename T>
LGM_HD void operand_b(T mu, T w, T& b1, T& b2, T& c) {
  b1 = mu * w;
  b2 = w;
  c += mu * b1;
}

// dL/dx[n,j] from T: x * (sum_k g w) - sum_k g mu w.
template <typename T>
LGM_HD T grad_x_from_moments(T x, T t1, T t2) {
  return x * t2 - t1;
}

// Per-class sample sums from S: a1 = sum_n g (x - mu), a2 = sum_n g (x - mu)^2.
template <typename T>
LGM_HD void class_sums_from_moments(T sa, T sb, T gsum, T mu, T& a1, T& a2) {
  const T s1 = T(-0.5) * sa;  // sum_n g x
  a1 = s1 - mu * gsum;
  a2 = sb - T(2) * mu * s1 + mu * mu * gsum;
}

// ---------------------------------------------------------------- distances
// Partial sum over j = start, start+stride, ... < D of (x_j - mu_j)^2 * w_j
// (w == nullptr: identity covariance).  A CPU row calls it with (0, 1); a CUDA
// lane with (lane, 32), and the lanes' partials are summed by a butterfly.
// One feature's contribution to the squared distance: (x - mu)^2 w.
template <typename T>
LGM_HD T sqdist_term(T x, T mu, T w) {
  const T t = x - mu;
  return t * t * w;
}

template <typename PX, typename PM, typename PW, typename T = elem_t<PX>>
LGM_HD T sqdist_partial(PX x, PM mu, PW w, int64_t D, int64_t start, int64_t stride) {
  T acc = T(0);
  if (w != nullptr) {
    LGM_SIMD_SUM(acc)
    for (int64_t j = start; j < D; j += stride) acc += sqdist_term(x[j], mu[j], w[j]);
  } else {
    LGM_SIMD_SUM(acc)
    for (int64_t j = start; j < D; j += stride) acc += sqdist_term(x[j], mu[j], T(1));
  }
  return acc;
}

// d from the full squared-distance sum.
template <typename T>
LGM_HD T dist_from_sqdist(T sq) {
  return T(0.5) * sq;
}

// d from the GEMM expansion: m = sum_j x^2 w - 2 x mu w (one GEMM), c = sum_j mu^2 w.
// The expansion cancels when x ~ mu, so it is clamped at 0 (NaN stays NaN).
template <typename T>
LGM_HD T dist_from_expansion(T m, T c) {
  const T d = T(0.5) * (m + c);
  return d < T(0) ? T(0) : d;
}

// Partial squared distance with w computed from log_var s on the fly (s ==
// nullptr: identity), same terms as sqdist_partial over a class table.
template <typename PX, typename PM, typename PS, typename T = elem_t<PX>>
LGM_HD T sqdist_partial_logvar(PX x, PM mu, PS s, int64_t D, int64_t start, int64_t stride) {
  T acc = T(0);
  for (int64_t j = start; j < D; j += stride) acc += sqdist_term(x[j], mu[j], s != nullptr ? inv_var(s[j]) : T(1));
  return acc;
}

// d[n,k] on the GEMM path.  Where the expansion is not finite (an inf/NaN
// operand, or overflow of x^2 w or mu^2 w) it says nothing about d -- inf - inf
// is NaN even when the direct sum is +inf -- so that entry is recomputed by the
// direct formula (serially over j; rare), which gives what plain PyTorch gives.
template <typename T, typename PX, typename PM, typename PS>
LGM_HD T dist_gemm(T m, T c, PX x, PM mu, PS s, int64_t D) {
  if (is_finite(m + c)) return dist_from_expansion(m, c);
  return dist_from_sqdist(sqdist_partial_logvar(x, mu, s, D, 0, 1));
}

// ---------------------------------------------------------------- labels
// Row n's labelled column among this call's K classes, or -1 when it has none:
// no labels at all, or -- the class-sharded loss (class_offset, docs/SPEC.md
// section 7) -- a shifted label outside [0, K), i.e. a class another shard owns.
// Such a row still gets lse over this shard's free logits and 1 - P = 1.
template <typename PY>
LGM_HD int64_t label_column(PY y, int64_t n, int64_t K) {
  if (y == nullptr) return -1;
  const int64_t v = y[n];
  return (v >= 0 && v < K) ? v : -1;
}

// ---------------------------------------------------------------- logits
// Margin-free logit: the log-likelihood up to the constant -0.5 D log(2 pi).
template <typename T>
LGM_HD T free_logit(T d, T hl) {
  return -d - hl;
}

// The labelled class's logit carries the margin: -(1 + alpha) d - hl.
template <typename T>
LGM_HD T margin_logit(T d, T hl, T alpha) {
  return -(T(1) + alpha) * d - hl;
}

// ---------------------------------------------------------------- logsumexp
// Two passes over a row of logits l[0..K) whose labelled entry y is replaced
// by l_y (the margin logit; y < 0: none).  Partial over k = start, start+stride,
// ...: a CPU row runs (0, 1), a CUDA lane (lane, 32) followed by a warp max /
// sum.  The sum leaves out the labelled entry: with e_y = exp(l_y - m),
//   lse = m + log(others + e_y),   1 - P[n,y] = others / (others + e_y),
// so 1 - P[n,y] is exact to rounding even when the labelled class dominates
// (rebuilding it as 1 - exp(l_y - lse) would carry the rounding of lse).
template <typename PL, typename T>
LGM_HD T row_max_partial(PL l, int64_t K, int64_t y, T l_y, int64_t start, int64_t stride) {
  T m = neg_inf<T>();
  for (int64_t k = start; k < K; k += stride) {
    const T v = k == y ? l_y : l[k];
    m = v > m ? v : m;
  }
  return m;
}

// sum over k != y of exp(l_k - m).
template <typename PL, typename T>
LGM_HD T row_sumexp_others_partial(PL l, int64_t K, int64_t y, T m, int64_t start, int64_t stride) {
  T acc = T(0);
  LGM_SIMD_SUM(acc)
  for (int64_t k = start; k < K; k += stride) acc += k == y ? T(0) : safe_exp(l[k] - m);
  return acc;
}

// Row statistics from the max m, the others' sum and the labelled logit:
// lse and q = 1 - P[n,y] (what the backward needs per row).
template <typename T>
LGM_HD void row_stats(T m, T others, T l_y, T& lse, T& q) {
  const T total = others + safe_exp(l_y - m);
  lse = m + log_(total);
  q = others / total;
}

// The labelled logit entering the row statistics: the margin logit, or -inf
// for a row without a labelled column here (its e_y term is then 0).
template <typename T>
LGM_HD T labelled_logit(int64_t y, T d_y, T hl_y, T alpha) {
  return y >= 0 ? margin_logit(d_y, hl_y, alpha) : neg_inf<T>();
}

// ---------------------------------------------------------------- loss
// L[n] = lse - logit_y + lambda * (d_y + hl_y); 0 for a row whose label is on another shard (y < 0).
template <typename T>
LGM_HD T row_loss(int64_t y, T lse, T logit_y, T d_y, T hl_y, T lambda) {
  return y >= 0 ? lse - logit_y + lambda * (d_y + hl_y) : T(0);
}

// ---------------------------------------------------------------- backward
// Probability of a logit under the row's logsumexp (denormal-free).
template <typename T>
LGM_HD T prob(T logit, T lse) {
  return safe_exp(logit - lse);
}

// g[n,k] = dL[n]/dd[n,k], scaled by c (incoming gradient, 1/N for "mean");
// q = 1 - P[n,y] from the forward's row statistics.
template <typename T>
LGM_HD T coef_g_label(T q, T alpha, T lambda, T c) {
  return c * ((T(1) + alpha) * q + lambda);
}

template <typename T>
LGM_HD T coef_g_other(T p_k, T c) {
  return flush_denormal(-c * p_k);
}

// The log-det coefficient h equals g except in the labelled column, where
// h_y - g_y = -alpha (1 - p_y): r carries that difference, scaled by c.
template <typename T>
LGM_HD T coef_r(T q, T alpha, T c) {
  return -c * alpha * q;
}

// A gradient reaching the margin-free logits adds to both coefficients:
// d l0 / d d = -1 and d l0 / d hl = -1, so g -= gl and h -= gl (r unchanged).
template <typename T>
LGM_HD T coef_add_logit_grad(T g, T gl) {
  return g - gl;
}

// Coefficients when the gradient reaches only the logits (lgm_logits): the
// labelled column with margin has dl/dd = -(1 + alpha) and dl/dhl = -1.
template <typename T>
LGM_HD T coef_g_logit(T gl, bool is_label_with_margin, T alpha) {
  return is_label_with_margin ? -(T(1) + alpha) * gl : -gl;
}

template <typename T>
LGM_HD T coef_r_logit(T gl_y, T alpha) {
  return alpha * gl_y;
}

// One class's contribution to dL/dx[n,j]: g * w * (x - mu).
template <typename T>
LGM_HD T grad_x_term(T g, T w, T x, T mu) {
  return g * w * (x - mu);
}

// dL/dx[n,j] for one j: sum over k of grad_x_term (CUDA lane / emulator order).
template <typename PG, typename T, typename PM, typename PW>
LGM_HD T grad_x_elem(PG g_row, T x_j, PM mu_col, PW w_col, int64_t K, int64_t ld) {
  T acc = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T g = g_row[k];
    acc += grad_x_term(g, w_col != nullptr ? w_col[k * ld] : T(1), x_j, mu_col[k * ld]);
  }
  return acc;
}

// out[j] += grad_x_term(g, w[j], x[j], mu[j]) for one class over a row (CPU order).
template <typename T>
LGM_HD void grad_x_axpy(T* out, T g, const T* x, const T* mu, const T* w, int64_t D) {
  if (w != nullptr) {
    LGM_SIMD
    for (int64_t j = 0; j < D; ++j) out[j] += grad_x_term(g, w[j], x[j], mu[j]);
  } else {
    LGM_SIMD
    for (int64_t j = 0; j < D; ++j) out[j] += grad_x_term(g, T(1), x[j], mu[j]);
  }
}

// Per-class sums over samples: a1 += g (x - mu), a2 += g (x - mu)^2.
template <typename T>
LGM_HD void class_accum(T& a1, T& a2, T g, T x, T mu) {
  const T t = x - mu;
  a1 += g * t;
  a2 += g * t * t;
}

// dL/dmu[k,j] = -w a1 ;  dL/dlog_var[k,j] = -0.5 w a2 + 0.5 hsum[k]
template <typename T>
LGM_HD T grad_mu_final(T a1, T w) {
  return -w * a1;
}

template <typename T>
LGM_HD T grad_log_var_final(T a2, T w, T hsum) {
  return T(-0.5) * w * a2 + T(0.5) * hsum;
}

// ---------------------------------------------------------------- PGD step
// sign with sign(0) = 0 (and sign(NaN) = 0, as torch.sign).
template <typename T>
LGM_HD T sign0(T g) {
  return T((g > T(0)) - (g < T(0)));
}

// max / min that return NaN when either operand is NaN (as torch.maximum / minimum).
template <typename T>
LGM_HD T max_nan(T v, T b) {
  return (v < b || b != b) ? b : v;
}

template <typename T>
LGM_HD T min_nan(T v, T b) {
  return (v > b || b != b) ? b : v;
}

// clip_[lo,hi]( clip_[x0-eps, x0+eps]( x + alpha sign(g) ) ); a NaN in x or x0
// gives NaN, as the formula in torch ops (lo, hi are validated numbers).
template <typename T>
LGM_HD T pgd_step_elem(T x, T g, T x0, T alpha, T eps, T lo, T hi) {
  T v = x + alpha * sign0(g);
  v = min_nan(max_nan(v, x0 - eps), x0 + eps);
  v = v < lo ? lo : (v > hi ? hi : v);
  return v;
}

}  // namespace math
}  // namespace lgm_ext
