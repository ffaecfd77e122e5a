"""The adapter modules and LaMDA's B-freeze schedule under data parallelism: `DDP(model)` with
default arguments and FSDP2 (`fully_shard` on each adapter layer and the root), on 2 gloo ranks
on CPU (the Triton kernels under the interpreter, as in the parent process).

Each rank trains on its half of a fixed batch with a mean loss, so the gradient the wrapper
averages (DDP) or reduce-scatters (FSDP2) is the single-process gradient on the concatenated
batch. After training, every parameter must equal, to fp32 rounding, that of one process
trained on the whole batch (computed once here, in the test process), and under DDP the ranks
must agree bit for bit. With the schedule, each B must stay bit-identical from its last
scheduled update on, its partly frozen columns bit-identical from the step they freeze, and
once frozen its gradient must be gone before the optimizer steps.

HydraLoRA's balance loss is a product of two batch means, so a rank's loss on half the batch
is not a share of the loss on the whole batch: the single-process reference for it runs the
batch as the same two halves (two forwards, the mean of their losses, one backward), which is
the objective the ranks optimise together.

One spawn per wrapper walks every scenario (process start-up dominates on busy cores); the
default group gets a short timeout and `_spawn` kills workers past an outer deadline, so a
hang fails within a minute or two instead of stalling the suite.
"""
import faulthandler
import gc
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adapterops import FusedHydraLoRALinear, FusedLaMDALinear, FusedLoRALinear
from adapterops.hydra import collect_balance_loss
from adapterops.lamda import BFreezeSchedule
from utils import join_or_kill

# Spawns processes: slow, so not in `make quick` (pyproject.toml's `slow` marker).
pytestmark = pytest.mark.slow

WORLD = 2
BATCH, IN_FEATURES, OUT_FEATURES = 8, 16, 7   # 7 outputs: FSDP2 shards B's rows 4 / 3
STEPS = 6
# eta * T = 4: the rank-8 B has 0, 2, 4, 6, 8 columns frozen after steps 0..4 (the rank-4 B
# 0..4), so steps 2-4 freeze it partly, step 4 is its last update, steps 5 and 6 run frozen.
TOTAL_STEPS, ETA = 10, 0.4
LAST_B_UPDATE = 4
LR = 0.02
# fp32 rounding only: the largest difference measured here is 3.4e-8, 12% of these tolerances
# (the halves' gradients are summed in another order than the whole batch's).
RTOL, ATOL = 2e-6, 2e-7
GROUP_TIMEOUT_S = 60   # also the rendezvous: process start-up is slow on busy cores
KINDS = ("lamda", "lora", "hydra")


def make_model(kind: str) -> nn.Sequential:
    torch.manual_seed(1234)
    if kind == "lamda":
        return nn.Sequential(FusedLaMDALinear(IN_FEATURES, 12, 8, 16.0, init="svd"), nn.ReLU(),
                             FusedLaMDALinear(12, OUT_FEATURES, 4, 8.0, init="svd"))
    if kind == "lora":
        return nn.Sequential(FusedLoRALinear(IN_FEATURES, 12, 4, 8.0, init="pissa"), nn.ReLU(),
                             FusedLoRALinear(12, OUT_FEATURES, 2, 4.0))
    return nn.Sequential(FusedHydraLoRALinear(IN_FEATURES, 12, 4, 3, 8.0, balance_loss_weight=0.01), nn.ReLU(),
                         FusedHydraLoRALinear(12, OUT_FEATURES, 2, 3, 4.0, balance_loss_weight=0.01))


def make_batch():
    gen = torch.Generator().manual_seed(99)
    return torch.randn(BATCH, IN_FEATURES, generator=gen), torch.randn(BATCH, OUT_FEATURES, generator=gen)


def halves(x, y):
    half = BATCH // WORLD
    return [(x[k * half:(k + 1) * half], y[k * half:(k + 1) * half]) for k in range(WORLD)]


def full(tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def train(model: nn.Module, kind: str, batches, where: str) -> dict[str, torch.Tensor]:
    """STEPS Adam steps, each on the mean of the losses of `batches` (one backward); for LaMDA
    with the B-freeze schedule, checked step by step. Returns the final parameters by name."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    schedule = BFreezeSchedule(model, TOTAL_STEPS, ETA, optimizer=opt) if kind == "lamda" else None
    layers = schedule.layers if schedule else []
    history = [[full(layer.lora_B) for layer in layers]]   # B after each optimizer step
    for t in range(1, STEPS + 1):
        opt.zero_grad()
        loss = 0
        for x, y in batches:
            loss = loss + (model(x) - y).square().mean()
            if kind == "hydra":
                balance = collect_balance_loss(model)
                assert balance.requires_grad and balance > 0, f"{where}: step {t}: balance loss {balance}"
                loss = loss + balance
        (loss / len(batches)).backward()
        if schedule is None:
            opt.step()
            continue
        schedule.step()
        for index, layer in enumerate(layers):
            rank = layer.lora_B.shape[1]
            frozen = schedule.frozen_columns(rank, t - 1)
            assert layer.lora_B.requires_grad, f"{where}: step {t}: layer {index}'s B stopped requiring grad"
            assert layer.lora_B_frozen == (t >= LAST_B_UPDATE), f"{where}: step {t}: layer {index} lora_B_frozen"
            if t > LAST_B_UPDATE:
                assert layer.lora_B.grad is None, f"{where}: step {t}: frozen B of layer {index} kept a gradient"
            else:
                grad = full(layer.lora_B.grad)
                assert torch.count_nonzero(grad[:, :frozen]) == 0, \
                    f"{where}: step {t}: layer {index}'s gradient is not zero on its {frozen} frozen columns"
                assert torch.count_nonzero(grad[:, frozen:]) > 0, f"{where}: step {t}: layer {index} no gradient"
            assert layer.lora_S.grad is not None and torch.count_nonzero(full(layer.lora_S.grad)) > 0, \
                f"{where}: step {t}: layer {index}'s S got no gradient"
        opt.step()
        history.append([full(layer.lora_B) for layer in layers])
    for index, layer in enumerate(layers):
        rank = layer.lora_B.shape[1]
        B = [h[index] for h in history]
        assert not torch.equal(B[LAST_B_UPDATE], B[LAST_B_UPDATE - 1]), \
            f"{where}: layer {index}'s B was not updated at step {LAST_B_UPDATE}, its last scheduled update"
        for t in range(LAST_B_UPDATE + 1, STEPS + 1):
            assert torch.equal(B[t], B[LAST_B_UPDATE]), f"{where}: layer {index}'s frozen B moved at step {t}"
        for t in range(2, LAST_B_UPDATE + 1):
            frozen = schedule.frozen_columns(rank, t - 1)
            assert torch.equal(B[t][:, :frozen], B[t - 1][:, :frozen]), \
                f"{where}: layer {index}'s {frozen} frozen columns moved at step {t}"
            assert not torch.equal(B[t][:, frozen:], B[t - 1][:, frozen:]), \
                f"{where}: layer {index}'s trainable columns did not move at step {t}"
    return {name.removeprefix("module."): full(p) for name, p in model.named_parameters()}


def reference(kind: str) -> dict[str, torch.Tensor]:
    """One process, the whole batch (as two halves for HydraLoRA's balance loss)."""
    x, y = make_batch()
    return train(make_model(kind), kind, halves(x, y) if kind == "hydra" else [(x, y)], f"{kind}, one process")


def assert_matches_reference(where: str, got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), f"{where}: parameters {sorted(got)} vs {sorted(want)}"
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{where}: {name} differs from one process: {m}")


def assert_ranks_identical(where: str, params: dict) -> None:
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other in range(1, len(gathered)):
        if not torch.equal(gathered[0], gathered[other]):
            start = 0
            for name, p in params.items():
                chunk = slice(start, start + p.numel())
                start += p.numel()
                assert torch.equal(gathered[0][chunk], gathered[other][chunk]), \
                    f"{where}: {name} differs between rank 0 and rank {other}"


def ddp_run(rank: int, world: int, references: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    x, y = make_batch()
    for kind in KINDS:
        where = f"DDP, {kind}"
        params = train(DDP(make_model(kind)), kind, [halves(x, y)[rank]], where)
        assert_ranks_identical(where, params)
        assert_matches_reference(where, params, references[kind])
    # Adapter dropout, fused: each rank draws its masks from its own generator (seeded apart
    # here, as ranks' data loaders are), so no one-process reference draws the same masks;
    # the averaged gradients keep the ranks' weights bit-identical, and training moves them.
    torch.manual_seed(1234)
    model = nn.Sequential(FusedLoRALinear(IN_FEATURES, 12, 4, 8.0, dropout=0.2), nn.ReLU(),
                          FusedLaMDALinear(12, OUT_FEATURES, 2, 4.0, dropout=0.2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(rank)
    params = train(DDP(model), "lora", [halves(x, y)[rank]], "DDP, dropout")
    assert_ranks_identical("DDP, dropout", params)
    assert all(not torch.equal(params[name], before[name]) for name in ("0.lora_A", "2.lora_S"))


def fsdp2_run(rank: int, world: int, references: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    x, y = make_batch()
    for kind in KINDS:
        where = f"FSDP2, {kind}"
        model = make_model(kind)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        B = model[2].lora_B if kind != "hydra" else None
        if B is not None:  # the case the schedule's DTensor path is written for
            assert isinstance(B, DTensor) and B.placements == (Shard(0),), f"{where}: B is {B!r}"
        # Every parameter is sharded: its full tensor is the same on every rank by construction,
        # so only the comparison with one process says something here.
        assert_matches_reference(where, train(model, kind, [halves(x, y)[rank]], where), references[kind])

    # The schedule on DTensors of other placements: Replicate works (the local tensor is the
    # whole B); a shard of B's columns cannot be zeroed locally and is refused by name.
    for placement, error in ((Replicate(), None), (Shard(1), "Shard(dim=1)")):
        torch.manual_seed(0)
        layer = FusedLaMDALinear(IN_FEATURES, 12, 8, 16.0, init="svd")
        layer.lora_B = nn.Parameter(distribute_tensor(layer.lora_B.detach(), mesh, [placement]))
        layer.lora_B.grad = distribute_tensor(torch.ones(12, 8), mesh, [placement])
        schedule = BFreezeSchedule(nn.Sequential(layer), TOTAL_STEPS, ETA)
        schedule.step_count = 1  # 2 of 8 columns frozen
        if error is None:
            schedule.step()
            grad = full(layer.lora_B.grad)
            assert torch.count_nonzero(grad[:, :2]) == 0 and torch.equal(grad[:, 2:], torch.ones(12, 6)), \
                f"Replicate: gradient {grad}"
            continue
        with pytest.raises(ValueError) as info:
            schedule.step()
        for piece in ("0.lora_B's gradient", error, "shard dim 0"):
            assert piece in str(info.value), f"{piece!r} not in {info.value}"


def _worker(rank: int, world: int, init_file: str, scenario, references_file: str) -> None:
    # A crash in C++ (an abort) leaves no Python traceback otherwise.
    faulthandler.enable(all_threads=True)
    if not torch.cuda.is_available():
        # conftest sets it in the test process; spawned workers inherit the environment.
        assert os.environ.get("TRITON_INTERPRET") == "1", "the worker does not run Triton's interpreter"
    # The ops return their own output for 2-D inputs, not a view of it: FSDP2 warns on views
    # (and skips its pre-backward hook for them), so here its warning is an error.
    warnings.filterwarnings("error", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        scenario(rank, world, torch.load(references_file))
        gc.collect()  # the wrappers (and their hooks on the group) go before the group does
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, scenario, references_file: str, guard_s: float = 120) -> None:
    """Runs scenario(rank, world, references) on WORLD gloo ranks, the references loaded from
    a file (not shared memory); a worker's exception fails the test with its traceback; workers
    still alive after guard_s seconds are killed."""
    context = mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), scenario, references_file),
                       nprocs=WORLD, join=False)
    join_or_kill(context, guard_s, f"{scenario.__name__} on {WORLD} ranks")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> str:
    """The one-process results of every kind, computed once, in a file for the workers."""
    path = tmp_path_factory.mktemp("references") / "references.pt"
    torch.save({kind: reference(kind) for kind in KINDS}, path)
    return str(path)


def test_ddp_default_arguments_matches_one_process(tmp_path, references):
    _spawn(tmp_path, ddp_run, references)


def test_fsdp2_fully_shard_matches_one_process(tmp_path, references):
    _spawn(tmp_path, fsdp2_run, references)
