// Test-only: the CUDA kernels' thread decomposition executed on the CPU.
#pragma once

#include "../host.h"

namespace lgm_ext {

// When enabled (torch.ops.lgm_ext._set_cuda_emulation(True)), the CPU operator
// kernels run through the emulated CUDA backend instead of the CPU loops.
bool cuda_emulation_enabled();
const Backend& emulated_cuda_backend(at::ScalarType acc);  // kernels of that accumulation type
void emulated_pgd_step(Tensor& out, const Tensor& x, const Tensor& g, const Tensor& x0, double alpha, double eps,
                       double lower, double upper);

}  // namespace lgm_ext
