"""Drop-in `nn.Linear` replacement with a HydraLoRA adapter (methods.md §3):

    p = softmax(x Wg^T),  g = p (or its top_k largest entries),  h = x A^T
    y = x W^T + bias + s Σ_e g_e h B_e^T

W (`weight`) and `bias` are frozen; `lora_A` (r, in), the heads `lora_B` (E, out, r) and the
router `lora_router` (E, in) train; s = `scaling` = alpha / rank. Runs
`adapterops.routed_lowrank_linear`. Init: A and the router kaiming-uniform (a = sqrt(5)), every
head B_e = 0, so the layer starts as its base layer. No merge: the gates depend on the token.

Dropout (`dropout > 0`, training mode only) applies to the adapter's input of A, with ONE mask
shared by all heads **[ours; the official code draws one per head]**; the router sees x
undropped, as in the official code. It is fused into the kernels (`routed_lowrank_linear`'s
`dropout`): the mask is drawn from a per-call seed and regenerated in backward, so nothing
mask-sized is saved; it is not `nn.Dropout`'s mask bit for bit, but the same distribution.
`layer.dropout` stays the `nn.Dropout` holding p (None without dropout).

Adapter dtype (`adapter_dtype`, as the low-rank modules): None keeps A, the heads and the
router in fp32 on a 16-bit base (PEFT's default; the op then computes the adapter path in
fp32) and in the base's dtype otherwise; a dtype (or its name) forces one the op takes: the
base's, or fp32 on a 16-bit base.

Balance loss (`balance_loss_weight > 0`, training mode only): each forward stores
`balance_loss_weight * adapterops.hydra.balance_loss(p, top_k)` in `last_balance_loss` for a
trainer to add to its loss with `adapterops.hydra.collect_balance_loss(model)`. A forward run
inside a backward pass (activation checkpointing's recompute) computes it again, so that the
recompute saves what the first pass saved, but does not store it: the first pass's loss is the
one the trainer added, and nothing stale is left in the layer afterwards.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..hydra import balance_loss
from ..ops import routed_lowrank_linear
from ..ops.checks import check_top_k
from .common import (REQUIRED, AdapterLayer, check_layer_args, check_linear, copy_base, is_conv1d, module_tensors,
                     resolve_adapter_dtype)


def _in_backward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing's recompute
    (the autograd engine is executing a graph task). Compiled code is never a recompute here."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class FusedHydraLoRALinear(AdapterLayer):
    """HydraLoRA linear: one shared A, `num_heads` B heads mixed per token by a softmax router.

    Args: in_features, out_features, rank (r), num_heads (E), alpha (scaling = alpha / rank),
    bias, top_k (None: dense routing; k: keep the k largest gates, not renormalised), dropout,
    balance_loss_weight, device, dtype, backend (None: dispatch picks; "triton"/"cuda"/"torch" forces
    one), adapter_dtype (None: fp32 on a 16-bit base, else the base's; see
    `resolve_adapter_dtype`).
    """

    method = "hydra"
    OPTIONS = {"num_heads": REQUIRED, "top_k": None, "dropout": 0.0, "balance_loss_weight": 0.0,
               "adapter_dtype": None}
    mergeable = False   # the gates depend on the token

    def __init__(self, in_features: int, out_features: int, rank: int, num_heads: int,
                 alpha: float, bias: bool = True, top_k: Optional[int] = None,
                 dropout: float = 0.0, balance_loss_weight: float = 0.0, device=None, dtype=None,
                 backend: Optional[str] = None, *, adapter_dtype=None, initialise: bool = True):
        super().__init__()
        check_layer_args(in_features=in_features, out_features=out_features, rank=rank,
                         num_heads=num_heads, alpha=alpha, dropout=dropout)
        top_k = check_top_k(top_k, num_heads, "num_heads")
        if (isinstance(balance_loss_weight, bool) or not isinstance(balance_loss_weight, (int, float))
                or not math.isfinite(balance_loss_weight) or balance_loss_weight < 0):
            raise ValueError(f"balance_loss_weight must be a finite number >= 0, got {balance_loss_weight!r}")
        factory = self._init_base(in_features, out_features, rank, alpha, bias, backend, device,
                                  dtype, resolve_adapter_dtype(adapter_dtype, dtype))
        self.num_heads, self.top_k = num_heads, top_k
        self.balance_loss_weight = float(balance_loss_weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.last_balance_loss: Optional[Tensor] = None
        self.lora_B = nn.Parameter(torch.empty(num_heads, out_features, rank, **factory))
        self.lora_router = nn.Parameter(torch.empty(num_heads, in_features, **factory))
        if initialise:
            self.reset_adapter()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, num_heads: int, alpha: float,
                    top_k: Optional[int] = None, dropout: float = 0.0,
                    balance_loss_weight: float = 0.0, backend: Optional[str] = None, *,
                    adapter_dtype=None, initialise: bool = True):
        """A layer computing `linear` plus a freshly initialised HydraLoRA adapter in
        `adapter_dtype` (None: fp32 on a 16-bit base, else the base's; see
        `resolve_adapter_dtype`); `linear` itself is left untouched (its weight is copied).
        initialise=False leaves the adapter uninitialised, for `load_adapter_state`. Only
        nn.Linear: a transformers Conv1D (GPT-2) is refused **[ours]**, as HydraLoRA is defined
        and evaluated on LLaMA-style projections."""
        if is_conv1d(linear):
            raise TypeError("FusedHydraLoRALinear takes an nn.Linear; transformers Conv1D layers "
                            "(GPT-2 and kin) are not supported by HydraLoRA here")
        check_linear(linear)
        layer = cls(linear.in_features, linear.out_features, rank, num_heads, alpha,
                    bias=linear.bias is not None, top_k=top_k, dropout=dropout,
                    balance_loss_weight=balance_loss_weight, device=linear.weight.device,
                    dtype=linear.weight.dtype, backend=backend, adapter_dtype=adapter_dtype,
                    initialise=initialise)
        copy_base(layer, linear)
        return layer

    def layer_options(self) -> dict:
        return {"rank": self.rank, "num_heads": self.num_heads, "alpha": self.alpha,
                "top_k": self.top_k, "dropout": self.dropout.p if self.dropout is not None else 0.0,
                "balance_loss_weight": self.balance_loss_weight,
                "adapter_dtype": str(self.lora_A.dtype).removeprefix("torch.")}

    def merge(self) -> nn.Module:
        raise ValueError("a HydraLoRA layer cannot be merged into its weight: its gates depend "
                         "on the token")

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A and the router kaiming-uniform (a = sqrt(5)), every head B_e = 0 (methods.md §3)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def __getstate__(self) -> dict:
        # The balance loss of the last batch belongs to that batch's graph, not to the layer
        # (and, a non-leaf tensor, cannot be deep-copied): copies and pickles leave it out.
        state = super().__getstate__()
        return {**state, "last_balance_loss": None}

    def forward(self, x: Tensor) -> Tensor:
        want_loss = self.training and self.balance_loss_weight > 0 and not self.adapters_disabled
        keep_loss = want_loss and not _in_backward()
        # A loss kept from an earlier batch (or from training, before eval()) must not reach
        # the trainer with this batch.
        if keep_loss or not want_loss:
            self.last_balance_loss = None
        if self.adapters_disabled:
            return self.base_forward(x)
        tensors = module_tensors(self, "weight", "bias", "lora_A", "lora_B", "lora_router")
        if self.dropout is None or not self.training:
            out = routed_lowrank_linear(x, *tensors, self.scaling, top_k=self.top_k,
                                        return_router_probs=want_loss, backend=self.backend)
        else:
            out = routed_lowrank_linear(x, *tensors, self.scaling, top_k=self.top_k,
                                        return_router_probs=want_loss, dropout=self.dropout.p,
                                        backend=self.backend)
        y, probs = out if want_loss else (out, None)
        if want_loss and probs.numel() > 0:  # an empty batch has no routing to balance
            loss = self.balance_loss_weight * balance_loss(probs, self.top_k)
            if keep_loss:
                self.last_balance_loss = loss
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"num_heads={self.num_heads}, alpha={self.alpha}, top_k={self.top_k}, "
                f"dropout={self.dropout.p if self.dropout else 0.0}, "
                f"balance_loss_weight={self.balance_loss_weight}, bias={self.bias is not None}, "
                f"backend={self.backend or 'auto'}")
