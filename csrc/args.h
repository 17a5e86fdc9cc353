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
T* mut_or_null(at::Tensor& t) {
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

// Class tables read log_var (K, D) and write w and hl.
template <typename T>
Args<T> make_table_args(const at::Tensor& s, at::Tensor& w, at::Tensor& hl) {
  Args<T> a{};
  a.K = s.size(0), a.D = s.size(1);
  a.mu = s.data_ptr<T>(), a.op_b = w.data_ptr<T>(), a.op_c = hl.data_ptr<T>();
  return a;
}

}  // namespace lgm_ext
