"""nn.Modules built on the ops."""
from .hdpissa import HDPiSSALinear
from .lowrank import FusedLaMDALinear, FusedLoRALinear
from .routed import FusedHydraLoRALinear

__all__ = ["FusedLoRALinear", "FusedLaMDALinear", "FusedHydraLoRALinear", "HDPiSSALinear"]
