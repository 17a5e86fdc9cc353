// lgm-ext host layer shared by every backend: input validation, the choice
// between the direct and the GEMM path, and the GEMM orchestration (ATen ops,
// device-agnostic).  A backend supplies only its row/class kernels through
// `Backend`; the per-element math they run is in include/lgm_ext/math.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace lgm_ext {

using at::Tensor;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };
enum Impl : int64_t { kAuto = 0, kDirect = 1, kGemm = 2 };

// K*D at or below which the direct fused loop beats GEMM + epilogue (measured
// on the CPU in benchmarks/bench_lgm.py; see README).
constexpr int64_t kDirectMaxKD = 8192;

// GEMM path: classes are processed in tiles so that no (K, 2D) operand or
// moment matrix is ever materialised; a tile's temporaries (b (kt,2D), its
// moments (kt,2D) -- in the backward usually held in the gradients' rows -- g and m (N,kt)) hold about
// this many elements (16 MiB in float32: few enough
// tiles that the per-tile parallel regions and GEMM calls stay cheap on a busy 2-core CPU).
constexpr int64_t kTileElems = int64_t(1) << 22;
int64_t gemm_tile(int64_t N, int64_t K, int64_t D);

// Whether the loss saves its (N, K) logits for the backward (true) or the backward recomputes them one
// class tile at a time (false, memory-lean): the direct path always saves them; the GEMM path when N <= D
// (then N*K <= K*D, a class-parameter tensor).  Exported to Python as lgm_ext._C.keep_logits_for_backward.
bool keep_logits_for_backward(int64_t N, int64_t K, int64_t D, int64_t impl);

// The dtype seam.  Features, means and log_var share one storage dtype (float32,
// float64, bfloat16 or float16: kStorageTypes); the kernels read and write only
// its accumulation type (at::opmath_type: float32 for the 16-bit types), so a
// 16-bit call is widened once on entry (prepare) and its gradients narrowed once
// on exit (to_storage).  Loss, logits, row statistics and log-likelihoods come back
// in the accumulation type.  Adding a storage dtype is one entry in kStorageTypes.
constexpr std::array<at::ScalarType, 4> kStorageTypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
bool is_storage_type(at::ScalarType t);
at::ScalarType acc_type(at::ScalarType storage);

// Inputs after validation: contiguous, in the accumulation type, labels as int64 (undefined if absent),
// w = exp(-log_var) (direct path only) and hl = 0.5 * sum(log_var) (undefined for identity).
// (Backend is declared below; prepare() takes it for its label and table passes.)
struct Inputs {
  Tensor x, mu, s, w, hl, labels;
  int64_t N = 0, K = 0, D = 0;
  at::ScalarType storage = at::kFloat;  // the callers' dtype (gradients are returned in it)
  bool identity() const { return !s.defined(); }
};

struct Backend;
// check_range: verify labels lie in [0, K) (every public op does: the kernels index with them).
// impl: the w table is built on the direct path only (the GEMM path computes w where it reads it).
Inputs prepare(const Backend& be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
               const std::optional<Tensor>& labels, bool labels_required, bool check_range, int64_t impl,
               const char* op);
void check_scalars(double alpha, double lambda, int64_t reduction, int64_t impl);
bool use_gemm(int64_t impl, int64_t K, int64_t D);

// What the backward coefficient pass reads for the class tile [k0, k0 + kt).
// Loss mode (stats defined): `logits` is an (N, kt) view (any row stride) of the
// margin-free logits -- or, when `c` (kt) is defined, of the GEMM expansion m
// of the tile, turned into logits on the fly (recompute mode); stats (N,2) =
// (lse, 1 - P[n,y]) from the forward; scale[n * scale_stride] * scale_mult is
// row n's incoming gradient; grad_logits an optional (N, kt) view.
// Logits mode (stats undefined): grad_logits is the gradient of lgm_logits'
// output (margin in the labelled column if labels).
struct Coef {
  int64_t k0 = 0, kt = 0;
  Tensor logits, c, stats, scale, grad_logits;
  int64_t scale_stride = 0;
  double scale_mult = 1.0, alpha = 0.0, lambda = 0.0;
};

// A 16-bit GEMM: a (m,k) b (k,n), bfloat16 operands, float32 accumulation and output (gemm.h).
using Mm16Fn = Tensor (*)(const Tensor& a, const Tensor& b);

// What a backend implements.  All tensors are on the backend's device; inputs contiguous.
struct Backend {
  // Direct path, one fused pass per row: logits (N,K) always -- margin-free,
  // or with the margin in the labelled column when `margin_out` -- and stats
  // (N,2) = (lse, 1 - P[n,y]) and per-row loss (N) when defined (needs labels).
  void (*direct_rows)(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& stats,
                      Tensor& row_loss);
  // GEMM path epilogue: m (N,K) holds sum_j x^2 w - 2 x mu w; c (K) sum_j mu^2 w.
  // Turns m into logits in place (as direct_rows; non-finite expansions are
  // recomputed directly, math::dist_gemm); fills stats and row_loss when defined.
  void (*gemm_rows)(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
                    Tensor& stats, Tensor& row_loss);
  // Backward coefficients of one class tile: g (N, kt) contiguous, and r[n]
  // (the label-column log-det correction) for the rows whose label lies in the
  // tile; other entries of r are left as they are.
  void (*coefficients)(const Inputs& in, const Coef& cf, Tensor& g, Tensor& r);
  // Direct path gradients from the coefficients g (N,K) and r (N) (any output
  // may be skipped by passing an undefined tensor).
  void (*direct_grads)(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                       Tensor& grad_s);
  // Validates labels in [0, K) (calls check_label_range with the min and max).
  void (*check_labels)(const Inputs& in);
  // w = exp(-s) (K,D; skipped when w is undefined) and hl = 0.5 sum_j s (K), one pass.
  void (*class_tables)(const Tensor& s, Tensor& w, Tensor& hl);
  // GEMM path (diagonal covariance), see math.h.  Its (rows, 2D) matrices are passed as their two
  // (rows, D) halves: views with unit column stride and one common row stride -- the halves of one
  // matrix, or two separate blocks (the tile's rows of grad_mu and grad_s, which serve as b's and s's
  // storage until the class gradients are written; host.cpp grads_tiled).
  // Operand a (N,2D) when defined; operand b's halves b1, b2 (kt,D) and c (kt) of classes
  // [k0, k0 + kt) when b1 is defined.
  void (*gemm_operands)(const Inputs& in, Tensor& a, int64_t k0, int64_t kt, Tensor& b1, Tensor& b2, Tensor& c);
  // grad_x from the halves of t = g b (N rows); t1 may be grad_x itself (each element is read before it
  // is written).
  void (*gemm_grad_x)(const Inputs& in, const Tensor& t1, const Tensor& t2, Tensor& grad_x);
  // Rows [k0, k0 + kt) of grad_mu, grad_s (either may be undefined) from the halves of the tile's
  // moments s = g^T a (kt rows), its coefficients g (N,kt) and r.  s may be those very rows of
  // grad_mu / grad_s: every element of s is read before the same element of the output is written.
  void (*gemm_class_grads)(const Inputs& in, int64_t k0, int64_t kt, const Tensor& s1, const Tensor& s2,
                           const Tensor& g, const Tensor& r, Tensor& grad_mu, Tensor& grad_s);
  // The GEMM path's tensor-core GEMM (gemm.h: the split mode), or null: the GEMMs stay in the accumulation
  // type (the CPU loops).  Not a kernel of ours: ATen's, or the emulation's.
  Mm16Fn mm16;
};

// A backend's kernels for one accumulation type (float or double): each backend's one dtype
// dispatch point; the operator bodies pick the table once per call (backend_of).
using BackendFor = const Backend& (*)(at::ScalarType acc);
inline const Backend& backend_of(BackendFor backend, const Tensor& features) {
  return backend(acc_type(features.scalar_type()));
}

void check_label_range(int64_t lo, int64_t hi, int64_t K);
// check_labels for device backends: one aminmax and a host sync (the price of a clear
// error instead of a device-side assert).
void check_labels_aminmax(const Inputs& in);

using Mask = std::array<bool, 3>;  // which of (features, means, log_var) need a gradient

// Operator bodies, shared by all backends.
std::tuple<Tensor, Tensor, Tensor> loss_forward(BackendFor be, const Tensor& x, const Tensor& mu,
                                                const std::optional<Tensor>& log_var, const Tensor& labels,
                                                double alpha, double lambda, int64_t reduction, int64_t impl,
                                                std::optional<int64_t> class_offset = std::nullopt);
std::tuple<Tensor, Tensor, Tensor> loss_backward(BackendFor be, const Tensor& grad_loss,
                                                 const std::optional<Tensor>& grad_logits, const Tensor& x,
                                                 const Tensor& mu, const std::optional<Tensor>& log_var,
                                                 const Tensor& labels, const std::optional<Tensor>& logits,
                                                 const Tensor& stats, double alpha, double lambda, int64_t reduction,
                                                 int64_t impl, Mask mask,
                                                 std::optional<int64_t> class_offset = std::nullopt);
Tensor logits_forward(BackendFor be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
                      const std::optional<Tensor>& labels, double alpha, int64_t impl);
std::tuple<Tensor, Tensor, Tensor> logits_backward(BackendFor be, const Tensor& grad, const Tensor& x,
                                                   const Tensor& mu, const std::optional<Tensor>& log_var,
                                                   const std::optional<Tensor>& labels, double alpha, int64_t impl,
                                                   Mask mask);
std::tuple<Tensor, Tensor> log_likelihood(BackendFor be, const Tensor& x, const Tensor& mu,
                                          const std::optional<Tensor>& log_var, int64_t impl);

// Registers the five L-GM operators of one backend (inside TORCH_LIBRARY_IMPL).
template <BackendFor B>
void register_lgm_ops(torch::Library& m) {
  using OptT = std::optional<Tensor>;
  m.impl("lgm_loss_forward", [](const Tensor& x, const Tensor& mu, const OptT& s, const Tensor& y, double alpha,
                                double lambda, int64_t reduction, int64_t impl, std::optional<int64_t> offset) {
    return loss_forward(B, x, mu, s, y, alpha, lambda, reduction, impl, offset);
  });
  m.impl("lgm_loss_backward", [](const Tensor& gloss, const OptT& glogits, const Tensor& x, const Tensor& mu,
                                 const OptT& s, const Tensor& y, const OptT& logits, const Tensor& stats, double alpha,
                                 double lambda, int64_t reduction, int64_t impl, Mask mask,
                                 std::optional<int64_t> offset) {
    return loss_backward(B, gloss, glogits, x, mu, s, y, logits, stats, alpha, lambda, reduction, impl, mask,
                         offset);
  });
  m.impl("lgm_logits", [](const Tensor& x, const Tensor& mu, const OptT& s, const OptT& y, double alpha,
                          int64_t impl) { return logits_forward(B, x, mu, s, y, alpha, impl); });
  m.impl("lgm_logits_backward", [](const Tensor& grad, const Tensor& x, const Tensor& mu, const OptT& s,
                                   const OptT& y, double alpha, int64_t impl, Mask mask) {
    return logits_backward(B, grad, x, mu, s, y, alpha, impl, mask);
  });
  m.impl("lgm_log_likelihood", [](const Tensor& x, const Tensor& mu, const OptT& s, int64_t impl) {
    return log_likelihood(B, x, mu, s, impl);
  });
}

// PGD step validation (shared by the CPU and CUDA step kernels).
void check_pgd(const Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps, double lower,
               double upper);
// pgd_step_ writes x: like torch's in-place ops it refuses an x whose elements share memory, and a grad or
// x_orig that partly overlaps x (the same tensor is fine: each element is read before it is written).
void check_pgd_inplace(const Tensor& x, const Tensor& grad, const Tensor& x_orig);

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
    const at::ScalarType acc = acc_type(x.scalar_type());  // 16-bit storage steps in float32, rounds once
    const Tensor xc = x.to(acc).contiguous();
    Tensor out = at::empty_like(xc);
    Step(out, xc, grad.to(acc).contiguous(), x_orig.to(acc).contiguous(), alpha, eps, lower, upper);
    return out.to(x.scalar_type());
  });
  m.impl("pgd_step_", [](Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps, double lower,
                         double upper) {
    check_pgd(x, grad, x_orig, alpha, eps, lower, upper);
    check_pgd_inplace(x, grad, x_orig);
    const c10::OptionalDeviceGuard guard(x.device());
    const at::ScalarType acc = acc_type(x.scalar_type());
    Tensor xc = x.is_contiguous() && acc == x.scalar_type() ? x : x.to(acc).contiguous();
    Step(xc, xc, grad.to(acc).contiguous(), x_orig.to(acc).contiguous(), alpha, eps, lower, upper);
    if (!xc.is_same(x)) x.copy_(xc);
  });
}

}  // namespace lgm_ext
