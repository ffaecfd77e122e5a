"""HydraLoRA utilities (methods.md §3): the optional Switch-style balance loss over the router's
probabilities, its collection from a model's layers, and the k-means step that picks the number
of B heads.

HydraLoRA layers are recognised by duck typing (a module with a `last_balance_loss`
attribute), so this module imports no module class (imports point down; the module imports
`balance_loss` from here).
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .ops.checks import check_top_k


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def balance_loss(probs: Tensor, top_k: Optional[int] = None) -> Tensor:
    """Switch-style load-balancing loss over router probabilities (off by default: methods.md
    §3 lists it as optional, and the released HydraLoRA LLM code returns a constant 0).

        loss = E * Σ_e f_e P_e

    probs: (..., E) per-token softmax probabilities of the router, the full softmax before any
    top-k masking (fp32 as `routed_lowrank_linear(..., return_router_probs=True)` returns
    them), flattened to (M, E). Each token is assigned to its k most probable heads (k = top_k,
    or 1 for dense routing: Switch Transformer's argmax; Mixtral's top-k generalisation
    otherwise), and

        f_e = #{(token, slot) assigned to head e} / (M k)      the fraction routed to e (Σ f = 1)
        P_e = (1 / M) Σ_t probs[t, e]                           the mean probability of e

    - **[ours]** f is normalised by M k (the number of assignments), so Σ_e f_e = 1 for every
      k and a balanced router scores 1 whatever k is; with uniform P the loss is exactly 1.
    - **[ours]** Ties go to the lower head index: heads are ranked by a stable descending sort
      of probs in the input's dtype (the rule `top_k_gates` uses for the gates themselves).
    - f is a count and carries no gradient; the gradient flows through P only:
      d loss / d probs[t, e] = E f_e / M.

    Computed in fp32 whatever probs' dtype (bf16 and fp16 are upcast; float64 is rounded to
    fp32). Returns a 0-dim fp32 tensor on probs' device.
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.dim() < 1 or probs.shape[-1] == 0 or probs.numel() == 0:
        raise ValueError(f"probs must be (..., E) with E >= 1 heads and at least one token, "
                         f"got shape {tuple(probs.shape)}")
    num_heads = probs.shape[-1]
    top_k = check_top_k(top_k, num_heads, "probs.shape[-1]")
    k = 1 if top_k is None else top_k
    flat = probs.reshape(-1, num_heads)
    tokens = flat.shape[0]
    chosen = torch.sort(flat.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    # scatter_add_, not bincount: bincount's output size depends on the data, which makes
    # torch.compile break the graph here.
    counts = torch.zeros(num_heads, dtype=torch.float32, device=flat.device).scatter_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=torch.float32, device=flat.device))
    fraction = counts / (tokens * k)
    mean_prob = flat.to(torch.float32).mean(dim=0)
    return num_heads * torch.dot(fraction, mean_prob)


def collect_balance_loss(model: nn.Module, reset: bool = True) -> Tensor:
    """The sum of every `last_balance_loss` kept by `model` and its submodules, for a trainer
    to add to its loss once per batch:

        loss = task_loss + adapterops.hydra.collect_balance_loss(model)

    Contract with the layers: a HydraLoRA layer built with `balance_loss_weight > 0` sets
    `last_balance_loss` on each training forward to `weight * balance_loss(probs, top_k)`, a
    0-dim tensor that already includes its weight; otherwise the attribute is None. Any module
    with that attribute counts (duck typing); a module shared at several places counts once.

    reset: set every collected `last_balance_loss` back to None, so the same batch cannot be
    added twice and the layers stop keeping its autograd graph alive.

    Called with gradients enabled, a loss that carries no graph while its module has trainable
    parameters of its own is a RuntimeError naming the module: the layer ran under torch.no_grad, which
    is what the first pass of reentrant activation checkpointing does, and the router would
    silently get no balance gradient. Non-reentrant checkpointing (transformers' default)
    keeps the graph.

    Returns a 0-dim tensor; with nothing collected, an fp32 zero on the device of the model's
    first parameter (CPU for a model without parameters).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    total = None
    for name, module in model.named_modules():
        loss = getattr(module, "last_balance_loss", None)
        if loss is None:
            continue
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(f"last_balance_loss of module {name or '<model>'!r} must be None or a "
                            f"0-dim Tensor, got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
        if (torch.is_grad_enabled() and not loss.requires_grad
                and any(p.requires_grad for p in module.parameters(recurse=False))):
            raise RuntimeError(
                f"module {name or '<model>'!r}: its balance loss was computed without autograd "
                "(the layer ran under torch.no_grad, as the first pass of reentrant activation "
                "checkpointing runs it), so it cannot train the router. Use non-reentrant "
                "checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) (transformers' default) or torch.utils.checkpoint(..., "
                "use_reentrant=False); or collect under torch.no_grad() when no gradient is wanted")
        total = loss if total is None else total + loss
        if reset:
            module.last_balance_loss = None
    if total is None:
        first = next(model.parameters(), None)
        total = torch.zeros((), dtype=torch.float32, device=first.device if first is not None else "cpu")
    return total


def suggest_num_heads(features: Tensor, max_heads: int = 8, *, n_init: int = 4, max_iter: int = 100,
                      seed: int = 0, max_samples: int = 4096) -> tuple[int, list[int]]:
    """The number of B heads (intrinsic components) for HydraLoRA: k-means over one feature
    vector per training sample (the paper's step for finding the data's intrinsic components),
    with k chosen by the mean silhouette score **[ours: the selection rule is this library's]**.

    features: (n, d), one row per sample (e.g. mean-pooled hidden states, or TF-IDF vectors:
    scale or normalise them beforehand as the features call for; only a global shift is
    removed here). For each k in 2 .. min(max_heads, n - 1):

    - k-means in float64: k-means++ seeding (each next centre drawn with probability
      proportional to the squared distance to the nearest chosen one), Lloyd iterations until
      the assignments stop changing or `max_iter`, best of `n_init` restarts by inertia
      (Σ squared distance to the assigned centre; the lower restart wins a tie). An empty
      cluster is re-seeded with the point farthest from its centre among clusters of two or
      more points, so no cluster is ever empty.
    - silhouette s(i) = (b_i - a_i) / max(a_i, b_i) from Euclidean distances in float64, with
      a_i the mean distance to the rest of i's cluster and b_i the least mean distance to
      another cluster; s(i) = 0 for a singleton (and where a_i = b_i = 0). The score is the
      mean over points.

    **[ours]** The silhouette costs O(n^2 d): with n > max_samples it is computed on one seeded
    random subset of max_samples points (the same subset for every k; k-means still runs on
    every point), and the pairwise distances of that subset are computed once for all k.

    The highest score wins, the lower k on ties. Deterministic: every random draw comes from a
    CPU torch.Generator seeded with `seed` (results on another device can differ by rounding).

    Returns (k, sizes): the chosen number of heads and its cluster sizes over all n samples,
    in descending order (sum n, none 0).
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 2 or features.shape[0] < 3:
        raise ValueError(f"features must be (n, d) with n >= 3 samples, got shape {tuple(features.shape)}")
    _check_int("max_heads", max_heads, 2)
    _check_int("n_init", n_init, 1)
    _check_int("max_iter", max_iter, 1)
    _check_int("max_samples", max_samples, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    x = features.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"features of shape {tuple(features.shape)} hold non-finite values")
    x = x - x.mean(dim=0)  # distances are shift invariant; centring keeps their GEMM form accurate
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(n, generator=generator)[:max_samples].to(x.device) if n > max_samples else None
    sample = x if subset is None else x[subset]
    pairwise = torch.cdist(sample, sample)
    pairwise.fill_diagonal_(0)  # the GEMM form leaves rounding residue on the diagonal
    best = None  # (score, k, labels)
    for k in range(2, min(max_heads, n - 1) + 1):
        labels = _kmeans(x, k, n_init, max_iter, generator)
        score = _mean_silhouette(pairwise, labels if subset is None else labels[subset], k)
        if best is None or score > best[0]:
            best = (score, k, labels)
    _, k, labels = best
    sizes = torch.bincount(labels, minlength=k).tolist()
    return k, sorted(sizes, reverse=True)


def _kmeans(x: Tensor, k: int, n_init: int, max_iter: int, generator: torch.Generator) -> Tensor:
    """Labels (n,) of the best of n_init k-means++ / Lloyd runs by inertia."""
    best_inertia, best_labels = math.inf, None
    x_sq = x.square().sum(dim=1)
    for _ in range(n_init):
        labels = _lloyd(x, x_sq, _kmeans_plus_plus(x, x_sq, k, generator), max_iter)
        centres = _centroids(x, labels, k)
        inertia = (x - centres[labels]).square().sum().item()
        if best_labels is None or inertia < best_inertia:
            best_inertia, best_labels = inertia, labels
    return best_labels


def _sq_dists(x: Tensor, x_sq: Tensor, centres: Tensor) -> Tensor:
    """(n, k) squared Euclidean distances as |x|^2 - 2 x c^T + |c|^2: one GEMM (torch.cdist
    takes a direct loop below 25 centres: 53 ms vs 4 ms for n = 9000, d = 512, k = 8 on CPU)."""
    sq = torch.addmm(x_sq[:, None], x, centres.t(), alpha=-2).add_(centres.square().sum(dim=1)[None, :])
    return sq.clamp_(min=0)


def _kmeans_plus_plus(x: Tensor, x_sq: Tensor, k: int, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    nearest = _sq_dists(x, x_sq, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = nearest.cpu()
        if not weights.sum() > 0:  # every point sits on a chosen centre: draw uniformly
            weights = torch.ones(n, dtype=torch.float64)
        index = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(x[index])
        nearest = torch.minimum(nearest, _sq_dists(x, x_sq, x[index:index + 1]).squeeze(1))
    return torch.stack(centres)


def _lloyd(x: Tensor, x_sq: Tensor, centres: Tensor, max_iter: int) -> Tensor:
    k = centres.shape[0]
    labels = None
    for _ in range(max_iter):
        sq_dist = _sq_dists(x, x_sq, centres)
        new_labels = _fill_empty_clusters(sq_dist.argmin(dim=1), sq_dist, k)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centres = _centroids(x, labels, k)
    return labels


def _fill_empty_clusters(labels: Tensor, sq_dist: Tensor, k: int) -> Tensor:
    """Moves, for each empty cluster in turn, the point farthest from its own centre (taken only
    from clusters that keep at least one point) into it. n > k guarantees a donor."""
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    own = sq_dist.gather(1, labels[:, None]).squeeze(1)
    for cluster in empty:
        donor_ok = counts[labels] > 1
        index = int(torch.where(donor_ok, own, own.new_full((), -1.0)).argmax())
        counts[labels[index]] -= 1
        counts[cluster] = 1
        labels[index] = cluster
    return labels


def _centroids(x: Tensor, labels: Tensor, k: int) -> Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    return sums / counts[:, None]


def _mean_silhouette(pairwise: Tensor, labels: Tensor, k: int) -> float:
    """Mean silhouette of the points behind the (m, m) distance matrix `pairwise`."""
    onehot = torch.nn.functional.one_hot(labels, k).to(pairwise.dtype)
    counts = onehot.sum(dim=0)
    per_cluster = pairwise @ onehot  # (m, k): summed distance from each point to each cluster
    own_count = counts[labels]
    a = per_cluster.gather(1, labels[:, None]).squeeze(1) / (own_count - 1).clamp(min=1)
    others = per_cluster / counts.clamp(min=1)
    others = others.masked_fill(onehot.bool() | (counts == 0)[None, :], math.inf)
    b = others.min(dim=1).values
    denom = torch.maximum(a, b)
    s = torch.where((own_count > 1) & (denom > 0) & torch.isfinite(b), (b - a) / denom, torch.zeros_like(a))
    return s.mean().item()
