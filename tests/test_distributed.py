"""adapterops.distributed: HD-PiSSA's delta exchange and the weight consistency check
(methods.md §4), on gloo across spawned CPU processes.

Each spawned run rendezvouses through a file in tmp_path, then runs its scenarios on a group
created with a short timeout, so a bug fails within seconds instead of hanging; `_spawn` also
kills the workers past an outer deadline. Starting processes dominates the time (a few seconds
per run on two busy cores), so one run per world size walks several scenarios in order, each
assertion naming its scenario.
"""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adapterops.distributed import aggregate_lowrank_deltas, check_consistency
from utils import join_or_kill

# Spawns processes: slow, so not in `make quick` (pyproject.toml's `slow` marker).
pytestmark = pytest.mark.slow

# (r, in, out) per layer: rank 1, odd sizes, and layer 1 larger than TINY_BUCKET_MB.
SHAPES = [(1, 5, 3), (4, 24, 16), (2, 7, 9), (2, 1, 11), (1, 3, 2)]
# r (in + out) per layer: 8, 160, 32, 24, 5; 229 elements in all.
TOTAL = 229
TINY_BUCKET_MB = 64 * 4 / 2 ** 20  # 64 fp32 elements
# The layout rule: whole layers, packed greedily in order; a layer larger than a bucket travels
# alone. 8 | 160 (alone) | 32 + 24 + 5 = 61.
TINY_BUCKETS = [8, 160, 61]
GROUP_TIMEOUT_S = 10
FAULT_TIMEOUT_S = 3
# torch 2.13 renamed all_gather_into_tensor to all_gather_single; the library calls whichever
# this torch has, the recorder counts both as one kind of collective.
GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "all_gather", "all_reduce", "broadcast",
               "all_gather_object")


def make_deltas(rank: int, shapes=SHAPES):
    """Rank `rank`'s deltas, reproducible on every rank; delta_B is a transposed view
    (non-contiguous)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(r, i, generator=gen), torch.randn(r, o, generator=gen).t()) for r, i, o in shapes]


class Recorder:
    """Wraps torch.distributed's collectives and records (name, dtype, input numel, output
    numel) of every call; `raising=True` makes any call fail the test instead."""

    def __init__(self, raising: bool = False):
        self.calls, self.raising = [], raising

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            if self.raising:
                raise AssertionError(f"{name} was called: a bad input reached a collective")
            out = args[0]
            inp = args[1] if name in ("all_gather_into_tensor", "all_gather_single") else out
            kind = "all_gather_into_tensor" if name == "all_gather_single" else name
            self.calls.append((kind, inp.dtype, inp.numel(), out.numel()))
            return fn(*args, **kwargs)
        return recorded

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def assert_gathered(where: str, results, world: int, shapes=SHAPES):
    """results hold every rank's make_deltas, bit for bit, in rank order."""
    expected = [make_deltas(k, shapes) for k in range(world)]
    assert len(results) == len(shapes), f"{where}: {len(results)} layers returned, expected {len(shapes)}"
    for index, (delta_A, delta_B) in enumerate(results):
        r, i, o = shapes[index]
        assert delta_A.shape == (world, r, i) and delta_B.shape == (world, o, r), \
            f"{where}: layer {index} shapes {tuple(delta_A.shape)}, {tuple(delta_B.shape)}"
        for k in range(world):
            for name, got, want in (("delta_A", delta_A[k], expected[k][index][0]),
                                    ("delta_B", delta_B[k], expected[k][index][1])):
                assert torch.equal(got, want), (f"{where}: layer {index} {name} of rank {k} differs, "
                                                f"max abs diff {(got - want).abs().max().item():.3e}")


def assert_exchange(where: str, calls, world: int, buckets: list[int]):
    """One layout check (3 int64 per rank), then one all_gather_into_tensor per bucket of the
    given element counts; nothing else. Only the deltas travel."""
    assert calls[0] == ("all_gather_into_tensor", torch.int64, 3, 3 * world), f"{where}: layout check {calls[0]}"
    expected = [("all_gather_into_tensor", torch.float32, n, world * n) for n in buckets]
    assert calls[1:] == expected, f"{where}: bucket collectives {calls[1:]}, expected {expected}"
    sent = sum(n * torch.float32.itemsize for _, _, n, _ in calls[1:])
    assert sent == TOTAL * 4, f"{where}: {sent} bytes handed to the bucket collectives, expected {TOTAL * 4}"


class Checked(nn.Module):
    """A layer exposing its tensors to check_consistency, as HDPiSSALinear does."""

    def __init__(self, n: int, gen: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n, generator=gen))
        self.bias = nn.Parameter(torch.randn(n, generator=gen))
        self.register_buffer("master", torch.randn(n, n + 1, generator=gen).bfloat16())

    def consistency_tensors(self):
        return {"weight": self.weight, "bias": self.bias, "master": self.master}


def make_model(extra: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    blocks = [nn.ModuleDict({"proj": Checked(n, gen), "plain": nn.Linear(2, 2)}) for n in (3, 4, 5)]
    if extra:
        blocks.append(nn.ModuleDict({"proj": Checked(2, gen)}))
    return nn.ModuleDict({"layers": nn.ModuleList(blocks)})


def expect_error(where: str, error, pieces, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except error as exc:
        for piece in pieces:
            assert piece in str(exc), f"{where}: {piece!r} not in the message: {exc}"
        return exc
    raise AssertionError(f"{where}: no {error.__name__} raised")


def healthy_run(rank: int, world: int, group) -> None:
    with Recorder() as rec:
        results = aggregate_lowrank_deltas(make_deltas(rank), group=group, bucket_mb=TINY_BUCKET_MB)
        assert_gathered("tiny buckets", results, world)
        assert_exchange("tiny buckets", rec.take(), world, TINY_BUCKETS)

        bad = [(3 if layer == 1 and rank == 1 else r, i, o) for layer, (r, i, o) in enumerate(SHAPES)]
        expect_error("rank 1 passes r=3", ValueError,
                     ["layer 1 is (r=4, in=24, out=16) on rank 0 but (r=3, in=24, out=16) on rank 1"],
                     aggregate_lowrank_deltas, make_deltas(rank, bad), group=group)
        short = SHAPES[:-1] if rank == world - 1 else SHAPES
        expect_error("last rank passes a layer fewer", ValueError, [f"layer 4 is (r=1, in=3, out=2) on rank 0 "
                                                                     f"but absent on rank {world - 1}"],
                     aggregate_lowrank_deltas, make_deltas(rank, short), group=group)
        calls = rec.take()
        assert all(dtype == torch.int64 for _, dtype, _, _ in calls), f"mismatch: deltas were sent: {calls}"

        results = aggregate_lowrank_deltas(make_deltas(rank), group=group)
        assert_gathered("default bucket, after the mismatches", results, world)
        assert_exchange("default bucket", rec.take(), world, [TOTAL])

        check_consistency(make_model(), group=group)
        calls = rec.take()
        assert [c[0] for c in calls] == ["all_reduce"] * 2, f"check_consistency ran {calls}"

        model = make_model()
        if rank == world - 1:  # one bf16 ulp
            master = model.layers[1].proj.master
            master[2, 3] = torch.nextafter(master[2, 3], torch.tensor(1e9, dtype=torch.bfloat16))
        expect_error("bf16 ulp", RuntimeError, ["ranks disagree on layers.1.proj master (values)"],
                     check_consistency, model, group=group)
        model = make_model()
        if rank == world - 1:  # same values, other places: the plain sum cannot see it
            with torch.no_grad():
                model.layers[2].proj.weight.copy_(model.layers[2].proj.weight.t().clone())
        expect_error("transposed weight", RuntimeError, ["ranks disagree on layers.2.proj weight (values)"],
                     check_consistency, model, group=group)
        model = make_model()
        if rank == world - 1:  # +1, -2, +1 on three neighbours' bits: Σ v and Σ (j + 1) v keep
            bits = model.layers[2].proj.weight.data.view(-1).view(torch.int32)
            bits[4:7] += torch.tensor([1, -2, 1], dtype=torch.int32)
        expect_error("crafted +1 -2 +1", RuntimeError, ["ranks disagree on layers.2.proj weight (values)"],
                     check_consistency, model, group=group)
        model = make_model()
        if rank == 0:
            model.layers[0].proj.bias.data = model.layers[0].proj.bias.data.double()
        expect_error("a float64 bias", RuntimeError, ["ranks disagree on layers.0.proj bias (shape or dtype)"],
                     check_consistency, model, group=group)
        expect_error("an extra layer", RuntimeError, ["ranks disagree on which tensors"],
                     check_consistency, make_model(extra=rank == 0), group=group)


def dead_peer_run(rank: int, world: int, group) -> None:
    """Rank 1 dies once the layout check is done, when the bucket exchange starts."""
    if rank == 1:
        gather = getattr(dist, GATHER)

        def die_on_second_call(*args, **kwargs):
            if die_on_second_call.calls:
                os._exit(0)
            die_on_second_call.calls += 1
            return gather(*args, **kwargs)

        die_on_second_call.calls = 0
        setattr(dist, GATHER, die_on_second_call)
        aggregate_lowrank_deltas(make_deltas(rank), group=group)
        raise AssertionError("rank 1 should have exited")
    start = time.monotonic()
    exc = expect_error("dead peer", RuntimeError,
                       ["the all-gather of bucket 1 of 1 (layers 0-4)", "rank 0 of world size 2",
                        "peer rank likely died or stalled"],
                       aggregate_lowrank_deltas, make_deltas(rank), group=group)
    assert isinstance(exc.__cause__, RuntimeError), f"dead peer: the backend's error is not chained: {exc!r}"
    elapsed = time.monotonic() - start
    assert elapsed < FAULT_TIMEOUT_S + 3, f"dead peer: raised after {elapsed:.1f} s, timeout {FAULT_TIMEOUT_S} s"


def stalled_peer_run(rank: int, world: int, group) -> None:
    """Rank 1 stalls past the timeout instead of calling."""
    if rank == 1:
        time.sleep(FAULT_TIMEOUT_S + 1)
        return
    start = time.monotonic()
    expect_error("stalled peer", RuntimeError, ["the all-gather of the layout check",
                                                "rank 0 of world size 2", "died or stalled"],
                 aggregate_lowrank_deltas, make_deltas(rank), group=group)
    elapsed = time.monotonic() - start
    assert elapsed < FAULT_TIMEOUT_S + 3, f"stalled peer: raised after {elapsed:.1f} s, timeout {FAULT_TIMEOUT_S} s"


def _worker(rank: int, world: int, init_file: str, timeout_s: int, scenarios) -> None:
    torch.manual_seed(0)
    # A generous rendezvous (process start-up is slow on busy cores); each scenario gets a
    # fresh group with the short timeout.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for scenario in scenarios:
            scenario(rank, world, dist.new_group(timeout=timedelta(seconds=timeout_s)))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world: int, *scenarios, timeout_s: int = GROUP_TIMEOUT_S, guard_s: float = 90) -> None:
    """Runs each scenario(rank, world, group) in turn on `world` gloo ranks; a worker's exception
    fails the test with its traceback; workers still alive after guard_s seconds are killed."""
    context = mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), timeout_s, scenarios), nprocs=world,
                       join=False)
    join_or_kill(context, guard_s, f"{[s.__name__ for s in scenarios]} on {world} ranks")


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_and_consistency_across_ranks(tmp_path, world):
    _spawn(tmp_path, world, healthy_run)


def test_stalled_then_dead_peer_raise_within_the_timeout(tmp_path):
    # One spawn for both (process start-up is most of the cost); the dead peer comes last.
    _spawn(tmp_path, 2, stalled_peer_run, dead_peer_run, timeout_s=FAULT_TIMEOUT_S)


def test_without_process_group_nothing_travels():
    assert not dist.is_initialized(), "importing adapterops.distributed started a process group"
    assert not torch.cuda.is_initialized(), "importing adapterops.distributed initialised CUDA"
    deltas = make_deltas(0)
    with Recorder(raising=True):
        results = aggregate_lowrank_deltas(deltas, bucket_mb=TINY_BUCKET_MB)
        check_consistency(make_model())
    assert_gathered("no process group", results, 1)
    assert results[1][0].data_ptr() == deltas[1][0].data_ptr(), "no process group: the result is a copy"


@pytest.fixture
def fake_group(monkeypatch):
    """A pretend 2-rank group whose collectives fail the test: bad input must raise before any."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with Recorder(raising=True):
        yield


def _pair(r=2, i=5, o=3, **kw):
    return torch.randn(r, i, **kw), torch.randn(o, r, **kw)


@pytest.mark.parametrize("deltas, error, message", [
    (torch.randn(2, 3), TypeError, "deltas must be a sequence"),
    ((p for p in [_pair()]), TypeError, "deltas must be a sequence"),
    ([], ValueError, "deltas is empty"),
    ([_pair(), torch.randn(2, 3)], TypeError, "deltas[1] must be a (delta_A, delta_B) pair"),
    ([_pair(), (*_pair(), torch.randn(1))], TypeError, "deltas[1] must be a (delta_A, delta_B) pair"),
    ([_pair(), (torch.randn(2, 5), None)], TypeError, "layer 1: delta_B must be a Tensor, got NoneType"),
    ([(torch.randn(10), torch.randn(3, 2))], ValueError, "layer 0: delta_A must be 2-D, got shape (10,)"),
    ([_pair(), (torch.randn(2, 5), torch.randn(1, 3, 2))], ValueError, "layer 1: delta_B must be 2-D"),
    ([_pair(), (torch.randn(2, 5), torch.randn(3, 4))], ValueError,
     "layer 1: delta_A (2, 5) has rank 2 but delta_B (3, 4) has rank 4"),
    ([_pair(), _pair(dtype=torch.float64)], TypeError,
     "layer 1: dtypes torch.float64 / torch.float64 differ from layer 0 delta_A's torch.float32"),
    ([(torch.randn(2, 5), torch.randn(3, 2).bfloat16())], TypeError, "layer 0: dtypes torch.float32 / torch.bfloat16"),
    ([_pair(), _pair(device="meta")], ValueError, "layer 1: devices meta / meta differ from layer 0 delta_A's cpu"),
])
def test_bad_deltas_raise_before_any_collective(fake_group, deltas, error, message):
    with pytest.raises(error) as info:
        aggregate_lowrank_deltas(deltas)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("bucket_mb, error", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                              (float("inf"), ValueError), ("64", TypeError), (True, TypeError)])
def test_bad_bucket_mb_raises_before_any_collective(fake_group, bucket_mb, error):
    with pytest.raises(error, match="bucket_mb"):
        aggregate_lowrank_deltas([_pair()], bucket_mb=bucket_mb)


def test_check_consistency_bad_models(fake_group):
    with pytest.raises(ValueError, match=r"no module exposes consistency_tensors\(\)"):
        check_consistency(nn.Sequential(nn.Linear(2, 2)))
    broken = make_model()
    broken.layers[1].proj.consistency_tensors = lambda: [torch.zeros(1)]
    with pytest.raises(TypeError, match=r"layers.1.proj.consistency_tensors\(\) must return a dict"):
        check_consistency(broken)
    broken.layers[1].proj.consistency_tensors = lambda: {"weight": 1.0}
    with pytest.raises(TypeError, match=r"layers.1.proj.consistency_tensors\(\)\['weight'\] must be a Tensor"):
        check_consistency(broken)
