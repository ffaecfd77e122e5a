"""Dequantizing a 4-bit weight in bitsandbytes' layout, in plain PyTorch (the oracle of the
Triton kernel): out[i] = code[nibble(i)] * scales[i // blocksize], high nibble first."""
import torch
from torch import Tensor

from ..base import Limits

LIMITS = Limits()


def dequantize_nf4(packed: Tensor, scales: Tensor, code: Tensor, blocksize: int, out: Tensor) -> None:
    """Fills the contiguous `out` (numel elements) from `packed` (ceil(numel / 2) uint8) and the fp32
    per-block `scales`."""
    numel = out.numel()
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]
    blocks = torch.arange(numel, device=out.device) // blocksize
    out.view(-1).copy_(code[nibbles.long()] * scales[blocks])
