"""nn.Modules built on the ops."""
from .lowrank import FusedLaMDALinear, FusedLoRALinear

__all__ = ["FusedLoRALinear", "FusedLaMDALinear"]
