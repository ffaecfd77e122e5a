"""Argument checks shared by the ops: they run at the Python boundary, before any kernel, and
name the argument and the sizes in the error."""
from typing import Optional

from torch import Tensor


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


def check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    scaling = float(scaling)
    if scaling != scaling or scaling in (float("inf"), float("-inf")):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return scaling
