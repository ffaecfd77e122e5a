"""The adapter dropout mask on the host: a replica, in plain PyTorch integer ops, of the mask
the kernels draw (`adapterops.kernels.common.dropout_keep`, csrc/dropout.h), so every backend
drops the same elements for the same seed.

    threshold = round(p 2^16),  kept(i, j) = bits16(seed, i, j) >= threshold,
    x_d = x * kept / (1 - p)    (0 where p = 1, as torch's dropout)

bits16(seed, i, j): Philox-4x32-10 (Salmon et al., SC'11; the constants of Triton's
`tl.philox`) with key (seed mod 2^32, seed // 2^32) at counter (j // 8, i mod 2^32, i // 2^32,
0) gives four 32-bit words w0..w3; lane j % 8 takes the low (lanes 0-3) or high (lanes 4-7) 16
bits of word j % 4. The keep probability is therefore 1 - threshold / 2^16, within 2^-17 of
1 - p. The seed is an int64 tensor on the tensors' device, drawn by the op from torch's
generator (`adapterops.ops.checks.dropout_seed`).
"""
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10


def threshold(p: float) -> int:
    """The 16-bit threshold of drop probability p: an element is kept when its bits >= it."""
    return round(p * 65536)


def keep_scale(p: float) -> float:
    """1 / (1 - p), the scale of a kept element (0 for p = 1: nothing is kept)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant a and 32-bit b (int64 tensor),
    without overflowing int64: b is split into 16-bit halves."""
    low_product = a * (b & 0xFFFF)
    t = a * (b >> 16) + (low_product >> 16)
    return t >> 16, ((t << 16) | (low_product & 0xFFFF)) & _MASK32


def philox(seed: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, ...]:
    """Philox-4x32-10 on int64 tensors holding 32-bit values; seed: a 1-element int64 tensor."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def keep_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The (rows, cols) boolean keep mask of seed `seed` (see the module docstring)."""
    device = seed.device
    groups = torch.arange((cols + 7) // 8, device=device, dtype=torch.int64)
    row = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    c0 = groups[None, :].expand(rows, -1)
    words = philox(seed.reshape(()).to(torch.int64), c0, (row & _MASK32).expand_as(c0),
                   (row >> 32).expand_as(c0), torch.zeros_like(c0))
    halves = [w & 0xFFFF for w in words] + [w >> 16 for w in words]
    bits = torch.stack(halves, dim=-1).reshape(rows, -1)[:, :cols]
    return bits >= threshold(p)


def dropped(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """x (M x K) with dropout applied: x * kept / (1 - p), in x's dtype."""
    mask = keep_mask(seed, x.shape[0], x.shape[1], p)
    return x * mask.to(x.dtype) * keep_scale(p)
