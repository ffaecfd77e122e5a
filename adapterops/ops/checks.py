"""What the ops share at the Python boundary: argument checks (they run before any kernel and
name the argument and the sizes in the error) and the autocast cast."""
import math
import numbers
import operator
from typing import Optional

import numpy as np
import torch
from torch import Tensor


def autocast_on(x) -> bool:
    """Whether the op must cast its inputs (`cast_for_autocast`): autocast is on for x's
    device. The ops ask this first, as the cast itself costs a microsecond per call; whether
    autocast is on anywhere costs a tenth of the per-device question. A device autocast does
    not know (meta, where models are built before loading) has it off."""
    if not (_any_autocast() and isinstance(x, Tensor)):
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # "unknown device type for autocast"; free when nothing raises
        return False


# torch's own question (torch.nn's RNNs ask it); its absence only costs the per-device question.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def cast_for_autocast(x, *tensors) -> tuple:
    """(x, *tensors), each floating tensor cast to the autocast dtype (autocast is on for x's
    device: `autocast_on`), as F.linear under autocast computes. The casts are ordinary
    differentiable copies, so each gradient comes back in its own tensor's dtype."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in (x, *tensors))


def check_tensor(name: str, t, *, ndim: Optional[int] = None, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_dtype_and_device(reference_name: str, reference: Tensor, **others) -> None:
    """Every tensor in `others` (None skipped) has `reference`'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; "
                            "all tensors of an op must share one dtype")
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_dim(name: str, t: Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: its size {t.shape[dim]} at dim {dim} "
                         f"must equal {what} = {expected}")


SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def fp32_adapter_on(x, lora_A) -> bool:
    """Whether the adapter is in fp32 on a 16-bit x (PEFT's default on a 16-bit base): the ops
    that allow it compute the low-rank path in fp32, as PEFT does."""
    return lora_A.dtype == torch.float32 and x.dtype in SIXTEEN_BIT


def check_base_and_A(x, weight, bias, lora_A, *, fp32_adapter_allowed: bool = False,
                     **adapter) -> tuple[int, int, int]:
    """Checks x (..., in), the base layer (weight (out, in), bias (out,) or None) and lora_A
    (r, in), and that they and the tensors in `adapter` (already checked with `check_tensor`
    by the caller, None skipped) share x's dtype and device; with `fp32_adapter_allowed`,
    lora_A and `adapter` may instead share fp32 on a 16-bit x. Returns (out, in, r)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2)
    check_tensor("bias", bias, ndim=1, optional=True)
    check_tensor("lora_A", lora_A, ndim=2)
    check_same_dtype_and_device("x", x, weight=weight, bias=bias)
    if fp32_adapter_allowed and fp32_adapter_on(x, lora_A):
        if lora_A.device != x.device:
            raise ValueError(f"lora_A is on {lora_A.device} but x is on {x.device}")
        check_same_dtype_and_device("lora_A", lora_A, **adapter)
    else:
        check_same_dtype_and_device("x", x, lora_A=lora_A, **adapter)
    out_features, in_features = weight.shape
    check_dim("x", x, -1, in_features, "weight's in_features (weight.shape[1])")
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}: the rank (lora_A.shape[0]) must be >= 1")
    check_dim("lora_A", lora_A, 1, in_features, "in_features (weight.shape[1])")
    if bias is not None:
        check_dim("bias", bias, 0, out_features, "out_features (weight.shape[0])")
    return out_features, in_features, rank


def all_plain(x, *tensors) -> bool:
    """Whether x is a floating-point Tensor of at least one dimension and every one of
    `tensors` (None skipped) a Tensor of x's dtype on x's device: the cheap first pass of the
    ops' checks (the detailed checks then only run to word an error)."""
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1):
        return False
    dtype, device = x.dtype, x.device
    for t in tensors:
        if t is not None and not (isinstance(t, Tensor) and t.dtype == dtype and t.device == device):
            return False
    return True


_FLOAT32_MAX = torch.finfo(torch.float32).max


def plain_scaling(scaling) -> bool:
    """Whether `scaling` passes `check_scaling` as it is (a Python float or int, not a bool,
    finite and within float32's range; an int with an exact float value): the common case,
    checked in one pass."""
    if type(scaling) is float:
        return -_FLOAT32_MAX <= scaling <= _FLOAT32_MAX
    return type(scaling) is int and -2 ** 53 <= scaling <= 2 ** 53


def _exact_index(value):
    """value as a Python int if it is an integer scalar (int, a NumPy integer, a 0-d integer
    tensor: what `operator.index` takes), not a bool; else None."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_top_k(top_k, num_heads: int, heads_from: str) -> Optional[int]:
    """top_k as a Python int, or None (dense routing): an integer scalar (int, NumPy integer,
    0-d integer tensor) in [1, num_heads]; `heads_from` says where the head count comes from,
    for the message."""
    if top_k is None:
        return None
    k = _exact_index(top_k)
    if k is None:
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__} {top_k!r}")
    if not 1 <= k <= num_heads:
        raise ValueError(f"top_k must be in [1, E] = [1, {num_heads}] (E = {heads_from}), got {k}")
    return k


def check_scaling(scaling, name: str = "scaling") -> float:
    """The op's runtime scalar as a Python float: any real scalar that converts exactly (int,
    float, a NumPy number, a 0-d real tensor, which costs a device sync on a GPU), not a bool,
    finite and within float32's range (the kernels compute with it in float32)."""
    if isinstance(scaling, Tensor):
        if scaling.dim() != 0 or scaling.is_complex() or scaling.dtype == torch.bool:
            raise TypeError(f"{name} must be a Python float, got a tensor of shape "
                            f"{tuple(scaling.shape)} and dtype {scaling.dtype} (a 0-d real "
                            "tensor is taken)")
        if scaling.requires_grad:
            raise ValueError(f"{name} requires grad, but the op takes it as a constant: no "
                             "gradient would reach it (pass a float or a detached tensor)")
        scaling = scaling.item()
    if isinstance(scaling, (bool, np.bool_)) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(scaling).__name__} "
                        f"{scaling!r} (any real scalar that converts exactly is taken: int, "
                        "NumPy numbers, a 0-d real tensor; not a bool)")
    as_float = float(scaling)
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {as_float}")
    if isinstance(scaling, numbers.Integral) and int(as_float) != int(scaling):
        raise ValueError(f"{name} = {scaling} has no exact float value")
    if abs(as_float) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be within float32's range (|{name}| <= {_FLOAT32_MAX:.4g}), "
                         f"got {as_float:g}")
    return as_float


def check_dropout(dropout, dropout_seed, x: Tensor) -> tuple[float, Optional[Tensor]]:
    """(p, seed) of an op's adapter dropout: p a real number in [0, 1] (not a bool); with
    p > 0 the seed is `dropout_seed` (a 1-element int64 tensor on x's device) or, when None,
    one drawn now from torch's generator for x's device (`torch.manual_seed` governs it, and
    activation checkpointing, which restores that generator, draws it again on recompute). The
    draw stays on the device: no host sync, and CUDA graphs capture it. With p = 0: (0.0, None).
    """
    if type(dropout) is not float:
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a float in [0, 1], got {type(dropout).__name__} "
                            f"{dropout!r}")
        dropout = float(dropout)
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    if dropout == 0.0:
        return 0.0, None
    if dropout_seed is None:
        return dropout, torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64, device=x.device)
    if not (isinstance(dropout_seed, Tensor) and dropout_seed.dtype == torch.int64
            and dropout_seed.numel() == 1):
        got = (f"a tensor of shape {tuple(dropout_seed.shape)} and dtype {dropout_seed.dtype}"
               if isinstance(dropout_seed, Tensor) else type(dropout_seed).__name__)
        raise TypeError(f"dropout_seed must be a 1-element torch.int64 tensor, got {got}")
    if dropout_seed.device != x.device:
        raise ValueError(f"dropout_seed is on {dropout_seed.device} but x is on {x.device}")
    return dropout, dropout_seed.reshape(1)
