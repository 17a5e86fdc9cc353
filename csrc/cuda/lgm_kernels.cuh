// lgm-ext: the CUDA kernels of the L-GM operators and their launches -- the only copy.  nvcc compiles them
// for the GPU (lgm_cuda.cu); the host compiler compiles the same text for the SIMT executor, which runs them
// on the CPU for the `cuda-emulated` tests (cpu/emulate_cuda.cpp; include/lgm_ext/simt.h).  Every formula
// comes from include/lgm_ext/math.h; this file holds only the thread decomposition (include/lgm_ext/launch.h),
// warp reductions and launches.
//
// Written for both compilers: a kernel takes its family's argument struct (args.h) with the pointer policy
// KPtrs, and KPtr<T> for any further pointer (raw pointers under nvcc; on the executor pointers bounded by the
// tensor each was made from); the launch code builds them from tensors (the args.h builder with KPtrs,
// KPtrs::make for the rest).  Derived pointers are `auto`, a value read through a pointer to non-const
// elements is converted (static_cast<T>) where a template deduces from it, and every launch is LGM_LAUNCH.
// The including file defines kernel_stream() and kernel_mm16() in lgm_ext::(anonymous) first.
#pragma once

#include <ATen/ATen.h>

#include "../args.h"
#include "../gemm.h"
#include "../host.h"
#include "lgm_ext/launch.h"
#include "lgm_ext/math.h"
#include "lgm_ext/simt.h"

namespace lgm_ext {
namespace {

using namespace lgm_ext::math;
using namespace lgm_ext::launch;

constexpr unsigned kFullMask = 0xffffffffu;

// A value read for the type T of the kernel (a non-deduced parameter: it may be an executor reference).
template <typename T>
struct value_of {
  using type = T;
};
template <typename T>
using val_t = typename value_of<T>::type;

// Butterfly all-reduce: every lane ends with the same value.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Row kernels run one warp per row (or per class): blocks of kRowsPerBlock warps.
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
}

// ------------------------------------------------------------------ row kernels: one warp per row
// The row's logits are written (free logits; lane k % 32 writes entry k), then
// the labelled entry gets its margin and the warp computes lse, 1 - P[n,y] and the loss.
template <typename T>
__device__ __forceinline__ void row_finish(const RowArgs<T, KPtrs>& a, int64_t n, int lane, int64_t y, T d_y) {
  if (a.stats == nullptr && (y < 0 || !a.margin_out)) return;
  const auto out = a.logits + n * a.K;
  const T hl_y = y >= 0 && a.half_logdet != nullptr ? a.half_logdet[y] : T(0);
  const T l_y = labelled_logit(y, d_y, hl_y, a.alpha);
  if (a.margin_out && y >= 0 && lane == y % kWarp) out[y] = l_y;
  if (a.stats == nullptr) return;
  __syncwarp();  // every lane's logits are written before the row is read
  const T m = warp_max(row_max_partial(out, a.K, y, l_y, lane, kWarp));
  const T others = warp_sum(row_sumexp_others_partial(out, a.K, y, m, lane, kWarp));
  if (lane == 0) {
    T lse, q;
    row_stats(m, others, l_y, lse, q);
    a.stats[2 * n] = lse;
    a.stats[2 * n + 1] = q;
    a.row_loss[n] = row_loss(y, lse, l_y, d_y, hl_y, a.lambda);
  }
}

template <typename T>
__global__ void direct_rows_kernel(RowArgs<T, KPtrs> a) {
  const int lane = threadIdx.x;
  const int64_t n = warp_row();
  if (n >= a.N) return;  // whole warp
  const int64_t K = a.K, D = a.D;
  const auto xr = a.x + n * D;
  const int64_t y = label_column(a.labels, n, a.K);
  const auto out = a.logits + n * K;
  T d_y = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T part =
        sqdist_partial(xr, a.mu + k * D, a.inv_var != nullptr ? a.inv_var + k * D : nullptr, D, lane, kWarp);
    const T d = dist_from_sqdist(warp_sum(part));
    if (lane == k % kWarp) out[k] = free_logit(d, a.half_logdet != nullptr ? a.half_logdet[k] : T(0));
    if (k == y) d_y = d;
  }
  row_finish(a, n, lane, y, d_y);
}

// d[n, kk] on the GEMM path from the expansion entry m (math::dist_gemm: the
// rare non-finite entry is recomputed by this lane alone); A: RowArgs or CoefArgs.
template <typename T, template <typename, typename> class A>
__device__ __forceinline__ T gemm_dist(const A<T, KPtrs>& a, int64_t n, int64_t kk, val_t<T> m, val_t<T> c) {
  return dist_gemm(m, c, a.x + n * a.D, a.mu + kk * a.D, a.log_var != nullptr ? a.log_var + kk * a.D : nullptr, a.D);
}

template <typename T>
__global__ void gemm_rows_kernel(RowArgs<T, KPtrs> a) {
  const int lane = threadIdx.x;
  const int64_t n = warp_row();
  if (n >= a.N) return;
  const int64_t K = a.K;
  const auto m = a.logits + n * K;
  const int64_t y = label_column(a.labels, n, a.K);
  const T d_y = y >= 0 ? gemm_dist(a, n, y, m[y], a.mu_sq_sum[y]) : T(0);
  __syncwarp();  // every lane has read m[y] before it is overwritten
  for (int64_t k = lane; k < K; k += kWarp)
    m[k] = free_logit(gemm_dist(a, n, k, m[k], a.mu_sq_sum[k]), a.half_logdet != nullptr ? a.half_logdet[k] : T(0));
  row_finish(a, n, lane, y, d_y);
}

// Coefficients of the class tile [k0, k0 + kt): one warp per row, lanes over the tile.
template <typename T>
__global__ void coefficients_kernel(CoefArgs<T, KPtrs> a) {
  const int lane = threadIdx.x;
  const int64_t n = warp_row();
  if (n >= a.N) return;
  const int64_t kt = a.kt, k0 = a.k0;
  const auto gr = a.coef + n * kt;
  const auto glr = a.grad_logits != nullptr ? a.grad_logits + n * a.ld_grad : nullptr;
  const int64_t yl = a.labels != nullptr ? a.labels[n] - k0 : -1;
  const bool in_tile = yl >= 0 && yl < kt;
  if (a.stats != nullptr) {
    const auto lr = a.logits + n * a.ld_logits;
    const T lse = a.stats[2 * n], q = a.stats[2 * n + 1];
    const T c = a.scale[n * a.scale_stride] * a.scale_mult;
    for (int64_t k = lane; k < kt; k += kWarp) {
      T v;
      if (k == yl) {
        v = coef_g_label(q, a.alpha, a.lambda, c);
      } else {
        const T l0 = a.mu_sq_sum != nullptr
                         ? free_logit(gemm_dist(a, n, k0 + k, lr[k], a.mu_sq_sum[k]),
                                      a.half_logdet != nullptr ? a.half_logdet[k0 + k] : T(0))
                         : lr[k];
        v = coef_g_other(prob(l0, lse), c);
      }
      if (glr != nullptr) v = coef_add_logit_grad(v, glr[k]);
      gr[k] = v;
    }
    if (lane == 0 && in_tile) a.label_coef[n] = coef_r(q, a.alpha, c);
  } else {
    for (int64_t k = lane; k < kt; k += kWarp) gr[k] = coef_g_logit(glr[k], k == yl, a.alpha);
    if (lane == 0 && in_tile) a.label_coef[n] = coef_r_logit(glr[yl], a.alpha);
  }
}

template <typename T>
__global__ void grad_x_kernel(DirectGradArgs<T, KPtrs> a) {
  const int lane = threadIdx.x;
  const int64_t n = warp_row();
  if (n >= a.N) return;
  const int64_t K = a.K, D = a.D;
  for (int64_t j = lane; j < D; j += kWarp)
    a.grad_features[n * D + j] = grad_x_elem(a.coef + n * K, a.x[n * D + j], a.mu + j,
                                             a.inv_var != nullptr ? a.inv_var + j : nullptr, K, D);
}

// Class tables: one warp per class, lanes over j (inv_var skipped when null).
template <typename T>
__global__ void tables_kernel(TableArgs<T, KPtrs> a) {
  const int lane = threadIdx.x;
  const int64_t k = warp_row();
  if (k >= a.K) return;
  const int64_t D = a.D;
  T h = T(0);
  for (int64_t j = lane; j < D; j += kWarp) {
    const T s = a.log_var[k * D + j];
    if (a.inv_var != nullptr) a.inv_var[k * D + j] = inv_var(s);
    h += half_logdet_term(s);
  }
  h = warp_sum(h);
  if (lane == 0) a.half_logdet[k] = h;
}

// ------------------------------------------------------------------ class kernels (direct path)
// grid (K, ceil(D / kClassThreads), ceil(N / kChunkRows)), launched in z pieces of at most 65,535 chunks
// (launch.h for_each_z_launch; blockIdx.z counts from z0): thread j of class k sums rows
// [chunk * kChunkRows, ...) into partials p1, p2 (chunks, K, D) and ph (chunks, K);
// class_finalize_kernel adds the chunks in order.
template <typename T>
__global__ void class_partial_kernel(DirectGradArgs<T, KPtrs> a, KPtr<T> p1, KPtr<T> p2, KPtr<T> ph, int64_t z0) {
  const int64_t k = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kClassThreads + threadIdx.x;
  const int64_t chunk = z0 + blockIdx.z;
  const int64_t K = a.K, D = a.D;
  const int64_t n0 = chunk * kChunkRows;
  const int64_t n1 = n0 + kChunkRows < a.N ? n0 + kChunkRows : a.N;
  T a1 = T(0), a2 = T(0), hs = T(0);
  const T muj = j < D ? a.mu[k * D + j] : T(0);
  for (int64_t n = n0; n < n1; ++n) {
    const T gk = a.coef[n * K + k];
    hs += gk;
    if (a.labels != nullptr && a.labels[n] == k) hs += a.label_coef[n];
    if (j < D) class_accum(a1, a2, gk, a.x[n * D + j], muj);
  }
  if (j < D) {
    p1[(chunk * K + k) * D + j] = a1;
    p2[(chunk * K + k) * D + j] = a2;
  }
  if (j == 0) ph[chunk * K + k] = hs;
}

template <typename T>
__global__ void class_finalize_kernel(DirectGradArgs<T, KPtrs> a, KPtr<const T> p1, KPtr<const T> p2,
                                      KPtr<const T> ph, int64_t chunks) {
  const int64_t K = a.K, D = a.D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < K * D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = i / D;
    T A1 = T(0), A2 = T(0), hs = T(0);
    for (int64_t c = 0; c < chunks; ++c) {
      A1 += p1[c * K * D + i];
      A2 += p2[c * K * D + i];
      hs += ph[c * K + k];
    }
    const T wj = a.inv_var != nullptr ? a.inv_var[i] : T(1);
    if (a.grad_means != nullptr) a.grad_means[i] = grad_mu_final(A1, wj);
    if (a.grad_log_var != nullptr) a.grad_log_var[i] = grad_log_var_final(A2, wj, hs);
  }
}

// ------------------------------------------------------------------ GEMM path helpers
template <typename T>
__global__ void operands_a_kernel(OperandArgs<T, KPtrs> a) {
  const int64_t D = a.D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.N * D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, j = i % D;
    T a1, a2;
    operand_a(static_cast<T>(a.x[i]), a1, a2);
    a.operand_a[n * 2 * D + j] = a1;
    a.operand_a[n * 2 * D + D + j] = a2;
  }
}

// Operand b and c of the tile's classes: one warp per class k0 + k.
template <typename T>
__global__ void operands_b_kernel(OperandArgs<T, KPtrs> a) {
  const int lane = threadIdx.x;
  const int64_t k = warp_row();
  if (k >= a.kt) return;
  const int64_t D = a.D, kk = a.k0 + k;
  T c = T(0);
  for (int64_t j = lane; j < D; j += kWarp) {
    T b1, b2;
    operand_b(static_cast<T>(a.mu[kk * D + j]), inv_var(static_cast<T>(a.log_var[kk * D + j])), b1, b2, c);
    a.operand_b1[k * a.ld_b + j] = b1;
    a.operand_b2[k * a.ld_b + j] = b2;
  }
  c = warp_sum(c);
  if (lane == 0) a.mu_sq_sum[k] = c;
}

template <typename T>
__global__ void gemm_grad_x_kernel(GemmGradXArgs<T, KPtrs> a) {
  const int64_t D = a.D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.N * D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, j = i % D;
    a.grad_features[i] =
        grad_x_from_moments(a.x[i], a.moments1[n * a.ld_moments + j], a.moments2[n * a.ld_moments + j]);
  }
}

// Column sums of the tile's g into coef_sum and logdet_coef_sum (GemmClassArgs; thread per tile class,
// consecutive threads read consecutive k).
template <typename T>
__global__ void column_sums_kernel(GemmClassArgs<T, KPtrs> a, KPtr<T> coef_sum, KPtr<T> logdet_coef_sum) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= a.kt) return;
  // Accumulated in double: coef_sum is multiplied by mu and subtracted from the GEMM's sum_n g x.
  double gs = 0.0, rs = 0.0;
  for (int64_t n = 0; n < a.N; ++n) {
    gs += static_cast<double>(a.coef[n * a.kt + k]);
    if (a.labels != nullptr && a.labels[n] == a.k0 + k) rs += static_cast<double>(a.label_coef[n]);
  }
  coef_sum[k] = static_cast<T>(gs);
  logdet_coef_sum[k] = static_cast<T>(gs + rs);
}

// Gradient rows of the tile's classes from its moments (kt, 2D).
template <typename T>
__global__ void gemm_class_kernel(GemmClassArgs<T, KPtrs> a) {
  const int64_t kt = a.kt, D = a.D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < kt * D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = i / D, j = i % D, o = a.k0 * D + i;
    T A1, A2;
    class_sums_from_moments(a.moments1[k * a.ld_moments + j], a.moments2[k * a.ld_moments + j], a.coef_sum[k],
                            a.mu[o], A1, A2);
    const T wj = inv_var(a.log_var[o]);
    if (a.grad_means != nullptr) a.grad_means[o] = grad_mu_final(A1, wj);
    if (a.grad_log_var != nullptr) a.grad_log_var[o] = grad_log_var_final(A2, wj, a.logdet_coef_sum[k]);
  }
}

// ------------------------------------------------------------------ launches
dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock))); }
const dim3 kRowBlock(kWarp, kRowsPerBlock);

unsigned elem_grid(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, ceil_div(n, kThreads))));
}

template <typename scalar_t>
void direct_rows(const Inputs& in, double alpha, double lambda, bool margin_out, Tensor& logits, Tensor& stats,
                 Tensor& row_loss) {
  const auto a = row_args<scalar_t, KPtrs>(in, alpha, lambda, margin_out, logits, stats, row_loss);
  LGM_LAUNCH(direct_rows_kernel<scalar_t>, row_grid(in.N), kRowBlock, 0, kernel_stream(), a);
}

template <typename scalar_t>
void gemm_rows(const Inputs& in, Tensor& m, const Tensor& c, double alpha, double lambda, bool margin_out,
               Tensor& stats, Tensor& row_loss) {
  const auto a = row_args<scalar_t, KPtrs>(in, alpha, lambda, margin_out, m, stats, row_loss, c);
  LGM_LAUNCH(gemm_rows_kernel<scalar_t>, row_grid(in.N), kRowBlock, 0, kernel_stream(), a);
}

template <typename scalar_t>
void coefficients(const Inputs& in, const Coef& cf, Tensor& g, Tensor& r) {
  const auto a = coefficient_args<scalar_t, KPtrs>(in, cf, g, r);
  LGM_LAUNCH(coefficients_kernel<scalar_t>, row_grid(in.N), kRowBlock, 0, kernel_stream(), a);
}

template <typename scalar_t>
void direct_grads(const Inputs& in, const Tensor& g, const Tensor& r, Tensor& grad_x, Tensor& grad_mu,
                  Tensor& grad_s) {
  const auto a = direct_grad_args<scalar_t, KPtrs>(in, g, r, grad_x, grad_mu, grad_s);
  if (a.grad_features != nullptr) {
    LGM_LAUNCH(grad_x_kernel<scalar_t>, row_grid(in.N), kRowBlock, 0, kernel_stream(), a);
  }
  if (a.grad_means == nullptr && a.grad_log_var == nullptr) return;
  // The partials: p[0], p[1] (chunks, K, D) and ph (chunks, K), each its own kernel pointer.
  const int64_t chunks = ceil_div(in.N, kChunkRows);
  Tensor p = at::empty({2, chunks, in.K, in.D}, in.x.options());
  Tensor ph = at::empty({chunks, in.K}, in.x.options());
  const auto p1 = KPtrs::make<scalar_t>(p.select(0, 0), "p1"), p2 = KPtrs::make<scalar_t>(p.select(0, 1), "p2");
  const auto phs = KPtrs::make<scalar_t>(ph, "ph");
  const int64_t blocks_y = class_blocks_y(in);
  for_each_z_launch(chunks, [&](int64_t z0, int64_t nz) {
    const dim3 grid(static_cast<unsigned>(in.K), static_cast<unsigned>(blocks_y), static_cast<unsigned>(nz));
    LGM_LAUNCH(class_partial_kernel<scalar_t>, grid, kClassThreads, 0, kernel_stream(), a, p1, p2, phs, z0);
  });
  LGM_LAUNCH(class_finalize_kernel<scalar_t>, elem_grid(in.K * in.D), kThreads, 0, kernel_stream(), a, p1, p2, phs,
             chunks);
}

template <typename scalar_t>
void class_tables(const Tensor& s, Tensor& w, Tensor& hl) {
  const auto a = table_args<scalar_t, KPtrs>(s, w, hl);
  LGM_LAUNCH(tables_kernel<scalar_t>, row_grid(a.K), kRowBlock, 0, kernel_stream(), a);
}

template <typename scalar_t>
void gemm_operands(const Inputs& in, Tensor& op_a, int64_t k0, int64_t kt, Tensor& b1, Tensor& b2, Tensor& c) {
  const auto a = operand_args<scalar_t, KPtrs>(in, op_a, k0, kt, b1, b2, c);
  if (a.operand_a != nullptr) {
    LGM_LAUNCH(operands_a_kernel<scalar_t>, elem_grid(in.N * in.D), kThreads, 0, kernel_stream(), a);
  }
  if (a.operand_b1 != nullptr) {
    LGM_LAUNCH(operands_b_kernel<scalar_t>, row_grid(kt), kRowBlock, 0, kernel_stream(), a);
  }
}

template <typename scalar_t>
void gemm_grad_x(const Inputs& in, const Tensor& t1, const Tensor& t2, Tensor& grad_x) {
  const auto a = gemm_grad_x_args<scalar_t, KPtrs>(in, t1, t2, grad_x);
  LGM_LAUNCH(gemm_grad_x_kernel<scalar_t>, elem_grid(in.N * in.D), kThreads, 0, kernel_stream(), a);
}

template <typename scalar_t>
void gemm_class_grads(const Inputs& in, int64_t k0, int64_t kt, const Tensor& s1, const Tensor& s2,
                      const Tensor& g, const Tensor& r, Tensor& grad_mu, Tensor& grad_s) {
  auto a = gemm_class_args<scalar_t, KPtrs>(in, k0, kt, s1, s2, g, r, grad_mu, grad_s);
  // The column sums: sums[0] = coef_sum, sums[1] = logdet_coef_sum (kt each).
  Tensor sums = at::empty({2, kt}, in.x.options());
  LGM_LAUNCH(column_sums_kernel<scalar_t>, elem_grid(kt), kThreads, 0, kernel_stream(), a,
             KPtrs::make<scalar_t>(sums.select(0, 0), "coef_sum"),
             KPtrs::make<scalar_t>(sums.select(0, 1), "logdet_coef_sum"));
  a.coef_sum = KPtrs::make<const scalar_t>(sums.select(0, 0), "coef_sum");
  a.logdet_coef_sum = KPtrs::make<const scalar_t>(sums.select(0, 1), "logdet_coef_sum");
  LGM_LAUNCH(gemm_class_kernel<scalar_t>, elem_grid(kt * in.D), kThreads, 0, kernel_stream(), a);
}

// The kernels' hook table of one accumulation type (kernel_mm16(): the including file's tensor-core GEMM).
template <typename T>
const Backend& kernel_backend_for() {
  static const Backend be{&direct_rows<T>, &gemm_rows<T>, &coefficients<T>, &direct_grads<T>, &check_labels_aminmax,
                          &class_tables<T>, &gemm_operands<T>, &gemm_grad_x<T>, &gemm_class_grads<T>, kernel_mm16()};
  return be;
}

// The backend's one dtype dispatch: the kernels of the accumulation type.
const Backend& kernel_backend(at::ScalarType acc) {
  return acc == at::kDouble ? kernel_backend_for<double>() : kernel_backend_for<float>();
}

}  // namespace
}  // namespace lgm_ext
