"""Launcher of the 4-bit dequantization (`nf4_dequantize_kernel`, in `adapterops.kernels.dequant`):
bitsandbytes' NF4/FP4 layout into a dense fp32, fp16 or bf16 buffer."""
import torch
import triton
from torch import Tensor

from ...kernels import dequant as K
from ..base import Limits
from .common import KernelConfig, device_guard, device_reasons, interpreting, kernel_config, launch

LIMITS = Limits(dtypes=(torch.float32, torch.float16, torch.bfloat16))
# 2048 bytes (4096 elements) per program on 4 warps: 16 bytes of packed codes per thread, one
# 16-byte load, and 32 (16-bit) or 64 (fp32) output bytes per thread, stored as whole vectors.
DEQUANT_CONFIG = {"BLOCK": 2048, "num_warps": 4, "num_stages": 1}
INTERPRETER_DEQUANT_CONFIG = {"BLOCK": 64}
# The blocksize the report compiles (bitsandbytes' default for 4-bit weights); others change
# one constexpr division.
REPORT_BLOCKSIZE = 64


def reasons_on(device: torch.device) -> list[str]:
    """Why the dequantization kernel cannot run on `device` (empty when it can)."""
    return device_reasons(device, K.nf4_dequantize_kernel)


@device_guard
def dequantize_nf4(packed: Tensor, scales: Tensor, code: Tensor, blocksize: int, out: Tensor) -> None:
    """Fills the contiguous `out` from `packed` and the fp32 per-block `scales` (see the kernel)."""
    numel = out.numel()
    kernel = K.nf4_dequantize_kernel
    config = INTERPRETER_DEQUANT_CONFIG if interpreting(kernel) else DEQUANT_CONFIG
    num_bytes = (numel + 1) // 2
    launch(kernel, (triton.cdiv(num_bytes, config["BLOCK"]),),
           (packed, scales, code, out, numel, num_bytes), config, BLOCKSIZE=blocksize)


def kernel_configurations() -> list[KernelConfig]:
    """The dequantization into each output dtype (memory-bound: no MMA)."""
    return [kernel_config(K.nf4_dequantize_kernel, f"out={str(dtype).removeprefix('torch.')}",
                          DEQUANT_CONFIG, True, dtype, "ieee", fp32_ptrs=("scales_ptr", "code_ptr"),
                          pointer_dtypes={"packed_ptr": torch.uint8}, loop="stream",
                          BLOCKSIZE=REPORT_BLOCKSIZE)
            for dtype in LIMITS.dtypes]
