// lgm-ext: validation and operator bodies shared by the CPU and CUDA backends.
#include "host.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "gemm.h"

namespace lgm_ext {

namespace {

const char* dtype_name(const Tensor& t) { return c10::toString(t.scalar_type()); }

void check_same(const Tensor& a, const char* an, const Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", bn, " has dtype ", dtype_name(b), " but ", an,
                   " has dtype ", dtype_name(a),
                   "; mixed dtypes are not supported (under torch.autocast the operators cast to float32; "
                   "otherwise convert, e.g. the module with .to(dtype))");
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", bn, " is on ", b.device(), " but ", an, " is on ",
                    a.device(), "; all inputs must be on one device");
}

}  // namespace

bool is_storage_type(at::ScalarType t) {
  return std::find(kStorageTypes.begin(), kStorageTypes.end(), t) != kStorageTypes.end();
}

at::ScalarType acc_type(at::ScalarType storage) {
  return is_storage_type(storage) ? at::toOpMathType(storage) : storage;  // others are rejected by prepare
}

namespace {
const char* kStorageNames = "float32, float64, bfloat16 or float16";
}

void check_label_range(int64_t lo, int64_t hi, int64_t K) {
  TORCH_CHECK_VALUE(lo >= 0 && hi < K, "labels must lie in [0, K) = [0, ", K, "), got values in [", lo, ", ", hi,
                    "]");
}

void check_labels_aminmax(const Inputs& in) {
  auto mm = at::aminmax(in.labels);
  check_label_range(std::get<0>(mm).item<int64_t>(), std::get<1>(mm).item<int64_t>(), in.K);
}

Inputs prepare(const Backend& be, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
               const std::optional<Tensor>& labels, bool labels_required, bool check_range, int64_t impl,
               const char* op) {
  TORCH_CHECK_TYPE(is_storage_type(x.scalar_type()), op, ": features must be ", kStorageNames, ", got ",
                   dtype_name(x));
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
  in.storage = x.scalar_type();
  const at::ScalarType acc = acc_type(in.storage);  // the dtype seam: kernels see only this type
  in.x = x.to(acc).contiguous();
  in.mu = mu.to(acc).contiguous();
  if (log_var.has_value() && log_var->defined()) {
    const Tensor& s = *log_var;
    check_same(x, "features", s, "log_var", op);
    TORCH_CHECK_VALUE(s.sizes() == mu.sizes(), op, ": log_var must have the shape of means ", mu.sizes(), ", got ",
                      s.sizes());
    in.s = s.to(acc).contiguous();
    if (!use_gemm(impl, in.K, in.D)) in.w = at::empty_like(in.s);
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

int64_t gemm_tile(int64_t N, int64_t K, int64_t D) {
  int64_t kt = kTileElems / (4 * D + 2 * N);
  kt = std::max<int64_t>(256, kt - kt % 32);
  return std::min(kt, K);
}

namespace {

// Validation of a tensor the backward ops read besides the inputs.
void check_aux(const Inputs& in, const Tensor& t, const char* name, at::IntArrayRef shape, const char* op) {
  check_same(in.x, "features", t, name, op);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// m = sum_j x^2 w - 2 x mu w (N,K) and c = sum_j mu^2 w (K) (math.h, GEMM operands).
// Diagonal covariance: the class operand b is built and multiplied one class
// tile at a time into m's columns, so no (K, 2D) matrix is ever held.
// The GEMMs run in the backend's precision for this call (gemm.h: native, or split into bf16 parts for the
// tensor cores); a, x and x^2 are split once per call, each tile's b once per tile.
Tensor expansion(const Backend& be, const Inputs& in, Tensor& c) {
  const GemmMode mode = gemm_mode(be, in);
  if (in.identity()) {
    c = in.mu.square().sum(1);
    return gemm(mode, in.x.square().sum(1, /*keepdim=*/true), operand(mode, in.x, mode.parts_x),
                operand(mode, in.mu, mode.parts_x).t(), /*beta=*/1, /*alpha=*/-2);
  }
  Tensor a = at::empty({in.N, 2 * in.D}, in.x.options());
  Tensor none;
  be.gemm_operands(in, a, 0, 0, none, none, none);
  const Operand oa = operand(mode, a, mode.parts_x2);  // [-2x | x^2]: x^2 needs the more parts
  Tensor m = at::empty({in.N, in.K}, in.x.options());
  c = at::empty({in.K}, in.x.options());
  const int64_t tile = gemm_tile(in.N, in.K, in.D);
  Tensor b = at::empty({tile, 2 * in.D}, in.x.options());
  for (int64_t k0 = 0; k0 < in.K; k0 += tile) {
    const int64_t kt = std::min(tile, in.K - k0);
    Tensor bt = b.narrow(0, 0, kt), ct = c.narrow(0, k0, kt), mt = m.narrow(1, k0, kt);
    Tensor b1 = bt.narrow(1, 0, in.D), b2 = bt.narrow(1, in.D, in.D);
    be.gemm_operands(in, none, k0, kt, b1, b2, ct);
    gemm_out(mode, mt, none, oa, operand(mode, bt, 3).t(), 0, 1);
  }
  return m;
}

Tensor compute_logits(const Backend& be, const Inputs& in, double alpha, double lambda, bool margin_out,
                      int64_t impl, Tensor& stats, Tensor& row_loss) {
  if (!use_gemm(impl, in.K, in.D)) {
    Tensor logits = at::empty({in.N, in.K}, in.x.options());
    be.direct_rows(in, alpha, lambda, margin_out, logits, stats, row_loss);
    return logits;
  }
  Tensor c;
  Tensor m = expansion(be, in, c);
  be.gemm_rows(in, m, c, alpha, lambda, margin_out, stats, row_loss);
  return m;
}

// dL/dx, dL/dmu, dL/dlog_var (those `mask` asks for; the others come back
// empty) from the coefficient pass described by `cf` (k0, kt are set here).
//
// Direct path (K*D <= kDirectMaxKD, or impl = direct): g (N,K) at once, then
// the fused gradient loops; `cf.logits` is the saved (N,K) logits or, if none
// were saved, recomputed here.
//
// GEMM path: one class tile at a time (gemm_tile classes): the tile's
// coefficients g (N,kt) come from the saved logits' columns, or -- when the
// forward saved none (`saved` false, the memory-lean path) -- from the tile's
// expansion m = a b^T recomputed by GEMM; then t += g b (N,2D) for dL/dx
// and s = g^T a (kt,2D) for the tile's rows of dL/dmu, dL/dlog_var.  When both
// class gradients are wanted, b and s live in those rows of the gradients
// themselves (below).  Live memory: the outputs, x^2 and half of t (N,D) and the
// tile's g (N,kt) -- with only one class gradient wanted, a and t (N,2D) and a
// tile's b and s; never (K,2D) and, without saved logits, never (N,K).
std::tuple<Tensor, Tensor, Tensor> grads_tiled(const Backend& be, const Inputs& in, Coef cf, bool saved,
                                               int64_t impl, Mask mask) {
  const bool need_x = mask[0], need_mu = mask[1], need_s = mask[2] && !in.identity();
  const bool need_class = need_mu || need_s;
  const auto empty = [&] { return at::empty({0}, in.x.options()); };  // a fresh one each: outputs must not alias
  Tensor gx = need_x ? at::empty_like(in.x) : empty();
  Tensor gmu = need_mu ? at::empty_like(in.mu) : empty();
  Tensor gs = need_s ? at::empty_like(in.mu) : empty();
  Tensor gx_out = need_x ? gx : Tensor(), gmu_out = need_mu ? gmu : Tensor(), gs_out = need_s ? gs : Tensor();
  if (!need_x && !need_class) return {gx, gmu, gs};
  Tensor r = at::zeros({in.N}, in.x.options());
  if (!use_gemm(impl, in.K, in.D)) {
    if (cf.stats.defined() && !saved) {
      Tensor none_stats, none_row;
      cf.logits = compute_logits(be, in, 0.0, 0.0, false, impl, none_stats, none_row);
    }
    cf.k0 = 0, cf.kt = in.K;
    Tensor g = at::empty({in.N, in.K}, in.x.options());
    be.coefficients(in, cf, g, r);
    be.direct_grads(in, g, r, gx_out, gmu_out, gs_out);
    return {gx, gmu, gs};
  }
  const bool loss_mode = cf.stats.defined();
  const bool recompute = loss_mode && !saved;
  const Tensor full_logits = cf.logits, full_grad_logits = cf.grad_logits;
  // With saved logits and both class gradients wanted, a tile's only temporary is its g (N, kt): tiles of
  // at most max(256, D) classes keep it no larger than the (N, D) buffers.
  // (in_grads: see below.)
  const bool in_grads = need_mu && need_s;
  const int64_t tile = saved && in_grads ? std::min(gemm_tile(in.N, in.K, in.D), std::max<int64_t>(256, in.D))
                                         : gemm_tile(in.N, in.K, in.D);
  Tensor none;
  const GemmMode mode = gemm_mode(be, in);  // (gemm.h)
  const int px = mode.parts_x, px2 = mode.parts_x2;
  if (in.identity()) {
    // dx = x * rowsum(g) - g mu ;  dmu = mu * colsum(g) - g^T x ;  m = sum x^2 - 2 x mu^T
    Tensor xsq = recompute ? in.x.square().sum(1, true) : Tensor();
    Tensor rowsum = need_x ? at::zeros({in.N, 1}, in.x.options()) : Tensor();
    Tensor gmu_acc = need_x ? at::zeros_like(in.x) : Tensor();  // sum_k g mu
    const Operand ox = operand(mode, in.x, px);
    for (int64_t k0 = 0; k0 < in.K; k0 += tile) {
      const int64_t kt = std::min(tile, in.K - k0);
      const Tensor mut = in.mu.narrow(0, k0, kt);
      const Operand omu = operand(mode, mut, px);
      cf.k0 = k0, cf.kt = kt;
      if (recompute) {
        cf.logits = gemm(mode, xsq, ox, omu.t(), 1, -2);
        cf.c = mut.square().sum(1);
      } else if (loss_mode) {
        cf.logits = full_logits.narrow(1, k0, kt);
      }
      if (full_grad_logits.defined()) cf.grad_logits = full_grad_logits.narrow(1, k0, kt);
      Tensor g = at::empty({in.N, kt}, in.x.options());
      be.coefficients(in, cf, g, r);
      const Operand og = operand(mode, g, 3);
      if (need_x) {
        rowsum.add_(g.sum(1, true));
        gemm_out(mode, gmu_acc, gmu_acc, og, omu, 1, 1);
      }
      if (need_mu) {
        Tensor out = gmu.narrow(0, k0, kt);
        gemm_out(mode, out, mut * g.sum(0).unsqueeze(1), og.t(), ox, 1, -1);
      }
    }
    if (need_x) at::sub_out(gx, in.x * rowsum, gmu_acc);
    return {gx, gmu, gs};
  }
  const int64_t D = in.D;
  // With both class gradients wanted (the usual case), a tile's rows of grad_mu and grad_s are free until
  // its class gradients are written, so they hold the tile's b (b1 = mu w, b2 = w) and then its moments
  // s = g^T a; a = [-2x | x^2] is replaced by x (the -2 goes into the GEMMs' alpha: exact) and x^2; t's
  // first half accumulates in grad_x.  Live memory: the outputs, x^2 and t2 (N,D), the tile's g (N,kt).
  const bool need_b = need_x || recompute;
  Tensor a, xsq;  // a = [-2x | x^2] without in_grads; with it, x and x^2
  Operand oa, ox, oxsq;
  if (in_grads) {
    xsq = in.x.square();
    ox = operand(mode, in.x, px), oxsq = operand(mode, xsq, px2);
  } else {
    a = at::empty({in.N, 2 * D}, in.x.options());
    be.gemm_operands(in, a, 0, 0, none, none, none);
    oa = operand(mode, a, px2);
  }
  Tensor t, t1, t2;  // the halves of t = g b
  if (need_x && in_grads) {
    gx.zero_();
    t1 = gx, t2 = at::zeros({in.N, D}, in.x.options());
  } else if (need_x) {
    t = at::zeros({in.N, 2 * D}, in.x.options());
    t1 = t.narrow(1, 0, D), t2 = t.narrow(1, D, D);
  }
  Tensor b = need_b && !in_grads ? at::empty({tile, 2 * D}, in.x.options()) : Tensor();
  Tensor c = need_b ? at::empty({tile}, in.x.options()) : Tensor();
  for (int64_t k0 = 0; k0 < in.K; k0 += tile) {
    const int64_t kt = std::min(tile, in.K - k0);
    cf.k0 = k0, cf.kt = kt;
    Tensor b1, b2;
    if (need_b) {
      if (in_grads) {
        b1 = gmu.narrow(0, k0, kt), b2 = gs.narrow(0, k0, kt);
      } else {
        b1 = b.narrow(0, 0, kt).narrow(1, 0, D), b2 = b.narrow(0, 0, kt).narrow(1, D, D);
      }
      Tensor ct = c.narrow(0, 0, kt);
      be.gemm_operands(in, none, k0, kt, b1, b2, ct);
      if (recompute) cf.c = ct;
    }
    // The tile's b as GEMM operands: its halves (in_grads) or the whole (kt, 2D) block.
    Operand ob1, ob2, ob;
    if (need_b && in_grads) {
      ob1 = operand(mode, b1, 3), ob2 = operand(mode, b2, 3);
    } else if (need_b) {
      ob = operand(mode, b.narrow(0, 0, kt), 3);
    }
    if (recompute) {  // m = a b^T
      cf.logits = in_grads ? gemm(mode, gemm(mode, none, oxsq, ob2.t(), 0, 1), ox, ob1.t(), 1, -2)
                           : gemm(mode, none, oa, ob.t(), 0, 1);
    } else if (loss_mode) {
      cf.logits = full_logits.narrow(1, k0, kt);
    }
    if (full_grad_logits.defined()) cf.grad_logits = full_grad_logits.narrow(1, k0, kt);
    Tensor g = at::empty({in.N, kt}, in.x.options());
    be.coefficients(in, cf, g, r);
    const Operand og = operand(mode, g, 3);
    if (need_x) {  // t += g b
      if (in_grads) {
        gemm_out(mode, t1, t1, og, ob1, 1, 1);
        gemm_out(mode, t2, t2, og, ob2, 1, 1);
      } else {
        gemm_out(mode, t, t, og, ob, 1, 1);
      }
    }
    if (need_class) {  // s = g^T a
      Tensor s1, s2;
      if (in_grads) {  // b is spent: the moments overwrite it
        s1 = gmu.narrow(0, k0, kt), s2 = gs.narrow(0, k0, kt);
        gemm_out(mode, s1, s1, og.t(), ox, /*beta=*/0, /*alpha=*/-2);
        gemm_out(mode, s2, none, og.t(), oxsq, 0, 1);
      } else {
        Tensor st = gemm(mode, none, og.t(), oa, 0, 1);
        s1 = st.narrow(1, 0, D), s2 = st.narrow(1, D, D);
      }
      be.gemm_class_grads(in, k0, kt, s1, s2, g, r, gmu_out, gs_out);
    }
  }
  if (need_x) be.gemm_grad_x(in, t1, t2, gx);  // t1 may be gx itself: read before written, per element
  return {gx, gmu, gs};
}

// Gradients back in the callers' storage dtype (no-op for float32 / float64).
std::tuple<Tensor, Tensor, Tensor> to_storage(const Inputs& in, std::tuple<Tensor, Tensor, Tensor> g) {
  if (in.storage == in.x.scalar_type()) return g;
  return {std::get<0>(g).to(in.storage), std::get<1>(g).to(in.storage), std::get<2>(g).to(in.storage)};
}

// The loss from the per-row losses.  On the CPU a serial sum in double: ATen's sum and mean cost ~30 us of
// dispatch per call here, a tenth of a whole MNIST-size training step of the fused loss.
Tensor reduce_rows(const Tensor& row, int64_t reduction) {
  if (reduction == kNone) return row;
  if (!row.is_cpu()) return reduction == kSum ? row.sum() : row.mean();
  Tensor out = at::empty({}, row.options());
  AT_DISPATCH_FLOATING_TYPES(row.scalar_type(), "lgm_loss_reduce", [&] {
    const scalar_t* p = row.const_data_ptr<scalar_t>();
    const int64_t n = row.numel();
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(p[i]);
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(reduction == kMean ? acc / static_cast<double>(n) : acc);
  });
  return out;
}

// Class-sharded loss (class_offset given): per-row outputs only, and a non-negative offset.
void check_shard(const std::optional<int64_t>& class_offset, int64_t reduction, const char* op) {
  if (!class_offset.has_value()) return;
  TORCH_CHECK_VALUE(*class_offset >= 0, op, ": class_offset must be >= 0, got ", *class_offset);
  TORCH_CHECK_VALUE(reduction == kNone, op, ": with class_offset (a class shard) reduction must be 0 (none), got ",
                    reduction);
}

// Global labels -> this shard's columns (rows outside [0, K) belong to other shards: math::label_column).
void shift_labels(Inputs& in, const std::optional<int64_t>& class_offset) {
  if (class_offset.has_value() && *class_offset != 0) in.labels = in.labels - *class_offset;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> loss_forward(BackendFor backend, const Tensor& x, const Tensor& mu,
                                                const std::optional<Tensor>& log_var, const Tensor& labels,
                                                double alpha, double lambda, int64_t reduction, int64_t impl,
                                                std::optional<int64_t> class_offset) {
  const Backend& be = backend_of(backend, x);
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, lambda, reduction, impl);
  check_shard(class_offset, reduction, "lgm_loss");
  Inputs in = prepare(be, x, mu, log_var, labels, true, !class_offset.has_value(), impl, "lgm_loss");
  shift_labels(in, class_offset);
  Tensor stats = at::empty({in.N, 2}, in.x.options());
  Tensor row = at::empty({in.N}, in.x.options());
  Tensor logits = compute_logits(be, in, alpha, lambda, /*margin_out=*/false, impl, stats, row);
  return {reduce_rows(row, reduction), logits, stats};
}

std::tuple<Tensor, Tensor, Tensor> loss_backward(BackendFor backend, const Tensor& grad_loss,
                                                 const std::optional<Tensor>& grad_logits, const Tensor& x,
                                                 const Tensor& mu, const std::optional<Tensor>& log_var,
                                                 const Tensor& labels, const std::optional<Tensor>& logits,
                                                 const Tensor& stats, double alpha, double lambda, int64_t reduction,
                                                 int64_t impl, Mask mask, std::optional<int64_t> class_offset) {
  const Backend& be = backend_of(backend, x);
  const char* op = "lgm_loss_backward";
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, lambda, reduction, impl);
  check_shard(class_offset, reduction, op);
  Inputs in = prepare(be, x, mu, log_var, labels, true, !class_offset.has_value(), impl, op);
  shift_labels(in, class_offset);
  check_same(in.x, "features", grad_loss, "grad_loss", op);
  TORCH_CHECK_VALUE(grad_loss.numel() == (reduction == kNone ? in.N : 1), op, ": grad_loss must have ",
                    reduction == kNone ? in.N : 1, " element(s), got ", grad_loss.numel());
  check_aux(in, stats, "row_stats", {in.N, 2}, op);
  Coef cf;
  cf.stats = stats.contiguous();
  cf.scale = grad_loss.contiguous();
  cf.scale_stride = reduction == kNone ? 1 : 0;
  cf.scale_mult = reduction == kMean ? 1.0 / static_cast<double>(in.N) : 1.0;
  cf.alpha = alpha, cf.lambda = lambda;
  const bool saved = logits.has_value() && logits->defined();
  if (saved) {
    check_aux(in, *logits, "logits", {in.N, in.K}, op);
    cf.logits = logits->contiguous();
  }
  if (grad_logits.has_value() && grad_logits->defined()) {
    check_aux(in, *grad_logits, "grad_logits", {in.N, in.K}, op);
    cf.grad_logits = grad_logits->contiguous();
  }
  return to_storage(in, grads_tiled(be, in, cf, saved, impl, mask));
}

Tensor logits_forward(BackendFor backend, const Tensor& x, const Tensor& mu, const std::optional<Tensor>& log_var,
                      const std::optional<Tensor>& labels, double alpha, int64_t impl) {
  const Backend& be = backend_of(backend, x);
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, 0.0, kMean, impl);
  const Inputs in = prepare(be, x, mu, log_var, labels, false, true, impl,
                            "lgm_logits");
  Tensor none_stats, none_row;
  return compute_logits(be, in, alpha, 0.0, /*margin_out=*/in.labels.defined(), impl, none_stats, none_row);
}

std::tuple<Tensor, Tensor, Tensor> logits_backward(BackendFor backend, const Tensor& grad, const Tensor& x,
                                                   const Tensor& mu, const std::optional<Tensor>& log_var,
                                                   const std::optional<Tensor>& labels, double alpha, int64_t impl,
                                                   Mask mask) {
  const Backend& be = backend_of(backend, x);
  const char* op = "lgm_logits_backward";
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(alpha, 0.0, kMean, impl);
  const Inputs in = prepare(be, x, mu, log_var, labels, false, true, impl, op);
  check_aux(in, grad, "grad", {in.N, in.K}, op);
  Coef cf;
  cf.grad_logits = grad.contiguous();
  cf.alpha = alpha;
  return to_storage(in, grads_tiled(be, in, cf, false, impl, mask));
}

std::tuple<Tensor, Tensor> log_likelihood(BackendFor backend, const Tensor& x, const Tensor& mu,
                                          const std::optional<Tensor>& log_var, int64_t impl) {
  const Backend& be = backend_of(backend, x);
  const c10::OptionalDeviceGuard guard(x.device());
  check_scalars(0.0, 0.0, kMean, impl);
  const Inputs in = prepare(be, x, mu, log_var, std::nullopt, false, false, impl,
                            "lgm_log_likelihood");
  Tensor none_stats, none_row;
  Tensor logits = compute_logits(be, in, 0.0, 0.0, false, impl, none_stats, none_row);
  auto best = logits.max(1);
  Tensor ll = std::get<0>(best).sub_(0.5 * static_cast<double>(in.D) * std::log(2.0 * M_PI));
  return {ll, std::get<1>(best)};
}

void check_pgd(const Tensor& x, const Tensor& grad, const Tensor& x_orig, double alpha, double eps, double lower,
               double upper) {
  const char* op = "pgd_step";
  TORCH_CHECK_TYPE(is_storage_type(x.scalar_type()), op, ": x must be ", kStorageNames, ", got ", dtype_name(x));
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

void check_pgd_inplace(const Tensor& x, const Tensor& grad, const Tensor& x_orig) {
  const char* op = "pgd_step_";
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes, op,
                    ": x has elements that share memory (an expanded or stride-0 tensor) and cannot be written in "
                    "place; pass x.clone()");
  const std::pair<const Tensor*, const char*> inputs[] = {{&grad, "grad"}, {&x_orig, "x_orig"}};
  for (const auto& [t, name] : inputs)
    TORCH_CHECK_VALUE(at::get_overlap_status(x, *t) != at::MemOverlapStatus::Partial, op, ": ", name,
                      " partly overlaps x (some of their elements share memory), so writing x would change ", name,
                      " while it is read; torch's in-place ops refuse this too -- pass ", name, ".clone()");
}

}  // namespace lgm_ext
