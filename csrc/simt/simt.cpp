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

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <numeric>
#include <random>
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
namespace {

// The memory the kernel pointers made for writing cover, since the current CallCheck began (or the last 256
// such pointers without one): a read through a pointer to const elements can only race where it reads this
// memory (an alias of an output), so the tracker records only those reads.
thread_local std::vector<std::pair<const char*, const char*>> t_writable;

void note_writable(const char* lo, const char* hi) {
  for (const auto& [a, b] : t_writable)
    if (a == lo && b == hi) return;
  if (t_writable.size() >= 256) t_writable.clear();
  t_writable.emplace_back(lo, hi);
}

bool in_writable(const void* addr) {
  const char* c = static_cast<const char*>(addr);
  for (const auto& [a, b] : t_writable)
    if (a <= c && c < b) return true;
  return false;
}

}  // namespace

Region tensor_region(const at::Tensor& t, const char* name, bool writable) {
  int64_t extent = t.numel() > 0 ? 1 : 0;
  for (int64_t i = 0; i < t.dim() && extent > 0; ++i) extent += (t.size(i) - 1) * t.stride(i);
  Region r;
  r.lo = static_cast<const char*>(t.data_ptr());
  r.hi = r.lo + extent * static_cast<int64_t>(t.element_size());
  r.name = name, r.writable = writable;
  if (writable) note_writable(r.lo, r.hi);
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

// One access by a thread: its block, its index in the block and the barrier epochs it had reached.
struct Access {
  int64_t block;
  int32_t thread;
  uint32_t block_epoch, warp_epoch;
  bool atomic;
};

// The reads of one address by one warp in the current barrier interval: its lanes, and the warp epoch of the
// newest (a lane's read at an older warp epoch is ordered before that warp's later operations).
struct WarpReads {
  int32_t warp;
  uint32_t lanes;
  uint32_t epoch;
};

// What a launch did to one address: its last write, and its reads since the block's last barrier.
struct AddrState {
  bool written = false;
  Access writer{};
  int64_t read_block = -1;        // the block of `reads` (-1: none yet)
  uint32_t read_epoch = 0;        // and its block epoch
  int64_t other_block_read = -1;  // another block that read it in this launch (-1: none)
  std::vector<WarpReads> reads;
};

size_t stack_bytes() {
#if defined(LGM_SIMT_ASAN)
  return 256 * 1024;
#else
  return 128 * 1024;
#endif
}

// A global address's bytes before a launch's first write to it, and which tensor element it is.
struct Undo {
  std::vector<unsigned char> bytes;
  const char* name = "?";
  std::ptrdiff_t element = 0;
};

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
  std::unordered_map<const void*, AddrState> global_acc, shared_acc;
  // The schedule: threads are resumed in `order` (pos_of inverts it); schedule k of the launch (0: index
  // order), `order_name` says which.
  std::vector<int> order, pos_of;
  int schedule = 0;
  const char* order_name = "index order";
  // Global memory the launch wrote: each address's bytes before its first write (restored between schedules).
  std::unordered_map<void*, Undo> undo;
  bool replay = false;  // the launch runs under more than one schedule (undo is kept)
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
  if (e.schedule > 0) s << " (threads run in " << e.order_name << ")";
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
    for (int p = e.pos_of[e.current] + 1; p < e.nthreads; ++p)
      if (e.fibers[e.order[p]].state == State::ready) {
        next = e.order[p];
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
  e.shared_acc.clear();
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
    for (int p = 0; p < n; ++p)
      if (e.fibers[e.order[p]].state == State::ready) resume(e, e.order[p]);
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

namespace {

std::atomic<int> g_orders{0};  // 0: LGM_SIMT_ORDERS not read yet

int orders_setting() {
  int o = g_orders.load(std::memory_order_relaxed);
  if (o == 0) {
    const char* v = std::getenv("LGM_SIMT_ORDERS");
    o = v != nullptr && std::atoi(v) >= 1 ? std::atoi(v) : 1;
    g_orders.store(o, std::memory_order_relaxed);
  }
  return o;
}

thread_local CallCheck* t_check = nullptr;  // the hook call in progress on this OS thread, if any

// Schedule k of a launch: the order of its blocks and of the threads within each block.
void set_schedule(Exec& e, int k, std::vector<int64_t>& blocks, std::string& name) {
  const int n = e.nthreads;
  e.order.resize(n);
  e.pos_of.resize(n);
  std::iota(e.order.begin(), e.order.end(), 0);
  std::iota(blocks.begin(), blocks.end(), int64_t(0));
  if (k == 1) {
    std::reverse(e.order.begin(), e.order.end());
    std::reverse(blocks.begin(), blocks.end());
    name = "reverse order";
  } else if (k >= 2) {
    std::mt19937 rng(static_cast<unsigned>(k));
    std::shuffle(e.order.begin(), e.order.end(), rng);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    name = "a shuffled order (seed " + std::to_string(k) + ")";
  } else {
    name = "index order";
  }
  for (int p = 0; p < n; ++p) e.pos_of[e.order[p]] = p;
  e.schedule = k;
  e.order_name = name.c_str();
}

}  // namespace

int set_orders(int orders) {
  TORCH_CHECK_VALUE(orders >= 1, "SIMT executor: orders must be >= 1, got ", orders);
  const int old = orders_setting();
  g_orders.store(orders, std::memory_order_relaxed);
  return old;
}

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
  if (t_check != nullptr) t_check->launched(spec.kernel);
  blockDim = spec.block;
  gridDim = spec.grid;
  const int64_t nblocks = static_cast<int64_t>(spec.grid.x) * spec.grid.y * spec.grid.z;
  std::vector<int64_t> blocks(nblocks);
  std::string schedule;
  const int orders = orders_setting();
  e.replay = orders > 1;
  // The global memory the first schedule left: address -> bytes (compared with every later schedule's).
  std::unordered_map<void*, std::vector<unsigned char>> first;
  for (int k = 0; k < orders; ++k) {
    set_schedule(e, k, blocks, schedule);
    e.global_acc.clear();
    e.undo.clear();
    for (const int64_t b : blocks) {
      e.block_linear = b;
      e.block = uint3(static_cast<unsigned>(b % spec.grid.x), static_cast<unsigned>(b / spec.grid.x % spec.grid.y),
                      static_cast<unsigned>(b / (static_cast<int64_t>(spec.grid.x) * spec.grid.y)));
      blockIdx = e.block;
      run_block(e);
    }
    if (orders == 1) break;
    if (k == 0) {
      for (const auto& [addr, u] : e.undo) {
        const auto* p = static_cast<const unsigned char*>(addr);
        first.emplace(addr, std::vector<unsigned char>(p, p + u.bytes.size()));
      }
    } else {
      auto differs = [&](void* addr) {
        const auto it = first.find(addr);
        const auto u = e.undo.find(addr);
        if (it == first.end() || u == e.undo.end()) return true;
        return std::memcmp(addr, it->second.data(), it->second.size()) != 0;
      };
      const void* bad = nullptr;
      for (const auto& [addr, u] : e.undo)
        if (differs(addr)) {
          bad = addr;
          break;
        }
      if (bad == nullptr)
        for (const auto& [addr, bytes] : first)
          if (differs(addr)) {
            bad = addr;
            break;
          }
      if (bad != nullptr) {
        std::ostringstream s;
        const auto u = e.undo.find(const_cast<void*>(bad));
        s << "SIMT executor: kernel " << spec.kernel << ": the result depends on the order the threads run in: ";
        if (u != e.undo.end()) {
          s << u->second.name << " element " << u->second.element;
        } else {
          s << "address " << bad;
        }
        s << (first.count(const_cast<void*>(bad)) && u != e.undo.end() ? " differs" : " is written under one order only")
          << " between index order and " << schedule
          << " (a race the access tracker cannot see, e.g. an order-dependent atomicAdd)";
        TORCH_CHECK(false, s.str());
      }
    }
    if (k + 1 < orders)
      for (const auto& [addr, u] : e.undo) std::memcpy(addr, u.bytes.data(), u.bytes.size());
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

namespace {

bool ordered(const Access& p, const Access& me) {
  if (p.block != me.block) return false;  // blocks of a launch are unordered
  if (p.thread == me.thread || p.block_epoch != me.block_epoch) return true;
  return p.thread / kWarp == me.thread / kWarp && p.warp_epoch != me.warp_epoch;
}

std::string place(const void* addr, const Region& r, size_t bytes) {
  std::ostringstream s;
  s << (r.space == Space::shared ? "shared array " : "") << r.name << " element "
    << (static_cast<const char*>(addr) - r.lo) / static_cast<std::ptrdiff_t>(bytes);
  return s.str();
}

std::string by_whom(const Exec& e, int64_t block, int thread, const char* did) {
  std::ostringstream s;
  if (block == e.block_linear) {
    s << "thread " << dim_str(e.fibers[thread].tid) << " of this block " << did
      << " it with no barrier between (__syncthreads, or __syncwarp within a warp)";
  } else {
    s << "a thread of block " << block << " (linear index) " << did << " it in this launch (blocks are unordered)";
  }
  return s.str();
}

Access me_now(const Exec& e, bool atomic) {
  return Access{e.block_linear, e.current, e.block_epoch, e.fibers[e.current].warp_epoch, atomic};
}

}  // namespace

void note_read(const void* addr, size_t bytes, const Region& r) {
  Exec* e = t_exec;
  if (e == nullptr || e->current < 0 || (!r.writable && !in_writable(addr))) return;
  const bool shared = r.space == Space::shared;
  AddrState& st = (shared ? e->shared_acc : e->global_acc)[addr];
  const Access me = me_now(*e, false);
  if (st.written && !ordered(st.writer, me))
    fault("read-after-write race on " + place(addr, r, bytes) + ": " +
          by_whom(*e, st.writer.block, st.writer.thread, "wrote"));
  if (st.read_block != me.block || st.read_epoch != me.block_epoch) {
    if (st.read_block >= 0 && st.read_block != me.block) st.other_block_read = st.read_block;
    st.reads.clear();
    st.read_block = me.block;
    st.read_epoch = me.block_epoch;
  }
  const int32_t w = me.thread / kWarp;
  const uint32_t bit = 1u << (me.thread % kWarp);
  for (WarpReads& wr : st.reads)
    if (wr.warp == w) {
      if (me.warp_epoch > wr.epoch) {  // the warp's older reads are ordered before its later operations
        wr.lanes = bit;
        wr.epoch = me.warp_epoch;
      } else {
        wr.lanes |= bit;
      }
      return;
    }
  st.reads.push_back({w, bit, me.warp_epoch});
}

void note_write(void* addr, size_t bytes, const Region& r, bool atomic) {
  Exec* e = t_exec;
  if (e == nullptr || e->current < 0) return;
  const bool shared = r.space == Space::shared;
  AddrState& st = (shared ? e->shared_acc : e->global_acc)[addr];
  const Access me = me_now(*e, atomic);
  if (st.written && !ordered(st.writer, me) && !(st.writer.atomic && atomic))
    fault("write-write race on " + place(addr, r, bytes) + ": " +
          by_whom(*e, st.writer.block, st.writer.thread, "wrote"));
  // A write after reads by other threads that no barrier orders before it.
  if (st.other_block_read >= 0 && st.other_block_read != me.block)
    fault("write-after-read race on " + place(addr, r, bytes) + ": " +
          by_whom(*e, st.other_block_read, 0, "read"));
  if (st.read_block >= 0 && st.read_block != me.block)
    fault("write-after-read race on " + place(addr, r, bytes) + ": " + by_whom(*e, st.read_block, 0, "read"));
  if (st.read_block == me.block && st.read_epoch == me.block_epoch) {
    const int32_t w = me.thread / kWarp;
    const uint32_t bit = 1u << (me.thread % kWarp);
    for (const WarpReads& wr : st.reads) {
      const uint32_t others = wr.warp == w ? (wr.epoch >= me.warp_epoch ? wr.lanes & ~bit : 0u) : wr.lanes;
      if (others != 0)
        fault("write-after-read race on " + place(addr, r, bytes) + ": " +
              by_whom(*e, me.block, wr.warp * kWarp + __builtin_ctz(others), "read"));
    }
  }
  st.written = true;
  st.writer = me;
  if (!shared && e->replay) {
    auto [it, fresh] = e->undo.try_emplace(addr);
    if (fresh) {
      const auto* p = static_cast<const unsigned char*>(addr);
      it->second.bytes.assign(p, p + bytes);
      it->second.name = r.name;
      it->second.element = (static_cast<const char*>(addr) - r.lo) / static_cast<std::ptrdiff_t>(bytes);
    }
  }
  if (!shared && t_check != nullptr) t_check->wrote(addr);
}

// ------------------------------------------------------------------ outputs a call must fill
CallCheck::CallCheck(const char* call) : call_(call), prev_(t_check) {
  if (prev_ == nullptr) t_writable.clear();  // a new call: the pointers made for writing from here on
  t_check = this;
}
CallCheck::~CallCheck() { t_check = prev_; }

void CallCheck::launched(const char* kernel) {
  if (kernels_.empty() || kernels_.back() != kernel) kernels_.emplace_back(kernel);
}

void CallCheck::wrote(const void* addr) {
  const char* c = static_cast<const char*>(addr);
  for (Out& o : outs_)
    if (o.lo <= c && c < o.hi) o.written[(c - o.lo) / o.elem] = true;
}

void CallCheck::add(const at::Tensor& t, const char* name, std::vector<bool> rows) {
  const Region r = tensor_region(t, name, false);
  Out o{t, name, std::move(rows), r.lo, r.hi, static_cast<int64_t>(t.element_size()), {}};
  o.written.assign((r.hi - r.lo) / o.elem, false);
  outs_.push_back(std::move(o));
}

namespace {

// f(pointer to the element, its index) for every element of t, in index order.
template <typename F>
void for_each_element(const at::Tensor& t, F f) {
  const int64_t dim = t.dim(), elem = static_cast<int64_t>(t.element_size());
  std::vector<int64_t> idx(dim, 0);
  auto* base = static_cast<char*>(t.data_ptr());
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t off = 0;
    for (int64_t d = 0; d < dim; ++d) off += idx[d] * t.stride(d);
    f(base + off * elem, idx);
    for (int64_t d = dim - 1; d >= 0; --d) {
      if (++idx[d] < t.size(d)) break;
      idx[d] = 0;
    }
  }
}

}  // namespace

void CallCheck::output(const at::Tensor& t, const char* name, std::initializer_list<at::Tensor> inputs) {
  if (!t.defined() || t.numel() == 0) return;
  bool overlaps = false;
  for (const at::Tensor& in : inputs)
    if (in.defined() && in.numel() > 0 && at::get_overlap_status(t, in) != at::MemOverlapStatus::No) overlaps = true;
  if (!overlaps && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
    // Signalling NaNs: an element no kernel writes reads as NaN wherever it goes.
    const uint32_t f32 = 0x7fa00000u;
    const uint64_t f64 = 0x7ff4000000000000ull;
    const bool dbl = t.scalar_type() == at::kDouble;
    for_each_element(t, [&](char* p, const std::vector<int64_t>&) {
      dbl ? std::memcpy(p, &f64, 8) : std::memcpy(p, &f32, 4);
    });
  }
  add(t, name, {});
}

void CallCheck::output_rows(const at::Tensor& t, const char* name, std::vector<bool> rows) {
  if (!t.defined() || t.numel() == 0) return;
  add(t, name, std::move(rows));
}

void CallCheck::verify() {
  for (const Out& o : outs_) {
    const std::vector<int64_t>* missing = nullptr;
    std::vector<int64_t> first;
    for_each_element(o.t, [&](char* p, const std::vector<int64_t>& idx) {
      if (missing != nullptr || (!o.rows.empty() && !o.rows[idx[0]])) return;
      if (!o.written[(p - o.lo) / o.elem]) {
        first = idx;
        missing = &first;
      }
    });
    if (missing == nullptr) continue;
    std::ostringstream s;
    s << "SIMT executor: " << call_ << " (kernels ";
    for (size_t i = 0; i < kernels_.size(); ++i) s << (i ? ", " : "") << kernels_[i];
    if (kernels_.empty()) s << "none";
    s << ") left " << o.name << " element [";
    for (size_t i = 0; i < first.size(); ++i) s << (i ? ", " : "") << first[i];
    s << "] of " << o.t.sizes() << " unwritten";
    TORCH_CHECK(false, s.str());
  }
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
