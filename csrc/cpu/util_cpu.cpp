// lgm-ext CPU utilities.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

namespace lgm_ext {
namespace {

// torch.set_flush_denormal() sets FTZ/DAZ on the calling thread only; ATen's
// worker threads keep their own MXCSR.  Benchmarks call this so every side
// (ours and plain PyTorch) runs with denormals flushed on every thread.
bool flush_denormal_all_threads(bool on) {
  std::atomic<bool> ok{at::globalContext().setFlushDenormal(on)};
  const int64_t n = at::get_num_threads();
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    if (!at::globalContext().setFlushDenormal(on)) ok = false;
  });
  return ok.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lgm_ext, m) {
  m.def("_flush_denormal_all_threads(bool on) -> bool", &flush_denormal_all_threads);
}

}  // namespace lgm_ext
