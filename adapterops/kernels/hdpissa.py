"""The fused W update of HD-PiSSA (methods.md §4).

Every step, with K ranks' fixed factors (A_k, B_k) and Adam steps (δA_k, δB_k):

    W <- W - s Σ_k [ δB_k (A_k - δA_k) + B_k δA_k ] = W + scale P Q,   scale = -s
    P = [δB_1 | B_1 | ... | δB_K | B_K]            (out x 2 K r)
    Q = [A_1 - δA_1; δA_1; ... ; A_K - δA_K; δA_K]  (2 K r x in)

one GEMM of inner size R = 2 K r added into W in place: one read and one write of W. With a
low-precision model weight, the update runs on the fp32 master copy and writes the rounded
result into the model's weight in the same pass (no second pass over W).

What bounds it (H100 SXM, out = in = 4096, fp32 W, K = 8 ranks, r = 16, so R = 256; an
analysis, not yet measured on a GPU):
- HBM: W read and written, 2 x 4 x 4096^2 bytes = 128 MiB, 45 us at the measured 3.0 TB/s of
  a device-to-device copy (+32 MiB, 11 us, for a 16-bit model copy). This is the floor.
- MMA work: 2 x 4096^2 x R = 8.6 GFLOP. At torch's "high" fp32 precision (TF32 wgmma, about
  495 TFLOP/s dense) 17 us, under the memory time: the pass can run at the copy's bandwidth.
  At "highest" (full fp32, no tensor cores: FMAs at about 67 TFLOP/s) 128 us: compute-bound,
  at most 45 / 128 = 35% of the copy's bandwidth, whatever the tiling.
- L2 -> SM: a BLOCK_N x BLOCK_K tile of W reads its BLOCK_N rows of P and BLOCK_K columns of
  Q once: (BLOCK_N + BLOCK_K) R 4 bytes, 256 KiB per 128 x 128 tile next to its 128 KiB of W,
  i.e. 256 MiB in all, from L2 (P and Q, 8 MiB together, stay resident). At an L2 bandwidth
  of 5.5-7 TB/s (published microbenchmarks; not measured here) 38-49 us, the same order as the
  HBM time but on another path. Smaller tiles re-read more (64 x 128: 384 MiB); 128 x 256
  spilled 1 KB of registers (sm_90 kernel report), so 128 x 128 is the largest tile.
- Overlap: the W tile's load is issued before the R loop, so its HBM latency runs under the
  L2-bound loop in the same program (one 128 x 128 program per SM fits: 216 registers).
  Overlapped, max(45, 38-49) us is about 90% of the copy's bandwidth at "high"; serialized it
  would be about 50%. The GPU benchmark (`hdpissa_update`, both precisions) measures which.
The P and Q loads are 16-byte vectors when R is a multiple of R_CHUNK (EVEN_R: no mask along
the inner dimension; R = 2 K r is one whenever K r is a multiple of R_CHUNK / 2).

(HD-PiSSA's forward and backward reuse `kernels.lowrank`: the shrink for h = x A_k^T and the
grad pass for s dY B_k and gB_k = s dY^T h in one read of dY; dx = dY W runs on cuBLAS.)
"""
import triton
import triton.language as tl

from .common import mma


@triton.jit(do_not_specialize=["R"])
def lowrank_update_kernel(
    w_ptr, p_ptr, q_ptr, copy_ptr,
    N, K, R, scale,
    stride_wn, stride_wk, stride_pn, stride_pr, stride_qr, stride_qk, stride_cn, stride_ck,
    HAS_COPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_CHUNK: tl.constexpr, EVEN_R: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """W[n, k] += scale * Σ_j P[n, j] Q[j, k] for one BLOCK_N x BLOCK_K tile of W (N x K), in
    place; with HAS_COPY also copy[n, k] = the new W[n, k] in copy's dtype. The inner size R is
    contracted R_CHUNK at a time (registers stay bounded whatever 2 K r is), in fp32. EVEN_R:
    R is a multiple of R_CHUNK, so the inner dimension needs no mask."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, R_CHUNK)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    # Issued first: W's HBM read overlaps the L2-bound R loop (see the module docstring).
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, R_CHUNK):
        inner = r0 + offs_c
        p_ptrs = p_ptr + offs_n[:, None] * stride_pn + inner[None, :] * stride_pr
        q_ptrs = q_ptr + inner[:, None] * stride_qr + offs_k[None, :] * stride_qk
        if EVEN_R:
            p = tl.load(p_ptrs, mask=mask_n[:, None], other=0.0)
            q = tl.load(q_ptrs, mask=mask_k[None, :], other=0.0)
        else:
            p = tl.load(p_ptrs, mask=mask_n[:, None] & (inner[None, :] < R), other=0.0)
            q = tl.load(q_ptrs, mask=(inner[:, None] < R) & mask_k[None, :], other=0.0)
        acc = mma(p, q, acc, UPCAST, INPUT_PRECISION)
    # The product is scaled once, then added to W: the same two roundings as
    # torch's W.addmm_(P, Q, alpha=scale).
    w = w.to(tl.float32) + scale * acc
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck,
                 w.to(copy_ptr.dtype.element_ty), mask=mask)
