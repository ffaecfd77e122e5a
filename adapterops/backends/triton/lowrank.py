"""Launchers of the fused low-rank linear kernels (`adapterops.kernels.lowrank`).

Forward: shrink pass (h1, h2), then the base GEMM seeded with s h2 B^T.
Backward: one pass over dY (g, dB, dS, gS), then the dx GEMM seeded with (g S) A; dA (LoRA
mode only) is a plain cuBLAS/ATen GEMM (g S)^T x.
Tile configurations are data below; the GEMM is autotuned per (token-count bucket, N, K, rank
bucket, dtype), the two memory-bound passes use one configuration each.
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from ...kernels import lowrank as K
from .common import (DTYPES, TRITON_DTYPE_NAMES, KernelConfig, bucket, device_reasons,
                     dtype_reasons, interpreting, numerics_flags, pick_config, rank_block)

MAX_RANK = 128

# GEMM tiles by element size. fp32 halves BLOCK_K so three stages fit in shared memory.
GEMM_CONFIGS = {
    2: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    4: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
}
SHRINK_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
GRAD_PASS_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
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


def _gemm_configs(dtype: torch.dtype) -> list[dict]:
    return GEMM_CONFIGS[torch.finfo(dtype).bits // 8]


def _launch(kernel, grid, args, config: dict, **constexprs):
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    launch_options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    kernel[grid](*args, **meta, **constexprs, **launch_options)


def _gemm(a: Tensor, b: Tensor, h: Tensor, c: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    """out = a @ b + bias + scale * h @ c, with b and c given as (possibly transposed) views."""
    M, Kdim = a.shape
    N = b.shape[1]
    R = h.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    kernel = K.gemm_lowrank_kernel
    flags = numerics_flags(a.dtype, kernel)
    args = (a, b, h, c, bias if bias is not None else out, out, M, N, Kdim, R, scale,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), h.stride(0), h.stride(1),
            c.stride(0), c.stride(1), out.stride(0), out.stride(1))
    constexprs = dict(HAS_BIAS=bias is not None, BLOCK_R=rank_block(R), **flags)

    def launch(config):
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        _launch(kernel, grid, args, config, **constexprs)

    if interpreting(kernel):
        config = INTERPRETER_CONFIGS["gemm"]
    else:
        configs = _gemm_configs(a.dtype)
        key = (bucket(M), N, Kdim, rank_block(R), a.dtype, bias is not None, a.device)
        config = pick_config(key, configs, configs[0], launch, kernel)
    launch(config)
    return out


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            lora_S: Optional[Tensor], scaling: float):
    """(y, h1, h2) for 2-D x; h2 is empty without S. See `adapterops.kernels.lowrank`."""
    M, Kdim = x.shape
    R = lora_A.shape[0]
    h1 = torch.empty((M, R), dtype=x.dtype, device=x.device)
    h2 = torch.empty((M, R), dtype=x.dtype, device=x.device) if lora_S is not None else x.new_empty(0)
    if M > 0:
        kernel = K.lowrank_shrink_kernel
        config = INTERPRETER_CONFIGS["shrink"] if interpreting(kernel) else SHRINK_CONFIG
        S = lora_S if lora_S is not None else lora_A  # a valid pointer; unread without HAS_S
        _launch(kernel, (triton.cdiv(M, config["BLOCK_M"]),),
                (x, lora_A, S, h1, h2 if lora_S is not None else h1, M, Kdim, R,
                 x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
                 S.stride(0), S.stride(1), h1.stride(0), R),
                config, HAS_S=lora_S is not None, BLOCK_R=rank_block(R),
                **numerics_flags(x.dtype, kernel))
    h = h2 if lora_S is not None else h1
    # b = W^T and c = B^T as strided views: no copies.
    y = _gemm(x, weight.t(), h, lora_B.t(), bias, scaling)
    return y, h1, h2


def backward(grad_y: Tensor, x: Optional[Tensor], h1: Optional[Tensor], h2: Optional[Tensor],
             weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_S: Optional[Tensor],
             scaling: float, need_x: bool, need_A: bool, need_B: bool, need_S: bool):
    """(dx, dA, dB, dS), None where not asked for."""
    M, N = grad_y.shape
    R = lora_A.shape[0]
    device = grad_y.device
    gS = torch.empty((M, R), dtype=grad_y.dtype, device=device)
    dB = torch.zeros((N, R), dtype=torch.float32, device=device) if need_B else None
    dS = torch.zeros((R, R), dtype=torch.float32, device=device) if need_S else None
    if M > 0:
        kernel = K.lowrank_grad_pass_kernel
        config = INTERPRETER_CONFIGS["grad_pass"] if interpreting(kernel) else GRAD_PASS_CONFIG
        S = lora_S if lora_S is not None else lora_A  # a valid pointer; unread without HAS_S
        h1_arg = h1 if h1 is not None else gS       # likewise when dS is not asked for
        h2_arg = h2 if h2 is not None else gS       # likewise when dB is not asked for
        _launch(kernel, (triton.cdiv(M, config["BLOCK_M"]),),
                (grad_y, lora_B, h1_arg, h2_arg, S, gS,
                 dB if dB is not None else gS, dS if dS is not None else gS,
                 M, N, R, scaling, grad_y.stride(0), grad_y.stride(1),
                 lora_B.stride(0), lora_B.stride(1), h1_arg.stride(0), h2_arg.stride(0),
                 S.stride(0), S.stride(1), R),
                config, HAS_S=lora_S is not None, COMPUTE_DB=need_B, COMPUTE_DS=need_S,
                BLOCK_R=rank_block(R), **numerics_flags(grad_y.dtype, kernel))
    dx = _gemm(grad_y, weight, gS, lora_A, None, 1.0) if need_x else None
    dA = torch.mm(gS.t(), x) if need_A else None
    return (dx, dA,
            dB.to(lora_B.dtype) if dB is not None else None,
            dS.to(lora_S.dtype) if dS is not None else None)


def _signature(fn, dtype: torch.dtype, constexprs: dict, fp32_ptrs=()) -> dict:
    """Triton types of `fn`'s arguments: pointers in `dtype` (fp32 for `fp32_ptrs`), the
    `scale` in fp32, every other runtime argument (sizes, strides) i32."""
    name = TRITON_DTYPE_NAMES[dtype]
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in fp32_ptrs else f"*{name}"
        elif arg == "scale":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    return signature


def kernel_configurations() -> list[KernelConfig]:
    """Every configuration the launchers above can pick on a GPU: each tile configuration in
    each dtype and rank bucket, with the feature flags every call path can set."""
    configs = []

    def add(fn, label, config, default, dtype, fp32_ptrs=(), **flags):
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        constexprs = {**meta, **flags, "UPCAST": False,
                      "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
        configs.append(KernelConfig(fn.__name__, fn, label, _signature(fn, dtype, constexprs, fp32_ptrs),
                                    constexprs, config["num_warps"], config["num_stages"], default, dtype))

    for dtype in DTYPES:
        d = TRITON_DTYPE_NAMES[dtype]
        for block_r in (16, 32, 64, 128):
            for i, config in enumerate(_gemm_configs(dtype)):
                tiles = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
                for has_bias in (True, False):
                    add(K.gemm_lowrank_kernel, f"{d} R{block_r} {tiles} bias={has_bias}", config,
                        i == 0, dtype, HAS_BIAS=has_bias, BLOCK_R=block_r)
            for has_s in (True, False):
                add(K.lowrank_shrink_kernel, f"{d} R{block_r} S={has_s}", SHRINK_CONFIG, True,
                    dtype, HAS_S=has_s, BLOCK_R=block_r)
                for compute_db in (True, False):
                    for compute_ds in ((True, False) if has_s else (False,)):
                        add(K.lowrank_grad_pass_kernel,
                            f"{d} R{block_r} S={has_s} dB={compute_db} dS={compute_ds}",
                            GRAD_PASS_CONFIG, True, dtype, fp32_ptrs=("db_ptr", "ds_ptr"),
                            HAS_S=has_s, COMPUTE_DB=compute_db, COMPUTE_DS=compute_ds,
                            BLOCK_R=block_r)
    return configs
