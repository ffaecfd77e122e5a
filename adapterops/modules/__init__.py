"""nn.Modules built on the ops."""
from .common import AdapterLayer
from .hdpissa import HDPiSSALinear
from .lowrank import FusedLaMDALinear, FusedLoRALinear
from .routed import FusedHydraLoRALinear

__all__ = ["AdapterLayer", "FusedLoRALinear", "FusedLaMDALinear", "FusedHydraLoRALinear", "HDPiSSALinear"]
