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
