#!/usr/bin/env python
"""Expected time of each kernel of one L-GM forward+backward on an H100 from its FLOP / DRAM-byte floor, as
the operators are built (csrc/host.cpp, csrc/gemm.h): a kernel's floor is max(FLOPs / peak, bytes / bandwidth);
bytes count one trip through DRAM (K x D tables and tiles are assumed to stay in L2 only where said).

GEMM path (K * D > 8192), diagonal covariance, logits kept (N <= D).  Its three GEMMs run
  - as built, on FP32 CUDA cores (cuBLAS SGEMM, IEEE: no TF32), 16-bit storage widened to float32, or
  - in the tensor-core mode ("tc", csrc/gemm.h, switched on by lgm_ext._testing.tensor_core_gemms): each
    float32 operand is split into bf16 parts (x of bf16 storage: 1 part, its square 2; fp16 values 2, their
    squares 3; every float32 value 3) and one bf16 GEMM with float32 accumulation sums the part products
    a_i b_j with i + j <= 2: P such products multiply the GEMM's FLOPs by P at the BF16 tensor peak, and add
    the splitting and concatenation passes (ATen elementwise kernels: split_bytes_per_element; per element of
    a concatenated operand 4 bytes).
Direct path (K * D <= 8192): the fused row kernels and the chunked class-gradient kernels.

Printed as the markdown tables of docs/CUDA.md:

    python benchmarks/cuda_floors.py            # N = 256, D = 512, K = 10575 and 100000

``kernels()`` is also what ``make gpu-check`` (benchmarks/gpu_check.py) sets each measured kernel beside: every
row names the kernels it covers (substrings of their CUDA names; "GEMM" rows: cuBLAS's).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

# H100 SXM5 (dense): FP32 67 TFLOP/s (CUDA cores), TF32 tensor 494, BF16 tensor 989; HBM3 3.35 TB/s.
PEAK = {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12}
BW = 3.35e12
DIRECT_MAX_KD = 8192  # csrc/host.h kDirectMaxKD
# bf16 parts that hold x and x^2 exactly, by storage dtype (csrc/gemm.cpp gemm_mode); float32 values: 3.
PARTS = {"bf16": (1, 2), "fp16": (2, 3), "fp32": (3, 3)}
# Substrings of cuBLAS / CUTLASS kernel names (GEMM rows).
GEMM_KERNELS = ("gemm", "Gemm", "GEMM", "xmma", "cutlass", "nvjet", "cublas")


@dataclass
class Kernel:
    name: str
    flops: float
    bytes: float
    match: tuple = ()  # substrings of the CUDA kernel names this row covers
    peak: str = "fp32"  # which peak bounds its FLOPs

    def floor_s(self) -> float:
        return max(self.flops / PEAK[self.peak], self.bytes / BW)

    def bound(self) -> str:
        return "F" if self.flops / PEAK[self.peak] >= self.bytes / BW else "B"


def pairs(pa: int, pb: int) -> int:
    """Part products a_i b_j with i + j <= 2 (gemm.cpp product)."""
    return sum(1 for i in range(pa) for j in range(pb) if i + j <= 2)


def split_bytes_per_element(parts: int) -> int:
    """DRAM bytes per float32 element of splitting it into bf16 parts with ATen ops (gemm.cpp operand): per part
    .to(bf16) (read 4, write 2), and before every further part .to(float32) (2 + 4), the subtraction (8 + 4) and
    nan_to_num (4 + 4)."""
    return 6 * parts + 26 * (parts - 1)


def gemm_path(n: int, k: int, d: int, storage: str, tc: bool) -> list[Kernel]:
    s = 4  # the accumulation type's bytes (float32)
    nd, kd, nk = n * d, k * d, n * k
    rows = []
    if storage != "fp32":  # widen x, mu, log_var (read 2, write 4 bytes); narrow the three gradients
        rows.append(Kernel("widen inputs / narrow gradients (16-bit storage only)", 0, 2 * 6 * (nd + 2 * kd),
                           ("copy",)))
    rows += [
        Kernel("class_tables (hl = 0.5 sum log_var)", kd, s * (kd + k), ("tables_kernel",)),
        Kernel("operands_a, forward + backward", 2 * 2 * nd, 2 * s * 3 * nd, ("operands_a_kernel",)),
        Kernel("operands_b (B = [mu w, w] and c), forward + backward", 2 * 5 * kd, 2 * s * (4 * kd + k),
               ("operands_b_kernel",)),
    ]
    # The three GEMMs: (name, rows m, columns n, inner, parts of the left and right operands, output read too)
    px, px2 = PARTS[storage]
    gemms = [("GEMM forward m = A B^T", n, k, 2 * d, px2, 3, False),
             ("GEMM t += g B (two halves)", n, 2 * d, k, 3, 3, True),
             ("GEMM S = g^T A (x and x^2)", k, d, n, 3, px, False),
             ("", k, d, n, 3, px2, False)]  # (S's second half, counted with the first)
    split_bytes = 0.0
    for name, m, cols, inner, pa, pb, acc in gemms:
        p = pairs(pa, pb) if tc else 1
        flops = 2.0 * m * cols * inner * p
        if tc:
            a_el, b_el = m * inner * p, cols * inner * p  # the concatenated bf16 operands
            byt = 2 * (a_el + b_el) + s * m * cols * (3 if acc else 2)  # + the float32 result added/copied out
            split_bytes += 4 * (a_el + b_el)
        else:
            byt = s * (m * inner + cols * inner + m * cols * (2 if acc else 1))
        if name:
            rows.append(Kernel(name, flops, byt, GEMM_KERNELS, "bf16" if tc else "fp32"))
        else:  # fold into the previous row
            prev = rows[-1]
            rows[-1] = Kernel(prev.name, prev.flops + flops, prev.bytes + byt, prev.match, prev.peak)
    if tc:  # the operands split once per call (x, x^2, a) or per tile (b, g), by ATen ops (gemm.cpp operand)
        per = lambda elems, parts: elems * split_bytes_per_element(parts)  # noqa: E731
        split_bytes += per(2 * nd, px2) + per(2 * kd, 3) + per(nd, px) + per(nd, px2) + per(2 * kd, 3) + per(nk, 3)
        rows.append(Kernel("split into bf16 parts + concatenate (tensor cores only)", 0, split_bytes,
                           ("elementwise", "CatArray", "cat", "copy", "nan_to_num")))
    rows += [
        Kernel("gemm_rows (logits, margin, lse, loss)", 8 * nk, s * 2 * nk, ("gemm_rows_kernel",)),
        Kernel("coefficients (g from saved logits)", 6 * nk, s * 2 * nk, ("coefficients_kernel",)),
        Kernel("column_sums + gemm_class (dmu, dlog_var)", 10 * kd + nk, s * (nk + 6 * kd),
               ("column_sums_kernel", "gemm_class_kernel")),
        Kernel("gemm_grad_x", 2 * nd, s * 3 * nd, ("gemm_grad_x_kernel",)),
    ]
    return rows


def direct_path(n: int, k: int, d: int, storage: str) -> list[Kernel]:
    s = 4
    nd, kd, nk = n * d, k * d, n * k
    chunks = -(-n // 256)
    rows = []
    if storage != "fp32":
        rows.append(Kernel("widen inputs / narrow gradients (16-bit storage only)", 0, 2 * 6 * (nd + 2 * kd),
                           ("copy",)))
    rows += [
        Kernel("class_tables (w = exp(-log_var), hl)", 2 * kd, s * (2 * kd + k), ("tables_kernel",)),
        Kernel("direct_rows (distances, logits, lse, loss)", 3 * nk * d + nk, s * (nd + 2 * kd + nk + 2 * n),
               ("direct_rows_kernel",)),
        Kernel("coefficients", 6 * nk, s * (2 * nk + 4 * n), ("coefficients_kernel",)),
        Kernel("grad_x_kernel", 3 * nk * d, s * (nk + 2 * nd + 2 * kd), ("grad_x_kernel",)),
        Kernel("class_partial + class_finalize", 5 * nk * d, s * (nk + nd + 4 * kd * chunks),
               ("class_partial_kernel", "class_finalize_kernel")),
    ]
    return rows


def kernels(n: int, k: int, d: int, storage: str, tc: bool = False) -> list[Kernel]:
    """The kernels of one forward+backward with impl='auto'; ``tc``: the GEMM path's tensor-core mode
    (csrc/gemm.h; off by default, as built)."""
    if k * d <= DIRECT_MAX_KD:
        return direct_path(n, k, d, storage)
    return gemm_path(n, k, d, storage, tc)


def table(n: int, d: int, sizes, columns) -> str:
    """Markdown: one row per kernel, one column per (K, storage, tensor cores)."""
    cols = {(k, st, tc): kernels(n, k, d, st, tc) for k in sizes for st, tc in columns}
    label = {("fp32", False): "fp32", ("bf16", False): "bf16", ("fp32", True): "fp32, tc", ("bf16", True): "bf16, tc",
             ("fp16", True): "fp16, tc"}
    out = ["| kernel | " + " | ".join(f"K={k:,} {label[(st, tc)]}" for k, st, tc in cols) + " |",
           "|---|" + "---|" * len(cols)]
    names = []
    for rows in cols.values():
        names += [r.name for r in rows if r.name not in names]
    for name in names:
        cells = []
        for rows in cols.values():
            r = next((r for r in rows if r.name == name), None)
            cells.append("-" if r is None else f"{r.floor_s() * 1e6:,.1f} µs ({r.bound()})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = [sum(r.floor_s() for r in rows) for rows in cols.values()]
    gemm = [sum(r.floor_s() for r in rows if r.name.startswith("GEMM")) for rows in cols.values()]
    out.append("| **total** | " + " | ".join(f"**{t * 1e3:.3f} ms**" for t in totals) + " |")
    out.append("| GEMM share | " + " | ".join(f"{100 * g / t:.0f}%" for g, t in zip(gemm, totals)) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--sizes", default="10575,100000")
    a = p.parse_args(argv)
    sizes = [int(v) for v in a.sizes.split(",")]
    print(f"N = {a.n}, D = {a.d}; (F) FLOP-bound, (B) bandwidth-bound.  As built: the GEMMs in IEEE float32 on the "
          "FP32 CUDA cores, 16-bit storage widened:\n")
    print(table(a.n, a.d, sizes, [("fp32", False), ("bf16", False)]))
    print("\nThe tensor-core mode (csrc/gemm.h; off by default): bf16 tensor-core GEMMs over bf16 parts, float32 "
          "accuracy:\n")
    print(table(a.n, a.d, sizes, [("fp32", True), ("bf16", True), ("fp16", True)]))


if __name__ == "__main__":
    main()
