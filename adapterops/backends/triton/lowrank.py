"""Launchers of the fused low-rank linear kernels (`adapterops.kernels.lowrank`).

Forward: shrink pass (h1, h2), then the base GEMM seeded with s h2 B^T.
Backward: one pass over dY (g, dB, dS, gS), then the dx GEMM seeded with (g S) A; dA (LoRA
mode only) is a plain cuBLAS/ATen GEMM (g S)^T x.
Tile configurations are data below; the GEMM is autotuned per (token-count bucket, N, K, rank,
dtype), the two memory-bound passes use one configuration per element size.
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from ...kernels import lowrank as K
from .common import (VARIANTS, KernelConfig, bucket, device_guard, device_reasons, dtype_reasons,
                     element_size, interpreting, kernel_config, launch, numerics_class,
                     numerics_flags, pick_config, rank_block, variant_label)

MAX_RANK = 128
RANK_CHUNK = 16  # the width of every contraction over the rank (see adapterops.kernels.lowrank)

# Tiles by element size (2: fp16/bf16 on tensor cores; 4: fp32, FMAs or TF32).
# fp32 GEMMs halve BLOCK_K so three stages fit in shared memory.
GEMM_CONFIGS = {
    2: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    4: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    ],
}
# The two memory-bound passes: one configuration each per numerics class ("16bit": fp16/bf16
# on tensor cores; "tf32"; "ieee": full fp32 on FMAs, which hold whole operand rows in
# registers, hence the small tiles). Each was chosen so that no rank bucket spills in the
# sm_90 and sm_80 kernel reports (M and R unspecialized, as launched). ptxas's choices here are
# not monotonic in tile size or warps: 4 warps spilled the 16-bit grad pass at rank 128 with S
# (364 bytes); 32-row fp32 grad-pass tiles spilled 16-660 bytes at rank 64; 16- and 32-row
# TF32 tiles spilled 8-76 bytes at rank 64 or 128. Re-run the report after changing any of them.
# BLOCK_K = 32 keeps the fp32 shrink's pipeline inside an A100's shared memory (BLOCK_K = 128
# needed 196,608 bytes at rank 128).
SHRINK_CONFIGS = {
    "16bit": {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    "tf32": {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    "ieee": {"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
}
GRAD_PASS_CONFIGS = {
    "16bit": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "tf32": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    "ieee": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 3},
}
# The grad pass at rank bucket 256, which only the routed op reaches (its rank is E r <= 256,
# without S): the g and dB accumulators are twice as wide, so the tiles shrink to keep them in
# registers.
WIDE_RANK_BLOCK = 256
WIDE_GRAD_PASS_CONFIGS = {
    "16bit": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    "tf32": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    "ieee": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3},
}
# Under the interpreter every program runs serially in NumPy: small tiles keep tests fast.
INTERPRETER_CONFIGS = {
    "gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
    "shrink": {"BLOCK_M": 32, "BLOCK_K": 32},
    "grad_pass": {"BLOCK_M": 32, "BLOCK_N": 32},
}


def reasons(x: Tensor, weight: Tensor, lora_A: Tensor, **_) -> list[str]:
    out = device_reasons(x.device, K.gemm_lowrank_kernel) + dtype_reasons(x.dtype)
    if lora_A.shape[0] > MAX_RANK:
        out.append(f"rank {lora_A.shape[0]} exceeds the Triton kernels' maximum rank {MAX_RANK}")
    return out


def grad_pass_configs(block_r: int) -> dict:
    """The grad pass's configuration table for a rank bucket."""
    return WIDE_GRAD_PASS_CONFIGS if block_r >= WIDE_RANK_BLOCK else GRAD_PASS_CONFIGS


def pass_config(kernel, dtype: torch.dtype, table: dict, interpreter_config: dict) -> tuple[dict, dict]:
    """(numerics flags, tile configuration) of a memory-bound pass for `dtype`: from `table`
    (keyed by numerics class) on a GPU, `interpreter_config` under the interpreter."""
    flags = numerics_flags(dtype, kernel)
    if interpreting(kernel):
        return flags, interpreter_config
    return flags, table[numerics_class(dtype, flags)]


def gemm_lowrank(a: Tensor, b: Tensor, h: Tensor, c: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    """out = a @ b + bias + scale * h @ c, with b and c given as (possibly transposed) views."""
    M, Kdim = a.shape
    N = b.shape[1]
    R = h.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    kernel = K.gemm_lowrank_kernel
    flags = numerics_flags(a.dtype, kernel)
    # The kernel reads bias with unit stride; a strided view (a column of a matrix) is copied.
    bias = bias.contiguous() if bias is not None else None
    args = (a, b, h, c, bias if bias is not None else out, out, M, N, Kdim, R, scale,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), h.stride(0), h.stride(1),
            c.stride(0), c.stride(1), out.stride(0), out.stride(1))
    constexprs = dict(HAS_BIAS=bias is not None, R_CHUNK=RANK_CHUNK, **flags)

    def launch_with(config):
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        launch(kernel, grid, args, config, **constexprs)

    if interpreting(kernel):
        config = INTERPRETER_CONFIGS["gemm"]
    else:
        configs = GEMM_CONFIGS[element_size(a.dtype)]
        key = (bucket(M), N, Kdim, R, a.dtype, bias is not None, a.device)
        config = pick_config(key, configs, configs[0], launch_with, kernel)
    launch_with(config)
    return out


def shrink(x: Tensor, lora_A: Tensor, lora_S: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(h1, h2) = (x A^T, h1 S^T) from one read of x; h2 is empty without S."""
    M, Kdim = x.shape
    R = lora_A.shape[0]
    h1 = torch.empty((M, R), dtype=x.dtype, device=x.device)
    h2 = torch.empty((M, R), dtype=x.dtype, device=x.device) if lora_S is not None else x.new_empty(0)
    if M > 0:
        kernel = K.lowrank_shrink_kernel
        flags, config = pass_config(kernel, x.dtype, SHRINK_CONFIGS, INTERPRETER_CONFIGS["shrink"])
        S = lora_S if lora_S is not None else lora_A  # a valid pointer; unread without HAS_S
        launch(kernel, (triton.cdiv(M, config["BLOCK_M"]),),
                (x, lora_A, S, h1, h2 if lora_S is not None else h1, M, Kdim, R,
                 x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
                 S.stride(0), S.stride(1), h1.stride(0), R),
                config, HAS_S=lora_S is not None, BLOCK_R=rank_block(R), R_CHUNK=RANK_CHUNK, **flags)
    return h1, h2


@device_guard
def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            lora_S: Optional[Tensor], scaling: float):
    """(y, h1, h2) for 2-D x; h2 is empty without S. See `adapterops.kernels.lowrank`."""
    h1, h2 = shrink(x, lora_A, lora_S)
    h = h2 if lora_S is not None else h1
    # b = W^T and c = B^T as strided views: no copies.
    y = gemm_lowrank(x, weight.t(), h, lora_B.t(), bias, scaling)
    return y, h1, h2


def grad_pass(grad_y: Tensor, lora_B: Tensor, h1: Optional[Tensor], h2: Optional[Tensor],
              lora_S: Optional[Tensor], scaling: float, need_B: bool, need_S: bool):
    """(gS, dB, dS) from one pass over dY: gS = s dY B S (s dY B without S) in dY's dtype; dB
    = s dY^T h2 (N x R) and dS = (s dY B)^T h1 (R x R) in fp32, None when not asked for."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    device = grad_y.device
    gS = torch.empty((M, R), dtype=grad_y.dtype, device=device)
    dB = torch.zeros((N, R), dtype=torch.float32, device=device) if need_B else None
    dS = torch.zeros((R, R), dtype=torch.float32, device=device) if need_S else None
    if M > 0:
        kernel = K.lowrank_grad_pass_kernel
        flags, config = pass_config(kernel, grad_y.dtype, grad_pass_configs(rank_block(R)),
                                    INTERPRETER_CONFIGS["grad_pass"])
        S = lora_S if lora_S is not None else lora_B  # a valid pointer; unread without HAS_S
        h1_arg = h1 if h1 is not None else gS       # likewise when dS is not asked for
        h2_arg = h2 if h2 is not None else gS       # likewise when dB is not asked for
        launch(kernel, (triton.cdiv(M, config["BLOCK_M"]),),
               (grad_y, lora_B, h1_arg, h2_arg, S, gS,
                dB if dB is not None else gS, dS if dS is not None else gS,
                M, N, R, scaling, grad_y.stride(0), grad_y.stride(1),
                lora_B.stride(0), lora_B.stride(1), h1_arg.stride(0), h2_arg.stride(0),
                S.stride(0), S.stride(1), R),
               config, HAS_S=lora_S is not None, COMPUTE_DB=need_B, COMPUTE_DS=need_S,
               BLOCK_R=rank_block(R), R_CHUNK=RANK_CHUNK, **flags)
    return gS, dB, dS


@device_guard
def backward(grad_y: Tensor, x: Optional[Tensor], h1: Optional[Tensor], h2: Optional[Tensor],
             weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_S: Optional[Tensor],
             scaling: float, need_x: bool, need_A: bool, need_B: bool, need_S: bool):
    """(dx, dA, dB, dS), None where not asked for."""
    gS, dB, dS = grad_pass(grad_y, lora_B, h1, h2, lora_S, scaling, need_B, need_S)
    dx = gemm_lowrank(grad_y, weight, gS, lora_A, None, 1.0) if need_x else None
    dA = torch.mm(gS.t(), x) if need_A else None
    return (dx, dA,
            dB.to(lora_B.dtype) if dB is not None else None,
            dS.to(lora_S.dtype) if dS is not None else None)


# Strides that are 1 when the launchers above get contiguous tensors, per kernel and call path.
# A launch turns an integer argument equal to 1 into a compile-time constant, so these are
# constants in what a GPU compiles. As runtime strides they stop the loads from vectorizing:
# the bf16 128x128x64 GEMM then compiled for sm_90 to scalar loads, 255 registers and 84 bytes
# of spills; with them constant (and sizes multiples of 16) to cp.async and 132 registers.
UNIT_STRIDES = {
    # a = x, b = W^T, h = h2, c = B^T
    "gemm fwd": ("stride_ak", "stride_bk", "stride_hr", "stride_cr", "stride_on"),
    # a = dY, b = W, h = gS, c = A
    "gemm bwd": ("stride_ak", "stride_bn", "stride_hr", "stride_cn", "stride_on"),
    "shrink": ("stride_xk", "stride_ak", "stride_sj"),
    "grad_pass": ("stride_dyn", "stride_br", "stride_sj"),
}


def kernel_configurations() -> list[KernelConfig]:
    """Every configuration the launchers above can pick on a GPU: each tile configuration in
    each dtype (fp32 in full precision and in TF32, as torch's fp32 matmul setting selects)
    and rank bucket, with the feature flags and unit strides of every call path."""
    configs = []
    for dtype, precision in VARIANTS:
        d = variant_label(dtype, precision)
        numerics = numerics_class(dtype, {"INPUT_PRECISION": precision})

        def add(fn, label, config, default, unit_strides, fp32_ptrs=(), **flags):
            configs.append(kernel_config(fn, f"{d} {label}", config, default, dtype, precision,
                                         unit_strides, fp32_ptrs, R_CHUNK=RANK_CHUNK, **flags))

        for i, config in enumerate(GEMM_CONFIGS[element_size(dtype)]):
            tiles = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
            # The backward (dx) GEMM never has a bias.
            for path, has_bias in (("fwd", True), ("fwd", False), ("bwd", False)):
                add(K.gemm_lowrank_kernel, f"{path} {tiles} bias={has_bias}", config, i == 0,
                    UNIT_STRIDES[f"gemm {path}"], HAS_BIAS=has_bias)
        for block_r in (16, 32, 64, 128, WIDE_RANK_BLOCK):
            # Rank bucket 256 is the routed op's grad pass alone: no S, no shrink.
            for has_s in ((True, False) if block_r < WIDE_RANK_BLOCK else (False,)):
                if block_r < WIDE_RANK_BLOCK:
                    add(K.lowrank_shrink_kernel, f"R{block_r} S={has_s}", SHRINK_CONFIGS[numerics],
                        True, UNIT_STRIDES["shrink"], HAS_S=has_s, BLOCK_R=block_r)
                for compute_db in (True, False):
                    for compute_ds in ((True, False) if has_s else (False,)):
                        add(K.lowrank_grad_pass_kernel,
                            f"R{block_r} S={has_s} dB={compute_db} dS={compute_ds}",
                            grad_pass_configs(block_r)[numerics], True, UNIT_STRIDES["grad_pass"],
                            fp32_ptrs=("db_ptr", "ds_ptr"), HAS_S=has_s, COMPUTE_DB=compute_db,
                            COMPUTE_DS=compute_ds, BLOCK_R=block_r)
    return configs
