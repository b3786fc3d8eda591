"""Pure tensor maths of cache-based personalization (TTA-CaP), tested on its own.

No state, no model: plain functions on tensors. Conventions:

* features used as cache keys and prototypes are L2-normalised (``unit``);
* a cache is ``keys (C, K, D)``, ``entropy (C, K)`` (normalised by ln C) and ``valid (C, K)``
  (bool): slot ``k`` of class ``c`` holds an entry when ``valid[c, k]``. Empty slots keep
  finite zeros, so a subject's state never holds NaN/Inf sentinels;
* affinities use Tip-Adapter/TDA's kernel ``exp(-beta * (1 - cos))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

__all__ = [
    "unit",
    "frechet_diagonal",
    "diagonal_moments",
    "class_prototypes",
    "retrieve",
    "fuse",
    "cache_insert",
    "video_prediction",
]

_EPS = 1e-12


def unit(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (an all-zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def frechet_diagonal(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> Tensor:
    """Squared Frechet (2-Wasserstein) distance between diagonal Gaussians.

    ``||mu_a - mu_b||^2 + sum(var_a + var_b - 2 sqrt(var_a var_b))``, i.e. the squared
    distance of the means plus that of the standard deviations. Broadcasts over leading
    dimensions (the last one is the feature dimension).
    """
    std_a = var_a.clamp_min(0.0).sqrt()
    std_b = var_b.clamp_min(0.0).sqrt()
    return ((mean_a - mean_b) ** 2).sum(dim=-1) + ((std_a - std_b) ** 2).sum(dim=-1)


def diagonal_moments(total: Tensor, total_sq: Tensor, count: float) -> tuple[Tensor, Tensor]:
    """Mean and (biased) per-dimension variance from running sums over ``count`` samples."""
    mean = total / count
    return mean, (total_sq / count - mean**2).clamp_min(0.0)


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class prototypes: the normalised sum of the class's normalised features.

    Returns ``(prototypes (C, D), counts (C,))``; a class without samples gets a zero row
    and count 0 (the caller decides the fallback).
    """
    z = unit(features)
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
    sums.index_add_(0, labels.to(z.device), z)
    counts = torch.bincount(labels.to(z.device), minlength=num_classes)[:num_classes]
    return unit(sums), counts


def retrieve(query: Tensor, keys: Tensor, valid: Tensor, sharpness: float) -> Tensor:
    """Affinity-weighted mean of a cache's valid entries for each query.

    ``query (N, D)`` and ``keys (M, D)`` are unit vectors; weights are
    ``exp(-sharpness * (1 - cos))`` over the valid keys, normalised to sum to one. A query
    facing an empty cache retrieves the zero vector (the cache then has no effect).
    """
    if keys.shape[0] == 0 or not bool(valid.any()):
        return torch.zeros_like(query)
    cos = query @ keys.T
    weights = torch.exp(-sharpness * (1.0 - cos)) * valid.to(query.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(_EPS)
    return weights @ keys


def fuse(
    query: Tensor, source: Tensor, positive: Tensor, negative: Tensor, weights: tuple[float, ...]
) -> Tensor:
    """TTA-CaP fusion ``normalise(f + a_s src + a_p pos - a_n neg)`` of unit vectors."""
    w_src, w_pos, w_neg = weights
    return unit(query + w_src * source + w_pos * positive - w_neg * negative)


def cache_insert(
    keys: Tensor,
    entropy: Tensor,
    valid: Tensor,
    new_keys: Tensor,
    new_entropy: Tensor,
    new_class: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Insert entries into a per-class cache, keeping the lowest-entropy ``K`` per class.

    Args:
        keys, entropy, valid: the cache, shapes ``(C, K, D)``, ``(C, K)``, ``(C, K)``.
        new_keys: ``(N, D)`` candidate entries; ``new_entropy`` ``(N,)``; ``new_class``
            ``(N,)`` the class bucket of each candidate.

    Returns new ``(keys, entropy, valid)`` tensors (the inputs are not modified). On equal
    entropy an entry already in the cache wins over a new one, and earlier new entries win
    over later ones (stable sort), so the result is deterministic.
    """
    num_classes, capacity = entropy.shape
    n = new_keys.shape[0]
    if n == 0:
        return keys.clone(), entropy.clone(), valid.clone()
    inf = torch.tensor(float("inf"), dtype=entropy.dtype, device=entropy.device)
    old_rank = torch.where(valid, entropy, inf)  # (C, K): empty slots rank last
    member = new_class.view(1, n) == torch.arange(num_classes, device=new_class.device).view(-1, 1)
    new_rank = torch.where(member, new_entropy.view(1, n).to(entropy.dtype), inf)  # (C, N)
    rank = torch.cat([old_rank, new_rank], dim=1)
    order = torch.sort(rank, dim=1, stable=True).indices[:, :capacity]  # (C, K)
    pool_keys = torch.cat([keys, new_keys.unsqueeze(0).expand(num_classes, -1, -1)], dim=1)
    pool_entropy = torch.cat([entropy, new_entropy.view(1, n).expand(num_classes, -1)], dim=1)
    pool_valid = torch.cat([valid, member], dim=1)
    out_keys = pool_keys.gather(1, order.unsqueeze(-1).expand(-1, -1, keys.shape[2]))
    out_valid = pool_valid.gather(1, order)
    out_entropy = torch.where(out_valid, pool_entropy.gather(1, order), 0.0)
    out_keys = torch.where(out_valid.unsqueeze(-1), out_keys, 0.0)
    return out_keys.contiguous(), out_entropy.contiguous(), out_valid.contiguous()


def video_prediction(logits: Tensor) -> tuple[Tensor, int]:
    """Video-level prediction over a segment: the sum of the frames' logits and its argmax.

    ``logits``: ``(T, C)`` per-frame logits of one (subject, video) segment, ``T >= 1``.
    """
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise InputError(
            f"Expected per-frame logits of shape (T, C) with T >= 1 but got {tuple(logits.shape)}"
        )
    total = logits.sum(dim=0)
    return total, int(total.argmax())
