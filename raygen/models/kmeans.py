"""Seeded k-means with k-means++ initialisation, in torch (palettes now, CTF's codebook clusters later)."""

from __future__ import annotations

import torch


def kmeans(
    x: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 100, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster points x (N, D) into k centres.

    Returns (centres (k, D) float32, assignment (N,) int64). Deterministic for a given
    generator state. When x holds fewer than k distinct points, every distinct point
    becomes a centre and the remaining centres repeat one of them.
    """
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    # k-means++: each next centre is drawn with probability proportional to D(x)^2.
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = _sqdist(x, centres[0][None], chunk).squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every point already coincides with a centre
            centres.append(centres[-1])
            continue
        idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        centres.append(x[idx])
        d2 = torch.minimum(d2, _sqdist(x, x[idx][None], chunk).squeeze(1))
    c = torch.stack(centres)  # (k, D)

    assign = _assign(x, c, chunk)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        # An empty cluster keeps its centre rather than collapsing to the origin.
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        new_assign = _assign(x, new, chunk)
        converged = torch.equal(new_assign, assign)
        c, assign = new, new_assign
        if converged:
            break
    return c, assign


def _sqdist(x: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """Squared Euclidean distances (N, K), computed in row chunks to bound memory."""
    return torch.cat([torch.cdist(xs, c).pow_(2) for xs in x.split(chunk)])


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([torch.cdist(xs, c).argmin(dim=1) for xs in x.split(chunk)])
