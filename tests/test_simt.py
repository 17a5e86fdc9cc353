"""The SIMT executor (csrc/simt/simt.cpp) runs the CUDA kernels' own source on the CPU for the `cuda-emulated`
tests.  It must report, as an error naming the kernel, block and thread, what a GPU would hide or crash on:
each class of fault below is a small deliberately wrong kernel (csrc/simt/simt_faults.cpp, compiled for the
executor only) run through ``torch.ops.lgm_ext._simt_fault(kind)``."""
import pytest
import torch

import lgm_ext  # noqa: F401  (loads the operators)

pytestmark = pytest.mark.kernels  # the executor is part of the compiled extension


def fault(kind):
    from lgm_ext._testing import executor

    executor()  # the test module lgm_ext._simt holds the executor and these kernels
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
         r"write-write race on out element 0: thread \(0, 0, 0\) of this block wrote it with no barrier between"),
        ("shared_race", r"shared_race_kernel, block \(0, 0, 0\), thread \(32, 0, 0\)",
         r"write-write race on shared array buf element 0: thread \(0, 0, 0\) of this block wrote it"),
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


# ---------------------------------------------------------------- read-write races (issue 44)
# Thread 1 and thread 2 (lanes of warp 0) or thread 1 and thread 33 (warp 0 and warp 1) touch one slot of shared
# memory or of a global tensor in the same barrier interval: one writes, the other reads.  In index order the
# lower thread runs first, so raw_ (writer 1, reader 2/33) is seen at the read, war_ (reader 1, writer 2/33) at
# the write.  On a GPU with independent thread scheduling each is a real race.
RW_CASES = [(rw, scope, space) for rw in ("raw", "war") for scope in ("warp", "block")
            for space in ("shared", "global")]


@pytest.mark.parametrize("rw, scope, space", RW_CASES)
def test_read_write_race_is_reported(rw, scope, space):
    other = "2" if scope == "warp" else "33"
    what = {"raw": f"thread \\({other}, 0, 0\\): read-after-write race on {{}} element {{}}: thread \\(1, 0, 0\\) "
                   "of this block wrote it with no barrier between",
            "war": f"thread \\({other}, 0, 0\\): write-after-read race on {{}} element {{}}: thread \\(1, 0, 0\\) "
                   "of this block read it with no barrier between"}[rw]
    where = ("shared array buf", 0) if space == "shared" else ("out", 32)
    with pytest.raises(RuntimeError, match="SIMT executor: kernel read_write_kernel, block \\(0, 0, 0\\), "
                                           + what.format(*where)):
        fault(f"{rw}_{scope}_{space}")


@pytest.mark.parametrize("rw, scope, space", RW_CASES)
def test_the_barrier_that_orders_them_is_no_race(rw, scope, space):
    """The same accesses with __syncwarp (same warp) or __syncthreads (two warps) between them: the reader sees
    the write (raw) or the value before it (war)."""
    assert fault(f"{rw}_{scope}_{space}_ordered")[0].item() == (1.0 if rw == "raw" else 0.0)


def test_a_read_of_another_blocks_write_is_a_race():
    with pytest.raises(RuntimeError, match=r"kernel read_across_blocks_kernel, block \(1, 0, 0\), thread \(0, 0, 0\): "
                                           r"read-after-write race on out element 0: a thread of block 0 \(linear "
                                           r"index\) wrote it in this launch \(blocks are unordered\)"):
        fault("read_across_blocks")


def test_an_output_left_unwritten_is_reported():
    """The emulated backend poisons what a hook must fill and then requires every element written (CallCheck)."""
    with pytest.raises(RuntimeError, match=r"SIMT executor: _simt_fault\(unwritten_output\) \(kernels "
                                           r"short_loop_kernel\) left out element \[63\] of \[64\] unwritten"):
        fault("unwritten_output")
    assert torch.equal(fault("written_output"), torch.ones(64))


def test_a_result_that_depends_on_the_thread_order_is_reported():
    """Float atomics in another order give another sum: invisible to the access tracker (atomics may share an
    address), caught by running the launch again in reverse order."""
    from lgm_ext._testing import simt_orders

    assert fault("order_dependent_sum")[0].item() == 0.0  # one order: (1 + 1e8) - 1e8
    with simt_orders(2), pytest.raises(RuntimeError, match=r"kernel order_dependent_sum_kernel: the result depends "
                                                           r"on the order the threads run in: out element 0 differs "
                                                           r"between index order and reverse order"):
        fault("order_dependent_sum")
    with simt_orders(4):  # a correct kernel gives the same bytes under every order
        assert torch.equal(fault("ok"), torch.full((64,), float(sum(range(64)))))


def test_orders_must_be_positive():
    from lgm_ext._testing import simt_orders

    with pytest.raises(ValueError, match="orders must be >= 1"), simt_orders(0):
        pass
