"""HD-PiSSA's exchange between ranks (methods.md §4) on torch.distributed, and a check that the
ranks still hold identical weights.

Every optimizer step, rank k of K has its Adam steps (δA_k, δB_k) for each adapted layer, and
every rank must apply the same update

    W <- W - s * Σ_k [ δB_k (A_k - δA_k) + B_k δA_k ]

The factors A_k, B_k are fixed (each rank can rebuild every rank's slice of the original W), so
only the steps travel: r (in + out) numbers per layer per rank per step.
`aggregate_lowrank_deltas` gathers them, `check_consistency` compares a checksum of every rank's
weights.

Collectives run on the device of the tensors passed in: CUDA tensors with NCCL, CPU tensors
with gloo. Both functions run no collective without an initialised process group or with a
group of one rank, so one process (or virtual ranks simulated in one process) needs no set-up.

This module is a method utility: it imports torch only, no module class (layers take part in
`check_consistency` by duck typing), and importing it starts no process group and no CUDA.
"""
import hashlib
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["aggregate_lowrank_deltas", "check_consistency", "raise_together", "world_and_rank"]

# Integer dtype of each element size: checksums read a tensor's bytes as integers of the same
# width, so they are exact for every floating dtype (bf16 and fp16 included) and never round.
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Elements per checksum chunk: bounds the int64 temporaries (the chunk, its position weights
# and the steps computing them, their product) to a few times 32 MiB whatever the size of the
# tensor checked.
_CHECKSUM_CHUNK = 1 << 22


def aggregate_lowrank_deltas(deltas, *, group=None, bucket_mb: float = 64.0) -> list[tuple[Tensor, Tensor]]:
    """Gathers every rank's low-rank steps for every layer.

    deltas: a non-empty sequence of one `(delta_A, delta_B)` per adapted layer, in the same
        layer order on every rank: this rank's Adam steps, delta_A (r_i, in_i) and delta_B
        (out_i, r_i). One dtype and one device for all (fp32 normally; CUDA with NCCL, CPU with
        gloo); shapes may differ between layers but must be the same on every rank. Inputs are
        validated (TypeError / ValueError naming the layer) before any collective.
    group: the process group (default: the default group). Index k of the result is the rank
        of index k in this group.
    bucket_mb: the most MiB one collective carries, positive and finite (see the layout below).

    Returns, per layer, `(delta_A_all, delta_B_all)` of shapes (K, r_i, in_i) and
    (K, out_i, r_i): index k is rank k's step. They are views into the gathered buffers (not
    contiguous along K); read them, do not keep them across steps if memory matters. Without an
    initialised process group, or with a group of one rank, they are the inputs with a leading
    dimension of 1 (views, no copy) and no collective runs.

    Layout: layers are packed in order, each as delta_A then delta_B flattened, into flat
    buffers; a new buffer starts when the next layer would take the current one past bucket_mb
    MiB. A layer is never split, so its results are plain views of one buffer; hence a buffer
    exceeds bucket_mb only when it holds a single layer larger than bucket_mb. Each buffer is
    exchanged with ONE all-gather into a single tensor (`all_gather_into_tensor`, named
    `all_gather_single` from torch 2.13 on); the published code runs four all-gathers per layer,
    A and B included.

    Bytes per step: each rank hands Σ_i r_i (in_i + out_i) x element size bytes to the
    collectives and receives K times that (its own part included). Before them, one tiny
    all-gather of 3 int64 per rank (layer count, element count, a hash of the shapes and dtype)
    checks that every rank passes the same layout: mismatched buffer sizes would otherwise hang
    or corrupt the exchange, which is what layers converted with different world sizes or ranks
    produce. It costs one small collective and, on CUDA, one host sync per call. A mismatch
    raises a ValueError on every rank naming the first differing layer (one more tiny
    all-gather, on that error path only).

    Faults: every collective is bounded by the process group's timeout
    (`init_process_group(timeout=...)`). With gloo a dead or stalled peer makes the collective
    raise, re-raised here as a RuntimeError naming the collective, this rank and the world size.
    NCCL collectives return before they complete: a stalled peer is caught by NCCL's watchdog,
    which by default tears the process down after the timeout; set TORCH_NCCL_BLOCKING_WAIT=1
    to get the error raised here instead.
    """
    layers = _check_deltas(deltas)
    if not isinstance(bucket_mb, (int, float)) or isinstance(bucket_mb, bool):
        raise TypeError(f"bucket_mb must be a number, got {type(bucket_mb).__name__}")
    if not (math.isfinite(bucket_mb) and bucket_mb > 0):
        raise ValueError(f"bucket_mb must be a positive finite number, got {bucket_mb!r}")
    world, rank = world_and_rank(group)
    if world == 1:
        return [(a.detach().unsqueeze(0), b.detach().unsqueeze(0)) for a, b in layers]

    shapes = [(a.shape[0], a.shape[1], b.shape[0]) for a, b in layers]  # (r, in, out)
    ref = layers[0][0]
    _check_same_layout(shapes, ref.dtype, ref.device, group, rank, world)

    element_size = ref.element_size()
    capacity = max(1, int(bucket_mb * 2 ** 20) // element_size)
    buckets = _plan_buckets([r * (i + o) for r, i, o in shapes], capacity)
    results = []
    for b, (first, last) in enumerate(buckets):
        parts = [t.detach().reshape(-1) for pair in layers[first:last] for t in pair]
        send = torch.cat(parts)
        gathered = torch.empty(world * send.numel(), dtype=send.dtype, device=send.device)
        if send.numel():
            what = (f"aggregate_lowrank_deltas: the all-gather of bucket {b + 1} of {len(buckets)} "
                    f"(layers {first}-{last - 1})")
            _run_collective(what, rank, world, _all_gather(), gathered, send, group=group)
        per_rank = gathered.view(world, send.numel())
        offset = 0
        for r, i, o in shapes[first:last]:
            delta_A = per_rank[:, offset:offset + r * i].unflatten(1, (r, i))
            offset += r * i
            delta_B = per_rank[:, offset:offset + o * r].unflatten(1, (o, r))
            offset += o * r
            results.append((delta_A, delta_B))
    return results


def check_consistency(model: nn.Module, group=None) -> None:
    """Raises if the ranks do not hold bit-identical tensors (HD-PiSSA keeps every rank's W
    identical after every step; a rank that drifts trains a different model unnoticed).

    A module takes part when it has a method `consistency_tensors()` returning a dict
    name -> Tensor (an HD-PiSSA layer returns its weight, bias and fp32 master weight). Each
    tensor's checksum is exact: its bytes read as integers of the same width, summed plain and
    weighted by odd pseudo-random weights of the position (the weighted sum catches permuted
    or transposed data, and differences crafted to cancel in a patterned sum) in int64 with
    wrap-around (integer addition is associative, so the order of the reduction does not
    matter), plus a hash of its shape and dtype.

    Two collectives in all, whatever the number of layers: an all-reduce of a hash of the
    participating (module, tensor) names, so the second one cannot meet vectors of different
    lengths, then one of the checksums. Each all-reduce takes MAX over [v, ~v], i.e. the max and
    (bitwise-negated) min of v at once. A mismatch raises a RuntimeError on every rank naming the
    module and tensor. Without a process group or with one rank it returns after the local
    checks, running no collective.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    entries = []  # ("module.path tensor_name", tensor)
    for qualname, module in model.named_modules():
        method = getattr(module, "consistency_tensors", None)
        if not callable(method):
            continue
        owner = qualname or "the model"
        tensors = method()
        if not isinstance(tensors, dict):
            raise TypeError(f"{owner}.consistency_tensors() must return a dict name -> Tensor, "
                            f"got {type(tensors).__name__}")
        for name, tensor in tensors.items():
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{owner}.consistency_tensors()[{name!r}] must be a Tensor, "
                                f"got {type(tensor).__name__}")
            if tensor.element_size() not in _INT_OF_SIZE:
                raise TypeError(f"{owner} {name}: cannot checksum dtype {tensor.dtype}")
            entries.append((f"{owner} {name}", tensor))
    if not entries:
        raise ValueError("check_consistency: no module exposes consistency_tensors()")
    world, rank = world_and_rank(group)
    if world == 1:
        return
    device = entries[0][1].device

    names = [label for label, _ in entries]
    header = torch.tensor([len(entries), _digest(names)], dtype=torch.int64, device=device)
    low, high = _all_reduce_min_max(header, "the names", rank, world, group)
    if not torch.equal(low, high):
        raise RuntimeError(f"check_consistency: ranks disagree on which tensors to check (this rank, "
                           f"{rank} of {world}, has {len(entries)}: {_describe(names)}); the modules, "
                           f"tensor names or their order differ between ranks")

    sums = torch.stack([s.to(device) for _, t in entries for s in _checksum(t)])
    low, high = _all_reduce_min_max(sums, "the checksums", rank, world, group)
    differs = (low != high).view(len(entries), 3).tolist()  # per tensor: shape/dtype, sum, weighted sum
    bad = [(label, d) for (label, _), d in zip(entries, differs) if any(d)]
    if bad:
        first, d = bad[0]
        more = f"; {len(bad) - 1} more differ: {_describe([b for b, _ in bad[1:]])}" if len(bad) > 1 else ""
        raise RuntimeError(f"check_consistency: ranks disagree on {first} "
                           f"({'shape or dtype' if d[0] else 'values'}){more}; seen on rank {rank} of {world}")


def _check_deltas(deltas) -> list[tuple[Tensor, Tensor]]:
    if not isinstance(deltas, Sequence):
        raise TypeError(f"deltas must be a sequence of (delta_A, delta_B) pairs, got {type(deltas).__name__}")
    if not deltas:
        raise ValueError("deltas is empty: pass one (delta_A, delta_B) pair per adapted layer")
    layers = []
    for index, pair in enumerate(deltas):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"deltas[{index}] must be a (delta_A, delta_B) pair, got {type(pair).__name__}"
                            + (f" of length {len(pair)}" if isinstance(pair, Sequence) else ""))
        delta_A, delta_B = pair
        for name, t in (("delta_A", delta_A), ("delta_B", delta_B)):
            if not isinstance(t, Tensor):
                raise TypeError(f"layer {index}: {name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"layer {index}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if delta_A.shape[0] != delta_B.shape[1]:
            raise ValueError(f"layer {index}: delta_A {tuple(delta_A.shape)} has rank {delta_A.shape[0]} but "
                             f"delta_B {tuple(delta_B.shape)} has rank {delta_B.shape[1]}")
        ref_name, ref = ("layer 0 delta_A", layers[0][0]) if layers else ("delta_A", delta_A)
        if delta_B.dtype != ref.dtype or delta_A.dtype != ref.dtype:
            raise TypeError(f"layer {index}: dtypes {delta_A.dtype} / {delta_B.dtype} differ from "
                            f"{ref_name}'s {ref.dtype}; every delta must share one dtype")
        if delta_B.device != ref.device or delta_A.device != ref.device:
            raise ValueError(f"layer {index}: devices {delta_A.device} / {delta_B.device} differ from "
                             f"{ref_name}'s {ref.device}; every delta must be on one device")
        layers.append((delta_A, delta_B))
    return layers


def raise_together(problem: Optional[str], *, group=None, device=None,
                   error: type = RuntimeError) -> None:
    """Collective: raises `error` on EVERY rank when any rank passes a `problem` (None: all is
    well).

    An error found on one rank before a collective (a missing gradient, a mismatched setting)
    would otherwise leave its peers waiting in that collective until the process group's
    timeout, and then blaming a dead peer. Costs one all-reduce of one int64; on a problem, one
    all_gather_object of the messages, so that every rank's error names each culprit rank.
    `device`: where the flag lives (the CUDA device for NCCL; default CPU, for gloo).
    """
    world, rank = world_and_rank(group)
    if world == 1:
        if problem is not None:
            raise error(problem)
        return
    flag = torch.tensor([int(problem is not None)], dtype=torch.int64, device=device)
    _run_collective("the all-reduce of the ranks' error flags", rank, world, dist.all_reduce, flag,
                    op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return
    messages = [None] * world
    dist.all_gather_object(messages, problem, group=group)
    raise error("; ".join(f"rank {k}: {m}" for k, m in enumerate(messages) if m is not None))


def world_and_rank(group=None) -> tuple[int, int]:
    """(world size, this process's rank) in `group`; (1, 0) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group")
    return world, rank


def _plan_buckets(sizes: list[int], capacity: int) -> list[tuple[int, int]]:
    """Greedy, in order, whole layers: [first, last) layer ranges of at most `capacity` elements,
    except a single layer larger than it. A zero-sized layer joins the current bucket."""
    buckets, first, filled = [], 0, 0
    for index, size in enumerate(sizes):
        if size and filled and filled + size > capacity:
            buckets.append((first, index))
            first, filled = index, 0
        filled += size
    buckets.append((first, len(sizes)))
    return buckets


def _check_same_layout(shapes, dtype, device, group, rank: int, world: int) -> None:
    """One all-gather of (layer count, element count, hash of shapes and dtype) per rank; on a
    mismatch a second one of every rank's shapes finds the first differing layer."""
    header = torch.tensor([len(shapes), sum(r * (i + o) for r, i, o in shapes), _digest((str(dtype), shapes))],
                          dtype=torch.int64, device=device)
    headers = _all_gather_int64(header, "the layout check", rank, world, group)
    if all(h == headers[0] for h in headers):
        return
    longest = max(h[0] for h in headers)
    padded = torch.full((longest, 3), -1, dtype=torch.int64, device=device)
    padded[:len(shapes)] = torch.tensor(shapes, dtype=torch.int64, device=device)
    every = _all_gather_int64(padded.view(-1), "the layout check's shape exchange", rank, world, group)

    def layer(row):
        return "absent" if row[0] < 0 else f"(r={row[0]}, in={row[1]}, out={row[2]})"

    for index in range(longest):
        rows = [every[k][3 * index:3 * index + 3] for k in range(world)]
        for k in range(1, world):
            if rows[k] != rows[0]:
                raise ValueError(f"aggregate_lowrank_deltas: ranks pass different layouts: layer {index} is "
                                 f"{layer(rows[0])} on rank 0 but {layer(rows[k])} on rank {k} (layer "
                                 f"counts per rank: {[h[0] for h in headers]}); were the layers converted "
                                 f"with different world sizes or ranks?")
    raise ValueError(f"aggregate_lowrank_deltas: ranks pass deltas of different dtypes (this rank, "
                     f"{rank}, passes {dtype}); every rank must pass the same dtype")


def _all_gather_int64(values: Tensor, what: str, rank: int, world: int, group) -> list[list[int]]:
    out = torch.empty(world * values.numel(), dtype=torch.int64, device=values.device)
    _run_collective(f"aggregate_lowrank_deltas: the all-gather of {what}", rank, world, _all_gather(), out,
                    values, group=group)
    return out.view(world, -1).tolist()


def _all_reduce_min_max(values: Tensor, what: str, rank: int, world: int, group) -> tuple[Tensor, Tensor]:
    # ~v = -v - 1 reverses the order of int64 without overflow, so MAX over [v, ~v] yields
    # max(v) and ~min(v) in one collective.
    both = torch.cat([values, ~values])
    _run_collective(f"check_consistency: the all-reduce of {what}", rank, world, dist.all_reduce, both,
                    op=dist.ReduceOp.MAX, group=group)
    high, low = both.split(values.numel())
    return ~low, high


def _all_gather():
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (same signature; the old
    # name warns on every call); torch 2.11 and 2.12 have only the old name. Looked up per call
    # so that a wrapper installed on torch.distributed sees the calls.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _run_collective(what: str, rank: int, world: int, collective, *args, **kwargs) -> None:
    try:
        collective(*args, **kwargs)
    except RuntimeError as exc:  # DistBackendError is a RuntimeError
        raise RuntimeError(f"{what} failed on rank {rank} of world size {world}: a peer rank likely died "
                           f"or stalled past the process group's timeout (or the backend cannot serve "
                           f"{args[-1].device} tensors); original error: {exc}") from exc


def _checksum(tensor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(hash of shape and dtype, Σ v_j, Σ w_j v_j) in int64 with wrap-around (mod 2^64), v_j
    the elements read as integers of their own width and w_j odd pseudo-random weights of the
    position j (`_position_weights`, the same on every rank). Weights that follow a pattern
    can be cancelled by a difference that follows it too (with w_j = j + 1, the edit
    +1, -2, +1 of three neighbours keeps both sums); with pseudo-random ones a given
    difference goes unseen with chance about 2^-64."""
    ints = tensor.detach().reshape(-1).view(_INT_OF_SIZE[tensor.element_size()])
    plain = torch.zeros((), dtype=torch.int64, device=ints.device)
    weighted = torch.zeros((), dtype=torch.int64, device=ints.device)
    for start in range(0, ints.numel(), _CHECKSUM_CHUNK):
        chunk = ints[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        plain += chunk.sum()
        weighted += (chunk * _position_weights(start, chunk.numel(), ints.device)).sum()
    shape = torch.tensor(_digest((tuple(tensor.shape), str(tensor.dtype))), dtype=torch.int64, device=ints.device)
    return shape, plain, weighted


def _as_int64(value: int) -> int:
    """A 64-bit pattern as the signed int torch's int64 arithmetic takes."""
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64's constants (Steele, Lea and Flood, 2014): a bijective mix of 64-bit integers.
_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                0x94D049BB133111EB))


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _position_weights(start: int, count: int, device) -> Tensor:
    """Odd pseudo-random int64 weights of positions start .. start + count - 1: SplitMix64 of
    (position + 1), lowest bit set (an odd weight keeps every bit of a difference visible
    mod 2^64). Products wrap around mod 2^64, as the checksum's sums do."""
    z = torch.arange(start + 1, start + 1 + count, dtype=torch.int64, device=device) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return (z ^ _shift_right(z, 31)) | 1


def _digest(value) -> int:
    """A signed 64-bit hash of value's repr, the same in every process (Python's hash() of a
    str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def _describe(names, most: int = 5) -> str:
    shown = ", ".join(str(n) for n in names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")
