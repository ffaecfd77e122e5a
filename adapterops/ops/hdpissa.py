"""HD-PiSSA's layer op (methods.md §4), `hdpissa_linear`: the layer of one rank k, whose
adapter factors are fixed slices of W's principal components. The adapter adds nothing to the
output; backward gives the factors the gradients of the LoRA form B_k A_k at its current value:

    y  = x W^T + bias
    gA = s (dY B)^T x      (r x in)      gB = s dY^T (x A^T)     (out x r)
    dx = dY W              (no adapter term)        dW = dY^T x, dbias = Σ_tokens dY

with x (..., in), weight W (out, in), lora_A A (r, in), lora_B B (out, r), s = scaling; fp32,
fp16 or bf16. No out x in matrix is ever formed. Memory contract: backward keeps x (for gA)
and h = x A^T (M x r, for gB), each only when that gradient is asked for; without a gradient
for lora_B the forward does not compute h at all.

HD-PiSSA's weight update is the `update` family (`adapterops.ops.update.lowrank_update_`).

Backends: `triton` (CUDA sm_80+, or CPU under TRITON_INTERPRET=1; fp32, fp16, bf16 at rank
<= 128), `cuda` (the compiled C++: CUDA tensors in fp32, fp16, bf16, any rank) and `torch`
(everything else). Declared once (`adapterops.ops.declare`): custom ops
`adapterops::hdpissa_linear_fwd` and `_bwd` for `torch.compile`, and an eager autograd
Function onto the same functions.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from .checks import (autocast_on, cast_for_autocast, check_base_and_A, check_dim, check_scaling,
                     check_tensor)
from .declare import DeclaredOp


def _backend(backend, x, lora_A):
    # What the backends' reasons depend on: device, dtype, rank.
    signature = (x.device, x.dtype, lora_A.shape[0])
    return (dispatch.cached("hdpissa", backend, signature)
            or dispatch.select("hdpissa", backend, signature=signature, x=x, lora_A=lora_A))


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scaling: float, need_h: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """(y, h) for 2-D x: the base layer's output and h = x A^T (None or empty unless need_h: only gB
    needs it, and computing it costs a read of x)."""
    return _backend(backend, x, lora_A).hdpissa_forward(x, weight, bias, lora_A, lora_B, scaling,
                                                        need_h)


def _gradients(grad_y: Tensor, x: Optional[Tensor], h: Optional[Tensor], weight: Tensor,
               lora_A: Tensor, lora_B: Tensor, scaling: float, need_x: bool, need_A: bool,
               need_B: bool, backend: Optional[str]) -> tuple:
    """(dx, gA, gB), None where not asked for."""
    return _backend(backend, grad_y, lora_A).hdpissa_backward(grad_y, x, h, weight, lora_A, lora_B,
                                                              scaling, need_x, need_A, need_B)


def _save(inputs, output, needs) -> tuple:
    """The memory contract: x only for gA or dW, h only for gB."""
    x, weight, bias, lora_A, lora_B = inputs[:5]
    _, need_W, _, need_A, need_B = needs[:5]
    return x if (need_A or need_W) else None, output[1] if need_B else None, weight, lora_A, lora_B


def _fake(x, weight, bias, lora_A, lora_B, scaling, need_h, backend):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]) if need_h else 0))


_hdpissa_op = DeclaredOp("hdpissa_linear", forward=_forward, gradients=_gradients, save=_save,
                         fake=_fake, trained=("x", "lora_A", "lora_B"),
                         reads={"lora_A": ("x",), "lora_B": ("h",)})


def check_hdpissa_args(x, weight, bias, lora_A, lora_B, scaling) -> float:
    """Validates every argument of `hdpissa_linear`; returns scaling as a float."""
    check_tensor("lora_B", lora_B, ndim=2)
    out_features, _, rank = check_base_and_A(x, weight, bias, lora_A, lora_B=lora_B)
    check_dim("lora_B", lora_B, 0, out_features, "out_features (weight.shape[0])")
    check_dim("lora_B", lora_B, 1, rank, "the rank (lora_A.shape[0])")
    return check_scaling(scaling)


def hdpissa_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                   lora_B: Tensor, scaling: float, *, backend: Optional[str] = None) -> Tensor:
    """y = x W^T + bias, with HD-PiSSA's factor gradients in backward; see this module's
    docstring. backend: None picks the first backend that supports the input
    (`ADAPTEROPS_BACKEND` overrides); "triton", "cuda" or "torch" forces one."""
    if autocast_on(x):
        x, weight, bias, lora_A, lora_B = cast_for_autocast(x, weight, bias, lora_A, lora_B)
    scaling = check_hdpissa_args(x, weight, bias, lora_A, lora_B, scaling)
    need_h = torch.is_grad_enabled() and lora_B.requires_grad  # gB is the only user of h
    # (A bad backend name raises in dispatch, before any kernel.)
    return _hdpissa_op(x, weight, bias, lora_A, lora_B, scaling, need_h, backend)
