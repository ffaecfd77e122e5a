"""Launchers of HD-PiSSA's layer: the factor gradients on the low-rank kernels
(`adapterops.kernels.lowrank`); its fused W update is the `update` family (update.py).

Forward: y = x W^T + bias is the base layer alone, so it runs on cuBLAS (`F.linear`: there is
nothing to fuse into it); the low-rank shrink computes h = x A^T, which backward needs for gB.
Backward: the low-rank grad pass (one read of dY: s dY B and gB = s dY^T h), dx = dY W on
cuBLAS (`torch.mm`: a plain GEMM with nothing to fuse, which cuBLAS runs at the floor), and
gA = (s dY B)^T x as one cuBLAS/ATen GEMM (one read of x).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import lowrank
from .common import device_guard

# Its kernels are the low-rank shrink and grad pass: their limits and device support.
LIMITS, reasons_on = lowrank.LIMITS, lowrank.reasons_on


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
