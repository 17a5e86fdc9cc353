// lgm-ext: one kernel source for the GPU and the CPU.
//
// The CUDA kernels (csrc/cuda/*.cuh) are compiled twice: by nvcc for the GPU, and by the host compiler
// for the SIMT executor (csrc/cpu/simt.cpp), which runs them on the CPU for the `cuda-emulated` tests.
// This header is what lets the same text compile both ways:
//
//   under nvcc        the CUDA keywords are the compiler's, device pointers are raw (KPtrs = RawPtrs,
//                     KPtr<T> = T*), and LGM_LAUNCH(kernel, grid, block, smem, stream, args...) checks CUDA's
//                     launch limits, then launches with <<<grid, block, smem, stream>>>;
//   on the host       __global__, __device__, __shared__, threadIdx, blockIdx, blockDim, gridDim,
//                     __syncthreads, __syncwarp, __shfl*_sync and atomicAdd are defined here; every thread
//                     of a block is a cooperative fiber that switches at each barrier and shuffle with
//                     CUDA's semantics; KPtrs = simt::CheckedPtrs, whose KPtr<T> is a pointer bounded by the
//                     tensor it was made from that also records every write, and LGM_LAUNCH checks the same
//                     limits and runs the grid block by block.
//
// What the executor reports as an error naming the kernel, block and thread (a RuntimeError in Python): an
// out-of-bounds read or write through a kernel pointer, two threads writing one address between barriers
// (global memory: two threads of a launch, unless ordered by the block's barriers; shared memory: within
// the block), a __syncthreads that not every thread of the block reaches, a __syncwarp or shuffle that not
// every lane of its mask reaches (or that reads a lane outside the mask), and a launch beyond CUDA's limits.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>
#include <tuple>
#include <type_traits>
#include <utility>

#include "lgm_ext/launch.h"

// Include after args.h (the argument structs, RawPtrs) and every torch header: on the host this defines CUDA's
// keywords.

#if defined(__CUDACC__)

namespace lgm_ext {
namespace {  // per translation unit: nvcc's and the executor's KPtrs differ
using KPtrs = RawPtrs;
template <typename T>
using KPtr = T*;
}  // namespace
}  // namespace lgm_ext

#define LGM_LAUNCH(kernel, grid, block, smem, stream, ...)                 \
  do {                                                                      \
    ::lgm_ext::launch::check_launch(#kernel, dim3(grid), dim3(block), smem); \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);                     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                         \
  } while (0)

// A kernel's shared array, read and written through a KPtr (checked and race-tracked on the executor).
#define LGM_SHARED(T, name, n) \
  __shared__ T name##_storage[n]; \
  T* const name = name##_storage

#else  // ---------------------------------------------------------------- the SIMT executor

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Shared memory: one copy; the executor runs one launch at a time, its blocks one after another.
#define __shared__ static

namespace lgm_ext {
namespace simt {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
using stream_t = void*;

// The running fiber's indices (the executor sets them at every switch; one launch runs at a time).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

[[noreturn]] void fault(const std::string& what);  // the running thread's error: the launch fails with it

enum class Space : uint8_t { global, shared };

// Where a checked pointer may point: [lo, hi) bytes of one tensor (or shared array), and its name.
struct Region {
  const char* lo = nullptr;
  const char* hi = nullptr;
  const char* name = "?";
  Space space = Space::global;
  bool writable = false;  // the kernel received it as a pointer to non-const elements
};

// The region of a kernel pointer made from t: its own extent, 1 + sum_i (size_i - 1) * stride_i elements from
// its data pointer (none when t is empty), named by the argument field (e.g. "grad_means").
Region tensor_region(const at::Tensor& t, const char* name, bool writable);

[[noreturn]] void out_of_bounds(const Region& r, const void* p, size_t size, bool write);

// Accesses: bounds are checked inline; reads and writes of `bytes` at addr in r go to the race tracker
// (simt.cpp), which also keeps what a launch wrote (for the thread-order replays and CallCheck below).
void note_read(const void* addr, size_t bytes, const Region& r);
void note_write(void* addr, size_t bytes, const Region& r, bool atomic);

template <typename T>
class Ref;

// A bounds-checked device pointer.  Arithmetic is free (as on a GPU: a pointer may leave its tensor);
// a read or write through it is checked against its region.
template <typename T>
class Ptr {
 public:
  using element_type = T;
  Ptr() = default;
  Ptr(std::nullptr_t) {}
  Ptr(T* p, const Region& r) : p_(p), r_(r) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Ptr(const Ptr<U>& o) : p_(o.raw()), r_(o.region()) {}

  T* raw() const { return p_; }
  const Region& region() const { return r_; }

  friend bool operator==(const Ptr& a, std::nullptr_t) { return a.p_ == nullptr; }
  friend bool operator!=(const Ptr& a, std::nullptr_t) { return a.p_ != nullptr; }
  friend bool operator==(const Ptr& a, const Ptr& b) { return a.p_ == b.p_; }
  friend bool operator!=(const Ptr& a, const Ptr& b) { return a.p_ != b.p_; }
  explicit operator bool() const { return p_ != nullptr; }

  Ptr operator+(int64_t i) const { return Ptr(p_ + i, r_); }
  Ptr operator-(int64_t i) const { return Ptr(p_ - i, r_); }
  Ptr& operator+=(int64_t i) { p_ += i; return *this; }
  Ptr& operator-=(int64_t i) { p_ -= i; return *this; }
  Ptr& operator++() { ++p_; return *this; }
  friend Ptr operator+(int64_t i, const Ptr& p) { return p + i; }

  T* at(int64_t i, bool write) const {
    T* q = p_ + i;
    const char* b = reinterpret_cast<const char*>(q);
    if (p_ == nullptr || b < r_.lo || b + sizeof(T) > r_.hi) out_of_bounds(r_, q, sizeof(T), write);
    return q;
  }
  // const elements read as values; others give a reference that checks each read and write.
  decltype(auto) operator[](int64_t i) const {
    if constexpr (std::is_const_v<T>) {
      const T* q = at(i, false);
      note_read(q, sizeof(T), r_);
      return static_cast<std::remove_const_t<T>>(*q);
    } else {
      return Ref<T>(*this, i);
    }
  }
  decltype(auto) operator*() const { return (*this)[0]; }

 private:
  T* p_ = nullptr;
  Region r_{};
};

template <typename T>
class Ref {
 public:
  Ref(const Ptr<T>& p, int64_t i) : p_(p), i_(i) {}
  operator T() const {
    T* q = p_.at(i_, false);
    note_read(q, sizeof(T), p_.region());
    return *q;
  }
  Ref& operator=(T v) {
    T* q = p_.at(i_, true);
    note_write(q, sizeof(T), p_.region(), false);
    *q = v;
    return *this;
  }
  Ref& operator=(const Ref& o) { return *this = static_cast<T>(o); }
  Ref& operator+=(T v) { return *this = static_cast<T>(*this) + v; }
  Ref& operator-=(T v) { return *this = static_cast<T>(*this) - v; }
  Ref& operator*=(T v) { return *this = static_cast<T>(*this) * v; }
  Ptr<T> operator&() const { return p_ + i_; }

 private:
  Ptr<T> p_;
  int64_t i_;
};

// The executor's pointer policy (args.h): each pointer of a kernel's argument struct, and each extra pointer
// argument, made from its tensor and bounded by that tensor's extent.
struct CheckedPtrs {
  template <typename U>
  using ptr = Ptr<U>;
  template <typename U>
  static Ptr<U> make(const at::Tensor& t, const char* name) {
    if (!t.defined()) return Ptr<U>();
    return Ptr<U>(t.data_ptr<std::remove_const_t<U>>(), tensor_region(t, name, !std::is_const_v<U>));
  }
};

// A shared array seen through a checked, race-tracked pointer (LGM_SHARED).
template <typename U, size_t n>
Ptr<U> shared_view(U (&a)[n], const char* name) {
  Region r;
  r.lo = reinterpret_cast<const char*>(a), r.hi = r.lo + sizeof(a), r.name = name, r.space = Space::shared;
  r.writable = !std::is_const_v<U>;
  return Ptr<U>(a, r);
}

// ---- synchronisation (each parks the fiber until the block or warp has arrived)
void syncthreads();
void syncwarp(unsigned mask);
uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg, int width);  // mode 0 idx, 1 xor, 2 up, 3 down

template <typename T>
T shfl_as(unsigned mask, T v, int mode, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl(mask, bits, mode, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ---- thread orders
// Each launch runs under `orders` schedules -- 1: threads and blocks in index order; 2: also in reverse order;
// 3 and more: also seeded shuffles -- restoring what the launch wrote between them, and the global memory it
// leaves must be the same bytes under every schedule (else the launch fails naming the first differing
// address).  A race-free kernel is deterministic whatever the order (fibers switch only at barriers and
// shuffles); this catches what the access tracker cannot see (e.g. an order-dependent float atomicAdd).
// The default is LGM_SIMT_ORDERS (1 when unset); returns the previous value.
int set_orders(int orders);

// ---- outputs a call must fill
// While a CallCheck is alive (one backend hook, or a test's launch), every element written through a kernel
// pointer on this OS thread is recorded.  `output` poisons a tensor the call must fill (signalling NaN for
// floating types; left as is where it overlaps one of `inputs`, e.g. an operation in place) and `verify`
// reports the first element of it no launch wrote, naming the call, the kernels it launched and the index.
class CallCheck {
 public:
  explicit CallCheck(const char* call);
  ~CallCheck();
  CallCheck(const CallCheck&) = delete;
  CallCheck& operator=(const CallCheck&) = delete;
  // t must be filled by the call; `inputs`: tensors it reads (no poisoning where t overlaps one).
  void output(const at::Tensor& t, const char* name, std::initializer_list<at::Tensor> inputs = {});
  // Only the elements where `rows` is true (a bool vector over t's first dimension) must be written (no poison).
  void output_rows(const at::Tensor& t, const char* name, std::vector<bool> rows);
  void verify();

  // (the executor's record)
  void launched(const char* kernel);
  void wrote(const void* addr);

 private:
  struct Out {
    at::Tensor t;
    std::string name;
    std::vector<bool> rows;     // empty: every element
    const char* lo = nullptr;   // t's extent [lo, hi) and element size
    const char* hi = nullptr;
    int64_t elem = 1;
    std::vector<bool> written;  // per element of the extent
  };
  void add(const at::Tensor& t, const char* name, std::vector<bool> rows);
  std::string call_;
  std::vector<std::string> kernels_;
  std::vector<Out> outs_;
  CallCheck* prev_ = nullptr;
};

// ---- launches
struct LaunchSpec {
  const char* kernel;
  dim3 grid, block;
  size_t smem;
};
void run(const LaunchSpec& spec, const std::function<void()>& thread_body);

// A launch: the kernel's own parameters, converted from the launch's arguments (a Ptr<T> also becomes the
// kernel's Ptr<const T>); a pointer argument must be a checked one, made from its tensor (CheckedPtrs::make).
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  static_assert((!std::is_pointer_v<std::decay_t<A>> && ...),
                "a raw pointer passed to a kernel: make it from its tensor with KPtrs::make");
  launch::check_launch(name, grid, block, smem);
  std::tuple<std::decay_t<P>...> dev{static_cast<std::decay_t<P>>(std::forward<A>(args))...};
  run(LaunchSpec{name, grid, block, smem}, [&] { std::apply(kernel, dev); });
}

}  // namespace simt

namespace {  // per translation unit: nvcc's and the executor's KPtrs differ
using KPtrs = simt::CheckedPtrs;
template <typename T>
using KPtr = simt::Ptr<T>;
}  // namespace

using simt::blockDim;
using simt::blockIdx;
using simt::dim3;
using simt::gridDim;
using simt::threadIdx;
using simt::uint3;
using cudaStream_t = simt::stream_t;

inline void __syncthreads() { simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { simt::syncwarp(mask); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return simt::shfl_as(mask, v, 0, src, width); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt::shfl_as(mask, v, 1, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::shfl_as(mask, v, 2, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::shfl_as(mask, v, 3, static_cast<int>(delta), width);
}
// Fibers switch only at barriers and shuffles, so a read-modify-write is atomic; it is exempt from the
// race check (atomics are how threads may share an address).
template <typename T>
T atomicAdd(simt::Ptr<T> p, T v) {
  T* q = p.at(0, true);
  simt::note_write(q, sizeof(T), p.region(), true);
  const T old = *q;
  *q = old + v;
  return old;
}

}  // namespace lgm_ext

#define LGM_LAUNCH(kernel, grid, block, smem, stream, ...)                  \
  do {                                                                      \
    (void)(stream);                                                         \
    ::lgm_ext::simt::launch(#kernel, &kernel, grid, block, smem, __VA_ARGS__); \
  } while (0)

#define LGM_SHARED(T, name, n)     \
  __shared__ T name##_storage[n]; \
  const ::lgm_ext::KPtr<T> name = ::lgm_ext::simt::shared_view(name##_storage, #name)

#endif
