"""Launchers of HD-PiSSA's kernels: the factor gradients on the low-rank kernels
(`adapterops.kernels.lowrank`) and the fused W update (`adapterops.kernels.hdpissa`).

Forward: y = x W^T + bias is the base layer alone, so it runs on cuBLAS (`F.linear`: there is
nothing to fuse into it); the low-rank shrink computes h = x A^T, which backward needs for gB.
Backward: the low-rank grad pass (one read of dY: s dY B and gB = s dY^T h), dx = dY W on
cuBLAS (`torch.mm`: a plain GEMM with nothing to fuse, which cuBLAS runs at the floor), and
gA = (s dY B)^T x as one cuBLAS/ATen GEMM (one read of x).
Update: `lowrank_update_kernel`, W += scale P Q in place with the rounded copy in the same pass.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from ...kernels import hdpissa as K
from . import lowrank
from .common import (TRITON_DTYPE_NAMES, KernelConfig, device_guard, device_reasons,
                     dtype_reasons, interpreting, kernel_config, launch, numerics_flags,
                     variant_label)

# The update's tiles: fp32 W, P and Q (the master weight and the factors are fp32 whatever the
# model's dtype); see `adapterops.kernels.hdpissa` for the analysis. TF32: the largest tile
# that does not spill with W prefetched (216 registers), 32-wide inner chunks (four k8 wgmmas
# each). Full fp32 runs on FMAs, compute-bound whatever the tile: 64 x 64 on 4 warps gives
# each thread 32 outputs per operand load and spills in no variant (144-181 registers); ptxas
# capped 64 x 128 on 8 warps at 128 registers and spilled 16-48 bytes in some variants.
UPDATE_CONFIGS = {
    "tf32": {"BLOCK_N": 128, "BLOCK_K": 128, "R_CHUNK": 32, "num_warps": 8, "num_stages": 3},
    "ieee": {"BLOCK_N": 64, "BLOCK_K": 64, "R_CHUNK": 16, "num_warps": 4, "num_stages": 3},
}
INTERPRETER_UPDATE_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32, "R_CHUNK": 16}


def reasons(x: Tensor, lora_A: Tensor, **_) -> list[str]:
    out = device_reasons(x.device, lowrank.K.lowrank_shrink_kernel) + dtype_reasons(x.dtype)
    if lora_A.shape[0] > lowrank.MAX_RANK:
        out.append(f"rank {lora_A.shape[0]} exceeds the Triton kernels' maximum rank {lowrank.MAX_RANK}")
    return out


def update_reasons(weight: Tensor, **_) -> list[str]:
    out = device_reasons(weight.device, K.lowrank_update_kernel)
    if weight.dtype != torch.float32:
        out.append(f"the Triton update runs on an fp32 (master) weight, not {weight.dtype}")
    return out


@device_guard
def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            scaling: float, need_h: bool):
    """(y, h) for 2-D x: y = x W^T + bias, h = x A^T (empty unless need_h)."""
    h = lowrank.shrink(x, lora_A, None)[0] if need_h else x.new_empty(0)
    return F.linear(x, weight, bias), h


@device_guard
def backward(grad_y: Tensor, x: Optional[Tensor], h: Optional[Tensor], weight: Tensor,
             lora_A: Tensor, lora_B: Tensor, scaling: float, need_x: bool, need_A: bool,
             need_B: bool):
    """(dx, gA, gB), None where not asked for."""
    g = gB = None
    if need_A or need_B:
        g, gB, _ = lowrank.grad_pass(grad_y, lora_B, None, h, None, scaling, need_B, False)
    dx = torch.mm(grad_y, weight) if need_x else None
    gA = torch.mm(g.t(), x) if need_A else None
    return dx, gA, gB.to(lora_B.dtype) if gB is not None else None


@device_guard
def update_(weight: Tensor, P: Tensor, Q: Tensor, scale: float, copy: Optional[Tensor]) -> None:
    """weight (N x K, fp32) += scale P Q in place; copy = the result in copy's dtype."""
    N, Kdim = weight.shape
    if N == 0 or Kdim == 0:
        return
    kernel = K.lowrank_update_kernel
    flags = numerics_flags(weight.dtype, kernel)
    config = (INTERPRETER_UPDATE_CONFIG if interpreting(kernel)
              else UPDATE_CONFIGS[flags["INPUT_PRECISION"]])
    target = copy if copy is not None else weight  # a valid pointer; unwritten without HAS_COPY
    R = P.shape[1]
    launch(kernel, (triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(Kdim, config["BLOCK_K"])),
           (weight, P, Q, target, N, Kdim, R, scale, weight.stride(0), weight.stride(1),
            P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), target.stride(0), target.stride(1)),
           config, HAS_COPY=copy is not None, EVEN_R=R % config["R_CHUNK"] == 0, **flags)


# Strides that are 1 for the contiguous W, P, Q and copy the optimizer passes.
UNIT_STRIDES = ("stride_wk", "stride_pr", "stride_qk", "stride_ck")


def kernel_configurations() -> list[KernelConfig]:
    """The update kernel's configurations: fp32 W, P and Q in full fp32 and in TF32, without a
    copy and with an fp16 or bf16 copy, with and without a masked inner dimension. The forward
    and backward run the low-rank kernels (see
    lowrank.kernel_configurations)."""
    configs = []
    for precision in ("ieee", "tf32"):
        for copy_dtype in (None, torch.float16, torch.bfloat16):
            label = f"{variant_label(torch.float32, precision)} copy={TRITON_DTYPE_NAMES.get(copy_dtype)}"
            for even_r in (True, False):
                configs.append(kernel_config(
                    K.lowrank_update_kernel, f"{label} even_r={even_r}", UPDATE_CONFIGS[precision],
                    True, torch.float32, precision, UNIT_STRIDES,
                    pointer_dtypes={"copy_ptr": copy_dtype or torch.float32},
                    HAS_COPY=copy_dtype is not None, EVEN_R=even_r))
    return configs
