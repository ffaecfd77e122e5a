"""What the adapter modules share: their hyper-parameter checks, the frozen base layer, and
the zero gradient of a parameter frozen without `requires_grad=False`."""
import math
from typing import Optional

import torch
from torch import Tensor, nn


def check_layer_args(*, dropout: float, alpha: float, **positive_ints) -> None:
    """ValueError, naming the argument, unless every `positive_ints` value is an int >= 1,
    alpha is finite and non-zero, and dropout is in [0, 1)."""
    for name, value in positive_ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha must be a finite non-zero number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def frozen_base(in_features: int, out_features: int, bias: bool, device=None,
                dtype=None) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """(weight, bias) of the frozen base layer, initialised as nn.Linear initialises them
    (`from_linear` then copies a real layer's)."""
    weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                          requires_grad=False)
    bias_parameter = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                   requires_grad=False) if bias else None)
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias_parameter is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(bias_parameter, -bound, bound)
    return weight, bias_parameter


def check_linear(linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")


@torch.no_grad()
def copy_base(layer: nn.Module, linear: nn.Linear) -> None:
    """Copies `linear`'s weight and bias into `layer`'s frozen base (linear is left untouched)."""
    layer.weight.copy_(linear.weight)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)


class _ZeroGradientFor(torch.autograd.Function):
    """x unchanged; in backward, x's gradient passes through and `parameter` gets zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, parameter: Tensor) -> Tensor:
        ctx.shape, ctx.dtype, ctx.device = parameter.shape, parameter.dtype, parameter.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        return grad_x, torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


def zero_gradient_for(x: Tensor, parameter: Tensor) -> Tensor:
    """x, with a backward that gives `parameter` a zero gradient (when it requires one).

    For a parameter frozen while it keeps `requires_grad=True`: DDP and FSDP expect a gradient
    for every parameter they registered as trainable (a parameter that stops getting one makes
    DDP's reducer fail or skip the bucket it shares with others), while the computation that
    uses the parameter is given a detached copy, so it computes no gradient for it."""
    if not (parameter.requires_grad and torch.is_grad_enabled()):
        return x
    return _ZeroGradientFor.apply(x, parameter)
