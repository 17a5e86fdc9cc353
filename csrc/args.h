// lgm-ext: the plain-old-data argument structs the kernels read (CPU loops, CUDA kernels by value, and the same
// kernels on the SIMT executor) -- one per kernel family, so a reader sees which kernel reads what -- and one
// builder per backend hook, so every backend fills them the same way.
#pragma once

#include <cstdint>
#include <type_traits>

#include "host.h"
#include "lgm_ext/launch.h"

namespace lgm_ext {

// Pointer policies.  A struct's pointers are PP::ptr<U>; a builder makes each from its tensor with
// PP::make<U>(tensor, name), null for an undefined tensor (name: the field's, for the executor's messages).
// RawPtrs: the tensor's data pointer, for the CPU loops and nvcc's kernels.  The SIMT executor's kernels read
// the same structs through simt::CheckedPtrs (lgm_ext/simt.h): pointers bounded by their own tensor's extent.
// The kernels' launch code builds with KPtrs, which simt.h defines per translation unit (RawPtrs under nvcc).
struct RawPtrs {
  template <typename U>
  using ptr = U*;
  template <typename U>
  static U* make(const at::Tensor& t, const char* /*name*/) {
    return t.defined() ? t.data_ptr<std::remove_const_t<U>>() : nullptr;
  }
};

// ------------------------------------------------------------------ one struct per kernel family
// In<T>: read by the kernel; Out<T>: written (some also read first, as said at the field).

// direct_rows / gemm_rows: direct_rows_kernel, gemm_rows_kernel and the CPU row loops, one row of logits (and
// its statistics) per sample.
template <typename T, typename PP = RawPtrs>
struct RowArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t N, K, D;
  In x, mu;               // features (N, D), means (K, D)
  In log_var;             // (K, D), GEMM path (a non-finite expansion is recomputed from it); null for identity
  In inv_var;             // exp(-log_var) (K, D), direct path only; null for identity
  In half_logdet;         // 0.5 sum_j log_var (K); null for identity
  typename PP::template ptr<const int64_t> labels;  // (N), or null
  T alpha, lambda;
  bool margin_out;        // the labelled column of logits gets its margin logit
  In mu_sq_sum;           // GEMM path: c = sum_j mu^2 w (K); null on the direct path
  Out logits;             // (N, K); on the GEMM path read first as the expansion m
  Out stats, row_loss;    // (N, 2): lse, 1 - P[n,y]; (N); both null when not wanted
};

// coefficients: coefficients_kernel and the CPU coefficient loop -- the backward's coefficients g and r of the
// class tile [k0, k0 + kt).
template <typename T, typename PP = RawPtrs>
struct CoefArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t N, D;
  int64_t k0, kt;
  In x, mu, log_var, half_logdet;  // as in RowArgs: recompute mode turns the expansion into logits
  typename PP::template ptr<const int64_t> labels;
  T alpha, lambda;
  In logits;              // (N, kt), row n at logits + n * ld_logits: free logits, or m when mu_sq_sum != null
  int64_t ld_logits;
  In mu_sq_sum;           // recompute mode: the tile's c = sum_j mu^2 w (kt); null when the logits are saved
  In stats;               // (N, 2) lse, 1 - P[n,y] of the forward: loss mode; null: logits mode
  In scale;               // row n's incoming gradient: scale[n * scale_stride] * scale_mult
  int64_t scale_stride;
  T scale_mult;
  In grad_logits;         // (N, kt), row n at grad_logits + n * ld_grad (optional in loss mode)
  int64_t ld_grad;
  Out coef;               // g (N, kt)
  Out label_coef;         // r (N): written for the rows whose label lies in the tile
};

// direct_grads: grad_x_kernel (rows), class_partial_kernel + class_finalize_kernel (classes) and the CPU loops,
// the direct path's gradients from the coefficients.
template <typename T, typename PP = RawPtrs>
struct DirectGradArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t N, K, D;
  In x, mu;
  In inv_var;             // exp(-log_var) (K, D); null for identity
  typename PP::template ptr<const int64_t> labels;
  In coef, label_coef;    // g (N, K), r (N)
  // CPU loops only: per class sum_n g[n,k] + sum_{n: y_n = k} r[n] (K), the log-det coefficient, which the
  // hook sums before the class loop (the kernels sum it per chunk: class_partial_kernel's ph).
  In logdet_coef_sum;
  Out grad_features, grad_means, grad_log_var;  // (N, D), (K, D), (K, D); each null when not wanted
};

// class_tables: tables_kernel and the CPU table loop.
template <typename T, typename PP = RawPtrs>
struct TableArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t K, D;
  In log_var;             // (K, D)
  Out inv_var;            // exp(-log_var) (K, D); null: not wanted (the GEMM path)
  Out half_logdet;        // 0.5 sum_j log_var (K)
};

// gemm_operands: operands_a_kernel (rows), operands_b_kernel (the tile's classes [k0, k0 + kt)) and the CPU
// loops.
template <typename T, typename PP = RawPtrs>
struct OperandArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t N, D;
  int64_t k0, kt;
  In x, mu, log_var;
  Out operand_a;          // a (N, 2D); null: not wanted
  // b's halves of tile class k at operand_b1 + k * ld_b and operand_b2 + k * ld_b (the halves of one (kt, 2D)
  // matrix, or two (kt, D) blocks, e.g. the tile's rows of the gradients); null: not wanted.
  Out operand_b1, operand_b2;
  int64_t ld_b;
  Out mu_sq_sum;          // c = sum_j mu^2 w of the tile's classes (kt), with b
};

// gemm_grad_x: gemm_grad_x_kernel and the CPU loop.
template <typename T, typename PP = RawPtrs>
struct GemmGradXArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t N, D;
  In x;
  // The two halves of t = g b (N rows): row n of the first at moments1 + n * ld_moments, of the second at
  // moments2 + n * ld_moments (one (N, 2D) matrix, or two (N, D) blocks).
  In moments1, moments2;
  int64_t ld_moments;
  Out grad_features;      // (N, D); may be moments1's storage (each element is read before it is written)
};

// gemm_class_grads: column_sums_kernel, gemm_class_kernel and the CPU loops -- the gradient rows of the class
// tile [k0, k0 + kt).
template <typename T, typename PP = RawPtrs>
struct GemmClassArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t N, D;
  int64_t k0, kt;
  In mu, log_var;
  typename PP::template ptr<const int64_t> labels;
  In coef, label_coef;    // the tile's g (N, kt), r (N)
  // The two halves of s = g^T a (kt rows): row k of the first at moments1 + k * ld_moments, of the second at
  // moments2 + k * ld_moments (one (kt, 2D) matrix, or two (kt, D) blocks, e.g. the tile's rows of the
  // gradients themselves: a row is read before it is written).
  In moments1, moments2;
  int64_t ld_moments;
  // Per tile class (kt), filled by the hook from the column sums: sum_n g[n,k], and the log-det coefficient
  // sum_n g[n,k] + sum_{n: y_n = k0 + k} r[n].
  In coef_sum, logdet_coef_sum;
  Out grad_means, grad_log_var;  // (K, D), rows [k0, k0 + kt) written; either null
};

// pgd_step: pgd_step_kernel, out[i] = pgd_step_elem(x[i], grad[i], x_orig[i]) over n contiguous elements.
template <typename T, typename PP = RawPtrs>
struct PgdStepArgs {
  using In = typename PP::template ptr<const T>;
  using Out = typename PP::template ptr<T>;
  int64_t n;
  In x, grad, x_orig;
  Out out;                // may be x's storage (each element is read before it is written)
  T alpha, eps, lower, upper;
};

// ------------------------------------------------------------------ one builder per backend hook

// A builder's pointers from tensors: read (const elements), written, labels.
template <typename T, typename PP>
struct PtrsFrom {
  static typename PP::template ptr<const T> read(const at::Tensor& t, const char* name) {
    return PP::template make<const T>(t, name);
  }
  static typename PP::template ptr<T> write(const at::Tensor& t, const char* name) {
    return PP::template make<T>(t, name);
  }
  static typename PP::template ptr<const int64_t> labels(const at::Tensor& t) {
    return PP::template make<const int64_t>(t, "labels");
  }
};

// direct_rows / gemm_rows: logits (N,K) written (for gemm_rows, read first as m), stats and row_loss when
// defined, c = sum_j mu^2 w on the GEMM path.
template <typename T, typename PP = RawPtrs>
RowArgs<T, PP> row_args(const Inputs& in, double alpha, double lambda, bool margin_out, at::Tensor& logits,
                        at::Tensor& stats, at::Tensor& row_loss, const at::Tensor& c = at::Tensor()) {
  using P = PtrsFrom<T, PP>;
  RowArgs<T, PP> a{};
  a.N = in.N, a.K = in.K, a.D = in.D;
  a.x = P::read(in.x, "x"), a.mu = P::read(in.mu, "mu"), a.log_var = P::read(in.s, "log_var");
  a.inv_var = P::read(in.w, "inv_var"), a.half_logdet = P::read(in.hl, "half_logdet");
  a.labels = P::labels(in.labels);
  a.alpha = T(alpha), a.lambda = T(lambda);
  a.margin_out = margin_out;
  a.mu_sq_sum = P::read(c, "mu_sq_sum");
  a.logits = P::write(logits, "logits"), a.stats = P::write(stats, "stats"), a.row_loss = P::write(row_loss, "row_loss");
  return a;
}

template <typename T, typename PP = RawPtrs>
CoefArgs<T, PP> coefficient_args(const Inputs& in, const Coef& cf, at::Tensor& g, at::Tensor& r) {
  using P = PtrsFrom<T, PP>;
  CoefArgs<T, PP> a{};
  a.N = in.N, a.D = in.D;
  a.k0 = cf.k0, a.kt = cf.kt;
  a.x = P::read(in.x, "x"), a.mu = P::read(in.mu, "mu"), a.log_var = P::read(in.s, "log_var");
  a.half_logdet = P::read(in.hl, "half_logdet");
  a.labels = P::labels(in.labels);
  a.alpha = T(cf.alpha), a.lambda = T(cf.lambda);
  a.logits = P::read(cf.logits, "logits"), a.ld_logits = cf.logits.defined() ? cf.logits.stride(0) : 0;
  a.mu_sq_sum = P::read(cf.c, "mu_sq_sum");
  a.stats = P::read(cf.stats, "stats");
  a.scale = P::read(cf.scale, "scale"), a.scale_stride = cf.scale_stride, a.scale_mult = T(cf.scale_mult);
  a.grad_logits = P::read(cf.grad_logits, "grad_logits");
  a.ld_grad = cf.grad_logits.defined() ? cf.grad_logits.stride(0) : 0;
  a.coef = P::write(g, "coef"), a.label_coef = P::write(r, "label_coef");
  return a;
}

// direct_grads: any gradient may be undefined (not wanted).
template <typename T, typename PP = RawPtrs>
DirectGradArgs<T, PP> direct_grad_args(const Inputs& in, const at::Tensor& g, const at::Tensor& r,
                                       const at::Tensor& grad_x, const at::Tensor& grad_mu,
                                       const at::Tensor& grad_s) {
  using P = PtrsFrom<T, PP>;
  DirectGradArgs<T, PP> a{};
  a.N = in.N, a.K = in.K, a.D = in.D;
  a.x = P::read(in.x, "x"), a.mu = P::read(in.mu, "mu"), a.inv_var = P::read(in.w, "inv_var");
  a.labels = P::labels(in.labels);
  a.coef = P::read(g, "coef"), a.label_coef = P::read(r, "label_coef");
  a.grad_features = P::write(grad_x, "grad_features");
  a.grad_means = P::write(grad_mu, "grad_means"), a.grad_log_var = P::write(grad_s, "grad_log_var");
  return a;
}

// Class tables read log_var (K, D) and write inv_var (when w is defined) and half_logdet.
template <typename T, typename PP = RawPtrs>
TableArgs<T, PP> table_args(const at::Tensor& s, at::Tensor& w, at::Tensor& hl) {
  using P = PtrsFrom<T, PP>;
  TableArgs<T, PP> a{};
  a.K = s.size(0), a.D = s.size(1);
  a.log_var = P::read(s, "log_var"), a.inv_var = P::write(w, "inv_var"), a.half_logdet = P::write(hl, "half_logdet");
  return a;
}

// A (rows, D) half of a GEMM-path matrix: unit column stride, and the row stride its partner shares.
inline int64_t half_stride(const at::Tensor& h1, const at::Tensor& h2) {
  TORCH_INTERNAL_ASSERT(h1.stride(1) == 1 && h2.stride(1) == 1 && h1.stride(0) == h2.stride(0) &&
                        h1.sizes() == h2.sizes());
  return h1.stride(0);
}

// GEMM operands: a (N,2D) when op_a is defined; b's halves b1, b2 (kt, D) and c of classes [k0, k0 + kt)
// when b1 is defined.
template <typename T, typename PP = RawPtrs>
OperandArgs<T, PP> operand_args(const Inputs& in, const at::Tensor& op_a, int64_t k0, int64_t kt,
                                const at::Tensor& b1, const at::Tensor& b2, const at::Tensor& c) {
  using P = PtrsFrom<T, PP>;
  OperandArgs<T, PP> a{};
  a.N = in.N, a.D = in.D;
  a.k0 = k0, a.kt = kt;
  a.x = P::read(in.x, "x"), a.mu = P::read(in.mu, "mu"), a.log_var = P::read(in.s, "log_var");
  a.operand_a = P::write(op_a, "operand_a"), a.mu_sq_sum = P::write(c, "mu_sq_sum");
  if (b1.defined()) {
    a.operand_b1 = P::write(b1, "operand_b1"), a.operand_b2 = P::write(b2, "operand_b2");
    a.ld_b = half_stride(b1, b2);
  }
  return a;
}

// gemm_grad_x: the halves t1, t2 of t = g b (N rows).
template <typename T, typename PP = RawPtrs>
GemmGradXArgs<T, PP> gemm_grad_x_args(const Inputs& in, const at::Tensor& t1, const at::Tensor& t2,
                                      const at::Tensor& grad_x) {
  using P = PtrsFrom<T, PP>;
  GemmGradXArgs<T, PP> a{};
  a.N = in.N, a.D = in.D;
  a.x = P::read(in.x, "x");
  a.moments1 = P::read(t1, "moments1"), a.moments2 = P::read(t2, "moments2"), a.ld_moments = half_stride(t1, t2);
  a.grad_features = P::write(grad_x, "grad_features");
  return a;
}

// gemm_class_grads, classes [k0, k0 + kt): the halves s1, s2 of the tile's moments; either gradient may be
// undefined.  coef_sum and logdet_coef_sum are the hook's (column sums).
template <typename T, typename PP = RawPtrs>
GemmClassArgs<T, PP> gemm_class_args(const Inputs& in, int64_t k0, int64_t kt, const at::Tensor& s1,
                                     const at::Tensor& s2, const at::Tensor& g, const at::Tensor& r,
                                     const at::Tensor& grad_mu, const at::Tensor& grad_s) {
  using P = PtrsFrom<T, PP>;
  GemmClassArgs<T, PP> a{};
  a.N = in.N, a.D = in.D;
  a.k0 = k0, a.kt = kt;
  a.mu = P::read(in.mu, "mu"), a.log_var = P::read(in.s, "log_var");
  a.labels = P::labels(in.labels);
  a.coef = P::read(g, "coef"), a.label_coef = P::read(r, "label_coef");
  a.moments1 = P::read(s1, "moments1"), a.moments2 = P::read(s2, "moments2"), a.ld_moments = half_stride(s1, s2);
  a.grad_means = P::write(grad_mu, "grad_means"), a.grad_log_var = P::write(grad_s, "grad_log_var");
  return a;
}

// pgd_step over contiguous tensors of one dtype (out may be x).
template <typename T, typename PP = RawPtrs>
PgdStepArgs<T, PP> pgd_step_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& grad,
                                 const at::Tensor& x_orig, double alpha, double eps, double lower, double upper) {
  using P = PtrsFrom<T, PP>;
  PgdStepArgs<T, PP> a{};
  a.n = x.numel();
  a.x = P::read(x, "x"), a.grad = P::read(grad, "grad"), a.x_orig = P::read(x_orig, "x_orig");
  a.out = P::write(out, "out");
  a.alpha = T(alpha), a.eps = T(eps), a.lower = T(lower), a.upper = T(upper);
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
