"""Greedy k-center coreset selection, exact but fast and memory-bounded on a CPU.

PatchCore keeps a subset of the training patch features (its memory bank) chosen by greedy
k-center selection ("farthest point sampling"): start from one point, then repeatedly add the
point farthest from everything chosen so far. Written plainly, every one of the k additions
scans all N points, so a category with 300,000 patches and a 10% coreset reads the whole
feature matrix 30,000 times; this is the step users of other tools report as slow or
running out of memory.

This implementation returns exactly what the plain algorithm returns (same start point, same
distances, up to exact floating-point ties) but skips most of the work, using the triangle
inequality:

1. The points (after a Gaussian random projection to ``projection_dim`` dimensions, which
   preserves distances well and is what the PatchCore paper does) are partitioned into small
   blocks of nearby points with a few rounds of k-means, each block with a centre and a radius.
2. When a new centre ``c`` is added, a point ``x`` of block ``b`` can only get closer to the
   chosen set if ``|c - centre_b| - radius_b < min_dist(x)``; a whole block is skipped when
   that fails for its largest ``min_dist``. After the first few hundred additions almost all
   blocks are skipped.

Memory stays bounded: the projected points are held once (N x projection_dim float32, in
blocks), distances are computed block-wise, and nothing of size N x k or N x N is ever made.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .kmeans import lloyd, nearest_centre

#: Rows per chunk of the random projection (bounds temporary memory).
_CHUNK = 16384


def random_projection(features: torch.Tensor, dim: int | None,
                      generator: torch.Generator) -> torch.Tensor:
    """Gaussian random projection to ``dim`` dimensions (Johnson-Lindenstrauss), chunked.

    Returns float32 features unchanged (as float32) where ``dim`` is None or not smaller.
    """
    n, d = features.shape
    if dim is None or dim <= 0 or dim >= d:
        return features.float()
    matrix = torch.randn(d, dim, generator=generator) / math.sqrt(dim)
    out = torch.empty(n, dim)
    for start in range(0, n, _CHUNK):
        out[start:start + _CHUNK] = features[start:start + _CHUNK].float() @ matrix
    return out


def _kmeans(points: torch.Tensor, k: int, iterations: int,
            generator: torch.Generator) -> torch.Tensor:
    """Cluster assignment of every point after a few Lloyd rounds on a sample."""
    n = len(points)
    sample = points[torch.randperm(n, generator=generator)[:min(n, 40 * k)]]
    return nearest_centre(points, lloyd(sample, sample[:k].clone(), iterations))


def _block_table(assign: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """(blocks, block_size) table of point indices; each block holds points of one cluster.

    Clusters larger than ``block_size`` are cut into several blocks; the unused slots of a
    block repeat its first point (a duplicate can never win the farthest-point argmax, which
    returns the first of equal values).
    """
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=k)
    per_cluster = (counts + block_size - 1) // block_size
    cluster_start = torch.cumsum(counts, 0) - counts
    block_start = torch.cumsum(per_cluster, 0) - per_cluster
    sorted_assign = assign[order]
    pos = torch.arange(len(order)) - cluster_start[sorted_assign]
    block = block_start[sorted_assign] + pos // block_size
    table = torch.full((int(per_cluster.sum()), block_size), -1, dtype=torch.long)
    table[block, pos % block_size] = order
    return torch.where(table >= 0, table, table[:, :1])


def greedy_coreset(features: torch.Tensor, n_select: int, projection_dim: int | None = 128,
                   seed: int = 0, start: int | None = None, block_size: int = 16,
                   progress: bool = True) -> torch.Tensor:
    """Indices (in order of selection) of a greedy k-center coreset of ``features``.

    ``start`` is the first point (default: one drawn with ``seed``). Fewer than ``n_select``
    indices come back only when every point is already at distance 0 from the set.
    """
    n = len(features)
    n_select = max(1, min(int(n_select), n))
    generator = torch.Generator().manual_seed(seed)
    points = random_projection(features, projection_dim, generator)
    if start is None:
        start = int(torch.randint(n, (1,), generator=generator))
    n_clusters = max(1, n // (4 * block_size))
    assign = _kmeans(points, n_clusters, 4, generator) if n_clusters > 1 else \
        torch.zeros(n, dtype=torch.long)
    table = _block_table(assign, n_clusters, block_size)
    blocks = points[table]                     # (B, S, p), the only copy kept
    del points
    flat = blocks.view(-1, blocks.shape[-1])
    table_flat = table.view(-1)
    sq_norms = (blocks * blocks).sum(-1)       # (B, S)
    centre = blocks.mean(1)
    centre_sq = (centre * centre).sum(1)
    centre_slack = 2e-5 * centre_sq
    radius = (blocks - centre[:, None]).pow(2).sum(-1).amax(1).sqrt()
    # Slack on the skip test so float rounding can never skip a block that needed a look.
    radius = radius * (1 + 1e-4) + 1e-6
    position = torch.empty(n, dtype=torch.long)
    position[table_flat] = torch.arange(len(table_flat))  # a real (first) slot of each point

    min_dist = torch.full(sq_norms.shape, math.inf)
    block_max = torch.full((len(blocks),), math.inf)
    n_blocks, size = blocks.shape[:2]
    sq_flat = sq_norms.view(-1)
    dot = torch.empty(len(flat))
    chosen = [start]
    pos = int(position[start])
    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress or None,
               leave=False, mininterval=0.5)
    bar.update(1)
    # The loop is thousands of small operations: one thread avoids waiting on the second
    # thread at every step (measured 4x faster on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            while True:
                c = flat[pos]
                cc = c @ c
                # |centre - c| from one matrix-vector product, lowered by a bound on its
                # float32 rounding (|a|^2 + |b|^2 times a few hundred epsilons) so that it
                # stays a lower bound and no block that needed a look is skipped.
                reach = torch.addmv(centre_sq, centre, c, alpha=-2).add_(cc)
                reach.sub_(centre_slack + 2e-5 * cc).clamp_min_(0).sqrt_().sub_(radius)
                look = torch.nonzero(reach < block_max).squeeze(1)
                if len(look) > n_blocks // 2:     # most blocks: one pass, no gathering
                    torch.mv(flat, c, out=dot)
                    d = dot.mul_(-2).add_(sq_flat).add_(cc).clamp_min_(0).sqrt_()
                    torch.minimum(min_dist, d.view(n_blocks, size), out=min_dist)
                    block_max = min_dist.amax(1)
                elif len(look):
                    d = (sq_norms[look] - 2 * (blocks[look] @ c) + cc).clamp_min_(0).sqrt_()
                    d = torch.minimum(min_dist[look], d)
                    min_dist[look] = d
                    block_max[look] = d.amax(1)
                if len(chosen) >= n_select:
                    break
                b = int(block_max.argmax())
                if float(block_max[b]) <= 0:
                    break
                pos = b * size + int(min_dist[b].argmax())
                chosen.append(int(table_flat[pos]))
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
    bar.close()
    return torch.tensor(chosen, dtype=torch.long)
