"""Plain-loop specifications of the token ops, for tests of both paths (CPU and GPU).

Slow on purpose: one Python loop per row, written straight from the contract in ``__init__.py``.

Example:
    >>> import torch
    >>> loop_gather(torch.arange(4.).view(1, 2, 2), torch.tensor([[1, -1]])).tolist()
    [[[2.0, 3.0], [0.0, 0.0]]]
"""

from __future__ import annotations

import torch


def loop_gather(x, index):
    b, k = index.shape
    out = torch.zeros(b, k, x.shape[2], dtype=x.dtype)
    for i in range(b):
        for j in range(k):
            if index[i, j] >= 0:
                out[i, j] = x[i, index[i, j]]
    return out


def loop_scatter(dst, index, src):
    out = dst.clone()
    for i in range(index.shape[0]):
        for j in range(index.shape[1]):
            if index[i, j] >= 0:
                out[i, index[i, j]] = src[i, j].to(dst.dtype)
    return out


def loop_merge(x, assign, m, weight=None):
    """float64 weighted mean per group; zeros for empty groups."""
    b, n, d = x.shape
    out = torch.zeros(b, m, d, dtype=torch.float64)
    total = torch.zeros(b, m, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            g = int(assign[i, j])
            if g >= 0:
                w = 1.0 if weight is None else float(weight[i, j])
                out[i, g] += w * x[i, j].double()
                total[i, g] += w
    nz = total > 0
    out[nz] /= total[nz].unsqueeze(-1)
    return out, total


def rand_index(b, n, k, holes=True, unique=True, gen=None):
    """Random ``[b, k]`` index into ``n`` rows (unique per row by default) with one ``-1`` hole."""
    rows = [torch.randperm(n, generator=gen)[:k] if unique else torch.randint(0, n, (k,), generator=gen)
            for _ in range(b)]
    idx = torch.stack(rows)
    if holes and k > 1:
        idx[b - 1, k // 2] = -1
    return idx


# Odd test shapes (B, N, D, K): N not a power of two, D = 257, K = 1, B = 3, D = 1.
SHAPES = [(3, 13, 257, 1), (1, 7, 33, 7), (2, 9, 1, 4), (3, 6, 40, 6)]
