"""The routed low-rank linear (HydraLoRA) on the compiled C++ (csrc/routed.cpp)."""
from ..base import Limits
from . import DTYPES, ops

LIMITS = Limits(dtypes=DTYPES)


def forward(x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k):
    return ops().routed_lowrank_linear_fwd_cuda(x, weight, bias, lora_A, lora_B, router_weight,
                                                scaling, top_k)


def backward(grad_y, grad_probs, x, h, hg, probs, gates, weight, lora_A, lora_B, router_weight,
             scaling, need_x, need_A, need_B, need_router):
    return ops().routed_lowrank_linear_bwd_cuda(grad_y, grad_probs, x, h, hg, probs, gates, weight,
                                                lora_A, lora_B, router_weight, scaling, need_x,
                                                need_A, need_B, need_router)
