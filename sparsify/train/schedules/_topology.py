"""Mask edits shared by the schedules, at the granularity of the mask.

For a masked conv a mask entry is a channel connection (the whole kernel window), so a per-weight
statistic (magnitude, momentum, gradient) is summed over the kernel window to score the entry;
for a SparseLinear the entry is the weight itself. Ties are broken by position, so the same
inputs give the same mask on every rank and every run.
"""
from __future__ import annotations

import math

import torch



def unit_size(module: torch.nn.Module) -> int:
    """Weights per mask entry (the kernel size for a conv, 1 for a linear layer)."""
    return int(math.prod(module.weight.shape[2:]))


def unit_scores(module: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Sum of |t| over each mask entry's weights, shaped like the mask."""
    a = t.detach().abs()
    if a.dim() > 2:
        a = a.flatten(2).sum(dim=2)
    return a


def _top_k(score: torch.Tensor, candidates: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat indices of the k best candidates by score; among equal scores the lower index wins.

    O(n) selection (kthvalue) rather than a full sort: topology updates touch every dead entry.
    """
    idx = torch.nonzero(candidates.reshape(-1), as_tuple=False).squeeze(1)
    if k <= 0 or idx.numel() == 0:
        return idx[:0]
    if k >= idx.numel():
        return idx
    s = score.reshape(-1)[idx].double()
    if largest:
        s = -s
    kth = torch.kthvalue(s, k).values
    better = idx[s < kth]
    return torch.cat([better, idx[s == kth][: k - better.numel()]])


def prune_smallest(mask: torch.Tensor, score: torch.Tensor, k: int) -> int:
    """Turn off the k live entries with the smallest score, in place; return how many."""
    drop = _top_k(score, mask > 0, k, largest=False)
    mask.view(-1)[drop] = 0
    return int(drop.numel())


def grow_largest(mask: torch.Tensor, score: torch.Tensor, k: int) -> int:
    """Turn on the k dead entries with the largest score, in place; return how many."""
    grow = _top_k(score, mask == 0, k, largest=True)
    mask.view(-1)[grow] = 1
    return int(grow.numel())


def grow_random(mask: torch.Tensor, k: int, generator: torch.Generator, within: torch.Tensor | None = None) -> int:
    """Turn on k dead entries chosen uniformly (optionally only where ``within`` is set); return how many."""
    cand = mask == 0 if within is None else (mask == 0) & (within > 0)
    idx = torch.nonzero(cand.reshape(-1), as_tuple=False).squeeze(1)
    k = min(k, idx.numel())
    if k <= 0:
        return 0
    pick = idx[torch.randperm(idx.numel(), generator=generator)[:k]]
    mask.view(-1)[pick] = 1
    return int(k)


def random_mask_like(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask of ``mask``'s shape with exactly k ones at uniformly random places."""
    new = torch.zeros_like(mask)
    grow_random(new, k, generator)
    return new
