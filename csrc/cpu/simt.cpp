// lgm-ext: the SIMT executor -- runs the CUDA kernels' own code (csrc/cuda/*.cuh) on the CPU
// (include/lgm_ext/simt.h says how the same source compiles for both).
//
// A launch runs its blocks one after another.  A block's threads are cooperative fibers (own stacks): each runs
// until it reaches a barrier (__syncthreads), a warp synchronisation (__syncwarp, a shuffle) or its end; when
// no thread can run, the scheduler completes the warp operations whose lanes have all arrived (a shuffle
// reads each lane's value as it was on arrival, so the butterfly's operand order is CUDA's), or else the
// block barrier once every thread of the block waits at it.  Anything else -- a lane of a shuffle's mask that
// exited or waits elsewhere, a __syncthreads some thread never reaches -- is the divergence a GPU would
// deadlock on or leave undefined, and is reported.  Every write through a kernel pointer is recorded per
// address with its writer and the writer's barrier epoch: a second writer before a barrier orders them is a race.
#include <ucontext.h>

#include <atomic>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "../args.h"
#include "lgm_ext/simt.h"

#if defined(__SANITIZE_ADDRESS__)
#define LGM_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LGM_SIMT_ASAN 1
#endif
#endif
#if defined(LGM_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace lgm_ext {
namespace simt {

// ------------------------------------------------------------------ fiber contexts
// x86-64: a switch saves the callee-saved registers on the old stack and restores them from the new one (the
// SSE/x87 control words are shared: every fiber runs with the launching thread's, which kernels do not change).  glibc's swapcontext also saves the signal mask, a system call per
// switch -- 25x slower over a kernel's thousands of shuffles -- so it is only the fallback elsewhere.
#if defined(__x86_64__) && !defined(LGM_SIMT_UCONTEXT)
#define LGM_SIMT_ASM_SWITCH 1
extern "C" void lgm_simt_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.p2align 4
.globl lgm_simt_switch
.hidden lgm_simt_switch
.type lgm_simt_switch,@function
lgm_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size lgm_simt_switch, .-lgm_simt_switch
.section .note.GNU-stack,"",@progbits
.text
)");

struct Context {
  void* sp = nullptr;
};
// A fresh context that starts in entry() on [stack, stack + bytes).
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto* q = reinterpret_cast<uint64_t*>(top);
  q[-1] = 0;                                    // entry's return address (it never returns)
  q[-2] = reinterpret_cast<uint64_t>(entry);    // popped by the switch's ret
  for (int i = 3; i <= 8; ++i) q[-i] = 0;       // rbp, rbx, r12-r15
  c.sp = &q[-8];
}
inline void switch_context(Context& from, Context& to) { lgm_simt_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------ kernel pointers (simt.h CheckedPtrs)
Region tensor_region(const at::Tensor& t, const char* name, bool writable) {
  int64_t extent = t.numel() > 0 ? 1 : 0;
  for (int64_t i = 0; i < t.dim() && extent > 0; ++i) extent += (t.size(i) - 1) * t.stride(i);
  Region r;
  r.lo = static_cast<const char*>(t.data_ptr());
  r.hi = r.lo + extent * static_cast<int64_t>(t.element_size());
  r.name = name, r.writable = writable;
  return r;
}

namespace {

constexpr int kWarp = launch::kWarp;

enum class State : uint8_t { ready, barrier, warp_op, done };
enum class WarpOp : uint8_t { syncwarp, shfl };

const char* const kShflName[] = {"__shfl_sync", "__shfl_xor_sync", "__shfl_up_sync", "__shfl_down_sync"};

struct Fiber {
  Context ctx;
  State state = State::ready;
  WarpOp op = WarpOp::syncwarp;
  int mode = 0, arg = 0, width = 32;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  uint32_t warp_epoch = 0;
  uint3 tid;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's fake stack of this fiber while it is switched out
};

struct Writer {
  int64_t block;
  int32_t thread;
  uint32_t block_epoch, warp_epoch;
  bool atomic;
};

size_t stack_bytes() {
#if defined(LGM_SIMT_ASAN)
  return 256 * 1024;
#else
  return 128 * 1024;
#endif
}

// One launch in progress on this OS thread.
struct Exec {
  const LaunchSpec* spec = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  int nthreads = 0;
  int current = -1;
  int64_t block_linear = 0;
  uint3 block{0, 0, 0};
  uint32_t block_epoch = 0;
  Context sched;
  std::exception_ptr error;  // the fault of thread error_thread
  int error_thread = -1;
  std::unordered_map<const void*, Writer> global_writes, shared_writes;
#if defined(LGM_SIMT_ASAN)
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

// One launch at a time in the process (g_launch_mutex): the fibers' indices are plain globals (simt.h).
std::mutex g_launch_mutex;
Exec* t_exec = nullptr;
std::vector<std::unique_ptr<char[]>> t_stacks;  // reused between launches

std::string dim_str(const uint3& d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}

std::string where(const Exec& e, int t) {
  std::ostringstream s;
  s << "kernel " << e.spec->kernel << ", block " << dim_str(e.block) << ", thread " << dim_str(e.fibers[t].tid);
  return s.str();
}

[[noreturn]] void fail(const Exec& e, int t, const std::string& what) {
  TORCH_CHECK(false, "SIMT executor: ", where(e, t), ": ", what);
}

struct FaultError : std::exception {
  std::string msg;
  explicit FaultError(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

// The running fiber f stops (parked, or finished): control passes straight to the next ready thread of this
// pass, or back to the scheduler when there is none (or f failed).
void yield_fiber(Exec& e, Fiber& f, bool finishing) {
  int next = -1;
  if (!e.error)
    for (int t = e.current + 1; t < e.nthreads; ++t)
      if (e.fibers[t].state == State::ready) {
        next = t;
        break;
      }
  Context* to = &e.sched;
#if defined(LGM_SIMT_ASAN)
  const void* to_bottom = e.sched_stack_bottom;
  size_t to_size = e.sched_stack_size;
#endif
  if (next >= 0) {
    Fiber& g = e.fibers[next];
    e.current = next;
    threadIdx = g.tid;
    to = &g.ctx;
#if defined(LGM_SIMT_ASAN)
    to_bottom = g.stack, to_size = stack_bytes();
#endif
  }
#if defined(LGM_SIMT_ASAN)
  __sanitizer_start_switch_fiber(finishing ? nullptr : &f.fake_stack, to_bottom, to_size);
#else
  (void)finishing;
#endif
  switch_context(f.ctx, *to);
#if defined(LGM_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
  Exec& e = *t_exec;
#if defined(LGM_SIMT_ASAN)
  if (e.sched_stack_bottom == nullptr) {  // the first fiber learns the scheduler's stack
    __sanitizer_finish_switch_fiber(nullptr, &e.sched_stack_bottom, &e.sched_stack_size);
  } else {
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
  }
#endif
  Fiber& f = e.fibers[e.current];
  try {
    (*e.body)();
  } catch (...) {
    e.error = std::current_exception();
    e.error_thread = e.current;
  }
  f.state = State::done;
  yield_fiber(e, f, true);
  std::abort();  // never resumed
}

void resume(Exec& e, int t) {
  Fiber& f = e.fibers[t];
  e.current = t;
  threadIdx = f.tid;
#if defined(LGM_SIMT_ASAN)
  __sanitizer_start_switch_fiber(&e.sched_fake_stack, f.stack, stack_bytes());
#endif
  switch_context(e.sched, f.ctx);
#if defined(LGM_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(e.sched_fake_stack, nullptr, nullptr);
#endif
  e.current = -1;
  if (e.error) {
    std::string msg;
    try {
      std::rethrow_exception(e.error);
    } catch (const FaultError& x) {
      msg = x.msg;
    } catch (const c10::Error& x) {
      msg = x.what_without_backtrace();
    } catch (const std::exception& x) {
      msg = x.what();
    }
    e.error = nullptr;
    fail(e, e.error_thread, msg);
  }
}

Fiber& running(const char* what) {
  Exec* e = t_exec;
  TORCH_CHECK(e != nullptr && e->current >= 0, "SIMT executor: ", what, " called outside a kernel");
  return e->fibers[e->current];
}

std::string state_str(const Fiber& f) {
  switch (f.state) {
    case State::done: return "has exited";
    case State::barrier: return "waits at __syncthreads";
    case State::warp_op: {
      std::ostringstream s;
      s << "waits at " << (f.op == WarpOp::shfl ? kShflName[f.mode] : "__syncwarp") << " (mask 0x" << std::hex
        << f.mask << ")";
      return s.str();
    }
    default: return "is running";
  }
}

// The lanes of warp w whose warp operations can complete do so; returns whether any did.  A lane waiting at
// a warp operation that cannot complete -- a lane of its mask exited or waits elsewhere -- is a fault.
bool complete_warp_ops(Exec& e, int w) {
  const int first = w * kWarp, lanes = std::min(kWarp, e.nthreads - first);
  bool any = false;
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = e.fibers[first + l];
    if (f.state != State::warp_op) continue;
    const unsigned mask = f.mask;
    const char* name = f.op == WarpOp::shfl ? kShflName[f.mode] : "__syncwarp";
    if (!(mask >> l & 1u)) {
      std::ostringstream s;
      s << name << " with mask 0x" << std::hex << mask << " called by lane " << std::dec << l
        << ", which is not in the mask";
      fail(e, first + l, s.str());
    }
    for (int m = 0; m < kWarp; ++m) {
      if (!(mask >> m & 1u)) continue;
      if (m >= lanes) {
        std::ostringstream s;
        s << name << " with mask 0x" << std::hex << mask << " names lane " << std::dec << m
          << ", which this block does not have";
        fail(e, first + l, s.str());
      }
      const Fiber& o = e.fibers[first + m];
      if (o.state != State::warp_op || o.op != f.op || o.mask != mask || (f.op == WarpOp::shfl && o.mode != f.mode)) {
        std::ostringstream s;
        s << "divergent warp synchronisation: lane " << l << " waits at " << name << " (mask 0x" << std::hex << mask
          << std::dec << ") but lane " << m << " of its mask " << state_str(o);
        fail(e, first + l, s.str());
      }
    }
    // Every lane of the mask is here: complete the operation for all of them at once.
    for (int m = 0; m < kWarp; ++m) {
      if (!(mask >> m & 1u)) continue;
      Fiber& o = e.fibers[first + m];
      if (o.op == WarpOp::shfl) {
        const int width = o.width;
        if (width < 1 || width > kWarp || (width & (width - 1)) != 0) fail(e, first + m, "shuffle width must be a power of two <= 32");
        const int seg = m & ~(width - 1);
        int src = m;
        switch (o.mode) {
          case 0: src = seg + (o.arg & (width - 1)); break;
          case 1: src = m ^ o.arg; if (src >= seg + width || src < seg) src = m; break;
          case 2: src = m - o.arg; if (src < seg) src = m; break;
          default: src = m + o.arg; if (src >= seg + width) src = m; break;
        }
        if (src < 0 || src >= kWarp || !(mask >> src & 1u)) {
          std::ostringstream s;
          s << kShflName[o.mode] << " with mask 0x" << std::hex << mask << std::dec << ": lane " << m
            << " reads lane " << src << ", which is not in the mask (undefined on a GPU)";
          fail(e, first + m, s.str());
        }
        o.result = e.fibers[first + src].value;
      }
    }
    for (int m = 0; m < kWarp; ++m)
      if (mask >> m & 1u) {
        Fiber& o = e.fibers[first + m];
        o.state = State::ready;
        ++o.warp_epoch;
      }
    any = true;
  }
  return any;
}

void run_block(Exec& e) {
  const LaunchSpec& spec = *e.spec;
  const int n = e.nthreads;
  const size_t sb = stack_bytes();
  while (t_stacks.size() < static_cast<size_t>(n)) t_stacks.emplace_back(new char[sb]);
  e.fibers.assign(n, Fiber());  // (ucontext fallback: getcontext per fiber, one system call each)
  e.block_epoch = 0;
  e.shared_writes.clear();
  for (int t = 0; t < n; ++t) {
    Fiber& f = e.fibers[t];
    f.tid = uint3(t % spec.block.x, t / spec.block.x % spec.block.y, t / (spec.block.x * spec.block.y));
    f.stack = t_stacks[t].get();
#if defined(LGM_SIMT_ASAN)
    // A reused stack keeps the poisoned redzones of the frames its last fiber never returned from.
    ASAN_UNPOISON_MEMORY_REGION(f.stack, sb);
#endif
    make_context(f.ctx, f.stack, sb, &fiber_main);
  }
  const int warps = (n + kWarp - 1) / kWarp;
  for (;;) {
    for (int t = 0; t < n; ++t)
      if (e.fibers[t].state == State::ready) resume(e, t);
    bool progressed = false;
    for (int w = 0; w < warps; ++w) progressed |= complete_warp_ops(e, w);
    if (progressed) continue;
    int waiting = -1, other = -1;
    for (int t = 0; t < n; ++t) {
      if (e.fibers[t].state == State::barrier) {
        if (waiting < 0) waiting = t;
      } else if (other < 0) {
        other = t;
      }
    }
    if (waiting < 0) return;  // every thread has exited
    if (other >= 0) {
      std::ostringstream s;
      s << "divergent __syncthreads: thread " << dim_str(e.fibers[waiting].tid) << " waits at it but thread "
        << dim_str(e.fibers[other].tid) << " " << state_str(e.fibers[other])
        << " (every thread of the block must reach the same barrier)";
      fail(e, waiting, s.str());
    }
    for (Fiber& f : e.fibers) f.state = State::ready;
    ++e.block_epoch;
  }
}

}  // namespace

void run(const LaunchSpec& spec, const std::function<void()>& body) {
  static thread_local bool t_launching = false;
  TORCH_CHECK(!t_launching, "SIMT executor: a kernel launched ", spec.kernel, " from inside a kernel");
  std::lock_guard<std::mutex> lock(g_launch_mutex);  // one launch at a time (another OS thread's waits)
  t_launching = true;
  Exec e;
  e.spec = &spec;
  e.body = &body;
  e.nthreads = static_cast<int>(spec.block.x * spec.block.y * spec.block.z);
  struct Guard {
    ~Guard() {
      t_launching = false;
      t_exec = nullptr;
      threadIdx = blockIdx = uint3(0, 0, 0);
    }
  } guard;
  t_exec = &e;
  blockDim = spec.block;
  gridDim = spec.grid;
  for (unsigned bz = 0; bz < spec.grid.z; ++bz)
    for (unsigned by = 0; by < spec.grid.y; ++by)
      for (unsigned bx = 0; bx < spec.grid.x; ++bx) {
        e.block = uint3(bx, by, bz);
        e.block_linear = (static_cast<int64_t>(bz) * spec.grid.y + by) * spec.grid.x + bx;
        blockIdx = e.block;
        run_block(e);
      }
}

[[noreturn]] void fault(const std::string& what) { throw FaultError(what); }

[[noreturn]] void out_of_bounds(const Region& r, const void* p, size_t size, bool write) {
  std::ostringstream s;
  const char* c = static_cast<const char*>(p);
  s << "out-of-bounds " << (write ? "write" : "read") << " through " << r.name << ": ";
  if (r.lo == nullptr) {
    s << "a null pointer";
  } else {
    s << "byte offset " << (c - r.lo) << " (" << size << " bytes) of a " << (r.hi - r.lo) << "-byte "
      << (r.space == Space::shared ? "shared array" : "tensor");
  }
  if (t_exec == nullptr || t_exec->current < 0) TORCH_CHECK(false, "SIMT executor: ", s.str());
  fault(s.str());
}

void note_write(const void* addr, bool shared, bool atomic) {
  Exec* e = t_exec;
  if (e == nullptr || e->current < 0) return;
  const Fiber& f = e->fibers[e->current];
  const Writer me{e->block_linear, e->current, e->block_epoch, f.warp_epoch, atomic};
  auto& writes = shared ? e->shared_writes : e->global_writes;
  auto [it, fresh] = writes.try_emplace(addr, me);
  if (fresh) return;
  Writer& w = it->second;
  if (w.thread != me.thread || w.block != me.block) {
    const bool same_block = w.block == me.block;
    const bool same_warp = same_block && w.thread / kWarp == me.thread / kWarp;
    const bool ordered = same_block && (w.block_epoch != me.block_epoch ||
                                        (same_warp && w.warp_epoch != me.warp_epoch));
    if (!ordered && !(w.atomic && me.atomic)) {
      std::ostringstream s;
      s << "write-write race on " << (shared ? "shared" : "global") << " address " << addr << ": ";
      if (same_block) {
        const Fiber& o = e->fibers[w.thread];
        s << "thread " << dim_str(o.tid) << " of this block wrote it since the last barrier";
      } else {
        s << "a thread of block " << w.block << " (linear index) wrote it in this launch";
      }
      fault(s.str());
    }
  }
  w = me;
}

void syncthreads() {
  Fiber& f = running("__syncthreads");
  f.state = State::barrier;
  yield_fiber(*t_exec, f, false);
}

void syncwarp(unsigned mask) {
  Fiber& f = running("__syncwarp");
  f.state = State::warp_op;
  f.op = WarpOp::syncwarp;
  f.mask = mask;
  yield_fiber(*t_exec, f, false);
}

uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg, int width) {
  Fiber& f = running("a warp shuffle");
  f.state = State::warp_op;
  f.op = WarpOp::shfl;
  f.mask = mask, f.value = bits, f.mode = mode, f.arg = arg, f.width = width;
  yield_fiber(*t_exec, f, false);
  return f.result;
}

}  // namespace simt
}  // namespace lgm_ext
