"""HD-PiSSA's two ops (methods.md §4).

`hdpissa_linear`: the layer of one rank k, whose adapter factors are fixed slices of W's
principal components. The adapter adds nothing to the output; backward gives the factors the
gradients of the LoRA form B_k A_k at its current value:

    y  = x W^T + bias
    gA = s (dY B)^T x      (r x in)      gB = s dY^T (x A^T)     (out x r)
    dx = dY W              (no adapter term)        dW = dY^T x, dbias = Σ_tokens dY

with x (..., in), weight W (out, in), lora_A A (r, in), lora_B B (out, r), s = scaling; fp32,
fp16 or bf16. No out x in matrix is ever formed. Memory contract: backward keeps x (for gA)
and h = x A^T (M x r, for gB), each only when that gradient is asked for; without a gradient
for lora_B the forward does not compute h at all.

`lowrank_update_`: W += scale P Q in place, with W (out x in) and P (out x R), Q (R x in) of
one dtype, optionally writing the result rounded into `copy` (the model's low-precision weight
when W is its fp32 master) in the same pass. HD-PiSSA's step is scale = -s, P = [δB_1 | B_1 |
... ], Q = [A_1 - δA_1; δA_1; ...], R = 2 K r (see `adapterops.hdpissa.HDPiSSAOptimizer`).

Backends: `triton` (CUDA sm_80+, or CPU under TRITON_INTERPRET=1; the layer in fp32, fp16,
bf16 at rank <= 128; the update on an fp32 W), `cuda` (the compiled C++: CUDA tensors in fp32,
fp16, bf16, any rank; the update as one cuBLAS GEMM with beta = 1 plus a rounding kernel for
the copy) and `torch` (everything else). Both ops are `torch.library` custom ops, so
`torch.compile(fullgraph=True)` traces the layer; eagerly the layer runs the same forward and
backward functions through `_eager_hdpissa`, a `torch.autograd.Function` (`_EagerHDPiSSA`),
which costs a few microseconds of host time per call where the custom op's dispatcher costs
tens.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from .checks import (autocast_on, base_layer_grads, cast_for_autocast, check_base_and_A, check_dim,
                     check_same_dtype_and_device, check_scaling, check_tensor, eager_door)


def _serving_backend(backend, x, weight, lora_A):
    # What the backends' reasons depend on: device, dtype, rank.
    signature = (x.device, x.dtype, lora_A.shape[0])
    return (dispatch.cached("hdpissa", backend, signature)
            or dispatch.select("hdpissa", backend, signature=signature, x=x, weight=weight,
                               lora_A=lora_A))


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scaling: float, need_h: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """(y, h) for 2-D x: the base layer's output and h = x A^T (empty unless need_h: only gB
    needs it, and computing it costs a read of x)."""
    chosen = _serving_backend(backend, x, weight, lora_A)
    return chosen.hdpissa_forward(x, weight, bias, lora_A, lora_B, scaling, need_h)


def _gradients(grad_y: Tensor, x: Optional[Tensor], h: Optional[Tensor], weight: Tensor,
               lora_A: Tensor, lora_B: Tensor, scaling: float, need_x: bool, need_A: bool,
               need_B: bool, backend: Optional[str]) -> tuple:
    """(dx, gA, gB), None where not asked for."""
    for need, name, saved, why in ((need_A, "x", x, "gA"), (need_B, "h", h, "gB")):
        if need and saved is None:
            raise ValueError(f"hdpissa_linear_bwd: {why} was asked for but {name} is None")
    chosen = _serving_backend(backend, grad_y, weight, lora_A)
    return chosen.hdpissa_backward(grad_y, x, h, weight, lora_A, lora_B, scaling, need_x, need_A,
                                   need_B)


@torch.library.custom_op("adapterops::hdpissa_linear_fwd", mutates_args=())
def hdpissa_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                       lora_B: Tensor, scaling: float, need_h: bool, backend: Optional[str]
                       ) -> tuple[Tensor, Tensor]:
    """(y, h) for 2-D x (see `_forward`)."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, need_h, backend)


@hdpissa_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, need_h, backend):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]) if need_h else 0))


@torch.library.custom_op("adapterops::hdpissa_linear_bwd", mutates_args=())
def hdpissa_linear_bwd(grad_y: Tensor, x: Optional[Tensor], h: Optional[Tensor], weight: Tensor,
                       lora_A: Tensor, lora_B: Tensor, scaling: float, need_x: bool,
                       need_A: bool, need_B: bool, backend: Optional[str]
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, gA, gB); a gradient that was not asked for comes back as an empty tensor."""
    grads = _gradients(grad_y, x, h, weight, lora_A, lora_B, scaling, need_x, need_A, need_B,
                       backend)
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)


@hdpissa_linear_bwd.register_fake
def _(grad_y, x, h, weight, lora_A, lora_B, scaling, need_x, need_A, need_B, backend):
    shapes = ((grad_y.shape[0], weight.shape[1]), tuple(lora_A.shape), tuple(lora_B.shape))
    return tuple(grad_y.new_empty(shape if need else 0)
                 for shape, need in zip(shapes, (need_x, need_A, need_B)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, _need_h, backend = inputs
    _, h = output
    need_x, need_W, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    ctx.flags = (need_x, need_W, need_bias, need_A, need_B)
    ctx.scaling, ctx.backend = scaling, backend
    # The memory contract: x only for gA or dW, h only for gB.
    ctx.save_for_backward(x if (need_A or need_W) else None, h if need_B else None,
                          weight, lora_A, lora_B)


def _backward_through(gradients):
    """The autograd backward of either door; `gradients` is `_gradients` or the custom op."""
    def backward(ctx, grad_y, _grad_h=None):
        need_x, need_W, need_bias, need_A, need_B = ctx.flags
        x, h, weight, lora_A, lora_B = ctx.saved_tensors
        dx = gA = gB = None
        if need_x or need_A or need_B:
            grads = gradients(grad_y, x, h, weight, lora_A, lora_B, ctx.scaling, need_x, need_A,
                              need_B, ctx.backend)
            dx, gA, gB = (g if need else None for g, need in zip(grads, (need_x, need_A, need_B)))
        dW, dbias = base_layer_grads(grad_y, x, need_W, need_bias)
        return dx, dW, dbias, gA, gB, None, None, None
    return backward


hdpissa_linear_fwd.register_autograd(_backward_through(hdpissa_linear_bwd),
                                     setup_context=_setup_context)


# The eager door: the same forward, context and backward as the custom op's.
_eager_hdpissa = eager_door("_EagerHDPiSSA", _forward, _setup_context,
                            _backward_through(_gradients), only_first=True)


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
    leading = x.shape[:-1]
    need_h = torch.is_grad_enabled() and lora_B.requires_grad  # gB is the only user of h
    # (A bad backend name raises in dispatch, before any kernel.)
    x2 = x if x.dim() == 2 else x.reshape(math.prod(leading), x.shape[-1])
    if torch.compiler.is_compiling():
        y = hdpissa_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, need_h, backend)[0]
    else:
        y = _eager_hdpissa(x2, weight, bias, lora_A, lora_B, scaling, need_h, backend)
    # 2-D x: y itself, not a view of it (FSDP2 warns on, and skips hooks for, view outputs).
    return y if x.dim() == 2 else y.reshape(*leading, weight.shape[0])


@torch.library.custom_op("adapterops::lowrank_update_", mutates_args=("weight", "copy"))
def _lowrank_update_op(weight: Tensor, P: Tensor, Q: Tensor, scale: float, copy: Optional[Tensor],
                       backend: Optional[str]) -> None:
    chosen = dispatch.select("update", backend, weight=weight, copy=copy,
                             signature=(weight.device, weight.dtype,
                                        None if copy is None else (copy.device, copy.dtype)))
    chosen.update_(weight, P, Q, scale, copy)


@_lowrank_update_op.register_fake
def _(weight, P, Q, scale, copy, backend):
    return None


def _byte_range(t: Tensor) -> tuple[int, int]:
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _check_writable(name: str, t: Tensor) -> None:
    """What PyTorch's in-place ops refuse: a tensor that repeats elements (a stride 0: each
    element would be written many times, over memory shared with others), and, with grad
    mode on, one that requires grad (the update is not differentiable; PyTorch raises for a
    leaf and would record the op on anything else)."""
    if any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride())):
        raise ValueError(f"{name} has strides {t.stride()} for shape {tuple(t.shape)}: it "
                         "repeats elements, so an in-place update cannot write it")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"lowrank_update_: {name} requires grad and grad mode is on; update "
                           "it under torch.no_grad(), as optimizers do (the update is not "
                           "differentiable)")


def _check_copy_memory(weight: Tensor, copy: Tensor) -> None:
    """copy receives each element of the updated weight once: it must not overlap weight's
    memory, unless it is weight itself (same view). Checked before any backend runs, so a bad
    copy never leaves weight half-updated (a copy that repeats elements: `_check_writable`)."""
    same_view = (copy.data_ptr() == weight.data_ptr() and copy.stride() == weight.stride()
                 and copy.dtype == weight.dtype)
    (c0, c1), (w0, w1) = _byte_range(copy), _byte_range(weight)
    if copy.numel() and weight.numel() and not same_view and c0 < w1 and w0 < c1:
        raise ValueError(f"copy (strides {copy.stride()}, {copy.dtype}) overlaps weight's memory "
                         f"(strides {weight.stride()}, {weight.dtype}) without being weight itself")


def lowrank_update_(weight: Tensor, P: Tensor, Q: Tensor, scale: float, *,
                    copy: Optional[Tensor] = None, backend: Optional[str] = None) -> None:
    """weight += scale * P @ Q in place (one pass over weight); `copy`, when given, receives
    the result rounded to its dtype in the same pass. copy must not repeat elements (a stride
    0) nor overlap weight's memory unless it is weight itself; a bad argument raises before
    weight changes. See this module's docstring."""
    for name, t in (("weight", weight), ("P", P), ("Q", Q)):
        check_tensor(name, t, ndim=2)
    check_tensor("copy", copy, ndim=2, optional=True)
    check_same_dtype_and_device("weight", weight, P=P, Q=Q)
    _check_writable("weight", weight)
    if copy is not None:
        _check_writable("copy", copy)
        if copy.device != weight.device:
            raise ValueError(f"copy is on {copy.device} but weight is on {weight.device}")
        check_dim("copy", copy, 0, weight.shape[0], "weight.shape[0]")
        check_dim("copy", copy, 1, weight.shape[1], "weight.shape[1]")
        _check_copy_memory(weight, copy)
    check_dim("P", P, 0, weight.shape[0], "weight.shape[0]")
    check_dim("Q", Q, 1, weight.shape[1], "weight.shape[1]")
    check_dim("Q", Q, 0, P.shape[1], "the inner size (P.shape[1])")
    scale = check_scaling(scale, "scale")
    dispatch.check_backend_name(backend)
    _lowrank_update_op(weight, P, Q, scale, copy, backend)
