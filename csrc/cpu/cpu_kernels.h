// CPU loop mechanics shared by the CPU kernel files: per-ISA function clones
// (the binary stays portable; the loader picks AVX-512, AVX2 or baseline code
// at run time) and the grain size of at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define LGM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LGM_CPU_CLONES
#endif
#define LGM_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace lgm_ext {
namespace cpu {

// Items per task so that a task holds at least ~32k multiply-adds.
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

}  // namespace cpu
}  // namespace lgm_ext
