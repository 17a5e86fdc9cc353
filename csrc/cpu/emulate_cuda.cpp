// The `cuda-emulated` backend: the CUDA kernels' own source (csrc/cuda/*.cuh), compiled by the host compiler
// and run on the SIMT executor (include/lgm_ext/simt.h, cpu/simt.cpp) -- every thread of every block, with
// CUDA's barrier and warp-shuffle semantics, bounds-checked pointers and a write-race check.  There is no
// second copy of a kernel here: what the tests run is what nvcc compiles.
#include "emulate_cuda.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>

#include "../args.h"
#include "../gemm.h"

namespace lgm_ext {
namespace {
std::atomic<bool> g_emulate{false};
std::atomic<int64_t> g_max_grid_z{launch::kMaxGridYZ};
}  // namespace
}  // namespace lgm_ext

#include "lgm_ext/simt.h"

namespace lgm_ext {
namespace {
cudaStream_t kernel_stream() { return nullptr; }
// The tensor-core GEMM of the emulation: the bf16 parts widened exactly to float32 (gemm.h).
Mm16Fn kernel_mm16() { return &mm16_widened; }
}  // namespace
}  // namespace lgm_ext

#include "../cuda/lgm_kernels.cuh"
#include "../cuda/pgd_kernels.cuh"

namespace lgm_ext {
namespace {

bool set_cuda_emulation(bool on) { return g_emulate.exchange(on); }

// The emulated backend's hooks: each runs the kernels' own hook under a simt::CallCheck, which poisons the
// outputs the hook must fill (signalling NaN, where they do not overlap an input) and then requires every
// element of them to have been written by one of its launches.
#define LGM_EMU_INPUTS in.x, in.mu, in.s, in.w, in.hl, in.labels

template <typename T>
void emu_direct_rows(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& stats,
                     Tensor& row_loss) {
  simt::CallCheck check("direct_rows");
  check.output(logits, "logits", {LGM_EMU_INPUTS});
  check.output(stats, "row_stats", {LGM_EMU_INPUTS});
  check.output(row_loss, "row_loss", {LGM_EMU_INPUTS});
  direct_rows<T>(in, alpha, lambda, margin_out, logits, stats, row_loss);
  check.verify();
}

template <typename T>
void emu_gemm_rows(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
                   Tensor& stats, Tensor& row_loss) {
  simt::CallCheck check("gemm_rows");
  check.output(m, "logits (from the expansion m, in place)", {m});
  check.output(stats, "row_stats", {LGM_EMU_INPUTS, m, c});
  check.output(row_loss, "row_loss", {LGM_EMU_INPUTS, m, c});
  gemm_rows<T>(in, m, c, alpha, lambda, margin_out, stats, row_loss);
  check.verify();
}

template <typename T>
void emu_coefficients(const Inputs& in, const Coef& cf, Tensor& g, Tensor& r) {
  simt::CallCheck check("coefficients");
  check.output(g, "coef", {LGM_EMU_INPUTS, cf.logits, cf.c, cf.stats, cf.scale, cf.grad_logits});
  if (in.labels.defined()) {  // r: the rows whose label lies in the tile [k0, k0 + kt), the others left as they are
    const Tensor y = in.labels.cpu();
    const int64_t* yp = y.data_ptr<int64_t>();
    std::vector<bool> rows(in.N);
    for (int64_t n = 0; n < in.N; ++n) rows[n] = yp[n] >= cf.k0 && yp[n] < cf.k0 + cf.kt;
    check.output_rows(r, "label_coef", std::move(rows));
  }
  coefficients<T>(in, cf, g, r);
  check.verify();
}

template <typename T>
void emu_direct_grads(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                      Tensor& grad_s) {
  simt::CallCheck check("direct_grads");
  check.output(grad_x, "grad_features", {LGM_EMU_INPUTS, g, r});
  check.output(grad_mu, "grad_means", {LGM_EMU_INPUTS, g, r});
  check.output(grad_s, "grad_log_var", {LGM_EMU_INPUTS, g, r});
  direct_grads<T>(in, g, r, grad_x, grad_mu, grad_s);
  check.verify();
}

template <typename T>
void emu_class_tables(const Tensor& s, Tensor& w, Tensor& hl) {
  simt::CallCheck check("class_tables");
  check.output(w, "inv_var", {s});
  check.output(hl, "half_logdet", {s});
  class_tables<T>(s, w, hl);
  check.verify();
}

template <typename T>
void emu_gemm_operands(const Inputs& in, Tensor& a, int64_t k0, int64_t kt, Tensor& b1, Tensor& b2, Tensor& c) {
  simt::CallCheck check("gemm_operands");
  check.output(a, "operand_a", {LGM_EMU_INPUTS});
  check.output(b1, "operand_b (first half)", {LGM_EMU_INPUTS});
  check.output(b2, "operand_b (second half)", {LGM_EMU_INPUTS});
  if (b1.defined()) check.output(c, "operand_c", {LGM_EMU_INPUTS});
  gemm_operands<T>(in, a, k0, kt, b1, b2, c);
  check.verify();
}

template <typename T>
void emu_gemm_grad_x(const Inputs& in, const Tensor& t1, const Tensor& t2, Tensor& grad_x) {
  simt::CallCheck check("gemm_grad_x");
  check.output(grad_x, "grad_features", {LGM_EMU_INPUTS, t1, t2});
  gemm_grad_x<T>(in, t1, t2, grad_x);
  check.verify();
}

template <typename T>
void emu_gemm_class_grads(const Inputs& in, int64_t k0, int64_t kt, const Tensor& s1, const Tensor& s2,
                          const Tensor& g, const Tensor& r, Tensor& grad_mu, Tensor& grad_s) {
  simt::CallCheck check("gemm_class_grads");
  if (grad_mu.defined()) check.output(grad_mu.narrow(0, k0, kt), "grad_means (the tile's rows)", {LGM_EMU_INPUTS, s1, s2, g, r});
  if (grad_s.defined()) check.output(grad_s.narrow(0, k0, kt), "grad_log_var (the tile's rows)", {LGM_EMU_INPUTS, s1, s2, g, r});
  gemm_class_grads<T>(in, k0, kt, s1, s2, g, r, grad_mu, grad_s);
  check.verify();
}

#undef LGM_EMU_INPUTS

template <typename T>
const Backend& emulated_backend_for() {
  static const Backend be{&emu_direct_rows<T>,   &emu_gemm_rows<T>,      &emu_coefficients<T>,
                          &emu_direct_grads<T>,  &check_labels_aminmax,  &emu_class_tables<T>,
                          &emu_gemm_operands<T>, &emu_gemm_grad_x<T>,    &emu_gemm_class_grads<T>,
                          kernel_mm16()};
  return be;
}

}  // namespace

// launch.h: the z extent of one launch, for the CUDA kernels and the executor.
int64_t launch::max_grid_z() { return g_max_grid_z.load(std::memory_order_relaxed); }
int64_t launch::set_max_grid_z(int64_t z) {
  TORCH_CHECK_VALUE(z >= 1 && z <= kMaxGridYZ, "max_grid_z must be in [1, ", kMaxGridYZ, "], got ", z);
  return g_max_grid_z.exchange(z);
}

bool cuda_emulation_enabled() { return g_emulate.load(std::memory_order_relaxed); }

const Backend& emulated_cuda_backend(at::ScalarType acc) {
  return acc == at::kDouble ? emulated_backend_for<double>() : emulated_backend_for<float>();
}

void emulated_pgd_step(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                       double lower, double upper) {
  simt::CallCheck check("pgd_step");
  check.output(out, "out", {x, g, x0});
  pgd_step_into(out, x, g, x0, alpha, eps, lower, upper);
  check.verify();
}

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  // Test-only: route CPU kernels through the CUDA kernels on the SIMT executor; returns the previous setting.
  m.def("_set_cuda_emulation(bool on) -> bool", &set_cuda_emulation);
  // Test-only: the z extent one launch may use (launch.h max_grid_z; CUDA's limit 65,535 by default), for the
  // executor and the real CUDA kernels; returns the previous value.
  m.def("_set_max_grid_z(int z) -> int", [](int64_t z) { return set_max_grid_z(z); });
  // Test-only: how many 16-bit (tensor-core) GEMMs the GEMM path has run (gemm.h), on any backend.
  m.def("_mm16_calls() -> int", []() { return mm16_calls(); });
  // Test/benchmark hook: the GEMM path's tensor-core mode on or off (gemm.h; off by default); returns the
  // previous setting.
  m.def("_set_tensor_core_gemms(bool on) -> bool", [](bool on) { return set_tensor_core_gemms(on); });
}

}  // namespace lgm_ext
