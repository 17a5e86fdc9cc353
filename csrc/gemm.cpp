// lgm-ext: the GEMM path's GEMMs, native or split into bf16 parts for the tensor cores (gemm.h).
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>

namespace lgm_ext {

namespace {
std::atomic<int64_t> g_mm16_calls{0};  // test hook: how many 16-bit GEMMs ran (lgm_ext._testing)
}

int64_t mm16_calls() { return g_mm16_calls.load(std::memory_order_relaxed); }

namespace {
// Off by default: benchmarks/cuda_floors.py shows the split's extra passes (the bf16 parts written by ATen
// ops, the concatenated operands) outweigh the tensor cores at the sizes of docs/CUDA.md (N = 256, D = 512);
// `make gpu-check` times the fused loss both ways so the default can follow measurements.
std::atomic<bool> g_tensor_cores{false};
}  // namespace

bool set_tensor_core_gemms(bool on) { return g_tensor_cores.exchange(on); }

GemmMode gemm_mode(const Backend& be, const Inputs& in) {
  GemmMode mode;
  if (be.mm16 == nullptr || in.x.scalar_type() != at::kFloat || !g_tensor_cores.load(std::memory_order_relaxed))
    return mode;
  if (in.storage == at::kBFloat16) {
    mode.parts_x = 1, mode.parts_x2 = 2;
  } else if (in.storage == at::kHalf) {
    mode.parts_x = 2, mode.parts_x2 = 3;
  }  // float32 storage: 3 and 3
  mode.mm16 = be.mm16;
  return mode;
}

Operand Operand::t() const {
  Operand o{v.t(), {}};
  for (const Tensor& p : parts) o.parts.push_back(p.t());
  return o;
}

Operand operand(const GemmMode& mode, const Tensor& v, int parts) {
  Operand o{v, {}};
  if (!mode.split()) return o;
  Tensor rem = v;
  for (int i = 0; i < parts; ++i) {
    o.parts.push_back(rem.to(at::kBFloat16));
    // v - bf16(v) is exact in float32.  Where v is not finite the rest is NaN; it is zeroed: the first part
    // carries the inf or NaN into the product, as the float32 GEMM would.
    if (i + 1 < parts) rem = (rem - o.parts.back().to(rem.scalar_type())).nan_to_num_(0.0, 0.0, 0.0);
  }
  return o;
}

namespace {

// a b summed over the part products a_i b_j with i + j <= 2, as one 16-bit GEMM with float32 accumulation
// over the parts concatenated along the inner dimension.
Tensor product(const GemmMode& mode, const Operand& a, const Operand& b) {
  std::vector<Tensor> as, bs;
  for (size_t i = 0; i < a.parts.size(); ++i)
    for (size_t j = 0; j < b.parts.size() && i + j <= 2; ++j) {
      as.push_back(a.parts[i]);
      bs.push_back(b.parts[j]);
    }
  g_mm16_calls.fetch_add(1, std::memory_order_relaxed);
  if (as.size() == 1) return mode.mm16(as[0], bs[0]);
  return mode.mm16(at::cat(as, 1), at::cat(bs, 0));
}

void check_beta(double beta) {
  TORCH_INTERNAL_ASSERT(beta == 0.0 || beta == 1.0, "gemm: beta must be 0 or 1");
}

}  // namespace

void gemm_out(const GemmMode& mode, Tensor& out, const Tensor& self, const Operand& a, const Operand& b,
              double beta, double alpha) {
  check_beta(beta);
  if (!mode.split()) {
    const at::NoTF32Guard ieee;  // (gemm.h: no TF32 operands)
    if (beta == 0.0 && alpha == 1.0) {
      at::mm_out(out, a.v, b.v);
    } else {
      at::addmm_out(out, beta == 0.0 ? out : self, a.v, b.v, beta, alpha);
    }
    return;
  }
  Tensor r = product(mode, a, b);
  if (beta == 0.0) {
    out.copy_(alpha == 1.0 ? r : r.mul_(alpha));
  } else if (self.is_same(out)) {
    out.add_(r, alpha);
  } else {
    at::add_out(out, self, r, alpha);
  }
}

Tensor gemm(const GemmMode& mode, const Tensor& self, const Operand& a, const Operand& b, double beta, double alpha) {
  check_beta(beta);
  if (!mode.split()) {
    const at::NoTF32Guard ieee;  // (gemm.h: no TF32 operands)
    return beta == 0.0 && alpha == 1.0 ? at::mm(a.v, b.v) : at::addmm(self, a.v, b.v, beta, alpha);
  }
  Tensor r = product(mode, a, b);
  if (alpha != 1.0) r.mul_(alpha);
  if (beta != 0.0) r.add_(self);
  return r;
}

Tensor mm16_aten(const Tensor& a, const Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aten::mm", "dtype")
                             .typed<Tensor(const Tensor&, const Tensor&, at::ScalarType)>();
  return op.call(a, b, at::kFloat);
}

bool has_mm_dtype() { return c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"}).has_value(); }

Tensor mm16_widened(const Tensor& a, const Tensor& b) { return at::mm(a.to(at::kFloat), b.to(at::kFloat)); }

}  // namespace lgm_ext
