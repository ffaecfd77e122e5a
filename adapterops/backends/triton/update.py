"""Launcher of the low-rank update W += scale P Q (`lowrank_update_kernel`, HD-PiSSA's fused
update, in `adapterops.kernels.hdpissa`): in place, with the rounded copy in the same pass.
The Triton update serves an fp32 (master) W only; the cuda backend serves 16-bit ones too.
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from ...kernels import hdpissa as K
from ..base import Limits
from .common import (TRITON_DTYPE_NAMES, KernelConfig, device_guard, device_reasons, interpreting,
                     kernel_config, launch, numerics_flags, variant_label)

LIMITS = Limits(dtypes=(torch.float32,))
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


def reasons_on(device: torch.device) -> list[str]:
    """Why the update kernel cannot run on `device` (empty when it can)."""
    return device_reasons(device, K.lowrank_update_kernel)


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
    copy and with an fp16 or bf16 copy, with and without a masked inner dimension."""
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
