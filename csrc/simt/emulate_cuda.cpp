// The `cuda-emulated` backend (in lgm_ext._simt, the test module, never in the production lgm_ext._C): the CUDA
// kernels' own source (csrc/cuda/*.cuh), compiled by the host compiler and run on the SIMT executor
// (include/lgm_ext/simt.h, simt/simt.cpp) -- every thread of every block, with CUDA's barrier and warp-shuffle
// semantics, bounds-checked pointers, read-write race tracking and the outputs each hook must fill checked.
// There is no second copy of a kernel here: what the tests run is what nvcc compiles.  While the emulation is
// on, this module's registrations replace the CPU loops' for the CPU dispatch key (the dispatcher restores
// those when they are dropped): the production operators carry no switch and no per-call check.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <memory>
#include <mutex>

#include "../args.h"
#include "../gemm.h"
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

std::mutex g_emulation_mutex;
std::unique_ptr<torch::Library> g_emulation;  // the CPU registrations of the emulated kernels, while on

bool set_cuda_emulation(bool on) {
  std::lock_guard<std::mutex> lock(g_emulation_mutex);
  const bool was = g_emulation != nullptr;
  if (on && !was) {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "lgm_ext", c10::DispatchKey::CPU, __FILE__,
                                                __LINE__);
    register_lgm_ops<&emulated_cuda_backend>(*lib);
    register_pgd_ops<&emulated_pgd_step>(*lib);
    g_emulation = std::move(lib);
  } else if (!on && was) {
    g_emulation.reset();  // the CPU loops' registrations are the operators' kernels again
  }
  return was;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  // Test-only: route the CPU operators through the CUDA kernels on the SIMT executor; returns the previous setting.
  m.def("_set_cuda_emulation(bool on) -> bool", &set_cuda_emulation);
  // Test-only: the number of thread orders (schedules) every launch runs under (simt.h set_orders); returns
  // the previous value.
  m.def("_simt_set_orders(int orders) -> int", [](int64_t n) { return int64_t(simt::set_orders(static_cast<int>(n))); });
}

}  // namespace lgm_ext

extern "C" {
// `import lgm_ext._simt` (lgm_ext._testing.executor()) loads this library, which links lgm_ext._C and runs the
// registrations above.
PyObject* PyInit__simt(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_simt",
      "lgm-ext's SIMT executor (test module): the CUDA kernels run on the CPU, and their fault checks.", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
