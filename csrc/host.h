// lgm-ext host layer shared by every backend: input validation, the choice
// between the direct and the GEMM path, and the GEMM orchestration (ATen ops,
// device-agnostic).  A backend supplies only its row/class kernels through
// `Backend`; the per-element math they run is in include/lgm_ext/math.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lgm_ext {

using at::Tensor;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };
enum Impl : int64_t { kAuto = 0, kDirect = 1, kGemm = 2 };

// K*D at or below which the direct fused loop beats GEMM + epilogue (measured
// on the CPU in benchmarks/bench_lgm.py; see README).
constexpr int64_t kDirectMaxKD = 8192;

// Inputs after validation: contiguous, labels as int64 (undefined if absent),
// w = exp(-log_var) and hl = 0.5 * sum(log_var) (undefined for identity).
// (Backend is declared below; prepare() takes it for its label and table passes.)
struct Inputs {
  Tensor x, mu, s, w, hl, labels;
  int64_t N = 0, K = 0, D = 0;
  bool identity() const { return !s.defined(); }
};

struct Backend;
// check_range: verify labels lie in [0, K) (forward ops; backward trusts its forward).
Inputs prepare(const Backend& be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
               const std::optional<Tensor>& labels, bool labels_required, bool check_range, const char* op);
void check_scalars(double alpha, double lambda, int64_t reduction, int64_t impl);
bool use_gemm(int64_t impl, int64_t K, int64_t D);

// What a backend implements.  All tensors are contiguous and on the backend's device.
struct Backend {
  // Direct path, one fused pass per row: logits (N,K) always -- margin-free,
  // or with the margin in the labelled column when `margin_out` -- and lse (N)
  // and per-row loss (N) when defined (loss mode needs labels).
  void (*direct_rows)(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& lse,
                      Tensor& row_loss);
  // GEMM path epilogue: m (N,K) holds sum_j x^2 w - 2 x mu w; c (K) sum_j mu^2 w.
  // Turns m into logits in place (as direct_rows); fills lse and row_loss when defined.
  void (*gemm_rows)(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
                    Tensor& lse, Tensor& row_loss);
  // Backward row pass: gradient coefficients g (N,K) and the label-column
  // log-det correction r (N).  Loss mode (lse defined): from the saved
  // margin-free logits and lse, scale (N) the incoming gradient per row,
  // grad_logits (N,K) optional.  Logits mode (lse undefined): grad_logits is the
  // gradient of lgm_logits' output (margin in the labelled column if labels).
  // scale[n * scale_stride] * scale_mult is row n's incoming gradient (stride 0: a scalar).
  void (*coefficients)(const Inputs& in, const Tensor& logits, const Tensor& lse, const Tensor& scale,
                       int64_t scale_stride, double scale_mult, const Tensor& grad_logits, double alpha,
                       double lambda, Tensor& g, Tensor& r);
  // Direct path gradients from the coefficients (any output may be skipped by
  // passing an undefined tensor).
  void (*direct_grads)(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                       Tensor& grad_s);
  // Validates labels in [0, K) (calls check_label_range with the min and max).
  void (*check_labels)(const Inputs& in);
  // w = exp(-s) (K,D) and hl = 0.5 sum_j s (K), one pass.
  void (*class_tables)(const Tensor& s, Tensor& w, Tensor& hl);
  // GEMM path (diagonal covariance): operands a (N,2D), b (K,2D), c (K) -- see math.h.
  void (*gemm_operands)(const Inputs& in, Tensor& a, Tensor& b, Tensor& c);
  // grad_x from t = g b (N,2D).
  void (*gemm_grad_x)(const Inputs& in, const Tensor& t, Tensor& grad_x);
  // grad_mu, grad_s from s = g^T a (K,2D), the coefficients g and r.
  void (*gemm_class_grads)(const Inputs& in, const Tensor& s, const Tensor& g, const Tensor& r, Tensor& grad_mu,
                           Tensor& grad_s);
};

void check_label_range(int64_t lo, int64_t hi, int64_t K);
// check_labels for device backends: one aminmax and a host sync (the price of a clear
// error instead of a device-side assert).
void check_labels_aminmax(const Inputs& in);

// Operator bodies, shared by all backends.
std::tuple<Tensor, Tensor, Tensor> loss_forward(const Backend& be, const Tensor& x, const Tensor& mu,
                                                const std::optional<Tensor>& log_var, const Tensor& labels,
                                                double alpha, double lambda, int64_t reduction, int64_t impl);
std::tuple<Tensor, Tensor, Tensor> loss_backward(const Backend& be, const Tensor& grad_loss,
                                                 const std::optional<Tensor>& grad_logits, const Tensor& x,
                                                 const Tensor& mu, const std::optional<Tensor>& log_var,
                                                 const Tensor& labels, const Tensor& logits, const Tensor& lse,
                                                 double alpha, double lambda, int64_t reduction, int64_t impl);
Tensor logits_forward(const Backend& be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
                      const std::optional<Tensor>& labels, double alpha, int64_t impl);
std::tuple<Tensor, Tensor, Tensor> logits_backward(const Backend& be, const Tensor& grad, const Tensor& x,
                                                   const Tensor& mu, const std::optional<Tensor>& log_var,
                                                   const std::optional<Tensor>& labels, double alpha, int64_t impl);
std::tuple<Tensor, Tensor> log_likelihood(const Backend& be, const Tensor& x, const Tensor& mu,
                                          const std::optional<Tensor>& log_var, int64_t impl);

// Registers the five L-GM operators of one backend (inside TORCH_LIBRARY_IMPL).
template <const Backend& (*B)()>
void register_lgm_ops(torch::Library& m) {
  using OptT = std::optional<Tensor>;
  m.impl("lgm_loss_forward", [](const Tensor& x, const Tensor& mu, const OptT& s, const Tensor& y, double alpha,
                                double lambda, int64_t reduction, int64_t impl) {
    return loss_forward(B(), x, mu, s, y, alpha, lambda, reduction, impl);
  });
  m.impl("lgm_loss_backward", [](const Tensor& gloss, const OptT& glogits, const Tensor& x, const Tensor& mu,
                                 const OptT& s, const Tensor& y, const Tensor& logits, const Tensor& lse, double alpha,
                                 double lambda, int64_t reduction, int64_t impl) {
    return loss_backward(B(), gloss, glogits, x, mu, s, y, logits, lse, alpha, lambda, reduction, impl);
  });
  m.impl("lgm_logits", [](const Tensor& x, const Tensor& mu, const OptT& s, const OptT& y, double alpha,
                          int64_t impl) { return logits_forward(B(), x, mu, s, y, alpha, impl); });
  m.impl("lgm_logits_backward", [](const Tensor& grad, const Tensor& x, const Tensor& mu, const OptT& s,
                                   const OptT& y, double alpha, int64_t impl) {
    return logits_backward(B(), grad, x, mu, s, y, alpha, impl);
  });
  m.impl("lgm_log_likelihood", [](const Tensor& x, const Tensor& mu, const OptT& s, int64_t impl) {
    return log_likelihood(B(), x, mu, s, impl);
  });
}

// PGD step validation (shared by the CPU and CUDA step kernels).
void check_pgd(const Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps, double lower,
               double upper);

// A backend's step: out[i] = pgd_step_elem(x[i], g[i], x0[i]) over contiguous tensors (out may be x).
using PgdStepFn = void (*)(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                           double lower, double upper);

// Registers pgd_step and pgd_step_ of one backend: validation, contiguity and the
// in-place write-back are here, once.
template <PgdStepFn Step>
void register_pgd_ops(torch::Library& m) {
  m.impl("pgd_step", [](const Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps,
                        double lower, double upper) {
    check_pgd(x, grad, x_orig, alpha, eps, lower, upper);
    const c10::OptionalDeviceGuard guard(x.device());
    const Tensor xc = x.contiguous();
    Tensor out = at::empty_like(xc);
    Step(out, xc, grad.contiguous(), x_orig.contiguous(), alpha, eps, lower, upper);
    return out;
  });
  m.impl("pgd_step_", [](Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps, double lower,
                         double upper) {
    check_pgd(x, grad, x_orig, alpha, eps, lower, upper);
    const c10::OptionalDeviceGuard guard(x.device());
    Tensor xc = x.is_contiguous() ? x : x.contiguous();
    Step(xc, xc, grad.contiguous(), x_orig.contiguous(), alpha, eps, lower, upper);
    if (!x.is_contiguous()) x.copy_(xc);
  });
}

}  // namespace lgm_ext
