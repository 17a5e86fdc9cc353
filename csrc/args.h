// lgm-ext: the plain-old-data argument block every kernel reads (CPU loops,
// CUDA kernels by value, and the CPU emulation of the CUDA kernels).
#pragma once

#include <cstdint>

#include "host.h"
#include "lgm_ext/launch.h"

namespace lgm_ext {

template <typename T>
struct Args {
  int64_t N, K, D;
  const T *x, *mu, *s, *w, *hl;  // s: log_var (K,D); w = exp(-s) table (direct path only); null for identity
  const int64_t* y;
  T alpha, lambda;
  bool margin_out;
  // forward
  const T* c;  // GEMM path: sum_j mu^2 w (of the tile, in the backward)
  T *logits, *stats, *loss;  // stats (N,2): lse, 1 - P[n,y]
  // backward, over the class tile [k0, k0 + kt)
  int64_t k0, kt;
  const T *saved_logits, *saved_stats, *scale, *grad_logits;  // saved_logits: free logits, or m when c != null
  int64_t ld_logits, ld_grad;                                  // row strides of saved_logits, grad_logits
  int64_t scale_stride;
  T scale_mult;
  // GEMM path backward: the two halves of t = g b (N rows) or s = g^T a (kt rows), row i of the first
  // at moments + i * ld_moments, of the second at moments2 + i * ld_moments (one (rows, 2D) matrix, or
  // two (rows, D) blocks, e.g. the tile's rows of the gradients themselves).
  const T *moments, *moments2;
  int64_t ld_moments;
  // GEMM operands: a (N,2D); b's halves of class k at op_b + k * ld_b and op_b2 + k * ld_b (as the
  // moments); c.  Class tables: w -> op_b (K,D), hl -> op_c.
  T *op_a, *op_b, *op_b2, *op_c;
  int64_t ld_b;
  const T *gsum, *hsum;   // per-class sums of g, and of the log-det coefficient
  T *g, *r, *gx, *gmu, *gs;
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_or_null(const at::Tensor& t) {  // (a Tensor handle's const-ness does not cover its data)
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
Args<T> make_args(const Inputs& in, double alpha, double lambda) {
  Args<T> a{};
  a.N = in.N, a.K = in.K, a.D = in.D;
  a.x = in.x.data_ptr<T>(), a.mu = in.mu.data_ptr<T>(), a.s = ptr_or_null<T>(in.s);
  a.w = ptr_or_null<T>(in.w), a.hl = ptr_or_null<T>(in.hl);
  a.y = ptr_or_null<int64_t>(in.labels);
  a.alpha = T(alpha), a.lambda = T(lambda);
  a.kt = in.K;
  return a;
}

// ---- one builder per backend hook, so every backend fills Args the same way

// direct_rows / gemm_rows: logits (N,K) written (for gemm_rows, read first as m), stats and
// row_loss when defined, c = sum_j mu^2 w on the GEMM path.
template <typename T>
Args<T> row_args(const Inputs& in, double alpha, double lambda, bool margin_out, at::Tensor& logits,
                 at::Tensor& stats, at::Tensor& row_loss, const at::Tensor& c = at::Tensor()) {
  Args<T> a = make_args<T>(in, alpha, lambda);
  a.margin_out = margin_out;
  a.c = ptr_or_null<T>(c);
  a.logits = logits.data_ptr<T>(), a.stats = mut_or_null<T>(stats), a.loss = mut_or_null<T>(row_loss);
  return a;
}

template <typename T>
Args<T> coefficient_args(const Inputs& in, const Coef& cf, at::Tensor& g, at::Tensor& r) {
  Args<T> a = make_args<T>(in, cf.alpha, cf.lambda);
  a.k0 = cf.k0, a.kt = cf.kt;
  a.saved_logits = ptr_or_null<T>(cf.logits), a.ld_logits = cf.logits.defined() ? cf.logits.stride(0) : 0;
  a.c = ptr_or_null<T>(cf.c);
  a.saved_stats = ptr_or_null<T>(cf.stats);
  a.scale = ptr_or_null<T>(cf.scale), a.scale_stride = cf.scale_stride, a.scale_mult = T(cf.scale_mult);
  a.grad_logits = ptr_or_null<T>(cf.grad_logits), a.ld_grad = cf.grad_logits.defined() ? cf.grad_logits.stride(0) : 0;
  a.g = g.data_ptr<T>(), a.r = r.data_ptr<T>();
  return a;
}

// direct_grads, gemm_grad_x, gemm_class_grads (classes [k0, k0 + kt)): any tensor may be undefined
// (not used by that hook, or not wanted).
// A (rows, D) half of a GEMM-path matrix: unit column stride, and the row stride its partner shares.
inline int64_t half_stride(const at::Tensor& h1, const at::Tensor& h2) {
  TORCH_INTERNAL_ASSERT(h1.stride(1) == 1 && h2.stride(1) == 1 && h1.stride(0) == h2.stride(0) &&
                        h1.sizes() == h2.sizes());
  return h1.stride(0);
}

template <typename T>
Args<T> grad_args(const Inputs& in, const at::Tensor& g, const at::Tensor& r, const at::Tensor& grad_x,
                  const at::Tensor& grad_mu, const at::Tensor& grad_s, const at::Tensor& moments1 = at::Tensor(),
                  const at::Tensor& moments2 = at::Tensor(), int64_t k0 = 0, int64_t kt = -1) {
  Args<T> a = make_args<T>(in, 0.0, 0.0);
  a.k0 = k0, a.kt = kt < 0 ? in.K : kt;
  a.g = mut_or_null<T>(g), a.r = mut_or_null<T>(r);
  a.gx = mut_or_null<T>(grad_x), a.gmu = mut_or_null<T>(grad_mu), a.gs = mut_or_null<T>(grad_s);
  if (moments1.defined()) {
    a.moments = moments1.data_ptr<T>(), a.moments2 = moments2.data_ptr<T>();
    a.ld_moments = half_stride(moments1, moments2);
  }
  return a;
}

// GEMM operands: a (N,2D) when op_a is defined; b's halves b1, b2 (kt, D) and c of classes [k0, k0 + kt)
// when b1 is defined.
template <typename T>
Args<T> operand_args(const Inputs& in, const at::Tensor& op_a, int64_t k0, int64_t kt, const at::Tensor& b1,
                     const at::Tensor& b2, const at::Tensor& c) {
  Args<T> a = make_args<T>(in, 0.0, 0.0);
  a.k0 = k0, a.kt = kt;
  a.op_a = mut_or_null<T>(op_a), a.op_c = mut_or_null<T>(c);
  if (b1.defined()) {
    a.op_b = b1.data_ptr<T>(), a.op_b2 = b2.data_ptr<T>();
    a.ld_b = half_stride(b1, b2);
  }
  return a;
}

// Class tables read log_var (K, D) and write w and hl.
template <typename T>
Args<T> make_table_args(const at::Tensor& s, at::Tensor& w, at::Tensor& hl) {
  Args<T> a{};
  a.K = s.size(0), a.D = s.size(1);
  a.mu = s.data_ptr<T>(), a.op_b = mut_or_null<T>(w), a.op_c = hl.data_ptr<T>();
  return a;
}

// The direct backward's class kernel (class_partial_kernel) spans D with grid.y = ceil(D / kClassThreads)
// blocks, at most 65,535: D up to 8,388,480.  Larger D only reaches the direct path through impl=direct
// (auto takes it for K * D <= kDirectMaxKD), so it is refused with a pointer to the GEMM path.
inline int64_t class_blocks_y(const Inputs& in) {
  const int64_t by = launch::ceil_div(in.D, launch::kClassThreads);
  TORCH_CHECK_VALUE(by <= launch::kMaxGridYZ, "lgm_ext: D = ", in.D, " is too large for the direct path's gradient "
                    "kernel (at most ", launch::kMaxGridYZ * launch::kClassThreads, "); use impl='gemm'");
  return by;
}

}  // namespace lgm_ext
