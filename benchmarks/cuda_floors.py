#!/usr/bin/env python
"""Expected time of each kernel of one L-GM forward+backward (GEMM path, diagonal covariance) from its
FLOP / DRAM-byte floor on an H100, as the operators are built (csrc/host.cpp): 16-bit storage is widened to
float32 on entry and the gradients narrowed on exit; every kernel and GEMM runs in float32 (cuBLAS SGEMM, no
TF32 unless torch.backends.cuda.matmul.allow_tf32).  A kernel's floor is max(FLOPs / peak, bytes / bandwidth);
bytes count one trip through DRAM.  Printed as the markdown table of docs/CUDA.md:

    python benchmarks/cuda_floors.py            # N = 256, D = 512, K = 10575 and 100000
"""
import argparse

# H100 SXM5 (dense): FP32 67 TFLOP/s (CUDA cores), TF32 tensor 494, BF16 tensor 989; HBM3 3.35 TB/s.
PEAK = {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12}
BW = 3.35e12


def kernels(n: int, k: int, d: int, storage: str, keep_logits: bool = True):
    """(name, FLOPs, DRAM bytes) per kernel of one forward+backward; s = 4 (accumulation type float32)."""
    s = 4
    nd, kd, nk = n * d, k * d, n * k
    rows = []
    if storage != "fp32":  # widen x, mu, log_var (read 2, write 4 bytes); narrow the three gradients
        rows.append(("widen inputs / narrow gradients (16-bit storage only)", 0, 2 * 6 * (nd + 2 * kd)))
    rows += [
        ("class_tables (hl = 0.5 sum log_var)", kd, s * (kd + k)),
        ("operands_a, forward + backward", 2 * 2 * nd, 2 * s * 3 * nd),
        ("operands_b (B = [mu w, w] and c), forward + backward", 2 * 5 * kd, 2 * s * (4 * kd + k)),
        ("GEMM forward m = A B^T", 2 * n * k * 2 * d, s * (2 * nd + 2 * kd + nk)),
        ("gemm_rows (logits, margin, lse, loss)", 8 * nk, s * 2 * nk),
        ("coefficients (g from saved logits)", 6 * nk, s * 2 * nk),
        ("GEMM t += g B", 2 * n * k * 2 * d, s * (nk + 2 * kd + 4 * nd)),
        ("GEMM S = g^T A", 2 * n * k * 2 * d, s * (nk + 2 * nd + 2 * kd)),
        ("column_sums + gemm_class (dmu, dlog_var)", 10 * kd + nk, s * (nk + 6 * kd)),
        ("gemm_grad_x", 2 * nd, s * 3 * nd),
    ]
    if not keep_logits:
        rows.append(("GEMM recompute of the logits (N > D)", 2 * n * k * 2 * d, s * (2 * nd + 2 * kd + nk)))
    return rows


def table(n: int, d: int, sizes, gemm_peak: str = "fp32") -> str:
    out = ["| kernel | " + " | ".join(f"K={k:,} {st}" for k in sizes for st in ("fp32", "bf16")) + " |",
           "|---|" + "---|" * (2 * len(sizes))]
    cols = {(k, st): kernels(n, k, d, st) for k in sizes for st in ("fp32", "bf16")}
    names = [r[0] for r in cols[(sizes[0], "bf16")]]
    totals = {key: 0.0 for key in cols}
    for name in names:
        cells = []
        for key in cols:
            row = next((r for r in cols[key] if r[0] == name), None)
            if row is None:
                cells.append("-")
                continue
            peak = PEAK[gemm_peak] if name.startswith("GEMM") else PEAK["fp32"]
            t = max(row[1] / peak, row[2] / BW)
            totals[key] += t
            bound = "F" if row[1] / peak >= row[2] / BW else "B"
            cells.append(f"{t * 1e6:,.1f} µs ({bound})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| **total** | " + " | ".join(f"**{totals[key] * 1e3:.3f} ms**" for key in cols) + " |")
    gemm = {key: sum(max(r[1] / PEAK[gemm_peak], r[2] / BW) for r in cols[key] if r[0].startswith("GEMM"))
            for key in cols}
    out.append("| GEMM share | " + " | ".join(f"{100 * gemm[key] / totals[key]:.0f}%" for key in cols) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--sizes", default="10575,100000")
    a = p.parse_args(argv)
    sizes = [int(v) for v in a.sizes.split(",")]
    print(f"N = {a.n}, D = {a.d}; (F) FLOP-bound, (B) bandwidth-bound; GEMMs on FP32 CUDA cores (as built):\n")
    print(table(a.n, a.d, sizes, "fp32"))
    print("\nThe same with the GEMMs on tensor cores (TF32 for float32 storage would need allow_tf32; BF16 GEMMs "
          "are not built -- the kernels widen 16-bit storage to float32), GEMMs at the BF16 tensor peak:\n")
    print(table(a.n, a.d, sizes, "bf16"))


if __name__ == "__main__":
    main()
