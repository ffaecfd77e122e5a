"""The low-rank update in plain PyTorch: W <- W + scale P Q in place; the model's
low-precision copy rounded from it."""
from typing import Optional

from torch import Tensor

from ..base import Limits

LIMITS = Limits()


def update_(weight: Tensor, P: Tensor, Q: Tensor, scale: float, copy: Optional[Tensor]) -> None:
    """weight += scale P Q in place; then copy (when given) = weight in copy's dtype."""
    weight.addmm_(P, Q, alpha=scale)
    if copy is not None:
        copy.copy_(weight)
