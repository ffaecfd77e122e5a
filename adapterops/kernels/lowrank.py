"""Kernels of the fused low-rank linear (LoRA, PiSSA, LaMDA).

    h1 = x A^T                    (M x r)
    h2 = h1 S^T                   (M x r; h2 = h1 without S)
    y  = x W^T + bias + s h2 B^T

Forward = `lowrank_shrink_kernel` (h1, h2) then the base GEMM with the low-rank term s h2 B^T
and the bias added in its epilogue. Backward = `lowrank_grad_pass_kernel` (one pass over dY:
g = s dY B, dB = s dY^T h2, dS = g^T h1, gS = g S) then the same GEMM for dx = dY W + (g S) A.
For few tokens both passes split their loop and a finishing kernel ends them ("Few tokens").
The GEMM has two forms with one epilogue (`_add_lowrank_and_bias`): `gemm_lowrank_tma_kernel`
(tensor descriptors, persistent, for sm_90) and `gemm_lowrank_kernel` (pointer loads, one
program per tile, for sm_80 and for operands a descriptor cannot describe); the launcher picks.

Why a shrink pass and an epilogue term, not x A^T fused into the base GEMM's K-loop
(analysis for an H100, bf16, M = 8192, K = N = 4096, r = 16; not yet measured on a GPU):
- The base GEMM is 2 M K N = 275 GFLOP, about 390 us at ~700 TFLOP/s.
- K-loop fusion repeats x A^T in every N-tile: the extra tensor-core work is r_pad / BLOCK_N
  (6.3% at BLOCK_N = 256, 12.5% at 128). It also adds a second accumulator and a second
  B-operand stream to the hot loop, which costs registers and pipeline stages, and only one
  N-tile could store the M x r activations that backward needs.
- The shrink pass reads x once more: 2 M K bytes = 64 MiB, about 22 us at 3 TB/s, i.e.
  F / (BW * N) ~ 5.6% of the GEMM, shrinking as N grows (2.1% at N = 11008); it also produces
  h1 and h2, which LaMDA saves for backward anyway. The main loop stays a plain GEMM, so it
  can run at the floor's speed, and the low-rank term costs one [BLOCK_M, r] x [r, BLOCK_N]
  MMA per output tile (r / K = 0.4% of the tile's work).
So the shrink design is the one whose overhead is bounded by a memory pass that can only get
cheaper relative to the GEMM, and it is the simpler kernel. The benchmark suite measures both
costs against the floor on a GPU; revisit this if the measured shrink overhead exceeds 5%.

The term goes after the K-loop, not before it as a seed of the accumulator: a runtime-length
rank loop ahead of the main loop made ptxas serialize every wgmma of the main loop on sm_90
(advisory C7515; the kernel report now fails on it and on its SASS signature).

The backward pass sums dB and dS over row blocks with relaxed, vectorized fp32 reductions
(`REDG.E.ADD.F32x4`, no fences): (M / BLOCK_M) N r_pad adds for dB, 8.4M at M = 8192,
N = 4096, r = 16, BLOCK_M = 64, into an L2-resident dB, next to a 64 MiB read of dY; the
grad pass's docstring compares them with per-program partials.

Few tokens: the two passes are grids of M / BLOCK_M row blocks (BLOCK_M = 64 for 16-bit),
each looping over all of K (shrink) or N (grad pass). On an H100 (132 SMs; bf16, K = N = 4096,
r = 16; an estimate, not yet measured on a GPU) that is 32 programs at M = 2048 and 128 at
M = 8192: one program or none per SM. A program keeps about 48 KiB of loads in flight (three
pipeline stages of a 64 x 128 bf16 tile), which at ~1 us of memory latency is ~48 GB/s per
SM (Little's law), so 32 programs pull at most ~1.5 TB/s of the ~3 TB/s the GPU can: the
shrink's 16 MiB read of x at M = 2048 takes >= 11 us instead of 5.6 us, about 15-30% of the
layer there. And with one program per SM nothing hides a program's waits (each grad-pass step
waits for its own MMAs before the next; see the kernel report). So when the row blocks are
fewer than the SMs, the launcher splits the loop (over K in the shrink, N in the grad pass) into
row blocks x splits programs, each over a contiguous range of whole K or N tiles, enough for
every SM to get a program but at least 4 tiles each (at M = 2048: 5 splits of 7 tiles, 160
programs; at M = 8192: 2 splits, 256 programs). Each stores its fp32 partial x A^T or dY B in
a (splits, M, BLOCK_R) buffer, and a finishing kernel (`lowrank_shrink_finish_kernel`,
`lowrank_grad_pass_finish_kernel`, one program per row block) sums the partials in split
order, so the result is the same on every run, and does what the unsplit pass does after its
loop (rounding, h2 = h1 S^T; gS, dS). The partials cost splits x M x BLOCK_R x 4 bytes written
and read once: 640 KiB at M = 2048 (4% of x) and 1 MiB at M = 8192 (1.6%), plus one more
launch. dB's reductions are the same in both forms.

Conventions: every tensor is addressed through (row, column) strides, so transposed views
(W^T, B^T, A^T) need no copies; row offsets are 64-bit (a column stride times a tile width
stays 32-bit: below 2^31 / 128 for a transposed x, i.e. 16M tokens); every pointer load and
store is masked, and a descriptor's tiles are bounds-checked by the hardware. The rank is a
runtime size R. Every contraction over the rank runs in chunks of R_CHUNK (16, the
smallest `tl.dot` tile a GPU takes): on the fp32 path `tl.dot` lowers to FMAs that hold the
whole contraction in registers, and a 128-wide one spilled tens of KB (sm_90 kernel report).
So the GEMM has no rank-dependent compile-time value at all, and the two passes only BLOCK_R
(the rank padded to a power of two >= 16) for their M x r accumulators. The token count M,
the rank R and the row strides of the M x r buffers (which equal R) are `do_not_specialize`:
Triton would otherwise compile new variants for a value of 1 or a multiple of 16, i.e. when a
batch size or a rank changes. So a new alpha never recompiles, and a new rank only when it
crosses into another BLOCK_R bucket (16, 32, 64, 128).
"""
import triton
import triton.language as tl

from .common import dropout_keep, mma, store_partial, sum_partials


@triton.jit
def _rows_times_square(rows_ptr, stride_rows, offs_m, mask_m, q_ptr, stride_qi, stride_qj, R,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
                       UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """rows[offs_m, :R] @ Q[:R, :R] as a [BLOCK_M, BLOCK_R] fp32 tile.

    `rows` (unit column stride) was just written by this program; the caller puts a barrier
    between that store and this call. Re-reading it R_CHUNK columns at a time (from L1/L2)
    keeps the contraction R_CHUNK wide, which is what bounds registers on the fp32 path.
    """
    offs_c = tl.arange(0, R_CHUNK)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, R, R_CHUNK):
        cols = c0 + offs_c
        a = tl.load(rows_ptr + offs_m[:, None] * stride_rows + cols[None, :],
                    mask=mask_m[:, None] & (cols[None, :] < R), other=0.0)
        q = tl.load(q_ptr + cols[:, None] * stride_qi + offs_r[None, :] * stride_qj,
                    mask=(cols[:, None] < R) & (offs_r[None, :] < R), other=0.0)
        acc = mma(a, q, acc, UPCAST, INPUT_PRECISION)
    return acc


@triton.jit
def _store_h1_h2(acc, offs_m, mask_m, s_ptr, h1_ptr, h2_ptr, R, stride_si, stride_sj, stride_h1m,
                 stride_h2m, HAS_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 R_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """h1 = acc rounded to h1's dtype, and (with S) h2 = h1 S^T, for the rows offs_m."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = mask_m[:, None] & (offs_r < R)[None, :]
    tl.store(h1_ptr + offs_m[:, None] * stride_h1m + offs_r[None, :],
             acc.to(h1_ptr.dtype.element_ty), mask=mask_h)
    if HAS_S:
        # h2 from the stored (rounded) h1, as the unfused composition and dS (which uses the
        # saved h1) see it. S^T has element (i, j) = S[j, i].
        tl.debug_barrier()
        h2 = _rows_times_square(h1_ptr, stride_h1m, offs_m, mask_m, s_ptr, stride_sj, stride_si, R,
                                BLOCK_M, BLOCK_R, R_CHUNK, UPCAST, INPUT_PRECISION)
        tl.store(h2_ptr + offs_m[:, None] * stride_h2m + offs_r[None, :],
                 h2.to(h2_ptr.dtype.element_ty), mask=mask_h)


@triton.jit(do_not_specialize=["M", "R", "num_splits", "stride_h1m", "stride_h2m"])
def lowrank_shrink_kernel(
    x_ptr, a_ptr, s_ptr, h1_ptr, h2_ptr, part_ptr, seed_ptr,
    M, K, R, num_splits, k_per_split, threshold, keep_scale,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_si, stride_sj, stride_h1m, stride_h2m,
    HAS_S: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """h1 = x A^T and (with S) h2 = h1 S^T for one block of BLOCK_M rows; one read of x.

    With DROPOUT, x_d = x * kept * keep_scale replaces x: each x tile is masked as it is
    loaded (`dropout_keep`, regenerated from the seed at seed_ptr; threshold = round(p 2^16)),
    and the fp32 accumulator takes keep_scale once at the end.

    Split over K (num_splits > 1, a grid of row blocks x splits, for few row blocks): program
    (m, k) reads columns [k k_per_split, (k + 1) k_per_split) of x and stores its fp32 partial
    x A^T into `part`; `lowrank_shrink_finish_kernel` sums the partials and stores h1 and h2.
    Unsplit, k_per_split = K. The split is a runtime branch, not a compile-time flag: one
    compiled kernel serves both (the kernel report compiles every configuration in CI).
    """
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    # This program's columns [k_start, k_start + k_len), walked from 0 as an unsplit loop walks
    # K. k_per_split is a whole number of BLOCK_K tiles, and a launch specializes it (divisible
    # by 16): as a runtime value of unknown alignment it made the 16-bit loads scalar (rank
    # 128: 255 registers and 3 KB of spills on sm_90; specialized: 141, none).
    k_start = tl.program_id(1) * k_per_split
    k_len = tl.minimum(K - k_start, k_per_split)
    x_ptr += k_start.to(tl.int64) * stride_xk
    a_ptr += k_start.to(tl.int64) * stride_ak
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # A^T tile: element (k, r) = A[r, k].
    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        mask_k = offs_k < k_len - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(dropout_keep(seed, threshold, offs_m, k_start + k0, BLOCK_K), x, 0.0)
        at = tl.load(at_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(x, at, acc, UPCAST, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    if DROPOUT:
        acc = acc * keep_scale
    if num_splits > 1:
        store_partial(part_ptr, acc, tl.program_id(1), offs_m, mask_m, M, BLOCK_R)
    else:
        _store_h1_h2(acc, offs_m, mask_m, s_ptr, h1_ptr, h2_ptr, R, stride_si, stride_sj,
                     stride_h1m, stride_h2m, HAS_S, BLOCK_M, BLOCK_R, R_CHUNK, UPCAST,
                     INPUT_PRECISION)


@triton.jit(do_not_specialize=["M", "R", "num_splits", "stride_h1m", "stride_h2m"])
def lowrank_shrink_finish_kernel(
    part_ptr, s_ptr, h1_ptr, h2_ptr,
    M, R, num_splits,
    stride_si, stride_sj, stride_h1m, stride_h2m,
    HAS_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The end of a split shrink for one block of BLOCK_M rows: h1 = the sum of the partials
    (in split order), and h2 = h1 S^T."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = sum_partials(part_ptr, num_splits, offs_m, mask_m, M, BLOCK_M, BLOCK_R)
    _store_h1_h2(acc, offs_m, mask_m, s_ptr, h1_ptr, h2_ptr, R, stride_si, stride_sj, stride_h1m,
                 stride_h2m, HAS_S, BLOCK_M, BLOCK_R, R_CHUNK, UPCAST, INPUT_PRECISION)


@triton.jit
def _tile_of(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile `tile_id` in grouped order: GROUP_M row blocks
    walk the N tiles together, so the b tiles they share stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % num_pid_in_group) % group_size_m
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _add_lowrank_and_bias(acc, h_ptr, c_ptr, bias_ptr, seed_ptr, offs_m, offs_n, mask_m, mask_n,
                          col0, R, scale, threshold, stride_hm, stride_hr, stride_cr, stride_cn,
                          HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, R_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr):
    """acc + scale * h[offs_m, :R] @ c[:R, offs_n] (+ bias[offs_n]), the epilogue of both GEMMs.

    With DROPOUT (the dx GEMM of a layer with adapter dropout) the term is kept only where the
    forward kept x: acc + kept * (scale h @ c), kept = `dropout_keep` of rows offs_m and
    columns [col0, col0 + BLOCK_N) (scale then carries 1 / (1 - p)). The term needs its own
    accumulator for that, a second BLOCK_M x BLOCK_N fp32 tile: the launcher gives this form
    tiles where both fit in registers (`DROPOUT_GEMM_CONFIGS`).

    It runs after the K-loop, never before it: a runtime-length `tl.dot` loop that may run zero
    times ahead of the main loop makes the accumulator's value unknown where the pipelined
    wgmma chain starts, and ptxas then serializes every wgmma of the main loop (C7515; the
    SASS waits `WARPGROUP.DEPBAR.LE gsb0, 0x0` after each HGMMA: the bf16 128x128x64 GEMM did
    so for sm_90 with the term seeded first). Here the chain has ended; these MMAs are r / K
    of the tile's work (0.4% at r = 16, K = 4096).
    """
    offs_c = tl.arange(0, R_CHUNK)
    if DROPOUT:
        term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        term = acc
    for r0 in range(0, R, R_CHUNK):
        ranks = r0 + offs_c
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + ranks[None, :] * stride_hr,
                    mask=mask_m[:, None] & (ranks[None, :] < R), other=0.0)
        c = tl.load(c_ptr + ranks[:, None] * stride_cr + offs_n[None, :] * stride_cn,
                    mask=(ranks[:, None] < R) & mask_n[None, :], other=0.0)
        # Scale h, not the product: a [BLOCK_M, R_CHUNK] multiply, and the MMA accumulates
        # straight into the GEMM's accumulator (no second BLOCK_M x BLOCK_N fp32 tile).
        h = (h.to(tl.float32) * scale).to(h_ptr.dtype.element_ty)
        if DROPOUT and h_ptr.dtype.element_ty == tl.float32:
            # FMAs: a TF32 wgmma chain into the second accumulator made ptxas serialize every
            # wgmma of the main loop (sm_90 kernel report, triton 3.9); r / K of the work.
            term = mma(h, c, term, UPCAST, "ieee")
        else:
            term = mma(h, c, term, UPCAST, INPUT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), threshold, offs_m, col0, BLOCK_N)
        acc += tl.where(keep, term, 0.0)
    else:
        acc = term
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["M", "R", "stride_hm"])
def gemm_lowrank_kernel(
    a_ptr, b_ptr, h_ptr, c_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R, scale, threshold,
    stride_am, stride_ak, stride_bk, stride_bn, stride_hm, stride_hr, stride_cr, stride_cn,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, R_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out = a @ b + bias + scale * h @ c   with a (M, K), b (K, N), h (M, R), c (R, N).

    Forward: a = x, b = W^T, h = h2, c = B^T. Backward: a = dY, b = W, h = g S, c = A.
    The pointer path: one program per output tile, masked pointer loads (cp.async on sm_80
    and newer when sizes and strides allow), any strides. The K-loop is a plain GEMM; the
    low-rank term and bias are added in its epilogue (`_add_lowrank_and_bias`), so they cost
    no extra pass over the output.
    """
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    acc = _add_lowrank_and_bias(acc, h_ptr, c_ptr, bias_ptr, seed_ptr, offs_m, offs_n, mask_m,
                                mask_n, pid_n * BLOCK_N, R, scale, threshold, stride_hm,
                                stride_hr, stride_cr, stride_cn, HAS_BIAS, DROPOUT, BLOCK_M,
                                BLOCK_N, R_CHUNK, UPCAST, INPUT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "R", "num_programs", "stride_hm"])
def gemm_lowrank_tma_kernel(
    a_desc, b_desc, out_desc, h_ptr, c_ptr, bias_ptr, seed_ptr,
    M, N, K, R, scale, threshold, num_programs,
    stride_hm, stride_hr, stride_cr, stride_cn,
    B_TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The same product as `gemm_lowrank_kernel`, for sm_90 (Hopper): a, b and out through
    tensor descriptors (TMA: one instruction moves a tile into shared memory, no per-thread
    address arithmetic, and the hardware zero-fills out-of-bounds rows and columns, so the
    K-loop has no masks), in a persistent loop: `num_programs` programs (one per SM) walk the
    output tiles in grouped order, so no launch pays a wave tail of idle SMs.

    b's descriptor is over b itself (K x N, unit column stride: b = W in the dx GEMM) or, with
    B_TRANSPOSED, over b^T (N x K, unit column stride: b = W^T in the forward, i.e. W's own
    row-major storage); its tiles are then transposed in shared memory, which wgmma reads as
    is. h and c (the low-rank term, r / K of the work) stay pointer loads: their row strides
    (the rank) need not be 16-byte multiples, which a descriptor requires.
    """
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(0), num_tiles, num_programs):
        pid_m, pid_n = _tile_of(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([off_m, k0])
            if B_TRANSPOSED:
                b = tl.trans(b_desc.load([off_n, k0]))
            else:
                b = b_desc.load([k0, off_n])
            acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)
        offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        acc = _add_lowrank_and_bias(acc, h_ptr, c_ptr, bias_ptr, seed_ptr, offs_m, offs_n,
                                    offs_m < M, offs_n < N, off_n, R, scale, threshold,
                                    stride_hm, stride_hr, stride_cr, stride_cn, HAS_BIAS, DROPOUT,
                                    BLOCK_M, BLOCK_N, R_CHUNK, UPCAST, INPUT_PRECISION)
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit(do_not_specialize=["M", "R", "num_splits", "stride_h1m", "stride_h2m", "stride_gsm"])
def lowrank_grad_pass_kernel(
    dy_ptr, b_ptr, h1_ptr, h2_ptr, s_ptr, gs_ptr, db_ptr, ds_ptr, part_ptr,
    M, N, R, num_splits, n_per_split, scale,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_h1m, stride_h2m, stride_si, stride_sj,
    stride_gsm,
    HAS_S: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One pass over a BLOCK_M-row block of dY:

        g  = s dY B            (kept for this block only)
        dB += s dY_blk^T h2_blk   (fp32 reductions into db, N x BLOCK_R)     if COMPUTE_DB
        dS += g^T h1_blk          (fp32 reductions into ds, R x BLOCK_R)     if COMPUTE_DS
        gS = g S   (or g without S), stored for the dx GEMM

    dB and dS are sums over row blocks, accumulated with relaxed fp32 reductions (`sem=
    "relaxed"`: `REDG`, fire-and-forget, where the default acq_rel semantics put a `MEMBAR` and
    a cache invalidation around every scalar `ATOMG`). Their buffers have BLOCK_R columns (the
    rank padded to a power of two; the padding receives zeros, since h1 and h2 are masked to 0
    there), so every row is contiguous with a compile-time stride and only the row needs a
    mask: the reductions vectorize to 16-byte `REDG.E.ADD.F32x4`. The launcher slices off the
    padding.

    Why reductions and not per-program partials plus a reduction kernel (H100, bf16, M = 8192,
    N = 4096, r = 16, BLOCK_M = 64; an analysis, not yet measured on a GPU): this pass reads dY,
    2 M N = 64 MiB, about 22 us at 3 TB/s. The reductions add (M / BLOCK_M) N r = 8.4M fp32
    values, 2.1M 16-byte REDGs, into a 256 KiB dB that stays in L2: 32 MiB of L2 traffic, no
    HBM traffic until dB is read back, and no instruction waits for them. Partials would write
    (M / BLOCK_M) N r fp32 = 32 MiB to HBM and read it back in a second kernel: 64 MiB, doubling
    the pass's HBM bytes. dS is r / N of dB's work. Determinism: the order of the fp32
    additions varies from run to run (differences at fp32 rounding, far below the output
    dtype's), as with any atomics.

    Each program walks its N tiles starting at a rotated tile (row block i starts at tile
    i mod the tile count): in step order, the programs would all reduce into the same dB rows
    at the same moment (at M = 8192, 128 programs x BLOCK_N x r adds into the same 32 L2 lines
    at a time); rotated, they spread over every tile. The sums are the same; the order of the
    fp32 additions into g changes, far below the output dtype's rounding.

    Split over N (num_splits > 1, a grid of row blocks x splits, for few row blocks): program
    (m, n) walks the columns [n n_per_split, (n + 1) n_per_split) of dY, reduces its dB tiles as
    above, and stores its fp32 partial dY B into `part`; `lowrank_grad_pass_finish_kernel` sums
    the partials and does the rest (gS, dS). Unsplit, n_per_split = N; a runtime branch, as in
    the shrink.
    """
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    mask_mr = mask_m[:, None] & mask_r[None, :]
    if COMPUTE_DB:
        h2 = tl.load(h2_ptr + offs_m[:, None] * stride_h2m + offs_r[None, :], mask=mask_mr, other=0.0)
        # Fold s into h2 once instead of into every dB tile.
        h2 = (h2.to(tl.float32) * scale).to(h2_ptr.dtype.element_ty)
    n_start = tl.program_id(1) * n_per_split
    n_end = tl.minimum(N, n_start + n_per_split)
    num_tiles = tl.cdiv(n_end - n_start, BLOCK_N)
    first_tile = pid % tl.maximum(num_tiles, 1)  # (no tiles when N = 0: the loop never runs)

    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for step in range(0, num_tiles):
        tile = first_tile + step
        tile = tl.where(tile < num_tiles, tile, tile - num_tiles)
        n0 = n_start + tile * BLOCK_N
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptr + n0.to(tl.int64) * stride_dyn + offs_m[:, None] * stride_dym
                     + offs_n[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        b = tl.load(b_ptr + n0.to(tl.int64) * stride_bn + offs_n[:, None] * stride_bn
                    + offs_r[None, :] * stride_br, mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0)
        g = mma(dy, b, g, UPCAST, INPUT_PRECISION)
        if COMPUTE_DB:
            db = mma(tl.trans(dy), h2, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                     UPCAST, INPUT_PRECISION)
            tl.atomic_add(db_ptr + (n0 + offs_n)[:, None] * BLOCK_R + offs_r[None, :], db,
                          mask=mask_n[:, None], sem="relaxed")

    if num_splits > 1:
        store_partial(part_ptr, g, tl.program_id(1), offs_m, mask_m, M, BLOCK_R)
    else:
        _grad_pass_tail(g, offs_m, mask_m, h1_ptr, s_ptr, gs_ptr, ds_ptr, R, scale, stride_h1m,
                        stride_si, stride_sj, stride_gsm, HAS_S, COMPUTE_DS, BLOCK_M, BLOCK_R,
                        R_CHUNK, UPCAST, INPUT_PRECISION)


@triton.jit
def _grad_pass_tail(g, offs_m, mask_m, h1_ptr, s_ptr, gs_ptr, ds_ptr, R, scale, stride_h1m,
                    stride_si, stride_sj, stride_gsm, HAS_S: tl.constexpr,
                    COMPUTE_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                    R_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """From g = dY B (fp32, unscaled) for the rows offs_m: gS = s g S (s g without S) into
    gs, and dS += (s g)^T h1 (fp32 reductions into ds, R x BLOCK_R) if COMPUTE_DS."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_mr = mask_m[:, None] & (offs_r < R)[None, :]
    # g goes to the gS buffer first: without S it is the result; with S, dS and gS re-read it
    # R_CHUNK columns at a time (see `_rows_times_square`) and gS then overwrites it.
    gs_ptrs = gs_ptr + offs_m[:, None] * stride_gsm + offs_r[None, :]
    tl.store(gs_ptrs, (g * scale).to(gs_ptr.dtype.element_ty), mask=mask_mr)
    if HAS_S:
        tl.debug_barrier()
        if COMPUTE_DS:
            h1 = tl.load(h1_ptr + offs_m[:, None] * stride_h1m + offs_r[None, :], mask=mask_mr, other=0.0)
            offs_c = tl.arange(0, R_CHUNK)
            for c0 in range(0, R, R_CHUNK):
                rows = c0 + offs_c
                g_cols = tl.load(gs_ptr + offs_m[:, None] * stride_gsm + rows[None, :],
                                 mask=mask_m[:, None] & (rows[None, :] < R), other=0.0)
                ds = mma(tl.trans(g_cols), h1, tl.zeros((R_CHUNK, BLOCK_R), dtype=tl.float32),
                         UPCAST, INPUT_PRECISION)
                tl.atomic_add(ds_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], ds,
                              mask=(rows < R)[:, None], sem="relaxed")
        gs = _rows_times_square(gs_ptr, stride_gsm, offs_m, mask_m, s_ptr, stride_si, stride_sj, R,
                                BLOCK_M, BLOCK_R, R_CHUNK, UPCAST, INPUT_PRECISION)
        tl.debug_barrier()  # every thread has read g before any thread overwrites it
        tl.store(gs_ptrs, gs.to(gs_ptr.dtype.element_ty), mask=mask_mr)


@triton.jit(do_not_specialize=["M", "R", "num_splits", "stride_h1m", "stride_gsm"])
def lowrank_grad_pass_finish_kernel(
    part_ptr, h1_ptr, s_ptr, gs_ptr, ds_ptr,
    M, R, num_splits, scale,
    stride_h1m, stride_si, stride_sj, stride_gsm,
    HAS_S: tl.constexpr, COMPUTE_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The end of a split grad pass for one block of BLOCK_M rows: g = the sum of the
    partials (in split order), then gS and dS as in `lowrank_grad_pass_kernel`."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    g = sum_partials(part_ptr, num_splits, offs_m, mask_m, M, BLOCK_M, BLOCK_R)
    _grad_pass_tail(g, offs_m, mask_m, h1_ptr, s_ptr, gs_ptr, ds_ptr, R, scale, stride_h1m,
                    stride_si, stride_sj, stride_gsm, HAS_S, COMPUTE_DS, BLOCK_M, BLOCK_R,
                    R_CHUNK, UPCAST, INPUT_PRECISION)


@triton.jit(do_not_specialize=["M", "R", "rows_per_split", "stride_gsm"])
def lowrank_grad_a_kernel(
    x_ptr, gs_ptr, da_ptr, seed_ptr,
    M, K, R, rows_per_split, threshold, keep_scale,
    stride_xm, stride_xk, stride_gsm, stride_dar,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dA += (g S)^T x for one BLOCK_K-column tile of x and one range of rows (program (k, m)
    of a grid of column tiles x row splits), x read in its own dtype; with DROPOUT, x_d = x *
    kept * keep_scale regenerated from the seed (`dropout_keep`) as each x tile is loaded. The
    LoRA-mode dA where no GEMM library serves: with dropout (no x_d exists to hand one) or with
    fp32 adapters on a 16-bit x (a library would need an fp32 copy of x).

    The programs of one column tile sum into dA (R x K, fp32) with relaxed fp32 reductions,
    as the grad pass sums dB: splits x R x K adds next to a read of x. Otherwise dA is a
    cuBLAS GEMM (g S)^T x.
    """
    offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    row_start = tl.program_id(1).to(tl.int64) * rows_per_split
    row_end = tl.minimum(M, row_start + rows_per_split)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    # 16-bit operands: dA^T = x^T (g S), [BLOCK_K, BLOCK_R] per program, whose BLOCK_K (>= 64)
    # rows take wgmma on sm_90 (the R-row form fell back to mma.sync at rank buckets 16 and
    # 32: a wgmma needs 64 rows). fp32 ones keep the R-row form dA = (g S)^T x: transposed, the
    # TF32 wgmma serialized (it reads its B operand K-major only) and the fp32-adapter FMAs
    # spilled at rank bucket 64 (sm_90 kernel report, triton 3.9).
    SIXTEEN_BIT: tl.constexpr = (x_ptr.dtype.element_ty != tl.float32
                                 and gs_ptr.dtype.element_ty != tl.float32)
    if SIXTEEN_BIT:
        acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed, threshold, offs_m, tl.program_id(0) * BLOCK_K, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        if SIXTEEN_BIT:
            gs = tl.load(gs_ptr + offs_m[:, None] * stride_gsm + offs_r[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            acc = mma(tl.trans(x), gs, acc, UPCAST, INPUT_PRECISION)
        else:
            # (g S)^T tile: element (r, m) = gS[m, r].
            gst = tl.load(gs_ptr + offs_m[None, :] * stride_gsm + offs_r[:, None],
                          mask=mask_r[:, None] & mask_m[None, :], other=0.0)
            acc = mma(gst, x, acc, UPCAST, INPUT_PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    if SIXTEEN_BIT:
        tl.atomic_add(da_ptr + offs_r[None, :] * stride_dar + offs_k[:, None], acc,
                      mask=mask_k[:, None] & mask_r[None, :], sem="relaxed")
    else:
        tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :], acc,
                      mask=mask_r[:, None] & mask_k[None, :], sem="relaxed")
