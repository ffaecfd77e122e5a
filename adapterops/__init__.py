"""adapterops: fused kernels for parameter-efficient fine-tuning adapters.

Importing it initialises no CUDA, compiles no kernel and imports no Triton: backends load what
they need on first use.
"""
from . import hydra, lamda, pissa
from .modules import FusedHydraLoRALinear, FusedLaMDALinear, FusedLoRALinear
from .ops import lowrank_linear, routed_lowrank_linear

__version__ = "0.1.0"
__all__ = ["lowrank_linear", "routed_lowrank_linear", "FusedLoRALinear", "FusedLaMDALinear",
           "FusedHydraLoRALinear", "hydra", "lamda", "pissa", "__version__"]
