"""The low-rank linear (LoRA, PiSSA, LaMDA; methods.md §1, §2) in plain PyTorch:

    h1 = x A^T,  h2 = h1 S^T (h2 = h1 without S),  y = x W^T + bias + s h2 B^T
    g = s dY B,  dB = s dY^T h2,  dS = g^T h1,  dx = dY W + (g S) A,  dA = (g S)^T x

With dropout p > 0, x_d (`dropout.dropped`: the kernels' mask) replaces x in h1 and dA, and
dx = dY W + kept * ((g S) A) / (1 - p). With fp32 adapters on a 16-bit x the low-rank path runs
in fp32 (PEFT's math), the base products in x's dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Limits
from .dropout import dropped

LIMITS = Limits()


def add_scaled_product(base: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """base + scale * (a @ b). BLAS skips the product when alpha is 0, dropping a NaN or inf
    of a @ b that PyTorch's composition `base + 0 * (a @ b)` propagates: scale 0 takes that
    composition."""
    if scale == 0:
        return base + torch.mm(a, b).mul_(0)
    return torch.addmm(base, a, b, alpha=scale)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            lora_S: Optional[Tensor], scaling: float, dropout: float,
            dropout_seed: Optional[Tensor]):
    """Returns (y, h1, h2); h2 is None when there is no S (then h2 = h1). Adapters in another
    dtype than x (fp32 on a 16-bit base) compute as PEFT does: x cast to their dtype, the base
    output (rounded to x's dtype) plus the term in their dtype, rounded to x's dtype."""
    # The casts only where the dtypes differ: a no-op `.to` still costs ~1 us a call, which
    # is this backend's whole budget for host overhead (docs/performance.md).
    mixed = lora_A.dtype != x.dtype
    x_adapter = x.to(lora_A.dtype) if mixed else x
    h1 = F.linear(dropped(x_adapter, dropout_seed, dropout) if dropout > 0 else x_adapter, lora_A)
    h2 = F.linear(h1, lora_S) if lora_S is not None else h1
    base = F.linear(x, weight, bias)
    if not mixed:
        return add_scaled_product(base, h2, lora_B.t(), scaling), h1, (h2 if lora_S is not None else None)
    y = add_scaled_product(base.to(h2.dtype), h2, lora_B.t(), scaling).to(x.dtype)
    return y, h1, (h2 if lora_S is not None else None)


def backward(grad_y: Tensor, x: Optional[Tensor], h1: Optional[Tensor], h2: Optional[Tensor],
             weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_S: Optional[Tensor],
             dropout_seed: Optional[Tensor], scaling: float, dropout: float, need_x: bool,
             need_A: bool, need_B: bool, need_S: bool):
    """Returns (dx, dA, dB, dS), each None when not asked for.

    Needs x for dA, h2 (h1 without S) for dB and h1 for dS; the caller saves only those.
    """
    mixed = lora_B.dtype != grad_y.dtype  # fp32 adapters on a 16-bit base
    dy = grad_y.to(lora_B.dtype) if mixed else grad_y  # the adapter's dtype
    g = torch.mm(dy, lora_B).mul_(scaling)
    dB = torch.mm(dy.t(), h2).mul_(scaling) if need_B else None
    dS = torch.mm(g.t(), h1) if need_S else None
    gS = torch.mm(g, lora_S) if lora_S is not None else g
    x_adapter = (x.to(lora_A.dtype) if mixed else x) if need_A else None
    if dropout > 0:
        dx = (torch.mm(grad_y, weight).to(gS.dtype)
              + dropped(torch.mm(gS, lora_A), dropout_seed, dropout)).to(grad_y.dtype) if need_x else None
        dA = torch.mm(gS.t(), dropped(x_adapter, dropout_seed, dropout)) if need_A else None
        return dx, dA, dB, dS
    if not need_x:
        dx = None
    elif mixed:
        dx = torch.addmm(torch.mm(grad_y, weight).to(gS.dtype), gS, lora_A).to(grad_y.dtype)
    else:
        dx = torch.addmm(torch.mm(grad_y, weight), gS, lora_A)
    dA = torch.mm(gS.t(), x_adapter) if need_A else None
    return dx, dA, dB, dS
