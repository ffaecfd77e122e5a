"""adapterops: fused kernels for parameter-efficient fine-tuning adapters.

Importing it initialises no CUDA, compiles no kernel and imports no Triton: backends load what
they need on first use.
"""
from . import lamda, pissa
from .modules import FusedLaMDALinear, FusedLoRALinear
from .ops import lowrank_linear

__version__ = "0.1.0"
__all__ = ["lowrank_linear", "FusedLoRALinear", "FusedLaMDALinear", "lamda", "pissa", "__version__"]
