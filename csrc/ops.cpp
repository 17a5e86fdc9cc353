// lgm-ext operator schemas (namespace lgm_ext).  Kernels are registered per
// backend in csrc/cpu and csrc/cuda; fake kernels and autograd in
// lgm_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "host.h"

namespace {
PyObject* py_keep_logits(PyObject*, PyObject* args) {
  long long n = 0, k = 0, d = 0, impl = 0;
  if (!PyArg_ParseTuple(args, "LLLL", &n, &k, &d, &impl)) return nullptr;
  return PyBool_FromLong(lgm_ext::keep_logits_for_backward(n, k, d, impl));
}

PyMethodDef kMethods[] = {
    {"keep_logits_for_backward", py_keep_logits, METH_VARARGS,
     "keep_logits_for_backward(n, k, d, impl) -> bool: whether the L-GM loss saves its (N, K) logits for the "
     "backward (csrc/host.h)."},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

extern "C" {
// `import lgm_ext._C` loads this library, which runs the registrations below.
// The module exports the codes and the path threshold of host.h, so Python
// reads them from here instead of repeating them.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  const struct {
    const char* name;
    long value;
  } constants[] = {
      {"REDUCTION_NONE", lgm_ext::kNone},   {"REDUCTION_MEAN", lgm_ext::kMean},
      {"REDUCTION_SUM", lgm_ext::kSum},     {"IMPL_AUTO", lgm_ext::kAuto},
      {"IMPL_DIRECT", lgm_ext::kDirect},    {"IMPL_GEMM", lgm_ext::kGemm},
      {"DIRECT_MAX_KD", static_cast<long>(lgm_ext::kDirectMaxKD)},
  };
  for (const auto& c : constants) {
    if (PyModule_AddIntConstant(m, c.name, c.value) != 0) {
      Py_DECREF(m);
      return nullptr;
    }
  }
  return m;
}
}

TORCH_LIBRARY(lgm_ext, m) {
  // L-GM loss.  reduction: 0 none, 1 mean, 2 sum.  impl: 0 auto, 1 direct, 2 gemm.
  // Returns (loss, margin-free logits (N,K), row statistics (N,2): the logsumexp
  // of the margin logits and 1 - P[n, y], what the backward needs per row).
  //
  // class_offset (class-sharded loss, docs/SPEC.md section 7): means/log_var hold the classes
  // [class_offset, class_offset + K) of a larger model and labels are global class ids; a row whose
  // label lies outside that range has no labelled column here.  Then reduction must be 0 and the
  // outputs are this shard's partials: row statistics (lse_r over the shard's logits, with the margin
  // logit where the shard owns the label; q_r = 1 - P_r[n, y], 1 for rows it does not own) and loss
  // lse_r - margin logit + lambda_ (d_y + hl_y) on owned rows, 0 elsewhere.  The global statistics
  // are lse = log sum_r exp(lse_r) and 1 - P[n, y] = sum_r q_r exp(lse_r - lse) (no cancellation), and
  // lgm_loss_backward with the same class_offset and those global statistics returns the shard's
  // exact means/log_var gradients and its addend of the features' gradient.
  m.def(
      "lgm_loss_forward(Tensor features, Tensor means, Tensor? log_var, Tensor labels, float alpha, "
      "float lambda_, int reduction, int impl, int? class_offset=None) -> (Tensor, Tensor, Tensor)");
  // Analytic backward (docs/SPEC.md section 1).  logits: the forward's logits, or None to
  // recompute them in class tiles (memory-lean); output_mask: which of
  // (features, means, log_var) need a gradient -- the others come back empty,
  // as does the third when log_var is None.
  m.def(
      "lgm_loss_backward(Tensor grad_loss, Tensor? grad_logits, Tensor features, Tensor means, Tensor? log_var, "
      "Tensor labels, Tensor? logits, Tensor row_stats, float alpha, float lambda_, int reduction, int impl, "
      "bool[3] output_mask=[True, True, True], int? class_offset=None) -> (Tensor, Tensor, Tensor)");
  // Logits; with labels the labelled column carries the margin alpha.
  m.def("lgm_logits(Tensor features, Tensor means, Tensor? log_var, Tensor? labels, float alpha, int impl) -> Tensor");
  m.def(
      "lgm_logits_backward(Tensor grad, Tensor features, Tensor means, Tensor? log_var, Tensor? labels, "
      "float alpha, int impl, bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)");
  // (log-likelihood of the best class, that class)
  m.def("lgm_log_likelihood(Tensor features, Tensor means, Tensor? log_var, int impl) -> (Tensor, Tensor)");
  // Projected sign step (no gradient).
  m.def(
      "pgd_step(Tensor x, Tensor grad, Tensor x_orig, float alpha, float eps, float lower, float upper) -> Tensor");
  m.def(
      "pgd_step_(Tensor(a!) x, Tensor grad, Tensor x_orig, float alpha, float eps, float lower, float upper) -> ()");
}
