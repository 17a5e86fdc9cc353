"""The SIMT executor (csrc/cpu/simt.cpp) runs the CUDA kernels' own source on the CPU for the `cuda-emulated`
tests.  It must report, as an error naming the kernel, block and thread, what a GPU would hide or crash on:
each class of fault below is a small deliberately wrong kernel (csrc/cpu/simt_faults.cpp, compiled for the
executor only) run through ``torch.ops.lgm_ext._simt_fault(kind)``."""
import pytest
import torch

import lgm_ext  # noqa: F401  (loads the operators)

pytestmark = pytest.mark.kernels  # the executor is part of the compiled extension


def fault(kind):
    return torch.ops.lgm_ext._simt_fault(kind)


def test_a_correct_kernel_runs():
    """Shared memory, a barrier and a warp butterfly: every thread gets the block's sum of arange(64)."""
    assert torch.equal(fault("ok"), torch.full((64,), float(sum(range(64)))))
    # The same shared slot written by two warps, ordered by a barrier, is no race.
    assert fault("shared_ordered")[0].item() == 2.0


@pytest.mark.parametrize(
    "kind, where, what",
    [
        ("oob_read", r"oob_read_kernel, block \(1, 0, 0\), thread \(16, 0, 0\)",
         r"out-of-bounds read through x: byte offset 256 \(4 bytes\) of a 256-byte tensor"),
        ("oob_write", r"oob_write_kernel, block \(1, 0, 0\), thread \(31, 0, 0\)",
         r"out-of-bounds write through out: byte offset 256 \(4 bytes\) of a 256-byte tensor"),
        ("global_race", r"global_race_kernel, block \(0, 0, 0\), thread \(1, 0, 0\)",
         r"write-write race on global address .*: thread \(0, 0, 0\) of this block wrote it since the last barrier"),
        ("shared_race", r"shared_race_kernel, block \(0, 0, 0\), thread \(32, 0, 0\)",
         r"write-write race on shared address"),
        ("divergent_barrier", r"divergent_barrier_kernel, block \(0, 0, 0\), thread \(0, 0, 0\)",
         r"divergent __syncthreads: thread \(0, 0, 0\) waits at it but thread \(16, 0, 0\) has exited"),
        ("exit_before_barrier", r"exit_before_barrier_kernel, block \(0, 0, 0\), thread \(0, 0, 0\)",
         r"divergent __syncthreads: .* thread \(5, 0, 0\) has exited"),
        ("partial_shuffle", r"partial_shuffle_kernel, block \(0, 0, 0\), thread \(0, 0, 0\)",
         r"divergent warp synchronisation: lane 0 waits at __shfl_xor_sync \(mask 0xffffffff\) but lane 16 of "
         r"its mask has exited"),
        ("shuffle_outside_mask", r"shuffle_outside_mask_kernel, block \(0, 0, 0\), thread \(0, 0, 0\)",
         r"__shfl_xor_sync with mask 0xffff: lane 0 reads lane 16, which is not in the mask"),
    ],
)
def test_fault_is_reported_with_kernel_block_and_thread(kind, where, what):
    with pytest.raises(RuntimeError, match=f"SIMT executor: kernel {where}: {what}"):
        fault(kind)


@pytest.mark.parametrize(
    "kind, what",
    [
        ("block_too_large", r"block 1025 x 1 x 1"),
        ("grid_too_large", r"grid 1 x 65536 x 1"),
        ("too_much_shared_memory", r"65536 bytes of shared memory"),
    ],
)
def test_launch_beyond_cuda_limits_is_refused(kind, what):
    with pytest.raises(RuntimeError, match=f"CUDA launch of global_race_kernel: invalid configuration argument "
                                           f"\\(.*{what}"):
        fault(kind)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        fault("nope")


def test_executor_recovers_after_a_fault():
    """A fault abandons the launch's fibers mid-kernel; the next launch -- here the operators' own kernels, the
    `cuda-emulated` backend -- starts clean and agrees with the CPU loops."""
    from lgm_ext._testing import cuda_emulation

    with pytest.raises(RuntimeError, match="out-of-bounds"):
        fault("oob_read")
    x, mu = torch.randn(5, 3), torch.randn(4, 3)
    with cuda_emulation():
        got = lgm_ext.lgm_logits(x, mu, None)
    torch.testing.assert_close(got, lgm_ext.lgm_logits(x, mu, None))
