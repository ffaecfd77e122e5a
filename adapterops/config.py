"""`AdapterConfig`: which adapter method goes where in a model, with its options.

    config = adapterops.AdapterConfig(method="lamda", rank=16, alpha=32,
                                      target_modules=["q_proj", "v_proj"], init="svd")
    adapterops.inject(model, config)

Fields: `method` ("lora", "lamda", "hydra", "hdpissa"), `rank`, `alpha` (scaling = alpha /
rank), `target_modules` (PEFT's matching rule, see `matches`; None = every linear layer), and
the methods' own options, each taken only by the methods that have it:

| field | methods | default |
|---|---|---|
| init | lora ("lora", "pissa", "pissa_niter_K"), lamda ("lora", "svd") | "lora" |
| dropout | lora, lamda, hydra | 0.0 |
| adapter_dtype | lora, lamda, hydra | None: fp32 on a 16-bit base (as PEFT), else the base's |
| num_heads, top_k, balance_loss_weight | hydra | required, None, 0.0 |
| world_size, rank_index, svd, niter | hdpissa | the process group's, "full", 8 |
| backend | every method | None (dispatch picks) |

A field set for a method that does not take it, an unknown method or field, or a missing
required field is a ValueError naming it; values are checked by the layers when `inject` builds
them. `to_dict` / `from_dict` and `to_json` / `from_json` round-trip every field.

Each method is one module class (`METHODS`): the class says which fields it takes (`OPTIONS`)
and builds, saves and merges itself; this is the one place that maps method names to classes.
"""
import dataclasses
import json
import math
import re
from typing import Optional, Union

import torch

from .dispatch import check_backend_name
from .modules import AdapterLayer, FusedHydraLoRALinear, FusedLaMDALinear, FusedLoRALinear, HDPiSSALinear
from .modules.common import DTYPE_NAMES, REQUIRED

METHODS: dict[str, type[AdapterLayer]] = {
    cls.method: cls for cls in (FusedLoRALinear, FusedLaMDALinear, FusedHydraLoRALinear, HDPiSSALinear)}
ALL_LINEAR = "all-linear"  # PEFT's name for target_modules=None


@dataclasses.dataclass
class AdapterConfig:
    method: str
    rank: int
    alpha: float
    target_modules: Optional[Union[str, list[str]]] = None
    init: Optional[str] = None
    dropout: Optional[float] = None
    adapter_dtype: Optional[Union[str, torch.dtype]] = None
    num_heads: Optional[int] = None
    top_k: Optional[int] = None
    balance_loss_weight: Optional[float] = None
    world_size: Optional[int] = None
    rank_index: Optional[int] = None
    svd: Optional[str] = None
    niter: Optional[int] = None
    backend: Optional[str] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"AdapterConfig: unknown method {self.method!r}; known: "
                             f"{', '.join(METHODS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterConfig: rank must be a positive int, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha == 0):
            raise ValueError(f"AdapterConfig: alpha must be a finite non-zero number, got "
                             f"{self.alpha!r}")
        targets = self.target_modules
        if isinstance(targets, (list, tuple)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError("AdapterConfig: target_modules must be None, a regular "
                                 f"expression or a non-empty list of names, got {targets!r}")
            self.target_modules = list(targets)
        elif targets is not None and not isinstance(targets, str):
            raise ValueError("AdapterConfig: target_modules must be None, a regular expression "
                             f"or a list of names, got {targets!r}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"AdapterConfig: target_modules {self.target_modules!r} is not "
                                 f"a valid regular expression: {exc}") from None
        check_backend_name(self.backend)
        if self.adapter_dtype is not None:
            # Kept by name ("float32"): a config is JSON. Whether it suits a base, the layers say.
            name = str(self.adapter_dtype).removeprefix("torch.")
            if name not in DTYPE_NAMES:
                raise ValueError(f"AdapterConfig: adapter_dtype must be None, a torch dtype or "
                                 f"one of {', '.join(DTYPE_NAMES)}, got {self.adapter_dtype!r}")
            self.adapter_dtype = name
        cls = METHODS[self.method]
        foreign = [name for name in _OPTION_FIELDS
                   if getattr(self, name) is not None and name not in cls.OPTIONS]
        if foreign:
            raise ValueError(f"AdapterConfig: {', '.join(foreign)} do(es) not apply to method "
                             f"{self.method!r}, which takes: {', '.join(cls.OPTIONS)}")
        missing = [name for name, default in cls.OPTIONS.items()
                   if default is REQUIRED and getattr(self, name) is None]
        if missing:
            raise ValueError(f"AdapterConfig: method {self.method!r} needs {', '.join(missing)}")

    def options_for(self, cls: type[AdapterLayer]) -> dict:
        """The options `cls.from_linear` takes, from this config or the class's defaults."""
        return {name: default if getattr(self, name) is None else getattr(self, name)
                for name, default in cls.OPTIONS.items()}

    @property
    def layer_class(self) -> type[AdapterLayer]:
        return METHODS[self.method]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(f"AdapterConfig.from_dict takes a dict, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        missing = [name for name in ("method", "rank", "alpha") if name not in data]
        if missing:
            raise ValueError(f"AdapterConfig: missing field(s) {', '.join(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(text))


# The fields only some methods take.
_OPTION_FIELDS = ("init", "dropout", "adapter_dtype", "num_heads", "top_k", "balance_loss_weight", "world_size",
                  "rank_index", "svd", "niter")


def matches(name: str, target_modules: Optional[Union[str, list[str]]]) -> bool:
    """PEFT's rule: a string is a regular expression the module's qualified name must match
    whole ("all-linear" and None: every linear layer); a list matches a name equal to one of
    its entries or ending in "." + one of them."""
    if target_modules is None or target_modules == ALL_LINEAR:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)
