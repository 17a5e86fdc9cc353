// lgm-ext: the plain-old-data argument block every kernel reads (CPU loops,
// CUDA kernels by value, and the CPU emulation of the CUDA kernels).
#pragma once

#include <cstdint>

#include "host.h"

namespace lgm_ext {

template <typename T>
struct Args {
  int64_t N, K, D;
  const T *x, *mu, *w, *hl;
  const int64_t* y;
  T alpha, lambda;
  bool margin_out;
  // forward
  const T* c;  // GEMM path: sum_j mu^2 w
  T *logits, *lse, *loss;
  // backward
  const T *saved_logits, *saved_lse, *scale, *grad_logits;
  int64_t scale_stride;
  T scale_mult;
  const T* moments;       // GEMM path backward: t = g b (N,2D) or s = g^T a (K,2D)
  T *op_a, *op_b, *op_c;  // GEMM operands; class tables (w -> op_b, hl -> op_c)
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
  a.x = in.x.data_ptr<T>(), a.mu = in.mu.data_ptr<T>(), a.w = ptr_or_null<T>(in.w), a.hl = ptr_or_null<T>(in.hl);
  a.y = ptr_or_null<int64_t>(in.labels);
  a.alpha = T(alpha), a.lambda = T(lambda);
  return a;
}

// ---- one builder per backend hook, so every backend fills Args the same way

// direct_rows / gemm_rows: logits (N,K) written (for gemm_rows, read first as m), lse and
// row_loss when defined, c = sum_j mu^2 w on the GEMM path.
template <typename T>
Args<T> row_args(const Inputs& in, double alpha, double lambda, bool margin_out, at::Tensor& logits,
                 at::Tensor& lse, at::Tensor& row_loss, const at::Tensor& c = at::Tensor()) {
  Args<T> a = make_args<T>(in, alpha, lambda);
  a.margin_out = margin_out;
  a.c = ptr_or_null<T>(c);
  a.logits = logits.data_ptr<T>(), a.lse = mut_or_null<T>(lse), a.loss = mut_or_null<T>(row_loss);
  return a;
}

template <typename T>
Args<T> coefficient_args(const Inputs& in, const at::Tensor& logits, const at::Tensor& lse,
                         const at::Tensor& scale, int64_t scale_stride, double scale_mult,
                         const at::Tensor& grad_logits, double alpha, double lambda, at::Tensor& g, at::Tensor& r) {
  Args<T> a = make_args<T>(in, alpha, lambda);
  a.saved_logits = ptr_or_null<T>(logits), a.saved_lse = ptr_or_null<T>(lse);
  a.scale = ptr_or_null<T>(scale), a.grad_logits = ptr_or_null<T>(grad_logits);
  a.scale_stride = scale_stride, a.scale_mult = T(scale_mult);
  a.g = g.data_ptr<T>(), a.r = r.data_ptr<T>();
  return a;
}

// direct_grads, gemm_grad_x, gemm_class_grads: any tensor may be undefined (not used by that hook).
template <typename T>
Args<T> grad_args(const Inputs& in, const at::Tensor& g, const at::Tensor& r, const at::Tensor& grad_x,
                  const at::Tensor& grad_mu, const at::Tensor& grad_s, const at::Tensor& moments = at::Tensor()) {
  Args<T> a = make_args<T>(in, 0.0, 0.0);
  a.g = mut_or_null<T>(g), a.r = mut_or_null<T>(r);
  a.gx = mut_or_null<T>(grad_x), a.gmu = mut_or_null<T>(grad_mu), a.gs = mut_or_null<T>(grad_s);
  a.moments = ptr_or_null<T>(moments);
  return a;
}

template <typename T>
Args<T> operand_args(const Inputs& in, at::Tensor& op_a, at::Tensor& op_b, at::Tensor& c) {
  Args<T> a = make_args<T>(in, 0.0, 0.0);
  a.op_a = op_a.data_ptr<T>(), a.op_b = op_b.data_ptr<T>(), a.op_c = c.data_ptr<T>();
  return a;
}

// Class tables read log_var (K, D) and write w and hl.
template <typename T>
Args<T> make_table_args(const at::Tensor& s, at::Tensor& w, at::Tensor& hl) {
  Args<T> a{};
  a.K = s.size(0), a.D = s.size(1);
  a.mu = s.data_ptr<T>(), a.op_b = w.data_ptr<T>(), a.op_c = hl.data_ptr<T>();
  return a;
}

}  // namespace lgm_ext
