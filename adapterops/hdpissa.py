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

This module builds `HDPiSSALinear` layers (`convert`, through `adapterops.inject`), so it sits
above `adapterops.modules` in the layering: a user-facing utility, imported by nothing inside
the package.
"""
import contextlib
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .distributed import aggregate_lowrank_deltas, check_consistency, raise_together, world_and_rank
from .inject import inject
from .modules.hdpissa import HDPiSSALinear
from .ops import lowrank_update_
from .pissa import check_rank_index, hdpissa_factors

__all__ = ["init_factors", "convert", "HDPiSSAOptimizer", "HDPiSSALinear"]


def init_factors(weight: Tensor, rank: int, world_size: int, rank_index: int, *,
                 svd: str = "full", niter: int = 8) -> tuple[Tensor, Tensor]:
    """(A_k, B_k) in fp32 for rank k = `rank_index` of `world_size`: A_k = sqrt(Σ_sl) Vh_sl
    (r x in), B_k = U_sl sqrt(Σ_sl) (out x r), sl = [k r, (k+1) r) of the SVD of `weight`
    (`svd="lowrank"`: a randomised SVD with `niter` iterations, the same on every rank)."""
    check_rank_index(rank_index, world_size)
    A_all, B_all = hdpissa_factors(weight, rank, world_size, svd, niter)
    rows = slice(rank_index * rank, (rank_index + 1) * rank)
    return A_all[rows].clone(), B_all[:, rows].clone()


def convert(model: nn.Module, rank: int, alpha: float, world_size: Optional[int] = None,
            rank_index: Optional[int] = None, target_modules: Optional[Iterable[str]] = None, *,
            svd: str = "full", niter: int = 8, backend: Optional[str] = None) -> nn.Module:
    """Replaces, in place, the linear layers of `model` that `target_modules` selects (PEFT's
    rule; None: every linear layer but the output embeddings) with `HDPiSSALinear` layers for
    rank `rank_index` of `world_size` (both default to the initialised process group's), and
    freezes every other parameter: `adapterops.inject` with method "hdpissa". Returns the
    model."""
    targets = (target_modules if target_modules is None or isinstance(target_modules, str)
               else list(target_modules))
    config = AdapterConfig(method="hdpissa", rank=rank, alpha=alpha, target_modules=targets,
                           world_size=world_size, rank_index=rank_index, svd=svd, niter=niter,
                           backend=backend)
    return inject(model, config)


def _cast_problem(layers: list[HDPiSSALinear], names: list[str]) -> Optional[str]:
    """What is wrong, or None, with the layers' dtypes: a model cast after `convert` (its
    factors are no longer fp32, or an fp16/bf16 weight lacks its fp32 master copy, or an fp32
    one keeps a stale one)."""
    for m, name in zip(layers, names):
        low_precision = m.weight.dtype in (torch.float16, torch.bfloat16)
        if m.factor_A.dtype != torch.float32 or low_precision != (m.master_weight is not None):
            return (f"layer {name} has a {m.weight.dtype} weight, {m.factor_A.dtype} factors and "
                    f"{'a' if m.master_weight is not None else 'no'} fp32 master copy: the model "
                    "was cast after adapterops.hdpissa.convert. Cast it first, then convert (the "
                    "factors and the master copy of fp16/bf16 weights are fp32)")
    return None


def _adam_delta(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, t: float, lr: float, beta1: float,
                beta2: float, eps: float) -> Tensor:
    """Adam's step δ of one factor (A' = A - δ) at step t (1 on the first), bias-corrected, no
    weight decay, from g = grad in fp32; updates the fp32 moments m = `exp_avg`, v = `exp_avg_sq` in place:

        m <- β1 m + (1 - β1) g,    v <- β2 v + (1 - β2) g²
        δ = m / (sqrt(v / (1 - β2^t)) + eps) * (lr / (1 - β1^t))    (= lr m̂ / (sqrt(v̂) + eps))"""
    g = grad.float()
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denominator = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
    return exp_avg / denominator * (lr / (1 - beta1 ** t))


def _keep_gradients(kept: dict[int, list[Optional[Tensor]]], rank_index: int, params: list[Tensor]) -> None:
    """Virtual ranks' gradient bookkeeping: keeps the factors' gradients (None where backward
    left none) in `kept[rank_index]`, added to what an earlier block for the same rank kept."""
    previous = kept.get(rank_index, [None] * len(params))
    kept[rank_index] = [g if old is None else old if g is None else old + g
                        for g, old in zip((p.grad for p in params), previous)]


def _apply_update(layer: HDPiSSALinear, delta_A: Tensor, delta_B: Tensor) -> None:
    """W <- W - s P Q with every rank's steps (delta_A (K, r, in), delta_B (K, out, r))."""
    K, r = layer.world_size, layer.rank
    A = layer.factor_A.view(K, r, -1)
    B = layer.factor_B.view(layer.out_features, K, r).permute(1, 0, 2)
    # P = [δB_0 | B_0 | δB_1 | B_1 | ...], Q = [A_0 - δA_0; δA_0; A_1 - δA_1; δA_1; ...]
    P = torch.stack([delta_B, B], 1).permute(2, 0, 1, 3).reshape(layer.out_features, 2 * K * r)
    Q = torch.stack([A - delta_A, delta_A], 1).reshape(2 * K * r, layer.in_features)
    target, copy = layer.update_target()
    # The factors and steps are fp32 (so is the update's precision); the product is added
    # into the weight in its own dtype (a float64 model's W stays float64).
    P, Q = P.to(target.dtype, memory_format=torch.contiguous_format), Q.to(target.dtype)
    lowrank_update_(target, P, Q, -layer.scaling, copy=copy, backend=layer.backend)


class HDPiSSAOptimizer(torch.optim.Optimizer):
    """Per-rank Adam on the HD-PiSSA factors, the exchange of the steps and the W update.

    Adam: β = `betas`, `eps`, bias-corrected, no weight decay, moments in fp32; the step of a factor is
    δ = lr m̂ / (sqrt(v̂) + eps), and A' = A - δ. `process_group` (default: the world) carries the exchange
    in buckets of at most `bucket_mb` MiB (`adapterops.distributed.aggregate_lowrank_deltas`). With
    `virtual_ranks=True` the process simulates all K ranks (see the module docstring) and runs no collective.

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
        finite = all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
                     for v in (lr, eps, *betas))
        if not (finite and len(betas) == 2 and lr >= 0 and eps > 0 and 0 <= min(betas) and max(betas) < 1):
            raise ValueError(f"invalid Adam settings lr={lr!r}, betas={betas!r}, eps={eps!r}: "
                             "lr >= 0, 0 <= beta < 1 (two of them) and eps > 0, all finite")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        names = {id(m): n for n, m in model.named_modules()}
        layer_names = [names[id(m)] for m in layers]
        world_sizes = {name: m.world_size for name, m in zip(layer_names, layers)}
        if len(set(world_sizes.values())) > 1:
            raise ValueError(f"HDPiSSAOptimizer: the layers were converted with different world "
                             f"sizes: {world_sizes}")
        problem = _cast_problem(layers, layer_names)
        if problem is not None:
            raise ValueError(f"HDPiSSAOptimizer: {problem}")
        self.world_size = layers[0].world_size
        self.virtual_ranks = virtual_ranks
        self._flag_device = layers[0].weight.device if layers[0].weight.is_cuda else None
        if not virtual_ranks:
            world, rank = world_and_rank(process_group)
            wrong = [f"layer {name} was built for rank {m.rank_index} of {m.world_size}"
                     for name, m in zip(layer_names, layers) if (m.world_size, m.rank_index) != (world, rank)]
            problem = None if not wrong else (
                f"HDPiSSAOptimizer: {wrong[0]}, but this process is rank {rank} of {world} in "
                "the process group" + ("" if world > 1 else " (pass virtual_ranks=True to "
                                       "simulate the ranks in one process)"))
            raise_together(problem, group=process_group, device=self._flag_device, error=ValueError)
            if world > 1:
                # Every rank must start from the same W: each applies every rank's steps to it.
                check_consistency(model, process_group)
        self._layers = layers
        self._layer_names = layer_names
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
        backward leaves are kept for that rank's Adam step (virtual ranks only). After it they
        hold their own rank's factors again."""
        if not self.virtual_ranks:
            raise RuntimeError("virtual_rank() needs HDPiSSAOptimizer(..., virtual_ranks=True)")
        params = self.param_groups[0]["params"]
        if any(p.grad is not None for p in params):
            raise RuntimeError("virtual_rank(): the factors already have gradients; run every "
                               "backward inside a virtual_rank block")
        configured = [m.rank_index for m in self._layers]
        for m in self._layers:
            m.set_rank_index(rank_index)
        try:
            yield
            _keep_gradients(self._virtual_grads, rank_index, params)
        finally:
            for p in params:  # kept above, or after a failure dropped: no partial gradients
                p.grad = None
            # Back to the rank each layer was built for (what save_adapters records).
            for m, index in zip(self._layers, configured):
                m.set_rank_index(index)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._virtual_grads.clear()

    def _gradients(self, rank_index: int) -> tuple[list[Optional[Tensor]], Optional[str]]:
        """(the factors' gradients of one rank, None or what is missing)."""
        params = self.param_groups[0]["params"]
        grads = (self._virtual_grads.get(rank_index, [None] * len(params)) if self.virtual_ranks
                 else [p.grad for p in params])
        missing = [f"{self._layer_names[i // 2]}.{('lora_A', 'lora_B')[i % 2]}"
                   for i, g in enumerate(grads) if g is None]
        if not missing:
            return grads, None
        if self.virtual_ranks:
            return grads, (f"HDPiSSAOptimizer.step(): no gradient for {missing[0]} of virtual rank "
                           f"{rank_index}; run backward inside virtual_rank(k) for every k first")
        return grads, f"HDPiSSAOptimizer.step(): no gradient for {missing[0]}; run backward first"

    def _adam_steps(self, grads: list[Tensor], slot: int) -> list[tuple[Tensor, Tensor]]:
        """(δA, δB) of every layer for one rank from its gradients, updating its step counts
        and moments (slot `slot` of the state)."""
        group = self.param_groups[0]
        steps = []
        for p, g in zip(group["params"], grads):
            state = self.state[p]
            if not state:
                slots = len(self._ranks_here())
                state["step"] = torch.zeros(slots, dtype=torch.float32)
                state["exp_avg"] = torch.zeros((slots, *p.shape), dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros((slots, *p.shape), dtype=torch.float32, device=p.device)
            state["step"][slot] += 1
            steps.append(_adam_delta(g, state["exp_avg"][slot], state["exp_avg_sq"][slot], state["step"][slot].item(),
                                     group["lr"], *group["betas"], group["eps"]))
        return list(zip(steps[0::2], steps[1::2]))

    @torch.no_grad()
    def step(self, closure=None):
        """One HD-PiSSA step: Adam per rank, the exchange of the steps, the W update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A cast since the optimizer was built (model.half()) would train without the fp32
        # master copy, or not at all: checked at every step (a few attribute reads per layer).
        cast = _cast_problem(self._layers, self._layer_names)
        # Every rank's gradients are checked before any state changes, and a problem on one
        # process raises on all of them (not a hang in the exchange).
        checked = [self._gradients(k) for k in self._ranks_here()]
        problem = (f"HDPiSSAOptimizer.step(): {cast}" if cast is not None
                   else next((p for _, p in checked if p is not None), None))
        if not self.virtual_ranks:
            raise_together(problem, group=self._group, device=self._flag_device)
        elif problem is not None:
            raise RuntimeError(problem)
        per_rank = [self._adam_steps(grads, slot) for slot, (grads, _) in enumerate(checked)]
        if self.virtual_ranks:  # every rank's steps of a layer, stacked: (K, r, in), (K, out, r)
            gathered = [(torch.stack([dA for dA, _ in layer]), torch.stack([dB for _, dB in layer]))
                        for layer in zip(*per_rank)]
        else:
            gathered = aggregate_lowrank_deltas(per_rank[0], group=self._group, bucket_mb=self._bucket_mb)
        for layer, (delta_A, delta_B) in zip(self._layers, gathered):
            _apply_update(layer, delta_A, delta_B)
        self._virtual_grads.clear()
        return loss

    def _layout(self) -> dict:
        return {"world_size": self.world_size, "ranks": self._ranks_here(),
                "virtual_ranks": self.virtual_ranks}

    def state_dict(self) -> dict:
        """torch's optimizer state plus which ranks it holds (`hdpissa`), checked on load."""
        return {**super().state_dict(), "hdpissa": self._layout()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state saved by an optimizer holding the same ranks (ValueError otherwise:
        rank 0's moments on rank 1 would train with the wrong history). torch's loader casts
        floating state to each parameter's dtype; the moments stay fp32 here whatever the
        factors' dtype, so they are restored as saved."""
        saved = state_dict.get("hdpissa")
        if saved != self._layout():
            raise ValueError(f"HDPiSSAOptimizer.load_state_dict: the state was saved for {saved}, "
                             f"this optimizer holds {self._layout()}")
        state_dict = {k: v for k, v in state_dict.items() if k != "hdpissa"}
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        for index, saved in state_dict["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[params[index]][key] = saved[key].to(device=params[index].device, dtype=torch.float32)
            if "step" in saved:
                self.state[params[index]]["step"] = saved["step"].to(torch.float32).cpu()
