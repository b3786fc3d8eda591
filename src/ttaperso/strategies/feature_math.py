"""Pure tensor maths of the feature/Fisher strategies (``fisher``, ``eata``, ``t3a``, ``shot``).

Plain functions without state, tested on their own: diagonal Fisher information, global
top-k selection under a budget, T3A's support filtering and prototypes, SHOT's
information-maximisation loss and centroid pseudo-labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "expected_fisher_diagonal",
    "empirical_fisher_diagonal",
    "top_k_indices",
    "split_flat_indices",
    "t3a_filter",
    "t3a_prototypes",
    "information_maximization",
    "centroid_pseudo_labels",
]


def expected_fisher_diagonal(log_probs: Tensor, leaves: Sequence[Tensor]) -> list[Tensor]:
    """Diagonal of the expected Fisher information, averaged over frames.

    ``F_j = 1/N sum_i sum_c p(c|x_i) (d log p(c|x_i) / d theta_j)^2`` with ``p`` the
    model's own predictive distribution (no labels needed). ``log_probs`` is ``(N, C)``
    and must be differentiable w.r.t. ``leaves``, with frames independent of each other
    (BatchNorm in eval mode): one backward pass per (frame, class).
    """
    n, c = log_probs.shape
    fisher = [torch.zeros_like(leaf) for leaf in leaves]
    probs = log_probs.detach().exp()
    for i in range(n):
        for k in range(c):
            grads = torch.autograd.grad(
                log_probs[i, k], list(leaves), retain_graph=True, allow_unused=True
            )
            weight = probs[i, k]
            for acc, g in zip(fisher, grads, strict=True):
                if g is not None:
                    acc.add_(weight * g.detach() ** 2)
    return [f / n for f in fisher]


def empirical_fisher_diagonal(log_probs: Tensor, leaves: Sequence[Tensor]) -> list[Tensor]:
    """Diagonal Fisher with the model's own predictions as labels (EATA's estimate).

    ``F_j = 1/N sum_i (d log p(yhat_i|x_i) / d theta_j)^2``, ``yhat_i = argmax p(.|x_i)``;
    per frame (the reference squares a batch-mean gradient instead, which cancels the
    frames' disagreement and depends on the batch size).
    """
    n = log_probs.shape[0]
    labels = log_probs.detach().argmax(dim=1)
    fisher = [torch.zeros_like(leaf) for leaf in leaves]
    for i in range(n):
        grads = torch.autograd.grad(
            log_probs[i, labels[i]], list(leaves), retain_graph=True, allow_unused=True
        )
        for acc, g in zip(fisher, grads, strict=True):
            if g is not None:
                acc.add_(g.detach() ** 2)
    return [f / n for f in fisher]


def top_k_indices(scores: Sequence[Tensor], budget: int) -> Tensor:
    """Flat indices (into the concatenation of the flattened ``scores``) of the ``budget``
    largest scores, sorted ascending; exactly ``min(budget, total)`` of them.

    Ties are broken by position (a stable sort), so the choice is deterministic.
    Non-finite scores count as 0.
    """
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores])
    flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    k = min(int(budget), flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def split_flat_indices(indices: Tensor, sizes: Sequence[int]) -> list[tuple[int, Tensor, Tensor]]:
    """Split sorted global flat ``indices`` by the tensors of ``sizes`` they fall in.

    Returns ``(tensor position, local indices, positions in `indices`)`` for each tensor
    that has at least one index.
    """
    bounds = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    idx = indices.to(torch.int64)
    owner = torch.bucketize(idx, bounds[1:], right=True)
    out = []
    for t in torch.unique(owner).tolist():
        where = (owner == t).nonzero().squeeze(1)
        out.append((int(t), idx[where] - bounds[t], where))
    return out


def t3a_filter(labels: Tensor, entropies: Tensor, num_classes: int, filter_k: int) -> Tensor:
    """Indices of the supports T3A keeps: per class the ``filter_k`` lowest-entropy ones.

    ``filter_k <= 0`` keeps every support (the reference's ``-1`` is meant to, but its
    code overwrites that branch and drops the last support of each class instead).
    Returned in class order, lowest entropy first within a class (stable on ties).
    """
    if filter_k <= 0:
        return torch.arange(labels.shape[0])
    kept = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if members.numel() == 0:
            continue
        order = torch.sort(entropies[members], stable=True).indices[:filter_k]
        kept.append(members[order])
    if not kept:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(kept)


def t3a_prototypes(supports: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(D, C)`` prototypes: per class the normalised sum of normalised supports.

    A class without supports gets a zero column (logit 0).
    """
    onehot = F.one_hot(labels.to(torch.int64), num_classes).to(supports.dtype)
    weights = F.normalize(supports, dim=1).T @ onehot
    return F.normalize(weights, dim=0)


def information_maximization(
    probs: Tensor, past_probs_sum: Tensor | None = None, past_count: float = 0.0
) -> tuple[Tensor, Tensor]:
    """SHOT's IM terms: (sum of per-frame entropies, entropy of the mean prediction).

    The mean prediction includes the subject's recent frames (``past_probs_sum`` over
    ``past_count`` frames, constants) so that one frame's diversity term is defined.
    Loss to minimise: ``entropies - N * mean_entropy``.
    """
    eps = 1e-8
    ent = -(probs * (probs + eps).log()).sum(dim=1).sum()
    total = probs.sum(dim=0)
    count = float(probs.shape[0])
    if past_probs_sum is not None and past_count > 0:
        total = total + past_probs_sum.detach()
        count += past_count
    mean = total / count
    mean_ent = -(mean * (mean + eps).log()).sum()
    return ent, mean_ent


def centroid_pseudo_labels(features: Tensor, probs: Tensor, rounds: int = 1) -> Tensor:
    """SHOT's pseudo-labels: nearest probability-weighted centroid by cosine distance.

    Features get a constant 1 appended and are normalised (as the reference does);
    centroids start soft (weighted by ``probs``), then ``rounds`` hard refinements
    recompute them from the current labels, over the classes that got at least one frame.
    """
    z = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)
    z = F.normalize(z, dim=1)
    weights = probs
    active = torch.ones(probs.shape[1], dtype=torch.bool)
    labels = probs.argmax(dim=1)
    for r in range(rounds + 1):
        centroids = (weights.T @ z) / (weights.sum(dim=0)[:, None] + 1e-8)
        sim = F.normalize(z, dim=1) @ F.normalize(centroids, dim=1).T
        sim[:, ~active] = -torch.inf
        labels = sim.argmax(dim=1)
        if r < rounds:
            weights = F.one_hot(labels, probs.shape[1]).to(z.dtype)
            active = weights.sum(dim=0) > 0
    return labels
