// lgm-ext: the plain-old-data argument block every kernel reads (CPU loops,
// CUDA kernels by value, and the same kernels on the SIMT executor).
#pragma once

#include <cstdint>

#include "host.h"
#include "lgm_ext/launch.h"

namespace lgm_ext {

// Kernel pointers: raw on the CPU loops and under nvcc; the SIMT executor's kernels read the same Args
// through bounds-checked pointers (lgm_ext/simt.h, ArgsT<T, simt::CheckedPtrs>).
struct RawPtrs {
  template <typename U>
  using ptr = U*;
};

// Every field of Args once, so the executor can convert an Args field by field (LGM_ARGS_FIELDS(S, P):
// S(name) for a value, P(name) for a pointer).
#define LGM_ARGS_FIELDS(S, P)                                                                                        \
  S(N) S(K) S(D) P(x) P(mu) P(s) P(w) P(hl) P(y) S(alpha) S(lambda) S(margin_out) P(c) P(logits) P(stats) P(loss)   \
  S(k0) S(kt) P(saved_logits) P(saved_stats) P(scale) P(grad_logits) S(ld_logits) S(ld_grad) S(scale_stride)       \
  S(scale_mult) P(moments) P(moments2) S(ld_moments) P(op_a) P(op_b) P(op_b2) P(op_c) S(ld_b) P(gsum) P(hsum)       \
  P(g) P(r) P(gx) P(gmu) P(gs)

template <typename T, typename PP = RawPtrs>
struct ArgsT {
  using CP = typename PP::template ptr<const T>;
  using MP = typename PP::template ptr<T>;
  int64_t N, K, D;
  CP x, mu, s, w, hl;  // s: log_var (K,D); w = exp(-s) table (direct path only); null for identity
  typename PP::template ptr<const int64_t> y;
  T alpha, lambda;
  bool margin_out;
  // forward
  CP c;  // GEMM path: sum_j mu^2 w (of the tile, in the backward)
  MP logits, stats, loss;  // stats (N,2): lse, 1 - P[n,y]
  // backward, over the class tile [k0, k0 + kt)
  int64_t k0, kt;
  CP saved_logits, saved_stats, scale, grad_logits;  // saved_logits: free logits, or m when c != null
  int64_t ld_logits, ld_grad;                         // row strides of saved_logits, grad_logits
  int64_t scale_stride;
  T scale_mult;
  // GEMM path backward: the two halves of t = g b (N rows) or s = g^T a (kt rows), row i of the first
  // at moments + i * ld_moments, of the second at moments2 + i * ld_moments (one (rows, 2D) matrix, or
  // two (rows, D) blocks, e.g. the tile's rows of the gradients themselves).
  CP moments, moments2;
  int64_t ld_moments;
  // GEMM operands: a (N,2D); b's halves of class k at op_b + k * ld_b and op_b2 + k * ld_b (as the
  // moments); c.  Class tables: w -> op_b (K,D), hl -> op_c.
  MP op_a, op_b, op_b2, op_c;
  int64_t ld_b;
  CP gsum, hsum;  // per-class sums of g, and of the log-det coefficient
  MP g, r, gx, gmu, gs;
};

template <typename T>
using Args = ArgsT<T, RawPtrs>;

// The SIMT executor (csrc/cpu/simt.cpp) bounds-checks a kernel's accesses against the tensors its Args came
// from: while the CUDA emulation is on, the builders below note each tensor's extent (a no-op otherwise).
bool cuda_emulation_enabled();
void note_kernel_region(const void* p, int64_t bytes);  // simt.cpp
void clear_kernel_regions();

// The tensor's data pointer for a kernel (noted for the executor's bounds checks while it runs).
template <typename T>
T* kernel_ptr(const at::Tensor& t) {
  T* p = t.data_ptr<T>();
  if (cuda_emulation_enabled()) {
    int64_t extent = t.numel() > 0 ? 1 : 0;
    for (int64_t i = 0; i < t.dim() && extent > 0; ++i) extent += (t.size(i) - 1) * t.stride(i);
    note_kernel_region(p, extent * static_cast<int64_t>(sizeof(T)));
  }
  return p;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? kernel_ptr<T>(t) : nullptr;
}

template <typename T>
T* mut_or_null(const at::Tensor& t) {  // (a Tensor handle's const-ness does not cover its data)
  return t.defined() ? kernel_ptr<T>(t) : nullptr;
}

template <typename T>
Args<T> make_args(const Inputs& in, double alpha, double lambda) {
  if (cuda_emulation_enabled()) clear_kernel_regions();  // a new hook call: forget the last one's tensors
  Args<T> a{};
  a.N = in.N, a.K = in.K, a.D = in.D;
  a.x = kernel_ptr<T>(in.x), a.mu = kernel_ptr<T>(in.mu), a.s = ptr_or_null<T>(in.s);
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
  a.logits = kernel_ptr<T>(logits), a.stats = mut_or_null<T>(stats), a.loss = mut_or_null<T>(row_loss);
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
  a.g = kernel_ptr<T>(g), a.r = kernel_ptr<T>(r);
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
    a.moments = kernel_ptr<T>(moments1), a.moments2 = kernel_ptr<T>(moments2);
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
    a.op_b = kernel_ptr<T>(b1), a.op_b2 = kernel_ptr<T>(b2);
    a.ld_b = half_stride(b1, b2);
  }
  return a;
}

// Class tables read log_var (K, D) and write w and hl.
template <typename T>
Args<T> make_table_args(const at::Tensor& s, at::Tensor& w, at::Tensor& hl) {
  if (cuda_emulation_enabled()) clear_kernel_regions();
  Args<T> a{};
  a.K = s.size(0), a.D = s.size(1);
  a.mu = kernel_ptr<T>(s), a.op_b = mut_or_null<T>(w), a.op_c = kernel_ptr<T>(hl);
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
