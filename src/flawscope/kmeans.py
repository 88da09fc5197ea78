"""A few rounds of Lloyd's k-means, chunked: the grouping behind the triangle-inequality
pruning of both the coreset selection (:mod:`flawscope.coreset`) and the neighbour search
(:mod:`flawscope.nnsearch`). Neither needs good clusters, only compact ones, so a handful of
rounds from seeded starting rows is enough."""

from __future__ import annotations

import torch

#: Rows per chunk in the nearest-centre assignment (bounds the temporary to CHUNK x k).
CHUNK = 16384


def nearest_centre(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every point, in chunks (no N x k matrix at once)."""
    cc = (centres * centres).sum(1)
    return torch.cat([torch.addmm(cc, chunk, centres.T, alpha=-2).argmin(1)
                      for chunk in points.split(CHUNK)])


def lloyd(points: torch.Tensor, centres: torch.Tensor, iterations: int) -> torch.Tensor:
    """``centres`` moved by ``iterations`` Lloyd rounds on ``points`` (an empty cluster keeps
    its centre)."""
    k = len(centres)
    for _ in range(iterations):
        assign = nearest_centre(points, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


def partition(points: torch.Tensor, target: int, generator: torch.Generator,
              branch: int = 64, iterations: int = 3) -> list[torch.Tensor]:
    """Row indices of ``points`` split into cells of at most ``2 * target`` nearby rows.

    Recursive k-means (a k-means tree): a set larger than ``2 * target`` rows is split into
    ``min(branch, ceil(n / target))`` clusters by a few Lloyd rounds on a sample, and each
    cluster is split again while too large, so the cost is about ``n * d * branch`` per level
    instead of ``n * d * n / target`` for one flat k-means. Rows that are all identical are cut
    into consecutive pieces. A cell of fewer than ``target // 8`` rows (k-means leaves some on
    unclustered data) joins the cell whose mean is nearest to its own.

    >>> cells = partition(torch.randn(5000, 8), 500, torch.Generator().manual_seed(0))
    >>> sum(len(c) for c in cells), max(len(c) for c in cells) <= 1000
    (5000, True)
    """
    cells: list[torch.Tensor] = []
    stack = [torch.arange(len(points))]
    while stack:
        index = stack.pop()
        n = len(index)
        if n <= 2 * target:
            cells.append(index)
            continue
        k = min(branch, -(-n // target))
        rows = points if n == len(points) else points[index]
        sample = rows[torch.randperm(n, generator=generator)[:40 * k]]
        assign = nearest_centre(rows, lloyd(sample, sample[:k].clone(), iterations))
        counts = torch.bincount(assign, minlength=k)
        if int(counts.max()) == n:                # one cluster: the rows are all the same
            cells.extend(index.split(target))
            continue
        order = torch.argsort(assign, stable=True)
        stack.extend(part for part in index[order].split(counts.tolist()) if len(part))
    return _merge_small(points, cells, max(1, target // 8))


def _merge_small(points: torch.Tensor, cells: list[torch.Tensor],
                 min_size: int) -> list[torch.Tensor]:
    small = [c for c in cells if len(c) < min_size]
    large = [c for c in cells if len(c) >= min_size]
    if not small or not large:
        return cells
    means = torch.stack([points[c].mean(0) for c in large])
    home = nearest_centre(torch.stack([points[c].mean(0) for c in small]), means).tolist()
    joined: list[list[torch.Tensor]] = [[c] for c in large]
    for cell, h in zip(small, home, strict=True):
        joined[h].append(cell)
    return [torch.cat(parts) for parts in joined]
