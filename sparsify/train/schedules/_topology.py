"""Mask edits shared by the schedules, at the granularity of the mask.

For a masked conv a mask entry is a channel connection (the whole kernel window), so a per-weight
statistic (magnitude, momentum, gradient) is summed over the kernel window to score the entry;
for a SparseLinear the entry is the weight itself. Ties are broken by position, so the same
inputs give the same mask on every rank and every run.

A conv with ``fan_in_block`` B > 1 (block sparsity: runs of B output channels share one row of the
mask) is edited a block at a time: each edit takes ``block=B``, works on one row per block (scores
summed over the block's rows, k entries as k / B blocks) and writes every row of the block, so the
runs keep one fan-in through training. Counts returned are mask entries.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def fan_in_block(module: torch.nn.Module) -> int:
    """Output channels per shared fan-in of a masked conv (``SparseConv2d.fan_in_block``), else 1."""
    return int(getattr(module, "fan_in_block", 1))


def block_parts(rows: int, block: int) -> list[slice]:
    """The row ranges of a mask with ``rows`` rows whose blocks all have one size: the whole blocks
    of ``block`` rows, then the last, shorter block when ``rows`` is not a multiple of ``block``.
    A schedule that conserves a layer's connections edits each part on its own: an entry of the
    short block is worth fewer mask entries than one of a whole block."""
    whole = rows - rows % block if block > 1 else rows
    return [part for part in (slice(0, whole), slice(whole, rows)) if part.stop > part.start]


def _by_block(mask: torch.Tensor, block: int, k: int, edit: Callable[..., int], *per_row: torch.Tensor | None) -> int:
    """``edit(rows_mask, k_rows, *rows_of_per_row)`` on one row per block of ``mask``; every row of a
    block then takes its block's row. per_row tensors (scores, masks) shaped like ``mask`` are
    summed over each block's rows (None passes through). Returns the mask entries changed.

    With a last, shorter block, the whole blocks and the short one are edited apart (``block_parts``),
    ``k`` shared between them by their rows, so that k entries are k / (rows of a block) edits in
    each (counting the short block as a whole one let every RigL update grow more than it pruned)."""
    if block <= 1:
        return edit(mask, k, *per_row)
    n = mask.shape[0]
    parts = block_parts(n, block)
    if len(parts) > 1:
        k_whole = int(round(k * parts[0].stop / n))
        return sum(_by_block(mask[part], block, share, edit, *(None if t is None else t[part] for t in per_row))
                   for part, share in zip(parts, (k_whole, k - k_whole)))
    rows = -(-n // block)

    def fold(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        pad = t.new_zeros((rows * block - n,) + tuple(t.shape[1:]))
        return torch.cat([t, pad]).reshape((rows, block) + tuple(t.shape[1:])).sum(dim=1)

    lead = mask[::block].clone()
    edit(lead, int(round(k * rows / n)), *(fold(t) for t in per_row))
    before = mask.clone()
    mask.copy_(lead.repeat_interleave(block, dim=0)[:n])
    return int((mask != before).sum())



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


def prune_smallest(mask: torch.Tensor, score: torch.Tensor, k: int, block: int = 1) -> int:
    """Turn off the k live entries with the smallest score, in place; return how many."""
    def edit(m: torch.Tensor, k: int, score: torch.Tensor) -> int:
        drop = _top_k(score, m > 0, k, largest=False)
        m.view(-1)[drop] = 0
        return int(drop.numel())
    return _by_block(mask, block, k, edit, score)


def grow_largest(mask: torch.Tensor, score: torch.Tensor, k: int, block: int = 1) -> int:
    """Turn on the k dead entries with the largest score, in place; return how many."""
    def edit(m: torch.Tensor, k: int, score: torch.Tensor) -> int:
        grow = _top_k(score, m == 0, k, largest=True)
        m.view(-1)[grow] = 1
        return int(grow.numel())
    return _by_block(mask, block, k, edit, score)


def grow_random(mask: torch.Tensor, k: int, generator: torch.Generator, within: torch.Tensor | None = None,
                block: int = 1) -> int:
    """Turn on k dead entries chosen uniformly (optionally only where ``within`` is set); return how many."""
    def edit(m: torch.Tensor, k: int, within: torch.Tensor | None) -> int:
        cand = m == 0 if within is None else (m == 0) & (within > 0)
        idx = torch.nonzero(cand.reshape(-1), as_tuple=False).squeeze(1)
        k = min(k, idx.numel())
        if k <= 0:
            return 0
        pick = idx[torch.randperm(idx.numel(), generator=generator)[:k]]
        m.view(-1)[pick] = 1
        return int(k)
    return _by_block(mask, block, k, edit, within)


def random_mask_like(mask: torch.Tensor, k: int, generator: torch.Generator, block: int = 1) -> torch.Tensor:
    """A 0/1 mask of ``mask``'s shape with about k ones (exactly k when block is 1) at uniformly
    random places (random blocks of rows with ``block``)."""
    new = torch.zeros_like(mask)
    grow_random(new, k, generator, block=block)
    return new
