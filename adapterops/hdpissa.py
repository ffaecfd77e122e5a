"""HD-PiSSA (methods.md §4): factors, model conversion and the optimizer that trains it.

K ranks (processes, or virtual ranks in one process) each train a different slice of W's
principal components. Every step, each rank k runs Adam on the gradients of its fixed factors
(A_k, B_k), the ranks exchange only the steps (δA_k, δB_k), and every rank applies the same
update

    W <- W - s Σ_k [ δB_k (A_k - δA_k) + B_k δA_k ] = W - s P Q
    P = [δB_0 | B_0 | ... ] (out x 2 K r),   Q = [A_0 - δA_0; δA_0; ...] (2 K r x in)

as one GEMM of inner size 2 K r fused into one pass over W (`adapterops.lowrank_update_`).
The factors never change; Adam's moments persist. There is no gradient all-reduce.

Virtual ranks **[ours]**: because ranks interact only through W, one process can simulate K
ranks exactly: data shard k's backward runs with the layers switched to rank k's factors, and
the optimizer keeps Adam state k for it:

    opt = HDPiSSAOptimizer(model, lr=1e-4, virtual_ranks=True)
    for batch in data:
        for k, shard in enumerate(batch.chunk(K)):
            with opt.virtual_rank(k):
                loss_fn(model(shard)).backward()
        opt.step()
        opt.zero_grad()

This module builds `HDPiSSALinear` layers (`convert`), so it sits above `adapterops.modules`
in the layering: a user-facing utility, imported by nothing inside the package.
"""
import contextlib
import math
import re
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import aggregate_lowrank_deltas
from .modules.hdpissa import HDPiSSALinear
from .ops import lowrank_update_
from .pissa import hdpissa_factors

__all__ = ["init_factors", "convert", "HDPiSSAOptimizer", "HDPiSSALinear"]


def init_factors(weight: Tensor, rank: int, world_size: int, rank_index: int, *,
                 svd: str = "full", niter: int = 8) -> tuple[Tensor, Tensor]:
    """(A_k, B_k) in fp32 for rank k = `rank_index` of `world_size`: A_k = sqrt(Σ_sl) Vh_sl
    (r x in), B_k = U_sl sqrt(Σ_sl) (out x r), sl = [k r, (k+1) r) of the SVD of `weight`
    (`svd="lowrank"`: a randomised SVD with `niter` iterations, the same on every rank)."""
    if isinstance(rank_index, bool) or not isinstance(rank_index, int) or not 0 <= rank_index < world_size:
        raise ValueError(f"rank_index must be an int in [0, world_size) = [0, {world_size}), "
                         f"got {rank_index!r}")
    A_all, B_all = hdpissa_factors(weight, rank, world_size, svd, niter)
    rows = slice(rank_index * rank, (rank_index + 1) * rank)
    return A_all[rows].clone(), B_all[:, rows].clone()


def _group_world_and_rank(group) -> Optional[tuple[int, int]]:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size(group), dist.get_rank(group)


def _matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule: a target matches the qualified name itself or its last components."""
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def convert(model: nn.Module, rank: int, alpha: float, world_size: Optional[int] = None,
            rank_index: Optional[int] = None, target_modules: Optional[Iterable[str]] = None, *,
            svd: str = "full", niter: int = 8, backend: Optional[str] = None) -> nn.Module:
    """Replaces, in place, every `nn.Linear` of `model` (or those whose qualified name matches
    one of `target_modules`: the name itself, a dotted suffix of it, or a regular expression
    matching it whole) with an `HDPiSSALinear` for rank `rank_index` of `world_size`; both
    default to the initialised process group. Returns the model."""
    group = _group_world_and_rank(None)
    if world_size is None or rank_index is None:
        if group is None:
            raise ValueError("convert: pass world_size and rank_index, or initialise a "
                             "torch.distributed process group first")
        world_size = group[0] if world_size is None else world_size
        rank_index = group[1] if rank_index is None else rank_index
    targets = None if target_modules is None else [target_modules] if isinstance(target_modules, str) else list(target_modules)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and (targets is None or _matches(qualified, targets)):
                setattr(module, child_name, HDPiSSALinear.from_linear(
                    child, rank, alpha, world_size, rank_index, svd=svd, niter=niter, backend=backend))
                replaced.append(qualified)
    if not replaced:
        raise ValueError(f"convert: no nn.Linear in the model matches target_modules={targets}")
    return model


class HDPiSSAOptimizer(torch.optim.Optimizer):
    """Per-rank Adam on the HD-PiSSA factors, the exchange of the steps and the W update.

    Adam: β = `betas`, `eps`, bias-corrected, no weight decay, moments in fp32; the step of a
    factor is δ = lr m̂ / (sqrt(v̂) + eps), and A' = A - δ. `process_group` (default: the
    world) carries the exchange in buckets of at most `bucket_mb` MiB
    (`adapterops.distributed.aggregate_lowrank_deltas`). With `virtual_ranks=True` the process
    simulates all K ranks (see the module docstring) and runs no collective.

    A `torch.optim.Optimizer`: `param_groups[0]["lr"]` is what LR schedulers change;
    `state_dict()` / `load_state_dict()` keep the fp32 moments of every (virtual) rank, and with
    the model's state_dict (W, its master copy, the factors) a resumed run continues exactly.
    """

    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, process_group=None, bucket_mb: float = 64.0,
                 virtual_ranks: bool = False):
        layers = [m for m in model.modules() if isinstance(m, HDPiSSALinear)]
        if not layers:
            raise ValueError("HDPiSSAOptimizer: the model has no HDPiSSALinear layer "
                             "(adapterops.hdpissa.convert replaces its nn.Linear layers)")
        if not (isinstance(lr, (int, float)) and lr >= 0) or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0:
            raise ValueError(f"invalid Adam settings lr={lr!r}, betas={betas!r}, eps={eps!r}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        names = {id(m): n for n, m in model.named_modules()}
        world_sizes = {names[id(m)]: m.world_size for m in layers}
        if len(set(world_sizes.values())) > 1:
            raise ValueError(f"HDPiSSAOptimizer: the layers were converted with different world "
                             f"sizes: {world_sizes}")
        self.world_size = layers[0].world_size
        self.virtual_ranks = virtual_ranks
        if not virtual_ranks:
            group = _group_world_and_rank(process_group)
            world, rank = group if group is not None else (1, 0)
            for m in layers:
                if m.world_size != world or m.rank_index != rank:
                    raise ValueError(
                        f"HDPiSSAOptimizer: layer {names[id(m)]} was built for rank "
                        f"{m.rank_index} of {m.world_size}, but this process is rank {rank} of "
                        f"{world} in the process group" + ("" if group is not None else
                        " (none is initialised; pass virtual_ranks=True to simulate the ranks)"))
        self._layers = layers
        self._layer_names = [names[id(m)] for m in layers]
        self._group = process_group
        self._bucket_mb = bucket_mb
        self._virtual_grads: dict[int, list[Optional[Tensor]]] = {}
        params = [p for m in layers for p in (m.lora_A, m.lora_B)]
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    def _ranks_here(self) -> list[int]:
        """The ranks whose Adam state this process keeps: all K when virtual, else its own."""
        return list(range(self.world_size)) if self.virtual_ranks else [self._layers[0].rank_index]

    @contextlib.contextmanager
    def virtual_rank(self, rank_index: int):
        """Within the block, the layers hold rank `rank_index`'s factors; the gradients its
        backward leaves are kept for that rank's Adam step (virtual ranks only)."""
        if not self.virtual_ranks:
            raise RuntimeError("virtual_rank() needs HDPiSSAOptimizer(..., virtual_ranks=True)")
        params = self.param_groups[0]["params"]
        if any(p.grad is not None for p in params):
            raise RuntimeError("virtual_rank(): the factors already have gradients; run every "
                               "backward inside a virtual_rank block")
        for m in self._layers:
            m.set_rank_index(rank_index)
        try:
            yield
        finally:
            previous = self._virtual_grads.get(rank_index)
            grads = [p.grad for p in params]
            if previous is not None:  # a second block for the same rank accumulates
                grads = [g if old is None else old if g is None else old + g
                         for g, old in zip(grads, previous)]
            self._virtual_grads[rank_index] = grads
            for p in params:
                p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._virtual_grads.clear()

    def _gradients(self, rank_index: int) -> list[Tensor]:
        params = self.param_groups[0]["params"]
        grads = (self._virtual_grads.get(rank_index, [None] * len(params)) if self.virtual_ranks
                 else [p.grad for p in params])
        for i, g in enumerate(grads):
            if g is None:
                name = f"{self._layer_names[i // 2]}.{('lora_A', 'lora_B')[i % 2]}"
                where = f" of virtual rank {rank_index}" if self.virtual_ranks else ""
                raise RuntimeError(f"HDPiSSAOptimizer.step(): no gradient for {name}{where}; "
                                   "run backward (inside virtual_rank(k) for every k) before step()")
        return grads

    def _adam_steps(self, rank_index: int, slot: int) -> list[Tensor]:
        """δ of every factor for one rank, updating its moments (slot `slot` of the state)."""
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        steps = []
        for p, g in zip(group["params"], self._gradients(rank_index)):
            state = self.state[p]
            if not state:
                slots = len(self._ranks_here())
                state["step"] = torch.zeros(slots, dtype=torch.float32)
                state["exp_avg"] = torch.zeros((slots, *p.shape), dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros((slots, *p.shape), dtype=torch.float32, device=p.device)
            state["step"][slot] += 1
            t = state["step"][slot].item()
            g = g.float()
            m, v = state["exp_avg"][slot], state["exp_avg_sq"][slot]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denominator = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            steps.append(m / denominator * (lr / (1 - beta1 ** t)))
        return steps

    @torch.no_grad()
    def step(self, closure=None):
        """One HD-PiSSA step: Adam per rank, the exchange of the steps, the W update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ranks = self._ranks_here()
        per_rank = [self._adam_steps(k, slot) for slot, k in enumerate(ranks)]
        if self.virtual_ranks:
            gathered = [(torch.stack([steps[2 * i] for steps in per_rank]),
                         torch.stack([steps[2 * i + 1] for steps in per_rank]))
                        for i in range(len(self._layers))]
        else:
            mine = per_rank[0]
            gathered = aggregate_lowrank_deltas(
                [(mine[2 * i], mine[2 * i + 1]) for i in range(len(self._layers))],
                group=self._group, bucket_mb=self._bucket_mb)
        for layer, (delta_A, delta_B) in zip(self._layers, gathered):
            self._apply_update(layer, delta_A, delta_B)
        self._virtual_grads.clear()
        return loss

    @staticmethod
    def _apply_update(layer: HDPiSSALinear, delta_A: Tensor, delta_B: Tensor) -> None:
        """W <- W - s P Q with every rank's steps (delta_A (K, r, in), delta_B (K, out, r))."""
        K, r = layer.world_size, layer.rank
        A = layer.factor_A.view(K, r, -1)
        B = layer.factor_B.view(layer.out_features, K, r).permute(1, 0, 2)
        # P = [δB_0 | B_0 | δB_1 | B_1 | ...], Q = [A_0 - δA_0; δA_0; A_1 - δA_1; δA_1; ...]
        P = torch.stack([delta_B, B], 1).permute(2, 0, 1, 3).reshape(layer.out_features, 2 * K * r)
        Q = torch.stack([A - delta_A, delta_A], 1).reshape(2 * K * r, layer.in_features)
        target, copy = layer.update_target()
        # fp32 factors and steps; a float64 weight takes the update in float64.
        P, Q = P.to(target.dtype, memory_format=torch.contiguous_format), Q.to(target.dtype)
        lowrank_update_(target, P, Q, -layer.scaling, copy=copy, backend=layer.backend)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to each parameter's dtype; the moments stay
        fp32 here whatever the factors' dtype, so they are restored as saved."""
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        for index, saved in state_dict["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[params[index]][key] = saved[key].to(device=params[index].device,
                                                                   dtype=torch.float32)
            if "step" in saved:
                self.state[params[index]]["step"] = saved["step"].to(torch.float32).cpu()
