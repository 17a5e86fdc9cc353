// lgm-ext: the GEMM path's GEMMs (host.cpp calls only these), in one of two modes.
//
// native        ATen's GEMM in the accumulation type: the CPU's BLAS; cuBLAS SGEMM/DGEMM on a GPU -- always
//               IEEE, under at::NoTF32Guard: with torch.backends.cuda.matmul.allow_tf32 set, cuBLAS would
//               round the float32 operands to TF32's 10-bit mantissa, and the expansion
//               sum_j x^2 w - 2 x mu w + mu^2 w cancels (when x ~ mu) exactly where that rounding hurts
//               (on the tests' data, emulated: 2e-4 to 5e-4 of the logits' scale, 20-50x the float32 bound).
// tensor cores  ("split") bf16 tensor-core GEMMs at float32 accuracy, for every storage dtype whose
//               accumulation type is float32.  Rounding the float32 operands to 16 bits would cancel as TF32
//               does (bf16: 1e-3 to 1e-2 of the logits' scale); instead each float32 operand v is written as bf16 parts
//               v = v0 + v1 + v2 (v0 = bf16(v), v1 = bf16(v - v0), ...: each part holds the next 8 bits,
//               exactly), and one bf16 GEMM with float32 accumulation over the operands' parts concatenated
//               along the inner dimension sums every product v_i w_j with i + j <= 2; the products left out
//               are below 2^-24 of |v| |w|, float32's own rounding.  A matrix of bf16 numbers (x and mu of
//               bf16 storage) is one part, x^2 of bf16 storage two; float16 values two, their squares three;
//               other float32 values three.  The epilogues (logits, log-sum-exp, coefficients, class
//               gradients) stay float32.  Off by default (lgm_ext._testing.tensor_core_gemms switches it):
//               with the parts made by separate ATen passes, benchmarks/cuda_floors.py puts this mode at
//               ~2.7x the float32 mode's floor for N = 256, D = 512; writing the parts from the kernels that
//               make the operands (operands_b, coefficients) is what would make it pay.  `make gpu-check`
//               times both modes.
//
// The tensor-core mode needs a 16-bit GEMM with float32 output (Backend::mm16): on CUDA ATen's mm.dtype
// (cuBLAS; torch >= 2.8 -- with an older torch the CUDA backend has none and the mode stays native); in the
// CPU emulation of the CUDA backend the bf16 parts widened exactly to float32 and a float32 GEMM (a product of
// two bf16 numbers is exact in float32, so only the order of the float32 sums differs from the tensor cores).
// The CPU backend has none.
#pragma once

#include <vector>

#include "host.h"

namespace lgm_ext {

struct GemmMode {
  Mm16Fn mm16 = nullptr;          // null: native
  int parts_x = 3, parts_x2 = 3;  // bf16 parts that hold x (and mu) and x^2 exactly (split mode)
  bool split() const { return mm16 != nullptr; }
};

// The mode of one call: tensor cores where they are switched on, the backend has mm16 and the accumulation
// type is float32; native otherwise.
GemmMode gemm_mode(const Backend& be, const Inputs& in);
bool set_tensor_core_gemms(bool on);  // test/benchmark hook (torch.ops.lgm_ext._set_tensor_core_gemms)

// A GEMM operand: the matrix (accumulation type) and, in split mode, its bf16 parts.
struct Operand {
  Tensor v;
  std::vector<Tensor> parts;
  Operand t() const;  // the transpose (views of the matrix and of its parts)
};
Operand operand(const GemmMode& mode, const Tensor& v, int parts);

// out = beta * self + alpha * (a b), beta 0 or 1 (self is ignored for 0; it may be out itself, or broadcast).
void gemm_out(const GemmMode& mode, Tensor& out, const Tensor& self, const Operand& a, const Operand& b,
              double beta, double alpha);
// The same into a new (rows of a, columns of b) tensor.
Tensor gemm(const GemmMode& mode, const Tensor& self, const Operand& a, const Operand& b, double beta, double alpha);

// Backend::mm16 implementations: ATen's mm.dtype (cuBLAS on CUDA; has_mm_dtype() says whether this torch has
// it), and the CPU emulation's exact widening.
Tensor mm16_aten(const Tensor& a, const Tensor& b);
bool has_mm_dtype();
Tensor mm16_widened(const Tensor& a, const Tensor& b);
int64_t mm16_calls();  // 16-bit GEMMs run so far (test hook: torch.ops.lgm_ext._mm16_calls)

}  // namespace lgm_ext
