"""Drop-in `nn.Linear` replacements with a fused low-rank adapter: LoRA/PiSSA and LaMDA.

    FusedLoRALinear:   y = x W^T + bias + s (x A^T) B^T            A, B trainable
    FusedLaMDALinear:  y = x W^T + bias + s ((x A^T) S^T) B^T      S, B trainable, A frozen

W (`weight`) and `bias` are frozen; s = `scaling` = alpha / rank. Both run
`adapterops.lowrank_linear`, so LaMDA keeps only M x r activations for backward.

Dropout (`dropout > 0`, training mode only) applies to the adapter's input, as in PEFT, fused
into the kernels (`lowrank_linear`'s `dropout`): the mask is drawn from a per-call seed and
regenerated in backward, so nothing mask-sized is saved and LaMDA keeps its M x r activations
only.
"""
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lamda import svd_factors
from ..ops import lowrank_linear
from ..pissa import factor_dtype, pissa_factors, residual_weight
from .common import (AdapterLayer, base_features, check_adapter_state, check_layer_args, check_linear, copy_base,
                     make_base, module_tensors, resolve_adapter_dtype, zero_gradient_for)


class _FusedLowRankLinear(AdapterLayer):
    """Shared parameters, validation, dropout, merge and `AdapterLayer` hooks of the two
    adapter modules."""

    INITS: tuple[str, ...] = ()
    has_S = False
    OPTIONS = {"init": "lora", "dropout": 0.0, "adapter_dtype": None}

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 bias: bool = True, init: str = "lora", dropout: float = 0.0,
                 device=None, dtype=None, backend: Optional[str] = None, *,
                 adapter_dtype=None, initialise: bool = True):
        super().__init__()
        check_layer_args(in_features=in_features, out_features=out_features, rank=rank,
                         alpha=alpha, dropout=dropout)
        self._parse_init(init, rank, in_features, out_features)
        factory = self._init_base(in_features, out_features, rank, alpha, bias, backend, device,
                                  dtype, resolve_adapter_dtype(adapter_dtype, dtype))
        self.init = init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.lora_S = nn.Parameter(torch.empty(rank, rank, **factory)) if self.has_S else None
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        # Set by `lamda.BFreezeSchedule` once B is fully frozen (B keeps requires_grad).
        self.lora_B_frozen = False
        self._register_initial_factors()
        if initialise:
            self.reset_adapter()

    def _parse_init(self, init, rank, in_features, out_features) -> None:
        if not isinstance(init, str) or not any(re.fullmatch(p, init) for p in self.INITS):
            raise ValueError(f"init must be one of {', '.join(self.INITS)}, got {init!r}")
        if init != "lora" and rank > min(in_features, out_features):
            raise ValueError(f"init {init!r} takes the top-{rank} singular directions of a "
                             f"{out_features} x {in_features} weight: rank must be <= {min(in_features, out_features)}")

    @property
    def rewrites_weight(self) -> bool:
        """Whether the init replaced W by a residual (PiSSA, LaMDA "svd")."""
        return self.init != "lora"

    def _register_initial_factors(self) -> None:
        """Inits that rewrite W keep their initial factors (buffers lora_A0, lora_S0, lora_B0):
        W = W_res + s B0 S0 A0 is the base layer, which `disable_adapters`, `save_adapters` and
        the PEFT export need; other inits register them as None."""
        for name in ("lora_A0", "lora_S0", "lora_B0"):
            source = getattr(self, name[:-1])
            self.register_buffer(name, torch.empty_like(source.detach())
                                 if self.rewrites_weight and source is not None else None)
        self.weight_holds_residual = False

    @classmethod
    def from_linear(cls, linear, rank: int, alpha: float, init: str = "lora",
                    dropout: float = 0.0, backend: Optional[str] = None, *,
                    adapter_dtype=None, initialise: bool = True):
        """A layer computing `linear` (an nn.Linear or a transformers Conv1D) plus an adapter
        initialised with `init`, in `adapter_dtype` (None: fp32 on a 16-bit base, else the
        base's; see `resolve_adapter_dtype`); `linear` itself is left untouched (its weight is
        copied). initialise=False leaves the adapter uninitialised, for `load_adapter_state`."""
        check_linear(linear)
        in_features, out_features = base_features(linear)
        layer = cls(in_features, out_features, rank, alpha, bias=linear.bias is not None,
                    init="lora", dropout=dropout, device=linear.weight.device,
                    dtype=linear.weight.dtype, backend=backend, adapter_dtype=adapter_dtype,
                    initialise=False)
        layer._parse_init(init, rank, in_features, out_features)
        layer.init = init
        layer._register_initial_factors()
        copy_base(layer, linear)
        if initialise:
            layer.reset_adapter()
        return layer

    def layer_options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "init": self.init,
                "dropout": self.dropout.p if self.dropout is not None else 0.0,
                "adapter_dtype": str(self.lora_A.dtype).removeprefix("torch.")}

    def reset_adapter(self) -> None:
        """Initialises the adapter per `self.init`; inits that rewrite the frozen weight keep
        the layer's output unchanged."""
        raise NotImplementedError

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor], layer_name: str = "layer") -> None:
        """Into a layer built from the ORIGINAL base layer; for an init that rewrites W it also
        rebuilds W_res from the original W and the initial factors, bit for bit as the init did.
        A mismatched state is named first (`check_adapter_state`), then a residual weight."""
        check_adapter_state(layer_name, self.adapter_state(), state)
        if self.rewrites_weight and self.weight_holds_residual:
            raise ValueError(f"{layer_name}: the layer already holds a residual weight (init "
                             f"{self.init!r}); load into a layer built from the original base "
                             "layer with initialise=False")
        super().load_adapter_state(state, layer_name)
        if self.rewrites_weight:
            self.weight.copy_(residual_weight(self.weight, self.scaling, self.lora_B0,
                                              self.lora_A0, self.lora_S0))
            self.weight_holds_residual = True

    def load_trained_state(self, state: dict[str, Tensor], layer_name: str = "layer") -> None:
        """See `AdapterLayer.load_trained_state`; for an init that rewrites W the loaded weight
        is the trained layer's residual."""
        super().load_trained_state(state, layer_name)
        self.weight_holds_residual = self.rewrites_weight

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer alone (W = W_res + s B0 S0 A0 for inits that rewrite W)."""
        if not self.rewrites_weight:
            return F.linear(x, self.weight, self.bias)
        return lowrank_linear(x, self.weight, self.bias, self.lora_A0, self.lora_B0,
                              self.scaling, self.lora_S0, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        if self.adapters_disabled:
            return self.base_forward(x)
        weight, bias, lora_A, lora_B, lora_S = module_tensors(self, "weight", "bias", "lora_A",
                                                              "lora_B", "lora_S")
        if self.lora_B_frozen:
            # Frozen by `lamda.BFreezeSchedule`: no dB is computed; B still gets a (zero)
            # gradient, which DDP and FSDP need (see `zero_gradient_for`).
            x, lora_B = zero_gradient_for(x, lora_B), lora_B.detach()
        if self.dropout is None or not self.training:
            return lowrank_linear(x, weight, bias, lora_A, lora_B, self.scaling, lora_S,
                                  backend=self.backend)
        return lowrank_linear(x, weight, bias, lora_A, lora_B, self.scaling, lora_S,
                              dropout=self.dropout.p, backend=self.backend)

    def delta_weight(self) -> Tensor:
        """s B S A (s B A for LoRA) in fp32 or better: the adapter as an out x in matrix."""
        dtype = factor_dtype(self.weight)
        B = self.lora_B.detach().to(dtype)
        if self.lora_S is not None:
            B = B @ self.lora_S.detach().to(dtype)
        return self.scaling * (B @ self.lora_A.detach().to(dtype))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain `nn.Linear` (a Conv1D for a layer made from one) computing the same
        function: W' = W + s B S A (computed in fp32 or better, then rounded once to the
        weight's dtype)."""
        delta = self.delta_weight()
        merged = (self.weight.to(delta.dtype) + delta).to(self.weight.dtype)
        return make_base(self.base_kind, merged, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, init={self.init!r}, dropout={self.dropout.p if self.dropout else 0.0}, "
                f"bias={self.bias is not None}, backend={self.backend or 'auto'}")


class FusedLoRALinear(_FusedLowRankLinear):
    """LoRA / PiSSA linear. Inits (methods.md §1):

    - "lora": A kaiming-uniform (a = sqrt(5)), B = 0.
    - "pissa": exact SVD of W in fp32; A = sqrt(Σ_r/s) Vh_r, B = U_r sqrt(Σ_r/s), W <- W - s B A.
    - "pissa_niter_K": the same from `torch.svd_lowrank(W, q=r, niter=K)` (fast, randomised).
    """

    INITS = ("lora", "pissa", r"pissa_niter_\d+")
    method = "lora"

    @torch.no_grad()
    def reset_adapter(self) -> None:
        if self.init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            return
        if self.weight_holds_residual:
            raise ValueError(f"init {self.init!r} factors the original weight, and this layer's "
                             "weight is already a residual")
        niter = int(self.init.rsplit("_", 1)[1]) if self.init.startswith("pissa_niter_") else None
        A, B, w_res = pissa_factors(self.weight, self.rank, self.scaling, niter, self.lora_A.dtype)
        for name, tensor in (("lora_A", A), ("lora_A0", A), ("lora_B", B), ("lora_B0", B)):
            getattr(self, name).copy_(tensor)
        self.weight.copy_(w_res)
        self.weight_holds_residual = True


class FusedLaMDALinear(_FusedLowRankLinear):
    """LaMDA linear: A (`lora_A`) frozen, S (`lora_S`, r x r) and B (`lora_B`) trainable; B is
    frozen gradually by `adapterops.lamda.BFreezeSchedule`. Inits (methods.md §2):

    - "lora" (the released code): A kaiming-uniform, S as `nn.Linear(r, r)`'s weight, B = 0.
    - "svd" **[ours]**: A = Vh_r, S = diag(Σ_r) / s, B = U_r, W <- W - U_r diag(Σ_r) Vh_r.
    """

    INITS = ("lora", "svd")
    has_S = True
    method = "lamda"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_A.requires_grad_(False)

    @torch.no_grad()
    def reset_adapter(self) -> None:
        if self.init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_S, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            return
        if self.weight_holds_residual:
            raise ValueError("init 'svd' factors the original weight, and this layer's weight "
                             "is already a residual")
        A, S, B, w_res = svd_factors(self.weight, self.rank, self.scaling, self.lora_A.dtype)
        for name, tensor in (("lora_A", A), ("lora_A0", A), ("lora_S", S), ("lora_S0", S),
                             ("lora_B", B), ("lora_B0", B)):
            getattr(self, name).copy_(tensor)
        self.weight.copy_(w_res)
        self.weight_holds_residual = True
