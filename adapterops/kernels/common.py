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
    for fp32 tiles on a GPU. Tiles of two dtypes (a 16-bit x or dY against fp32 adapter
    weights, PEFT's default on a 16-bit base) are multiplied in fp32: the 16-bit one is
    converted in registers as it is used, so x and dY are read once, in their own dtype.
    """
    if tl.constexpr(a.dtype != b.dtype):  # (a compile-time branch: both arms must not be built)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    elif UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


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


@triton.jit
def dropout_keep(seed, threshold, rows, col0, BLOCK_COLS: tl.constexpr):
    """The dropout keep mask of rows `rows` ([BLOCK_ROWS] integers) and columns
    [col0, col0 + BLOCK_COLS) (col0 and BLOCK_COLS multiples of 8) as a [BLOCK_ROWS,
    BLOCK_COLS] boolean tile: True where the element is kept.

    The mask is a function of (seed, row, column) alone (methods.md, "Dropout"; the host replica
    is `adapterops.backends.reference.dropout.keep_mask`): element (i, j) takes 16 bits of
    Philox-4x32-10 keyed by the seed at counter (j // 8, i mod 2^32, i // 2^32, 0), lane j % 8
    being the low (lanes 0-3) or high (lanes 4-7) half of word j % 4; it is kept when those 16
    bits are >= threshold = round(p 2^16). One Philox call serves 8 elements (an 8th of the
    integer work of one call per element), and any tiling draws the same mask.
    """
    groups = (col0 // 8 + tl.arange(0, BLOCK_COLS // 8)).to(tl.uint32)
    rows = rows.to(tl.int64)
    rows_lo = (rows & 0xFFFFFFFF).to(tl.uint32)
    rows_hi = (rows >> 32).to(tl.uint32)
    c0 = groups[None, :] + rows_lo[:, None] * 0
    c1 = rows_lo[:, None] + groups[None, :] * 0
    c2 = rows_hi[:, None] + groups[None, :] * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c0 * 0)
    # Lane order 0..7 per group: nested interleaves put v_(b0 + 2 b1 + 4 b2) at position
    # 4 b2 + 2 b1 + b0 (interleave puts its first argument at even positions).
    bits = tl.interleave(tl.interleave(tl.interleave(w0 & 0xFFFF, w0 >> 16),
                                       tl.interleave(w2 & 0xFFFF, w2 >> 16)),
                         tl.interleave(tl.interleave(w1 & 0xFFFF, w1 >> 16),
                                       tl.interleave(w3 & 0xFFFF, w3 >> 16)))
    return bits.to(tl.int32) >= threshold
