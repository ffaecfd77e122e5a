"""HD-PiSSA's layer (methods.md §4) in plain PyTorch: the forward is the base layer alone; the
factors get LoRA gradients:

    y = x W^T + bias,  h = x A^T,  gA = (s dY B)^T x,  gB = s dY^T h,  dx = dY W
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Limits

LIMITS = Limits()


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            scaling: float, need_h: bool):
    """(y, h): the base layer's output (the adapter adds nothing) and h = x A^T for gB (None
    unless need_h). lora_B and scaling play no part; the arguments are the op's."""
    return F.linear(x, weight, bias), (F.linear(x, lora_A) if need_h else None)


def backward(grad_y: Tensor, x: Optional[Tensor], h: Optional[Tensor], weight: Tensor,
             lora_A: Tensor, lora_B: Tensor, scaling: float, need_x: bool, need_A: bool,
             need_B: bool):
    """(dx, gA, gB), each None when not asked for: dx = dY W (no adapter term),
    gA = (s dY B)^T x, gB = s dY^T h (lora_A plays no part; the arguments are the op's)."""
    dx = torch.mm(grad_y, weight) if need_x else None
    gA = torch.mm(torch.mm(grad_y, lora_B).mul_(scaling).t(), x) if need_A else None
    gB = torch.mm(grad_y.t(), h).mul_(scaling) if need_B else None
    return dx, gA, gB
