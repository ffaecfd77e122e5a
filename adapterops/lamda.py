"""LaMDA utilities (methods.md §2): the spectral init, gradual freezing of B, and LaMDA++ rank
allocation.

LaMDA layers are recognised by duck typing (a module with `lora_A`, `lora_S` and `lora_B`), so
this module does not import the module classes (imports point down).
"""
import math
from fractions import Fraction
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .pissa import factor_dtype, residual_weight, top_singular_triplets


def svd_factors(weight: Tensor, rank: int, scaling: float, dtype: Optional[torch.dtype] = None):
    """The "svd" init **[ours: the paper says the projections come from W's spectral
    decomposition; the released code does not do it]**:

        A = Vh_r (orthonormal rows),  S = diag(Σ_r) / s,  B = U_r,  W_res = W - s B S A

    Returns (A, S, B, W_res): the factors in `dtype` (the adapter's; None: weight's), W_res in
    weight's dtype, computed from the rounded factors (`pissa.residual_weight`): s B S A + W_res
    = W up to one rounding.
    """
    U, sigma, Vh = top_singular_triplets(weight, rank)
    A, S, B = (t.to(dtype or weight.dtype) for t in (Vh, torch.diag(sigma / scaling), U))
    return A, S, B, residual_weight(weight, scaling, B, A, S)


def lamda_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), nn.Parameter) for n in ("lora_A", "lora_S", "lora_B"))]


def _dtensor_type():
    """torch's DTensor class, or None where torch.distributed (or its tensor package) is
    unavailable; imported on first use, so this module imports nothing distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # a torch built without distributed, or one older than 2.5
        try:
            from torch.distributed._tensor import DTensor
        except Exception:
            return None
    return DTensor


def _local_rows(tensor: Tensor, what: str) -> Tensor:
    """The tensor whose leading columns are zeroed for `what`: `tensor` itself, or for a DTensor
    its local shard, which holds whole rows (every column) when each placement shards dim 0
    (FSDP2's default) or replicates. Under no_grad, `to_local()` returns the local tensor
    itself, so in-place writes reach the DTensor's storage."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tensor
    for placement in tensor.placements:
        if placement.is_replicate() or (placement.is_shard() and placement.dim % tensor.dim() == 0):
            continue
        raise ValueError(f"BFreezeSchedule: {what} is a DTensor with placements {tuple(tensor.placements)}; "
                         f"zeroing B's leading columns on the local shard needs every placement to "
                         f"shard dim 0 (FSDP2's default) or to replicate, got {placement!r}")
    return tensor.to_local()


class BFreezeSchedule:
    """Gradually freezes every LaMDA layer's B (lora_B) over the first eta * T optimizer steps.

    **[ours: the released schedule only ever zeroes 3 of 64 columns, which reads as a bug; the
    paper says B is fully frozen early]** After step t, the first
    `min(r, floor(r * t / (eta * T)))` columns of B (the largest singular directions under the
    "svd" init) get zero gradient; at `t >= eta * T` B is frozen altogether.

    Call `step()` once per optimizer step, after `loss.backward()` and before
    `optimizer.step()`:

        loss.backward(); schedule.step(); optimizer.step(); optimizer.zero_grad()

    The call for optimizer step t (1-based) zeroes the columns frozen after step t - 1 in the
    gradient step t applies, so the first step trains every column and B gets exactly
    ceil(eta * T) updates. Partly frozen columns are zeroed in B's gradient after backward, that
    is after DDP's all-reduce or FSDP's reduce-scatter, so every rank zeroes the same gradient.

    Full freeze: the call for B's last update (step t = ceil(eta * T)) sets the layer's
    `lora_B_frozen = True`, and every later call sets `lora_B.grad = None`, so the
    optimizer skips B: B stays bit-identical from its last update on, whatever the
    optimizer's momentum or weight decay. B keeps `requires_grad=True`, on purpose: DDP and
    FSDP registered it as trainable when they wrapped the model and expect a gradient for it
    on every backward (a parameter that stops requiring one makes DDP skip the all-reduce of
    the bucket it shares with others, so ranks silently diverge, then fail the next step).
    With `lora_B_frozen` set, `FusedLaMDALinear` hands the fused op a detached B, so the
    backward computes no dB, and gives B a zero gradient instead, which the wrapper reduces
    and this schedule drops. (A duck-typed LaMDA module that ignores `lora_B_frozen` keeps
    computing dB; its gradient is dropped all the same.) `load_state_dict` sets
    `lora_B_frozen` from the restored step count.

    A zero gradient alone does not stop a momentum optimizer on partly frozen columns (Adam
    keeps moving an entry on its first moment). Pass `optimizer` and the schedule also zeroes
    the frozen columns of its `exp_avg` / `momentum_buffer` state, which makes the step of Adam
    and of SGD with momentum exactly zero there, provided the optimizer has no weight decay
    (decay still shrinks them until B is fully frozen).

    Under FSDP2 (`fully_shard`) B's gradient and optimizer state are DTensors: their columns
    are zeroed on each rank's local shard, which holds whole rows when the placement shards
    dim 0 (FSDP2's default) or replicates; any other placement raises a ValueError naming the
    parameter.
    """

    def __init__(self, model: nn.Module, total_steps: int, eta: float = 0.3,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1], got {eta!r}")
        self.layers = lamda_layers(model)
        if not self.layers:
            raise ValueError("the model has no LaMDA layers (modules with lora_A, lora_S and lora_B "
                             "parameters, such as adapterops.FusedLaMDALinear)")
        names = {id(module): name for name, module in model.named_modules()}
        self._names = [names[id(layer)] or "(root)" for layer in self.layers]
        self.total_steps, self.eta, self.optimizer = total_steps, eta, optimizer
        self.step_count = 0

    def frozen_columns(self, rank: int, step: Optional[int] = None) -> int:
        """How many leading columns of a rank-`rank` B are frozen after `step` (default: the
        steps taken so far): min(r, floor(r t / (eta T))), in exact rational arithmetic (a
        float eta * T like 0.1 * 48 would round some boundaries the wrong way)."""
        t = self.step_count if step is None else step
        eta = Fraction(self.eta).limit_denominator(10 ** 6)
        return min(rank, math.floor(Fraction(rank * t) / (eta * self.total_steps)))

    @torch.no_grad()
    def step(self) -> None:
        for layer, name in zip(self.layers, self._names):
            B = layer.lora_B
            if getattr(layer, "lora_B_frozen", False):
                B.grad = None  # frozen by an earlier call; its last update was applied then
                continue
            rank = B.shape[1]
            frozen = self.frozen_columns(rank)
            if frozen and B.grad is not None:
                _local_rows(B.grad, f"{name}.lora_B's gradient")[:, :frozen] = 0
            if frozen and self.optimizer is not None:
                state = self.optimizer.state.get(B, {})
                for key in ("exp_avg", "momentum_buffer"):
                    if isinstance(state.get(key), Tensor):
                        _local_rows(state[key], f"{name}.lora_B's optimizer state {key!r}")[:, :frozen] = 0
            if self.frozen_columns(rank, self.step_count + 1) >= rank:
                layer.lora_B_frozen = True  # this step's update is B's last
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "eta": self.eta}

    def load_state_dict(self, state: dict) -> None:
        """Restores the step count (and T, eta) and marks each layer's B frozen, or not, as the
        restored count says (frozen once its last update is behind)."""
        self.step_count, self.total_steps, self.eta = state["step_count"], state["total_steps"], state["eta"]
        for layer in self.layers:
            rank = layer.lora_B.shape[1]
            layer.lora_B_frozen = self.frozen_columns(rank) >= rank


def effective_rank(weight: Tensor) -> float:
    """exp(entropy) of the normalised singular values p_i = σ_i / Σσ (1 for a rank-1 matrix,
    min(shape) for a matrix with a flat spectrum)."""
    sigma = torch.linalg.svdvals(weight.detach().to(factor_dtype(weight)))
    total = sigma.sum()
    if total <= 0:
        return 1.0
    p = sigma / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def allocate_ranks(named_weights: Union[Mapping[str, Tensor], Iterable[tuple[str, Tensor]]],
                   mean_rank: int, min_rank: int, max_rank: int, multiple_of: int = 8) -> dict[str, int]:
    """LaMDA++ rank allocation **[ours: the formula is not published]**.

    Each layer's score is the effective rank of its weight (`effective_rank`). Ranks are
    proportional to the scores, scaled to the budget `mean_rank * n_layers`, rounded to a
    multiple of `multiple_of` (kernel friendly), clipped to [min_rank, max_rank] rounded inward
    to multiples, and never above the weight's min(shape).
    """
    items = list(named_weights.items() if isinstance(named_weights, Mapping) else named_weights)
    if not items:
        raise ValueError("named_weights is empty")
    for name, value in (("mean_rank", mean_rank), ("min_rank", min_rank), ("max_rank", max_rank),
                        ("multiple_of", multiple_of)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not min_rank <= mean_rank <= max_rank:
        raise ValueError(f"need min_rank <= mean_rank <= max_rank, got {min_rank}, {mean_rank}, {max_rank}")
    low = math.ceil(min_rank / multiple_of) * multiple_of
    high = (max_rank // multiple_of) * multiple_of
    if low > high:
        raise ValueError(f"no multiple of {multiple_of} lies in [min_rank, max_rank] = [{min_rank}, {max_rank}]")
    for name, weight in items:
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight {name!r} must be a 2-D tensor, got "
                             f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    scores = {name: effective_rank(weight) for name, weight in items}
    budget = mean_rank * len(items)
    total = sum(scores.values())
    ranks = {}
    for name, weight in items:
        raw = budget * scores[name] / total
        rank = min(max(round(raw / multiple_of) * multiple_of, low), high)
        ranks[name] = min(rank, min(weight.shape))
    return ranks
