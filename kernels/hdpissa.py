"""The fused W update of HD-PiSSA (methods.md §4).

Every step, with K ranks' fixed factors (A_k, B_k) and Adam steps (δA_k, δB_k):

    W <- W - s Σ_k [ δB_k (A_k - δA_k) + B_k δA_k ] = W + scale P Q,   scale = -s
    P = [δB_1 | B_1 | ... | δB_K | B_K]            (out x 2 K r)
    Q = [A_1 - δA_1; δA_1; ... ; A_K - δA_K; δA_K]  (2 K r x in)

one GEMM of inner size 2 K r added into W in place: one read and one write of W. Its
arithmetic intensity is K r / 2 FLOPs per byte of an fp32 W (64 at 2 K r = 256): memory-bound
on tensor cores (TF32), but more than an H100's fp32 FMAs keep up with, so in full fp32
precision (torch's default "highest") the update is compute-bound for large K r. The P and Q
chunks are re-read from L2 for every W tile. With a low-precision model
weight, the update runs on the fp32 master copy and writes the rounded result into the
model's weight in the same pass (no second pass over W).

(HD-PiSSA's forward and backward reuse `kernels.lowrank`: the shrink for h = x A_k^T, the grad
pass for s dY B_k and gB_k = s dY^T h in one read of dY, and the GEMM for dx = dY W.)
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
    R_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """W[n, k] += scale * Σ_j P[n, j] Q[j, k] for one BLOCK_N x BLOCK_K tile of W (N x K), in
    place; with HAS_COPY also copy[n, k] = the new W[n, k] in copy's dtype. The inner size R is
    contracted R_CHUNK at a time (registers stay bounded whatever 2 K r is), in fp32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, R_CHUNK)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, R_CHUNK):
        inner = r0 + offs_c
        p = tl.load(p_ptr + offs_n[:, None] * stride_pn + inner[None, :] * stride_pr,
                    mask=mask_n[:, None] & (inner[None, :] < R), other=0.0)
        q = tl.load(q_ptr + inner[:, None] * stride_qr + offs_k[None, :] * stride_qk,
                    mask=(inner[:, None] < R) & mask_k[None, :], other=0.0)
        acc = mma(p, q, acc, UPCAST, INPUT_PRECISION)
    mask = mask_n[:, None] & mask_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    # The product is scaled once, then added to W: the same two roundings as
    # torch's W.addmm_(P, Q, alpha=scale).
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + scale * acc
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck,
                 w.to(copy_ptr.dtype.element_ty), mask=mask)
