"""What every backend provides, and how it says what it cannot serve.

A backend is a package with one module per op family it serves (`FAMILIES`, or its own
`families`): `lowrank`, `routed`, `hdpissa`, `update` and `dequant`. Each family module holds
`LIMITS` (what it serves, as data: a `Limits`) and the family's functions, `forward` and
`backward` (the update: `update_`, in place; the dequantization: `dequantize_nf4`). The ops
reach them as attributes of the backend (`FUNCTIONS`: `backend.lowrank_forward`,
..., `backend.update_`), each bound once from its module on first use (so a backend whose
modules import triton imports it only when asked to serve).

`reasons(family, **inputs)` turns the limits into plain sentences, the same way for every
backend (as xformers' operators turn their SUPPORTED_* attributes into reasons), after what
only code can answer: whether the backend runs in this process at all, and on this device.
"""
import dataclasses
import importlib
from typing import Optional

import torch
from torch import Tensor

FAMILIES = ("lowrank", "routed", "hdpissa", "update", "dequant")
# The functions a backend provides, by the names the ops call them: (family, function of its
# module). The update (in place, not differentiable) has no backward; nor has the
# dequantization of a 4-bit weight (a frozen base).
FUNCTIONS = {**{f"{family}_{function}": (family, function) for family in FAMILIES[:3]
                for function in ("forward", "backward")},
             "update_": ("update", "update_"), "dequantize_nf4": ("dequant", "dequantize_nf4")}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one backend serves for one op family; an empty tuple or None is no limit.

    dtypes: of x (the update: of weight); max_rank: r, lora_A.shape[0] (routed: a head's
    rank); max_heads: E, the routed op's lora_B.shape[0]; max_routed_rank: E r, the routed
    sum's inner size; copy_dtypes: of the update's rounded copy."""
    dtypes: tuple[torch.dtype, ...] = ()
    max_rank: Optional[int] = None
    max_heads: Optional[int] = None
    max_routed_rank: Optional[int] = None
    copy_dtypes: tuple[torch.dtype, ...] = ()

    def __str__(self) -> str:
        """The limits set, "dtypes float32, max_rank 128", or "no limits"."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ", ".join(f"{name} {_names(v) if isinstance(v, tuple) else v}"
                         for name, v in values.items() if v not in ((), None)) or "no limits"


def _names(dtypes) -> str:
    """"float32, float16 or bfloat16"."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def limit_reasons(limits: Limits, who: str, family: str, inputs: dict) -> list[str]:
    """Why `limits` rule out these inputs of `family` (tensors by the ops' argument names),
    one sentence per limit exceeded; `who` names the kernels in the sentences."""
    first = inputs["x"] if "x" in inputs else inputs["weight"]
    lora_A, lora_B, copy = inputs.get("lora_A"), inputs.get("lora_B"), inputs.get("copy")
    out = []
    if limits.dtypes and first.dtype not in limits.dtypes:
        out.append(f"{who} serve {family} in {_names(limits.dtypes)}, not {first.dtype}")
    heads = lora_B.shape[0] if lora_B is not None and lora_B.dim() == 3 else None
    rank = lora_B.shape[2] if heads is not None else (lora_A.shape[0] if lora_A is not None else None)
    if limits.max_rank is not None and rank is not None and rank > limits.max_rank:
        out.append(f"rank {rank} exceeds {who}' maximum rank {limits.max_rank}")
    if limits.max_heads is not None and heads is not None and heads > limits.max_heads:
        out.append(f"{heads} heads exceed {who}' maximum of {limits.max_heads}")
    if (limits.max_routed_rank is not None and heads is not None
            and heads * rank > limits.max_routed_rank):
        out.append(f"heads x rank = {heads} x {rank} = {heads * rank} exceeds {who}' maximum "
                   f"routed rank {limits.max_routed_rank}")
    if limits.copy_dtypes and copy is not None and copy.dtype not in limits.copy_dtypes:
        out.append(f"{who} write {_names(limits.copy_dtypes)} copies, not {copy.dtype}")
    return out


class Backend:
    name: str = ""
    who: str = ""  # the kernels, as the reasons name them ("the Triton kernels")
    families: tuple[str, ...] = FAMILIES  # the op families it implements

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all in this process (None when it can)."""
        return None

    def device_reasons(self, family: str, device: torch.device) -> list[str]:
        """Why it cannot run `family` on `device` (the family matters to Triton only)."""
        return []

    def loaded_reasons(self, device: torch.device) -> list[str]:
        """What is known only once the backend has loaded for inputs it could serve (the cuda
        backend loads or builds its extension then)."""
        return []

    def family(self, family: str):
        """The module of this backend's package that serves `family`."""
        return importlib.import_module(f"{type(self).__module__}.{family}")

    def reasons(self, op: str, **inputs: Optional[Tensor]) -> list[str]:
        """Why this backend cannot serve the op family `op` for these inputs; empty when it can."""
        reason = self.unavailable_reason()
        if reason is not None:
            return [reason]
        if op not in self.families:
            return [f"backend {self.name!r} does not implement op {op!r}"]
        device = (inputs["x"] if "x" in inputs else inputs["weight"]).device
        out = self.device_reasons(op, device) + limit_reasons(self.family(op).LIMITS, self.who, op,
                                                              inputs)
        return out or self.loaded_reasons(device)

    def __getattr__(self, name: str):
        # "lowrank_forward" -> the lowrank module's `forward`, bound on the instance once (only
        # names not found otherwise reach here).
        if name not in FUNCTIONS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        family, function = FUNCTIONS[name]
        bound = getattr(self.family(family), function)
        setattr(self, name, bound)
        return bound

    def __repr__(self) -> str:
        return f"<adapterops backend {self.name!r}>"
