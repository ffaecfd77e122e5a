"""Launchers of the routed multi-head low-rank linear (HydraLoRA) kernels
(`adapterops.kernels.routed`, plus the GEMM and grad pass of `adapterops.kernels.lowrank`).

Forward: `routed_shrink_kernel` (h, router probabilities, gates and hg from one read of x),
then the low-rank GEMM with the heads side by side, y = x W^T + bias + s hg Bcat^T.
Backward: the low-rank grad pass with B = Bcat and h2 = hg (u = s dY Bcat and dBcat from one
read of dY), `routed_gate_grad_kernel` ([dh | dlogits]), the dx GEMM with
[dh | dlogits] [A; Wg] in its epilogue, and [dA; dWg] = [dh | dlogits]^T x as one cuBLAS/ATen GEMM.
Bcat (out x E r) and [A; Wg] ((r + E) x in) are built per call: copies of the adapter's
weights, which are small next to x and dY (E r (in + out) elements).

Adapter dropout (p > 0; one mask for every head, on A's input only): the shrink masks each x
tile for the h product as it loads it (the logits take x); backward splits the GEMM's
low-rank term, dx = dY W + kept * (dh A) / (1 - p) in the GEMM (its epilogue masks its whole
term), then dx += dlogits Wg (the router saw x: its term is not masked), and dA = dh^T x_d
regenerates x_d in `lowrank.streamed_grad_A`; dWg = dlogits^T x is a cuBLAS/ATen GEMM.

fp32 adapters on a 16-bit x (lora_A, lora_B, router_weight fp32; PEFT's default): h, hg, u and
[dh | dlogits] are fp32, and the passes take fp32's numerics and tiles (`lowrank.pass_config`
by the adapter's dtype): the shrink reads x once in its own dtype and converts each tile in
registers (`kernels.common.mma`), the grad pass likewise reads dY; the GEMMs keep their 16-bit
main loop and add the fp32 term in their epilogue (`lowrank.gemm_lowrank`). [dA; dWg] = [dh |
dlogits]^T x has no one-dtype GEMM: `lowrank.streamed_grad_A` reads x in its own dtype (one
launch for both when R + E fits its widest rank bucket). With dropout dx's router term is an
fp32 cuBLAS product, added in place to the GEMM's dx (rounding the sum once more).

Limits of this backend: rank r <= 128, E <= 16 heads and E r <= 256; beyond them the
dispatcher falls back to the torch backend with the reason.
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from ...kernels import lowrank as lowrank_kernels
from ...kernels import routed as K
from ..base import Limits
from ..reference.dropout import keep_scale, threshold
from ..reference.routed import heads_side_by_side
from . import lowrank
from .common import (DTYPES, VARIANTS, KernelConfig, device_guard, device_reasons, interpreting,
                     kernel_config, launch, numerics_class, rank_block, variant_label)

MAX_HEADS = 16
MAX_ROUTED_RANK = lowrank.WIDE_RANK_BLOCK  # E r: the widest rank bucket of the grad pass
LIMITS = Limits(dtypes=DTYPES, max_rank=lowrank.MAX_RANK, max_heads=MAX_HEADS,
                max_routed_rank=MAX_ROUTED_RANK)

# The shrink runs on the low-rank shrink's tiles (`lowrank.SHRINK_CONFIGS`, by numerics class
# and rank bucket): its 8 warps at 16-bit rank bucket 128 also keep this epilogue (softmax,
# top-k, the per-head stores of g_e h) from spilling, as 4 did (176-196 bytes).
# The gate gradient kernel is elementwise (no `tl.dot`): one configuration for every dtype.
SHRINK_CONFIGS = lowrank.SHRINK_CONFIGS
# The shrink with dropout, where it needs other tiles than SHRINK_CONFIGS: the full-fp32 one
# holds x and its masked copy, and at rank bucket 128 its 32-row, 8-warp tile spilled 24 bytes
# (48 with top-k), the low-rank dropout shrink's 16 rows on 8 warps still 12 (without top-k);
# 32 rows on 4 warps spill nowhere (168 registers at 128; sm_90 kernel report, triton 3.9) and
# keep the row blocks of the shrink without dropout. The 16-bit and TF32 tiles are the
# shrink's own.
DROPOUT_SHRINK_CONFIGS = {
    **SHRINK_CONFIGS,
    "ieee": ((128, {"BLOCK_M": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3}),),
}
GATE_GRAD_CONFIG = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}
INTERPRETER_GATE_GRAD_CONFIG = {"BLOCK_M": 32}


def reasons_on(device: torch.device) -> list[str]:
    """Why this family's kernels cannot run on `device` (empty when they can)."""
    return device_reasons(device, K.routed_shrink_kernel)


def head_block(num_heads: int) -> int:
    """The heads' tile size: a power of two >= 16 (the router logits are a `tl.dot` output)."""
    return max(16, triton.next_power_of_2(num_heads))


@device_guard
def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            router_weight: Tensor, scaling: float, top_k: Optional[int], dropout: float,
            dropout_seed: Optional[Tensor]):
    """(y, h, hg, probs, gates) for 2-D x; gates is empty for dense routing. With dropout
    p > 0, h = x_d A^T (the shrink draws the mask as it reads x); the logits and the base GEMM
    take x."""
    M, Kdim = x.shape
    E, _, R = lora_B.shape
    # h and hg in the adapter's dtype; with fp32 adapters on a 16-bit x the shrink computes in
    # fp32 (its numerics and tiles are fp32's), x converted in registers.
    h = torch.empty((M, R), dtype=lora_A.dtype, device=x.device)
    hg = torch.empty((M, E * R), dtype=lora_A.dtype, device=x.device)
    probs = torch.empty((M, E), dtype=torch.float32, device=x.device)
    gates = torch.empty_like(probs) if top_k is not None else probs.new_empty(0)
    if M > 0:
        kernel = K.routed_shrink_kernel
        block_r, block_e = rank_block(R), head_block(E)
        has_dropout = dropout > 0
        # By the adapter's dtype: fp32 adapters on a 16-bit x take fp32's tiles, which hold
        # the bf16 x tiles and their conversion without spilling (sm_90 kernel report, triton
        # 3.9: 52-168 registers, see fp32_adapter_configurations).
        flags, config = lowrank.pass_config(kernel, lora_A.dtype,
                                            DROPOUT_SHRINK_CONFIGS if has_dropout else SHRINK_CONFIGS,
                                            block_r, lowrank.INTERPRETER_CONFIGS["shrink"])
        row_blocks = triton.cdiv(M, config["BLOCK_M"])
        splits, k_per_split = lowrank.split_loop(kernel, x.device, row_blocks, Kdim,
                                                 config["BLOCK_K"])
        gates_arg = gates if top_k is not None else probs  # a valid pointer; unread without top_k
        part_h = lowrank.partial_sums(splits, M, block_r, h)
        part_logits = lowrank.partial_sums(splits, M, block_e, h)
        shapes = dict(HAS_TOP_K=top_k is not None, BLOCK_R=block_r, BLOCK_E=block_e)
        launch(kernel, (row_blocks, splits),
               (x, lora_A, router_weight, h, hg, probs, gates_arg, part_h, part_logits,
                dropout_seed if has_dropout else h,  # a valid pointer; unread without DROPOUT
                M, Kdim, R, E, top_k or 0, splits, k_per_split, threshold(dropout),
                keep_scale(dropout), x.stride(0), x.stride(1),
                lora_A.stride(0), lora_A.stride(1), router_weight.stride(0),
                router_weight.stride(1), R, E * R, E),
               config, DROPOUT=has_dropout, **shapes, **flags)
        if splits > 1:
            launch(K.routed_shrink_finish_kernel, (row_blocks,),
                   (part_h, part_logits, h, hg, probs, gates_arg, M, R, E, top_k or 0, splits,
                    R, E * R, E),
                   lowrank.finish_config(config), **shapes)
    y = lowrank.gemm_lowrank(x, weight.t(), hg, heads_side_by_side(lora_B).t(), bias, scaling)
    return y, h, hg, probs, gates


@device_guard
def backward(grad_y: Tensor, grad_probs: Tensor, x: Optional[Tensor], h: Optional[Tensor],
             hg: Optional[Tensor], probs: Optional[Tensor], gates: Optional[Tensor],
             weight: Tensor, lora_A: Tensor, lora_B: Tensor, router_weight: Tensor,
             dropout_seed: Optional[Tensor], scaling: float, dropout: float, need_x: bool,
             need_A: bool, need_B: bool, need_router: bool):
    """(dx, dA, dB, dWg), None where not asked for; gates is None for dense routing.

    With dropout p > 0: dx = dY W + kept * (dh A) / (1 - p) from the GEMM, whose epilogue
    masks its whole low-rank term, then dx += dlogits Wg, unmasked (the router saw x). That
    costs one more pass over dx (a read and a write of M x in, with an inner size of only E)
    next to the fused [dh | dlogits] [A; Wg] term without dropout; a second, unmasked term in
    the GEMM's epilogue would need a third accumulator tile there. dA = dh^T x_d regenerates
    x_d from the seed (`lowrank.streamed_grad_A`); dWg = dlogits^T x.

    With fp32 adapters on a 16-bit x: u (from the grad pass, which reads dY in its own dtype)
    and [dh | dlogits] are fp32; dx's GEMM adds its fp32 term in its epilogue; [dA; dWg] come
    from `lowrank.streamed_grad_A`, which reads x in its own dtype (a cuBLAS GEMM would need an
    fp32 copy of x, M x in: twice x's bytes written and read again)."""
    M, N = grad_y.shape
    E, _, R = lora_B.shape
    # u in the adapter's dtype (fp32 adapters: the pass computes in fp32, dY converted in
    # registers).
    u, dB_cat, _ = lowrank.grad_pass(grad_y, heads_side_by_side(lora_B), None, hg, None, scaling,
                                     need_B, False)
    dB = None
    if need_B:
        dB = torch.empty(lora_B.shape, dtype=lora_B.dtype, device=lora_B.device)
        dB.copy_(dB_cat.view(N, E, R).permute(1, 0, 2))
    dx = dA = dWg = None
    if need_x or need_A or need_router:
        # [dh | dlogits] in the adapter's dtype: the gate-gradient kernel reads u, h, p, the
        # gates and dp in their own dtypes and computes in fp32.
        dh_dlogits = torch.empty((M, R + E), dtype=lora_A.dtype, device=grad_y.device)
        mixed = x is not None and x.dtype != dh_dlogits.dtype  # fp32 adapters, 16-bit x
        if M > 0:
            kernel = K.routed_gate_grad_kernel
            config = INTERPRETER_GATE_GRAD_CONFIG if interpreting(kernel) else GATE_GRAD_CONFIG
            launch(kernel, (triton.cdiv(M, config["BLOCK_M"]),),
                   (u, h, probs, gates if gates is not None else probs, grad_probs, dh_dlogits,
                    M, R, E, u.stride(0), h.stride(0), probs.stride(0), grad_probs.stride(0),
                    grad_probs.stride(1), dh_dlogits.stride(0)),
                   config, HAS_TOP_K=gates is not None, BLOCK_R=rank_block(R),
                   BLOCK_E=head_block(E))
        if dropout > 0:
            dh, dlogits = dh_dlogits[:, :R], dh_dlogits[:, R:]
            if need_x:
                dx = lowrank.gemm_lowrank(grad_y, weight, dh, lora_A, None, keep_scale(dropout),
                                          dropout, dropout_seed)
                if dx.dtype == dlogits.dtype:
                    dx.addmm_(dlogits, router_weight)
                else:
                    # fp32 adapters: the router term in fp32 (cuBLAS's beta = 1 takes one
                    # dtype), an M x in fp32 transient added in place, the sum rounded once to
                    # x's dtype. dx itself was rounded once by the GEMM: as the torch backend,
                    # which rounds dY W before it adds the fp32 terms, two roundings in all.
                    dx.add_(torch.mm(dlogits, router_weight))
            if need_A:  # dh: a column slice of [dh | dlogits], read in place
                dA = lowrank.streamed_grad_A(dh, x, dropout, dropout_seed).to(lora_A.dtype)
            if need_router:  # the router saw x: no mask
                dWg = (lowrank.streamed_grad_A(dlogits, x, 0.0, None) if mixed
                       else torch.mm(dlogits.t(), x))
            return dx, dA, dB, dWg
        if need_x:
            dx = lowrank.gemm_lowrank(grad_y, weight, dh_dlogits,
                                      torch.cat([lora_A, router_weight]), None, 1.0)
        # dA and dWg: one GEMM (one read of x) over the rows of [dh | dlogits] asked for. A
        # custom op's outputs may not alias each other, so dWg (E x in) is copied out of it.
        # With fp32 adapters on a 16-bit x, the streamed pass in its place (one read of x as
        # well), or two of them when both are asked for and R + E exceeds its widest rank
        # bucket (r <= 128 and E <= 16: R + E <= 144).
        rows = slice(0 if need_A else R, R + E if need_router else R)
        if not (need_A or need_router):
            return dx, dA, dB, dWg
        if mixed and rows.stop - rows.start > lowrank.MAX_RANK:
            return (dx, lowrank.streamed_grad_A(dh_dlogits[:, :R], x, 0.0, None), dB,
                    lowrank.streamed_grad_A(dh_dlogits[:, R:], x, 0.0, None))
        dAW = (lowrank.streamed_grad_A(dh_dlogits[:, rows], x, 0.0, None) if mixed
               else torch.mm(dh_dlogits[:, rows].t(), x))
        dA = dAW[:R] if need_A else None
        dWg = (dAW[R:].clone() if need_A else dAW) if need_router else None
    return dx, dA, dB, dWg


# Strides that are 1 when the launchers above get contiguous tensors (see lowrank.UNIT_STRIDES).
UNIT_STRIDES = {
    "shrink": ("stride_xk", "stride_ak", "stride_wk"),
    # The probabilities' gradient autograd materializes is contiguous.
    "gate_grad": ("stride_dpe",),
}


def kernel_configurations() -> list[KernelConfig]:
    """Every configuration of the routed kernels the launchers above can pick on a GPU (the
    GEMM and grad pass they share with the low-rank op are in lowrank.kernel_configurations,
    rank bucket 256 of the grad pass included)."""
    configs = []
    for dtype, precision in VARIANTS:
        d = variant_label(dtype, precision)
        numerics = numerics_class(dtype, {"INPUT_PRECISION": precision})
        for block_r in (16, 32, 64, 128):
            for has_top_k in (False, True):
                flags = dict(HAS_TOP_K=has_top_k, BLOCK_R=block_r, BLOCK_E=head_block(MAX_HEADS))
                finishes = []  # the finishing kernel runs on its shrink's rows and warps
                for dropout, table in ((False, SHRINK_CONFIGS), (True, DROPOUT_SHRINK_CONFIGS)):
                    shrink_config = lowrank.bucket_config(table, numerics, block_r)
                    configs.append(kernel_config(
                        K.routed_shrink_kernel,
                        f"{d} R{block_r} E16 top_k={has_top_k}" + (" dropout" if dropout else ""),
                        shrink_config, True, dtype, precision, UNIT_STRIDES["shrink"],
                        fp32_ptrs=("probs_ptr", "gates_ptr", "part_h_ptr", "part_logits_ptr"),
                        loop="stream", DROPOUT=dropout, **flags))
                    if lowrank.finish_config(shrink_config) not in finishes:
                        finishes.append(lowrank.finish_config(shrink_config))
                # No dots below (the finishing kernel routes, the gate gradients are
                # elementwise): the fp32 matmul precision does not apply, one fp32 variant
                # suffices.
                if precision == "tf32" and dtype == torch.float32:
                    continue
                for i, finish in enumerate(finishes):
                    configs.append(kernel_config(
                        K.routed_shrink_finish_kernel,
                        f"{d} R{block_r} E16 top_k={has_top_k}"
                        + (f" BLOCK_M={finish['BLOCK_M']}" if i else ""),
                        finish, True, dtype, precision,
                        fp32_ptrs=("probs_ptr", "gates_ptr", "part_h_ptr", "part_logits_ptr"),
                        loop="partials", **flags))
                configs.append(kernel_config(
                    K.routed_gate_grad_kernel, f"{d} R{block_r} E16 top_k={has_top_k}",
                    GATE_GRAD_CONFIG, True, dtype, precision, UNIT_STRIDES["gate_grad"],
                    fp32_ptrs=("probs_ptr", "gates_ptr", "dprobs_ptr"), loop="stream", **flags))
    return configs + fp32_adapter_configurations()


# fp32 adapters on a 16-bit x: the routed shrink's pointers that hold the adapter's dtype (x
# keeps its own; the probabilities, gates and partial sums are fp32 in every variant).
FP32_ADAPTER_SHRINK_PTRS = ("a_ptr", "wg_ptr", "h_ptr", "hg_ptr")


def fp32_adapter_configurations() -> list[KernelConfig]:
    """The routed configurations launched with fp32 adapters on a bf16 x, in full fp32
    ("ieee", torch's default precision), as `lowrank.fp32_adapter_configurations` lists the
    low-rank ones: the shrink (x read in bf16, the fp32 tiles of A and Wg, h and hg stored in
    fp32) and the grad pass at rank bucket 256 (dY read in bf16 against Bcat; E r > 128 is the
    routed op's alone, so the low-rank list stops at 128). The rest see fp32 tensors only and
    compile as the fp32 variants above: the shrink's finishing kernel (fp32 partials, h, hg)
    and the gate gradients (u, h, [dh | dlogits], p, dp); the GEMMs, the grad pass at rank
    buckets up to 128 and the streamed dA pass (dA, dWg) are the low-rank op's own mixed
    configurations."""
    dtype, adapter, precision = torch.bfloat16, torch.float32, "ieee"
    d = f"bf16+fp32-{precision}"
    numerics = numerics_class(adapter, {"INPUT_PRECISION": precision})
    configs = []
    for block_r in (16, 32, 64, 128):
        for has_top_k in (False, True):
            flags = dict(HAS_TOP_K=has_top_k, BLOCK_R=block_r, BLOCK_E=head_block(MAX_HEADS))
            for dropout, table in ((False, SHRINK_CONFIGS), (True, DROPOUT_SHRINK_CONFIGS)):
                configs.append(kernel_config(
                    K.routed_shrink_kernel,
                    f"{d} R{block_r} E16 top_k={has_top_k}" + (" dropout" if dropout else ""),
                    lowrank.bucket_config(table, numerics, block_r),
                    True, dtype, precision, UNIT_STRIDES["shrink"],
                    fp32_ptrs=("probs_ptr", "gates_ptr", "part_h_ptr", "part_logits_ptr"),
                    pointer_dtypes=dict.fromkeys(FP32_ADAPTER_SHRINK_PTRS, adapter),
                    loop="stream", DROPOUT=dropout, **flags))
    block_r = lowrank.WIDE_RANK_BLOCK
    for compute_db in (True, False):
        configs.append(kernel_config(
            lowrank_kernels.lowrank_grad_pass_kernel,
            f"{d} R{block_r} S=False dB={compute_db} dS=False (routed)",
            lowrank.bucket_config(lowrank.GRAD_PASS_CONFIGS, numerics, block_r), True, dtype,
            precision, lowrank.UNIT_STRIDES["grad_pass"],
            fp32_ptrs=("db_ptr", "ds_ptr", "part_ptr"),
            pointer_dtypes=dict.fromkeys(lowrank.FP32_ADAPTER_PTRS["grad_pass"], adapter),
            loop="stream", COMPUTE_DB=compute_db, COMPUTE_DS=False, HAS_S=False,
            BLOCK_R=block_r, R_CHUNK=lowrank.RANK_CHUNK))
    return configs
