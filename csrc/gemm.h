// lgm-ext: the GEMM path's GEMMs in the precision of the backend and the call (host.cpp calls only these).
//
// native  ATen's GEMM in the accumulation type: the CPU's BLAS, cuBLAS SGEMM/DGEMM on a GPU.
// split   tensor cores at float32 accuracy, on CUDA for bfloat16/float16 storage (and float32 storage where
//         torch.backends.cuda.matmul.allow_tf32 is set).  Rounding the float32 operands to 16 bits would
//         not do: the expansion sum_j x^2 w - 2 x mu w + mu^2 w cancels when x ~ mu, and its 16-bit rounding
//         error (2^-8 of |x|^2 w for bf16) would swamp the labelled distance and the log_var gradient
//         (benchmarks/cuda_floors.py prints what the split costs).  Instead each float32 operand v is
//         written as bf16 parts v = v0 + v1 + v2 (v0 = bf16(v), v1 = bf16(v - v0), ...: each part holds the
//         next 8 bits, exactly), and one bf16 GEMM with float32 accumulation over the operands' parts
//         concatenated along the inner dimension sums every product v_i w_j with i + j <= 2; the products
//         left out are below 2^-24 of |v| |w|, float32's own rounding.  A matrix of bf16 numbers (x and mu
//         of bf16 storage) is one part; x^2 of bf16 storage two; float16 values two, their squares three.
//         The epilogues (logits, log-sum-exp, coefficients, class gradients) stay float32.
//
// The split mode runs wherever the backend has a 16-bit GEMM (Backend::mm16): on CUDA, ATen's mm.dtype
// (cuBLAS, bf16 in, float32 out; torch >= 2.8 -- older torch keeps the native GEMMs); in the CPU emulation
// of the CUDA backend, the bf16 parts widened exactly to float32 and a float32 GEMM (the products of two
// bf16 numbers are exact in float32, so only the order of the float32 sums differs from the tensor cores).
// The CPU backend keeps the native GEMMs.
#pragma once

#include <vector>

#include "host.h"

namespace lgm_ext {

struct GemmMode {
  Mm16Fn mm16 = nullptr;          // null: native
  int parts_x = 3, parts_x2 = 3;  // bf16 parts that hold x (and mu) and x^2 exactly (split mode)
  bool split() const { return mm16 != nullptr; }
};

// The mode of one call: split where the backend has mm16 and the inputs are 16-bit (or float32 with
// allow_tf32 read from ATen's context); native otherwise (and always for float64).
GemmMode gemm_mode(const Backend& be, const Inputs& in);

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
