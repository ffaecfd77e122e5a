"""The routed low-rank linear (HydraLoRA) on the compiled C++ (csrc/routed.cpp). Its ops take the Python op's
arguments, less `backend` (csrc/library.cpp)."""
from ..base import Limits
from . import DTYPES, ops

LIMITS = Limits(dtypes=DTYPES)


def forward(*args):
    return ops().routed_lowrank_linear_fwd_cuda(*args)


def backward(*args):
    return ops().routed_lowrank_linear_bwd_cuda(*args)
