"""Kernels of the routed multi-head low-rank linear (HydraLoRA, methods.md §3).

    logits = x Wg^T                       (M x E), accumulated and kept in fp32
    p      = softmax(logits)              per token, in fp32
    g      = p, or with top_k: p with all but the k largest zeroed (no renormalisation)
    h      = x A^T                        (M x r)
    hg     = [g_0 h | g_1 h | ... ]       (M x E r)
    y      = x W^T + bias + s hg Bcat^T   Bcat = [B_0 | B_1 | ... ]  (out x E r)

Forward: `routed_shrink_kernel` (one read of x gives h and the logits: the projection by
[A; Wg]; softmax, top-k and the per-head scaling of h in its epilogue; for few tokens split
over K and ended by `routed_shrink_finish_kernel`, as the low-rank shrink), then the low-rank GEMM
of `kernels.lowrank` with h = hg and c = Bcat^T: the routed sum over heads is ONE GEMM of inner
size E r added in the base GEMM's epilogue.
Backward: `lowrank_grad_pass_kernel` with B = Bcat, h2 = hg and no S (one pass over dY gives
u = s dY Bcat, whose block e is s dY B_e, and dBcat = s dY^T hg, i.e. dB_e = s (g_e dY)^T h for
every head), then `routed_gate_grad_kernel` (per token, from u: the gate gradients and dh),
then the GEMM of `kernels.lowrank` once more for dx = dY W + [dh | dlogits] [A; Wg].
With adapter dropout (one mask for every head, on A's input only) the shrink masks the x tile
for the h product alone, and the launcher splits dx's low-rank term in two (the GEMM's
epilogue masks its whole term, the router's must not be): see `backends.triton.routed`.

The head count E and the rank r are runtime sizes, like the token count: the epilogues loop
over heads, so only BLOCK_R (r padded) and BLOCK_E (E padded to a power of two >= 16, the
smallest `tl.dot` tile a GPU takes) are compile-time.
"""
import triton
import triton.language as tl

from .common import dropout_keep, mma, store_partial, sum_partials


@triton.jit(do_not_specialize=["M", "R", "E", "top_k", "num_splits", "stride_hm", "stride_hgm",
                               "stride_pm"])
def routed_shrink_kernel(
    x_ptr, a_ptr, wg_ptr, h_ptr, hg_ptr, probs_ptr, gates_ptr, part_h_ptr, part_logits_ptr,
    seed_ptr,
    M, K, R, E, top_k, num_splits, k_per_split, threshold, keep_scale,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_we, stride_wk, stride_hm, stride_hgm,
    stride_pm,
    HAS_TOP_K: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """For one block of BLOCK_M tokens: h = x A^T and the router logits x Wg^T from one read
    of x, then p = softmax(logits) (stored, fp32), the gates g (stored with top_k, fp32) and
    hg = [g_0 h | ... | g_{E-1} h] (stored in x's dtype).

    With DROPOUT, h = x_d A^T with x_d = x * kept * keep_scale (one mask for every head, as the
    low-rank shrink draws it: `dropout_keep` regenerated from the seed at seed_ptr, threshold =
    round(p 2^16)): each x tile is loaded once, masked for the h product only (the logits take
    x as loaded), and h's fp32 accumulator takes keep_scale once at the end.

    Split over K (num_splits > 1, for few row blocks, as the low-rank shrink: see
    `kernels.lowrank`, "Few tokens"): program (m, k) reads columns [k k_per_split,
    (k + 1) k_per_split) of x and stores its fp32 partial h and logits;
    `routed_shrink_finish_kernel` sums them and routes. Unsplit, k_per_split = K.
    """
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < M
    mask_r = offs_r < R
    mask_e = offs_e < E
    # As in the low-rank shrink: a whole number of tiles from k_start, walked from 0.
    k_start = tl.program_id(1) * k_per_split
    k_len = tl.minimum(K - k_start, k_per_split)
    x_ptr += k_start.to(tl.int64) * stride_xk
    a_ptr += k_start.to(tl.int64) * stride_ak
    wg_ptr += k_start.to(tl.int64) * stride_wk
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # A^T and Wg^T tiles: element (k, j) = A[j, k], Wg[j, k].
    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    wgt_ptrs = wg_ptr + offs_k[:, None] * stride_wk + offs_e[None, :] * stride_we
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        mask_k = offs_k < k_len - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(at_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        wgt = tl.load(wgt_ptrs, mask=mask_k[:, None] & mask_e[None, :], other=0.0)
        if DROPOUT:
            # The logits' product first, from x as loaded (in shared memory on sm_90), then the
            # masked tile's (x_d in registers): issued the other way round, ptxas serialized
            # every wgmma of the loop (C7514, "non wgmma instructions reading accumulator
            # registers ... between start and end of the pipeline stage"; sm_90 kernel report,
            # triton 3.9, every 16-bit and TF32 configuration).
            acc_logits = mma(x, wgt, acc_logits, UPCAST, INPUT_PRECISION)
            x_d = tl.where(dropout_keep(seed, threshold, offs_m, k_start + k0, BLOCK_K), x, 0.0)
            acc_h = mma(x_d, at, acc_h, UPCAST, INPUT_PRECISION)
        else:
            acc_h = mma(x, at, acc_h, UPCAST, INPUT_PRECISION)
            acc_logits = mma(x, wgt, acc_logits, UPCAST, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
        wgt_ptrs += BLOCK_K * stride_wk
    if DROPOUT:
        acc_h = acc_h * keep_scale
    if num_splits > 1:
        store_partial(part_h_ptr, acc_h, tl.program_id(1), offs_m, mask_m, M, BLOCK_R)
        store_partial(part_logits_ptr, acc_logits, tl.program_id(1), offs_m, mask_m, M, BLOCK_E)
    else:
        _route(acc_h, acc_logits, offs_m, mask_m, h_ptr, hg_ptr, probs_ptr, gates_ptr, R, E,
               top_k, stride_hm, stride_hgm, stride_pm, HAS_TOP_K, BLOCK_M, BLOCK_R, BLOCK_E)


@triton.jit(do_not_specialize=["M", "R", "E", "top_k", "num_splits", "stride_hm", "stride_hgm",
                               "stride_pm"])
def routed_shrink_finish_kernel(
    part_h_ptr, part_logits_ptr, h_ptr, hg_ptr, probs_ptr, gates_ptr,
    M, R, E, top_k, num_splits,
    stride_hm, stride_hgm, stride_pm,
    HAS_TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """The end of a split routed shrink for one block of BLOCK_M tokens: h and the logits
    are the sums of the partials (in split order), then the routing as unsplit."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc_h = sum_partials(part_h_ptr, num_splits, offs_m, mask_m, M, BLOCK_M, BLOCK_R)
    acc_logits = sum_partials(part_logits_ptr, num_splits, offs_m, mask_m, M, BLOCK_M, BLOCK_E)
    _route(acc_h, acc_logits, offs_m, mask_m, h_ptr, hg_ptr, probs_ptr, gates_ptr, R, E, top_k,
           stride_hm, stride_hgm, stride_pm, HAS_TOP_K, BLOCK_M, BLOCK_R, BLOCK_E)


@triton.jit
def _route(acc_h, acc_logits, offs_m, mask_m, h_ptr, hg_ptr, probs_ptr, gates_ptr, R, E, top_k,
           stride_hm, stride_hgm, stride_pm, HAS_TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """From fp32 h and logits for the rows offs_m: h (rounded), p, the gates and hg stored."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    mask_r = offs_r < R
    mask_e = offs_e < E
    h = acc_h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], h,
             mask=mask_m[:, None] & mask_r[None, :])

    # The softmax runs on the fp32 accumulator: the logits are never rounded to x's dtype
    # (nn.Linear would round them; bf16 logits move the probabilities by up to p(1-p) 2^-8 |logit|).
    logits = tl.where(mask_e[None, :], acc_logits, float("-inf"))
    numerator = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = numerator / tl.sum(numerator, axis=1)[:, None]
    mask_me = mask_m[:, None] & mask_e[None, :]
    tl.store(probs_ptr + offs_m[:, None] * stride_pm + offs_e[None, :], probs, mask=mask_me)
    gates = probs
    if HAS_TOP_K:
        # k rounds of "take the largest left": argmax breaks ties towards the lower head index,
        # as the reference's stable sort does. Padded heads (-1) are never taken: top_k <= E.
        left = tl.where(mask_e[None, :], probs, -1.0)
        keep = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        for _ in range(0, top_k):
            taken = offs_e[None, :] == tl.argmax(left, axis=1)[:, None]
            keep = tl.where(taken, 1.0, keep)
            left = tl.where(taken, -1.0, left)
        gates = probs * keep
        tl.store(gates_ptr + offs_m[:, None] * stride_pm + offs_e[None, :], gates, mask=mask_me)

    # hg[:, e r + j] = g_e h[:, j], from the rounded h (as the unfused composition computes it).
    h32 = h.to(tl.float32)
    hg_ptrs = hg_ptr + offs_m[:, None] * stride_hgm + offs_r[None, :]
    for e in range(0, E):
        g_e = tl.sum(tl.where(offs_e[None, :] == e, gates, 0.0), axis=1)
        tl.store(hg_ptrs + e * R, (g_e[:, None] * h32).to(hg_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "R", "E", "stride_um", "stride_hm", "stride_pm",
                               "stride_dpm", "stride_dpe", "stride_om"])
def routed_gate_grad_kernel(
    u_ptr, h_ptr, probs_ptr, gates_ptr, dprobs_ptr, out_ptr,
    M, R, E,
    stride_um, stride_hm, stride_pm, stride_dpm, stride_dpe, stride_om,
    HAS_TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """For one block of BLOCK_M tokens, from u = s dY Bcat (block e: u_e = s dY B_e):

        dg_e    = <u_e, h>                      the gate gradients
        dh      = Σ_e g_e u_e                   into out[:, :R]
        dp      = dg (top_k: only the kept heads) + dprobs (the gradient of the returned p)
        dlogits = p * (dp - <p, dp>)            the softmax backward, into out[:, R:R+E]

    `out` = [dh | dlogits] is the left operand of the dx GEMM's low-rank term and of
    [dA; dWg] = out^T x.
    Elementwise work on M x E r values (no `tl.dot`), in fp32. dprobs may have any strides
    (a user's loss on the probabilities can hand back an expanded gradient).
    """
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < M
    mask_mr = mask_m[:, None] & (offs_r[None, :] < R)
    mask_me = mask_m[:, None] & (offs_e[None, :] < E)
    h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], mask=mask_mr,
                other=0.0).to(tl.float32)
    probs = tl.load(probs_ptr + offs_m[:, None] * stride_pm + offs_e[None, :], mask=mask_me,
                    other=0.0)
    if HAS_TOP_K:
        gates = tl.load(gates_ptr + offs_m[:, None] * stride_pm + offs_e[None, :], mask=mask_me,
                        other=0.0)
    else:
        gates = probs
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dg = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    u_ptrs = u_ptr + offs_m[:, None] * stride_um + offs_r[None, :]
    for e in range(0, E):
        u_e = tl.load(u_ptrs + e * R, mask=mask_mr, other=0.0).to(tl.float32)
        is_e = offs_e[None, :] == e
        g_e = tl.sum(tl.where(is_e, gates, 0.0), axis=1)
        dh += g_e[:, None] * u_e
        dg = tl.where(is_e, tl.sum(u_e * h, axis=1)[:, None], dg)
    if HAS_TOP_K:
        # A dropped head's gate is a constant 0: no gradient reaches its probability. (A kept
        # head whose probability underflowed to 0 loses nothing: p multiplies its term below.)
        dg = tl.where(gates != 0.0, dg, 0.0)
    dp = dg + tl.load(dprobs_ptr + offs_m[:, None] * stride_dpm + offs_e[None, :] * stride_dpe,
                      mask=mask_me, other=0.0).to(tl.float32)
    dlogits = probs * (dp - tl.sum(probs * dp, axis=1)[:, None])
    out_rows = out_ptr + offs_m[:, None] * stride_om
    tl.store(out_rows + offs_r[None, :], dh.to(out_ptr.dtype.element_ty), mask=mask_mr)
    tl.store(out_rows + R + offs_e[None, :], dlogits.to(out_ptr.dtype.element_ty), mask=mask_me)
