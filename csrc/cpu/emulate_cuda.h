// Test-only: the CUDA kernels (csrc/cuda/*.cuh) run on the CPU by the SIMT executor.
#pragma once

#include "../host.h"

namespace lgm_ext {

// When enabled (torch.ops.lgm_ext._set_cuda_emulation(True)), the CPU operator
// kernels run the CUDA kernels on the SIMT executor instead of the CPU loops.
bool cuda_emulation_enabled();
const Backend& emulated_cuda_backend(at::ScalarType acc);  // kernels of that accumulation type
void emulated_pgd_step(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                       double lower, double upper);

}  // namespace lgm_ext
