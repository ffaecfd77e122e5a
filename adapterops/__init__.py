"""adapterops: fused kernels for parameter-efficient fine-tuning adapters.

Importing it initialises no CUDA, compiles no kernel and imports no Triton: backends load what
they need on first use. The math of every method, which the docstrings cite as "methods.md §N",
is in the package's own `methods.md` (beside this file).
"""
from . import distributed, hydra, lamda, pissa
from .modules import AdapterLayer, FusedHydraLoRALinear, FusedLaMDALinear, FusedLoRALinear, HDPiSSALinear
from .ops import hdpissa_linear, lowrank_linear, lowrank_update_, routed_lowrank_linear
from .ops.base_weight import NF4Weight
from . import hdpissa  # noqa: E402  (above the modules: it builds HDPiSSALinear layers)
from .config import AdapterConfig
from .inject import disable_adapters, inject, merge_and_unload, trainable_parameters
from .saving import load_adapters, load_pretrained, save_adapters, save_pretrained

__version__ = "0.1.0"
__all__ = ["lowrank_linear", "routed_lowrank_linear", "hdpissa_linear", "lowrank_update_", "NF4Weight",
           "AdapterLayer", "FusedLoRALinear", "FusedLaMDALinear", "FusedHydraLoRALinear", "HDPiSSALinear",
           "AdapterConfig", "inject", "trainable_parameters", "merge_and_unload",
           "disable_adapters", "save_adapters", "load_adapters", "save_pretrained", "load_pretrained",
           "distributed", "hdpissa", "hydra", "lamda", "pissa", "__version__"]
