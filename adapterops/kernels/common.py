"""Small `@triton.jit` helpers shared by the kernels of several op families."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST casts both tiles to fp32 first. The launcher sets it for bf16 under the Triton
    interpreter only: there (triton 3.8 and 3.9) `tl.dot` on bf16 tiles returns garbage
    (relative error ~1e10) while fp32 is exact, so the cast keeps bf16 testable on a CPU.
    INPUT_PRECISION ("ieee" or "tf32") follows torch's fp32 matmul setting; it only matters
    for fp32 tiles on a GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def store_partial(part_ptr, acc, split, offs_m, mask_m, M, BLOCK_R: tl.constexpr):
    """acc (fp32, [BLOCK_M, BLOCK_R]) into slice `split` of a (splits, M, BLOCK_R) fp32 buffer
    of partial sums: a split pass's share, for its finishing kernel to sum."""
    offs_r = tl.arange(0, BLOCK_R)
    # A scalar base for the split: the grad pass at rank bucket 256 spilled 108 bytes on sm_90
    # with 64-bit (split M + row) offsets per element, none with this.
    base = part_ptr + split.to(tl.int64) * M * BLOCK_R
    tl.store(base + offs_m[:, None] * BLOCK_R + offs_r[None, :], acc, mask=mask_m[:, None])


@triton.jit
def sum_partials(part_ptr, num_splits, offs_m, mask_m, M, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """The sum over the splits of a (splits, M, BLOCK_R) partial-sum buffer, in split order: the
    same bits on every run (fp32 atomics would add in arrival order)."""
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    ptrs = part_ptr + offs_m[:, None] * BLOCK_R + offs_r[None, :]
    for _ in range(0, num_splits):
        acc += tl.load(ptrs, mask=mask_m[:, None], other=0.0)
        ptrs += M * BLOCK_R
    return acc
