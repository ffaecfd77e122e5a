"""HD-PiSSA's layer on the compiled C++ (csrc/hdpissa.cpp)."""
from ..base import Limits
from . import DTYPES, ops

LIMITS = Limits(dtypes=DTYPES)


def forward(x, weight, bias, lora_A, lora_B, scaling, need_h):
    return ops().hdpissa_linear_fwd_cuda(x, weight, bias, lora_A, lora_B, scaling, need_h)


def backward(grad_y, x, h, weight, lora_A, lora_B, scaling, need_x, need_A, need_B):
    return ops().hdpissa_linear_bwd_cuda(grad_y, x, h, weight, lora_A, lora_B, scaling, need_x,
                                         need_A, need_B)
