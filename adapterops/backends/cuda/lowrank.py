"""The low-rank linear on the compiled C++ (csrc/lowrank.cpp). Its ops take the Python op's
arguments, less `backend` (csrc/library.cpp)."""
from ..base import Limits
from . import DTYPES, ops

LIMITS = Limits(dtypes=DTYPES)


def forward(*args):
    return ops().lowrank_linear_fwd_cuda(*args)


def backward(*args):
    return ops().lowrank_linear_bwd_cuda(*args)
