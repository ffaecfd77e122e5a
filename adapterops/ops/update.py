"""The low-rank update, in place: W += scale P Q, with W (out x in) and P (out x R), Q (R x in)
of one dtype, optionally writing the result rounded into `copy` (the model's low-precision
weight when W is its fp32 master) in the same pass. HD-PiSSA's step is scale = -s,
P = [δB_1 | B_1 | ... ], Q = [A_1 - δA_1; δA_1; ...], R = 2 K r (methods.md §4; see
`adapterops.hdpissa.HDPiSSAOptimizer`).

Backends: `triton` (CUDA sm_80+, or CPU under TRITON_INTERPRET=1; an fp32 W), `cuda` (the
compiled C++: CUDA tensors in fp32, fp16, bf16; one cuBLAS GEMM with beta = 1 plus a rounding
kernel for the copy) and `torch` (everything else). It is a `torch.library` custom op that
mutates weight and copy (not differentiable: optimizers run it under torch.no_grad()).
"""
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from .checks import check_dim, check_same_dtype_and_device, check_scaling, check_tensor


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
