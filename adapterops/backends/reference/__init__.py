"""The `torch` backend: plain PyTorch, runs on every device and dtype, and is the test oracle.

Each family module (`lowrank`, `routed`, `hdpissa`, `update`, `dequant`) writes its op's math
as directly as PyTorch allows; kernels are judged by their agreement with it (in float64 for tests). It
has no limits: it serves whatever the other backends decline.
"""
from ..base import Backend


class TorchBackend(Backend):
    name = "torch"
    who = "plain PyTorch"
