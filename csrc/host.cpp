// lgm-ext: validation and operator bodies shared by the CPU and CUDA backends.
#include "host.h"

#include <c10/core/DeviceGuard.h>

#include <cmath>

namespace lgm_ext {

namespace {

const char* dtype_name(const Tensor& t) { return c10::toString(t.scalar_type()); }

void check_same(const Tensor& a, const char* an, const Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", bn, " has dtype ", dtype_name(b), " but ", an,
                   " has dtype ", dtype_name(a), "; mixed dtypes are not supported");
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", bn, " is on ", b.device(), " but ", an, " is on ",
                    a.device(), "; all inputs must be on one device");
}

}  // namespace

void check_label_range(int64_t lo, int64_t hi, int64_t K) {
  TORCH_CHECK_VALUE(lo >= 0 && hi < K, "labels must lie in [0, K) = [0, ", K, "), got values in [", lo, ", ", hi,
                    "]");
}

void check_labels_aminmax(const Inputs& in) {
  auto mm = at::aminmax(in.labels);
  check_label_range(std::get<0>(mm).item<int64_t>(), std::get<1>(mm).item<int64_t>(), in.K);
}

Inputs prepare(const Backend& be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
               const std::optional<Tensor>& labels, bool labels_required, bool check_range, const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": features must be float32 or float64, got ", dtype_name(x));
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": features must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 2, op, ": means must be 2-D (K, D), got shape ", mu.sizes());
  check_same(x, "features", mu, "means", op);
  Inputs in;
  in.N = x.size(0);
  in.D = x.size(1);
  in.K = mu.size(0);
  TORCH_CHECK_VALUE(in.N > 0 && in.D > 0, op, ": features must be non-empty, got shape ", x.sizes());
  TORCH_CHECK_VALUE(in.K > 0, op, ": means must have at least one class, got shape ", mu.sizes());
  TORCH_CHECK_VALUE(mu.size(1) == in.D, op, ": means has feature dimension D=", mu.size(1),
                    " but features has D=", in.D);
  in.x = x.contiguous();
  in.mu = mu.contiguous();
  if (log_var.has_value() && log_var->defined()) {
    const Tensor& s = *log_var;
    check_same(x, "features", s, "log_var", op);
    TORCH_CHECK_VALUE(s.sizes() == mu.sizes(), op, ": log_var must have the shape of means ", mu.sizes(), ", got ",
                      s.sizes());
    in.s = s.contiguous();
    in.w = at::empty_like(in.s);
    in.hl = at::empty({in.K}, in.s.options());
    be.class_tables(in.s, in.w, in.hl);
  }
  if (labels.has_value() && labels->defined()) {
    const Tensor& y = *labels;
    TORCH_CHECK_TYPE(!y.is_floating_point() && !y.is_complex() && y.scalar_type() != at::kBool, op,
                     ": labels must be an integer tensor, got ", dtype_name(y));
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == in.N, op, ": labels must have shape (N,) = (", in.N,
                      ",), got ", y.sizes());
    TORCH_CHECK_VALUE(y.device() == x.device(), op, ": labels is on ", y.device(), " but features is on ",
                      x.device(), "; all inputs must be on one device");
    in.labels = y.to(at::kLong).contiguous();
    if (check_range) be.check_labels(in);
  } else {
    TORCH_CHECK_VALUE(!labels_required, op, ": labels are required");
  }
  return in;
}

void check_scalars(double alpha, double lambda, int64_t reduction, int64_t impl) {
  TORCH_CHECK_VALUE(alpha >= 0.0 && std::isfinite(alpha), "alpha (the margin) must be finite and >= 0, got ", alpha);
  TORCH_CHECK_VALUE(lambda >= 0.0 && std::isfinite(lambda), "lambda_ (the likelihood weight) must be finite and >= 0, got ",
                    lambda);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(impl >= kAuto && impl <= kGemm, "impl must be 0 (auto), 1 (direct) or 2 (gemm), got ", impl);
}

bool use_gemm(int64_t impl, int64_t K, int64_t D) {
  if (impl == kDirect) return false;
  if (impl == kGemm) return true;
  return K * D > kDirectMaxKD;
}

namespace {

// m = sum_j x^2 w - 2 x mu w (N,K) as one GEMM, c = sum_j mu^2 w (math.h, GEMM operands).
Tensor expansion(const Backend& be, const Inputs& in, Tensor& c) {
  if (in.identity()) {
    c = in.mu.square().sum(1);
    return at::addmm(in.x.square().sum(1, /*keepdim=*/true), in.x, in.mu.t(), /*beta=*/1, /*alpha=*/-2);
  }
  Tensor a = at::empty({in.N, 2 * in.D}, in.x.options());
  Tensor b = at::empty({in.K, 2 * in.D}, in.x.options());
  c = at::empty({in.K}, in.x.options());
  be.gemm_operands(in, a, b, c);
  return at::mm(a, b.t());
}

Tensor compute_logits(const Backend& be, const Inputs& in, double alpha, double lambda, bool margin_out,
                      int64_t impl, Tensor& lse, Tensor& row_loss) {
  if (!use_gemm(impl, in.K, in.D)) {
    Tensor logits = at::empty({in.N, in.K}, in.x.options());
    be.direct_rows(in, alpha, lambda, margin_out, logits, lse, row_loss);
    return logits;
  }
  Tensor c;
  Tensor m = expansion(be, in, c);
  be.gemm_rows(in, m, c, alpha, lambda, margin_out, lse, row_loss);
  return m;
}

// dL/dx, dL/dmu, dL/dlog_var from the coefficients g (N,K) and r (N).
std::tuple<Tensor, Tensor, Tensor> grads_from_coefficients(const Backend& be, const Inputs& in, const Tensor& g,
                                                           const Tensor& r, int64_t impl) {
  Tensor gx = at::empty_like(in.x);
  Tensor gmu = at::empty_like(in.mu);
  Tensor gs = in.identity() ? at::empty({0}, in.x.options()) : at::empty_like(in.mu);
  if (!use_gemm(impl, in.K, in.D)) {
    Tensor gs_out = in.identity() ? Tensor() : gs;
    be.direct_grads(in, g, r, gx, gmu, gs_out);
    return {gx, gmu, gs};
  }
  if (in.identity()) {
    // dx = x * rowsum(g) - g mu ;  dmu = mu * colsum(g) - g^T x
    at::addmm_out(gx, in.x * g.sum(1, true), g, in.mu, 1, -1);
    at::addmm_out(gmu, in.mu * g.sum(0).unsqueeze(1), g.t(), in.x, 1, -1);
    return {gx, gmu, gs};
  }
  Tensor a = at::empty({in.N, 2 * in.D}, in.x.options());
  Tensor b = at::empty({in.K, 2 * in.D}, in.x.options());
  Tensor c = at::empty({in.K}, in.x.options());
  be.gemm_operands(in, a, b, c);
  be.gemm_grad_x(in, at::mm(g, b), gx);
  be.gemm_class_grads(in, at::mm(g.t(), a), g, r, gmu, gs);
  return {gx, gmu, gs};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> loss_forward(const Backend& be, const Tensor& x, const Tensor& mu,
                                                const std::optional<Tensor>& log_var, const Tensor& labels,
                                                double alpha, double lambda, int64_t reduction, int64_t impl) {
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, lambda, reduction, impl);
  const Inputs in = prepare(be, x, mu, log_var, labels, true, true, "lgm_loss");
  Tensor lse = at::empty({in.N}, in.x.options());
  Tensor row = at::empty({in.N}, in.x.options());
  Tensor logits = compute_logits(be, in, alpha, lambda, /*margin_out=*/false, impl, lse, row);
  Tensor loss = reduction == kNone ? row : (reduction == kSum ? row.sum() : row.mean());
  return {loss, logits, lse};
}

std::tuple<Tensor, Tensor, Tensor> loss_backward(const Backend& be, const Tensor& grad_loss,
                                                 const std::optional<Tensor>& grad_logits, const Tensor& x,
                                                 const Tensor& mu, const std::optional<Tensor>& log_var,
                                                 const Tensor& labels, const Tensor& logits, const Tensor& lse,
                                                 double alpha, double lambda, int64_t reduction, int64_t impl) {
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, lambda, reduction, impl);
  const Inputs in = prepare(be, x, mu, log_var, labels, true, false, "lgm_loss_backward");
  TORCH_CHECK_VALUE(logits.sizes() == at::IntArrayRef({in.N, in.K}) && lse.numel() == in.N,
                    "lgm_loss_backward: saved logits/lse do not match the inputs");
  TORCH_CHECK_VALUE(grad_loss.numel() == (reduction == kNone ? in.N : 1), "lgm_loss_backward: grad_loss must have ",
                    reduction == kNone ? in.N : 1, " element(s), got ", grad_loss.numel());
  check_same(in.x, "features", grad_loss, "grad_loss", "lgm_loss_backward");
  const Tensor scale = grad_loss.contiguous();
  const int64_t scale_stride = reduction == kNone ? 1 : 0;
  const double scale_mult = reduction == kMean ? 1.0 / static_cast<double>(in.N) : 1.0;
  Tensor gl;
  if (grad_logits.has_value() && grad_logits->defined()) gl = grad_logits->to(in.x.scalar_type()).contiguous();
  Tensor g = at::empty({in.N, in.K}, in.x.options());
  Tensor r = at::empty({in.N}, in.x.options());
  be.coefficients(in, logits.contiguous(), lse.contiguous(), scale, scale_stride, scale_mult, gl, alpha, lambda, g, r);
  return grads_from_coefficients(be, in, g, r, impl);
}

Tensor logits_forward(const Backend& be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
                      const std::optional<Tensor>& labels, double alpha, int64_t impl) {
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, 0.0, kMean, impl);
  const Inputs in = prepare(be, x, mu, log_var, labels, false, true, "lgm_logits");
  Tensor none_lse, none_row;
  return compute_logits(be, in, alpha, 0.0, /*margin_out=*/in.labels.defined(), impl, none_lse, none_row);
}

std::tuple<Tensor, Tensor, Tensor> logits_backward(const Backend& be, const Tensor& grad, const Tensor& x,
                                                   const Tensor& mu, const std::optional<Tensor>& log_var,
                                                   const std::optional<Tensor>& labels, double alpha, int64_t impl) {
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, 0.0, kMean, impl);
  const Inputs in = prepare(be, x, mu, log_var, labels, false, false, "lgm_logits_backward");
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({in.N, in.K}), "lgm_logits_backward: grad must be (N, K)");
  Tensor g = at::empty({in.N, in.K}, in.x.options());
  Tensor r = at::empty({in.N}, in.x.options());
  Tensor none;
  be.coefficients(in, none, none, none, 0, 1.0, grad.to(in.x.scalar_type()).contiguous(), alpha, 0.0, g, r);
  return grads_from_coefficients(be, in, g, r, impl);
}

std::tuple<Tensor, Tensor> log_likelihood(const Backend& be, const Tensor& x, const Tensor& mu,
                                          const std::optional<Tensor>& log_var, int64_t impl) {
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(0.0, 0.0, kMean, impl);
  const Inputs in = prepare(be, x, mu, log_var, std::nullopt, false, false, "lgm_log_likelihood");
  Tensor none_lse, none_row;
  Tensor logits = compute_logits(be, in, 0.0, 0.0, false, impl, none_lse, none_row);
  auto best = logits.max(1);
  Tensor ll = std::get<0>(best).sub_(0.5 * static_cast<double>(in.D) * std::log(2.0 * M_PI));
  return {ll, std::get<1>(best)};
}

void check_pgd(const Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps, double lower,
               double upper) {
  const char* op = "pgd_step";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, got ", dtype_name(x));
  check_same(x, "x", grad, "grad", op);
  check_same(x, "x", x_orig, "x_orig", op);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad has shape ", grad.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(x_orig.sizes() == x.sizes(), op, ": x_orig has shape ", x_orig.sizes(), " but x has shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha (the step) must be finite, got ", alpha);
  TORCH_CHECK_VALUE(eps >= 0.0 && !std::isnan(eps), op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(!std::isnan(lower) && !std::isnan(upper) && lower <= upper, op,
                    ": lower must be <= upper, got lower=", lower, ", upper=", upper);
}

}  // namespace lgm_ext
