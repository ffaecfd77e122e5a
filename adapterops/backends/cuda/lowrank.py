"""The low-rank linear on the compiled C++ (csrc/lowrank.cpp)."""
from ..base import Limits
from . import DTYPES, ops

LIMITS = Limits(dtypes=DTYPES)


def forward(x, weight, bias, lora_A, lora_B, lora_S, scaling):
    return ops().lowrank_linear_fwd_cuda(x, weight, bias, lora_A, lora_B, lora_S, scaling)


def backward(grad_y, x, h1, h2, weight, lora_A, lora_B, lora_S, scaling, need_x, need_A, need_B,
             need_S):
    return ops().lowrank_linear_bwd_cuda(grad_y, x, h1, h2, weight, lora_A, lora_B, lora_S, scaling,
                                         need_x, need_A, need_B, need_S)
