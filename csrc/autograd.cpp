// lgm-ext: the L-GM loss's autograd formula, in C++ (the Autograd dispatch key).
//
// The loss is the operator every training step calls, and a Python autograd
// formula (torch.library.register_autograd) costs ~0.2 ms of wrapper per step --
// as much as the fused kernels themselves at MNIST sizes (K = 10).  So this one
// formula is a torch::autograd::Function, as torchvision's C++ ops do; it calls
// the operators through the dispatcher, so the fake kernels (lgm_ext/_ops.py)
// serve torch.compile exactly as before.  The other operators keep their Python
// formulas (lgm_ext/_ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "host.h"

namespace lgm_ext {

namespace {
// The rule of host.h on symbolic sizes (torch.compile with dynamic shapes traces this formula with fake
// tensors): the batch size N is only compared with D, on the GEMM path, so a compiled graph guards on
// "N <= D" instead of specialising to one batch size.
bool keep_logits_sym(const c10::SymInt& N, const c10::SymInt& K, const c10::SymInt& D, int64_t impl) {
  if (impl == kDirect) return true;
  if (impl == kAuto && K * D <= kDirectMaxKD) return true;  // SymInt comparisons guard on the relation
  return N <= D;
}
}  // namespace

bool keep_logits_for_backward(int64_t N, int64_t K, int64_t D, int64_t impl) {
  return keep_logits_sym(c10::SymInt(N), c10::SymInt(K), c10::SymInt(D), impl);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> call_forward(const Tensor& x, const Tensor& mu, const OptT& s, const Tensor& y,
                                                double alpha, double lambda, int64_t reduction, int64_t impl,
                                                std::optional<int64_t> offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lgm_ext::lgm_loss_forward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptT&,
                                                                  const Tensor&, double, double, int64_t, int64_t,
                                                                  std::optional<int64_t>)>();
  return op.call(x, mu, s, y, alpha, lambda, reduction, impl, offset);
}

std::tuple<Tensor, Tensor, Tensor> call_backward(const Tensor& gloss, const OptT& glogits, const Tensor& x,
                                                 const Tensor& mu, const OptT& s, const Tensor& y, const OptT& logits,
                                                 const Tensor& stats, double alpha, double lambda, int64_t reduction,
                                                 int64_t impl, Mask mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lgm_ext::lgm_loss_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const OptT&, const Tensor&, const Tensor&, const OptT&, const Tensor&,
                           const OptT&, const Tensor&, double, double, int64_t, int64_t, Mask,
                           std::optional<int64_t>)>();
  return op.call(gloss, glogits, x, mu, s, y, logits, stats, alpha, lambda, reduction, impl, mask, std::nullopt);
}

OptT opt(const Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

class LossFunction : public torch::autograd::Function<LossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mu, const OptT& s, const Tensor& y,
                               double alpha, double lambda, int64_t reduction, int64_t impl,
                               std::optional<int64_t> offset) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, logits, stats] = call_forward(x, mu, s, y, alpha, lambda, reduction, impl, offset);
    const bool has_s = s.has_value() && s->defined();
    const bool keep = keep_logits_sym(x.sym_size(0), mu.sym_size(0), x.sym_size(1), impl);
    ctx->save_for_backward({x, mu, has_s ? *s : Tensor(), y, keep ? logits : Tensor(), stats});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["lambda"] = lambda;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["impl"] = impl;
    ctx->saved_data["has_s"] = has_s;
    ctx->saved_data["sharded"] = offset.has_value();
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {loss, logits, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["sharded"].toBool(),
                "lgm_loss_forward with class_offset returns one class shard's partials, whose gradient depends on "
                "the statistics of every shard; differentiate the combined loss instead "
                "(lgm_ext.distributed.ShardedLGMLoss)");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mu = saved[1], &s = saved[2], &y = saved[3], &logits = saved[4], &stats = saved[5];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool has_s = ctx->saved_data["has_s"].toBool();
    Tensor gloss = grads[0];
    if (!gloss.defined())  // only the logits were used
      gloss = reduction == kNone ? at::zeros_symint({x.sym_size(0)}, stats.options()) : at::zeros({}, stats.options());
    // Gradient edges are the defined tensor inputs in order: x, mu, [log_var], labels.
    const Mask mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_s && ctx->needs_input_grad(2)};
    auto [gx, gmu, gs] = call_backward(gloss, opt(grads[1]), x, mu, opt(s), y, opt(logits), stats,
                                       ctx->saved_data["alpha"].toDouble(), ctx->saved_data["lambda"].toDouble(),
                                       reduction, ctx->saved_data["impl"].toInt(), mask);
    return {mask[0] ? gx : Tensor(), mask[1] ? gmu : Tensor(), mask[2] ? gs : Tensor(), Tensor(), Tensor(),
            Tensor(),        Tensor(),        Tensor(),         Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> loss_forward_autograd(const Tensor& x, const Tensor& mu, const OptT& s,
                                                         const Tensor& y, double alpha, double lambda,
                                                         int64_t reduction, int64_t impl,
                                                         std::optional<int64_t> offset) {
  auto out = LossFunction::apply(x, mu, s, y, alpha, lambda, reduction, impl, offset);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lgm_ext, Autograd, m) { m.impl("lgm_loss_forward", &loss_forward_autograd); }

}  // namespace lgm_ext
