"""HD-PiSSA's layer (methods.md §4): an `nn.Linear` replacement whose forward is the base layer
alone and whose backward gives this rank's fixed factors their LoRA gradients.

    y = x W^T + bias,   gA_k = s (dY B_k)^T x,   gB_k = s dY^T (x A_k^T),   dx = dY W

Rank k of K owns slice k of W's principal components (`adapterops.pissa.hdpissa_factors`):
the trainable `lora_A` (r, in) and `lora_B` (out, r) hold A_k and B_k, and never change; the
optimizer (`adapterops.hdpissa.HDPiSSAOptimizer`) turns their gradients into Adam steps,
exchanges the steps between ranks and merges the update into W. Every rank keeps all K
ranks' factors (`factor_A` (K r, in), `factor_B` (out, K r), fp32 buffers): the update sums
over all of them.

Weights **[ours]**: with a weight in fp16 or bf16 the layer keeps an fp32 master copy of W
(`master_weight`, a buffer) that the update is applied to; `weight` is its rounding to the
model's dtype, rewritten by the same pass. Each step's update is about lr * sqrt(σ) per entry,
far below a bf16 ulp of W's entries, so applied to bf16 directly most of it would round away.
(Stochastic rounding would save the memory of the copy but make the update random; every rank
must compute the same W, which a shared master copy guarantees simply.)
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import hdpissa_linear
from ..pissa import check_factor_args, check_rank_index, hdpissa_factors
from ..distributed import world_and_rank
from .common import (AdapterLayer, base_features, check_layer_args, check_linear, copy_base,
                     make_base, module_tensors)


def _reslice_after_load(module: "HDPiSSALinear", incompatible_keys) -> None:
    """The load_state_dict post-hook of HDPiSSALinear (a module-level function, not a lambda,
    so layers and models pickle and `torch.save` whole)."""
    module.set_rank_index(module.rank_index)


class HDPiSSALinear(AdapterLayer):
    """Rank `rank_index` of `world_size`'s HD-PiSSA layer; scaling = alpha / rank.

    Args: in_features, out_features, rank (r), alpha, world_size (K), rank_index (k), bias,
    svd ("full", or "lowrank" for large matrices), niter (for "lowrank"), device, dtype,
    backend (None: dispatch picks; "triton"/"cuda"/"torch" forces).
    """

    method = "hdpissa"
    # world_size and rank_index None: the initialised process group's.
    OPTIONS = {"world_size": None, "rank_index": None, "svd": "full", "niter": 8}
    can_disable = False  # the original W is not kept (W itself is trained: it merges as it is)

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 world_size: int, rank_index: int, bias: bool = True, svd: str = "full",
                 niter: int = 8, device=None, dtype=None, backend: Optional[str] = None, *,
                 initialise: bool = True):
        super().__init__()
        check_layer_args(in_features=in_features, out_features=out_features, rank=rank,
                         world_size=world_size, alpha=alpha, dropout=0.0)
        check_rank_index(rank_index, world_size)
        check_factor_args(rank, world_size, (out_features, in_features), svd, niter)
        factory = self._init_base(in_features, out_features, rank, alpha, bias, backend, device, dtype)
        self.world_size, self.rank_index, self.svd, self.niter = world_size, rank_index, svd, niter
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        fp32 = {"device": device, "dtype": torch.float32}
        self.register_buffer("factor_A", torch.empty(world_size * rank, in_features, **fp32))
        self.register_buffer("factor_B", torch.empty(out_features, world_size * rank, **fp32))
        low_precision = self.weight.dtype in (torch.float16, torch.bfloat16)
        self.register_buffer("master_weight", torch.empty(out_features, in_features, **fp32)
                             if low_precision else None)
        if initialise:
            self.reset_factors()
        # lora_A and lora_B are this rank's slice of the factors. A state_dict saved on another
        # rank (rank 0's, loaded everywhere as data-parallel trainers do) holds that rank's
        # slice: after any load, take this rank's slice from the loaded factors again.
        self.register_load_state_dict_post_hook(_reslice_after_load)

    @classmethod
    def from_linear(cls, linear, rank: int, alpha: float, world_size: int,
                    rank_index: int, svd: str = "full", niter: int = 8,
                    backend: Optional[str] = None, *, initialise: bool = True):
        """An HD-PiSSA layer on `linear`'s weight (an nn.Linear or a transformers Conv1D;
        copied, `linear` is left untouched). initialise=False computes no factors, for
        `load_adapter_state`."""
        check_linear(linear, trains_weight=True)
        in_features, out_features = base_features(linear)
        layer = cls(in_features, out_features, rank, alpha, world_size, rank_index,
                    bias=linear.bias is not None, svd=svd, niter=niter,
                    device=linear.weight.device, dtype=linear.weight.dtype, backend=backend,
                    initialise=False)
        copy_base(layer, linear)
        if initialise:
            layer.reset_factors()
        return layer

    @classmethod
    def from_config(cls, linear, config, *, initialise: bool = True):
        """`from_linear` with the rank, alpha, options and backend of an `AdapterConfig`;
        world_size and rank_index default to the initialised process group's."""
        options = config.options_for(cls)
        if options["world_size"] is None or options["rank_index"] is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("hdpissa: pass world_size and rank_index, or initialise a "
                                 "torch.distributed process group first")
            group_world, group_rank = world_and_rank()
            options["world_size"] = options["world_size"] or group_world
            if options["rank_index"] is None:
                options["rank_index"] = group_rank
        return cls.from_linear(linear, config.rank, config.alpha, backend=config.backend,
                               initialise=initialise, **options)

    def layer_options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "world_size": self.world_size,
                "rank_index": self.rank_index, "svd": self.svd, "niter": self.niter}

    def adapter_state(self) -> dict[str, Tensor]:
        """The tensors an adapter file holds: the trained weight (and its fp32 master copy)
        and every rank's factors; lora_A and lora_B are this rank's slice of the factors."""
        return {name: t for name, t in self.state_dict().items()
                if name not in ("bias", "lora_A", "lora_B")}

    def load_adapter_state(self, state: dict[str, Tensor], layer_name: str = "layer") -> None:
        super().load_adapter_state(state, layer_name)
        self.set_rank_index(self.rank_index)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain `nn.Linear` (a Conv1D for a layer made from one) with the trained weight."""
        return make_base(self.base_kind, self.weight, self.bias)

    def base_forward(self, x: Tensor) -> Tensor:
        raise ValueError("an HD-PiSSA layer trains W itself: its original base weight is not "
                         "kept, so it cannot run without its adapter")

    @torch.no_grad()
    def reset_factors(self) -> None:
        """Every rank's factors from the SVD of the current weight (taken as the original W),
        this rank's into lora_A and lora_B, and the master copy from the weight."""
        A_all, B_all = hdpissa_factors(self.weight, self.rank, self.world_size, self.svd, self.niter)
        self.factor_A.copy_(A_all)
        self.factor_B.copy_(B_all)
        if self.master_weight is not None:
            self.master_weight.copy_(self.weight)
        self.set_rank_index(self.rank_index)

    @torch.no_grad()
    def set_rank_index(self, rank_index: int) -> None:
        """Makes lora_A and lora_B hold rank `rank_index`'s factors (virtual ranks switch the
        rank a process computes for)."""
        check_rank_index(rank_index, self.world_size)
        rows = slice(rank_index * self.rank, (rank_index + 1) * self.rank)
        self.lora_A.copy_(self.factor_A[rows])
        self.lora_B.copy_(self.factor_B[:, rows])
        self.rank_index = rank_index

    def update_target(self) -> tuple[Tensor, Optional[Tensor]]:
        """(the tensor the W update is applied to, the model weight to round it into or None):
        (master_weight, weight) for fp16/bf16 weights, else (weight, None)."""
        if self.master_weight is not None:
            return self.master_weight, self.weight.data
        return self.weight.data, None

    def consistency_tensors(self) -> dict[str, Tensor]:
        """What must be bit-identical on every rank (`adapterops.distributed.check_consistency`):
        the weight, its master copy, the bias and every rank's factors."""
        tensors = {"weight": self.weight, "factor_A": self.factor_A, "factor_B": self.factor_B}
        if self.master_weight is not None:
            tensors["master_weight"] = self.master_weight
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors

    def forward(self, x: Tensor) -> Tensor:
        return hdpissa_linear(x, *module_tensors(self, "weight", "bias", "lora_A", "lora_B"),
                              self.scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, world_size={self.world_size}, rank_index={self.rank_index}, "
                f"svd={self.svd!r}, master_weight={self.master_weight is not None}, "
                f"bias={self.bias is not None}, backend={self.backend or 'auto'}")
