"""The low-rank update on the compiled C++ (csrc/hdpissa.cpp): one cuBLAS GEMM with beta = 1
plus a rounding kernel for the copy; W in fp32, fp16 or bf16."""
from ..base import Limits
from . import DTYPES, ops

LIMITS = Limits(dtypes=DTYPES, copy_dtypes=DTYPES)


def update_(weight, P, Q, scale, copy):
    ops().lowrank_update_cuda_(weight, P, Q, scale, copy)
