"""Ops: argument checks, the `torch.library` custom ops (schema, fake, autograd) and the call
into dispatch. One file per op family."""
from .hdpissa import hdpissa_linear
from .lowrank import lowrank_linear
from .routed import routed_lowrank_linear
from .update import lowrank_update_

__all__ = ["lowrank_linear", "routed_lowrank_linear", "hdpissa_linear", "lowrank_update_"]
