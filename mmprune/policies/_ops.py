"""Selection primitives shared by the policies: similarity, matching, diversity, DPP, grids, knees.

Everything here is deterministic (stable sorts, no randomness) and works on one segment's tokens on the
device they come on; results are returned as CPU ``long`` indices.

Example:
    >>> import torch
    >>> kcenter(torch.tensor([[1., 0.], [0.99, 0.1], [0., 1.], [-1., 0.]]), 2).tolist()
    [3, 0]
"""

from __future__ import annotations

import math

import torch

from .base import Plan, Tokens


def normed(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-8)


def cos_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    a = normed(a)
    return a @ (a if b is None else normed(b)).T


def attention_received(x: torch.Tensor) -> torch.Tensor:
    """Fallback importance without a [CLS]/attention signal: the mean attention each token receives under
    plain dot-product self-attention of the features, ``softmax(X Xᵀ / sqrt(d))`` averaged over queries."""
    x = x.float()
    return torch.softmax(x @ x.T / math.sqrt(x.shape[-1]), dim=-1).mean(0)


def mean_similarity(x: torch.Tensor) -> torch.Tensor:
    """Fallback for similarity-to-[CLS]: cosine similarity of each token to the segment's mean token."""
    return normed(x) @ normed(x.float().mean(0, keepdim=True)).T[:, 0]


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties broken by position (stable), sorted."""
    order = torch.sort(score.float().cpu(), descending=True, stable=True).indices
    return order[:k].sort().values


def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k indices spread over range(n) (bin centres)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long().clamp(max=n - 1)


def nearest_assign(n: int, keep: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``assign [n]``: kept tokens map to themselves, every other token to the kept token it is most similar
    to (``sim [n, len(keep)]``)."""
    keep = keep.cpu()
    assign = sim.float().cpu().argmax(-1)
    assign[keep] = torch.arange(len(keep))
    return assign


def bipartite_merge(metric: torch.Tensor, sizes: torch.Tensor, k: int, protect: torch.Tensor | None = None):
    """ToMe's bipartite soft matching, repeated until ``k`` tokens remain.

    Each round splits the current tokens alternately into A (even) and B (odd), matches every A token to
    its most similar B token (cosine of ``metric``), and merges the ``r = min(n - k, |A|)`` best-matched A
    tokens into their B partners; a merged token's metric is the size-weighted mean. ``protect`` marks
    tokens never merged away. Returns ``(keep, assign)``: surviving original indices (sorted) and, per
    original token, its group's position in ``keep``.
    """
    n = metric.shape[0]
    group = torch.arange(n)  # original -> current token id (an original index)
    alive = torch.arange(n)
    m = metric.float().cpu().clone()
    size = sizes.float().cpu().clone()
    prot = torch.zeros(n, dtype=torch.bool) if protect is None else protect.cpu().clone()
    while len(alive) > k:
        a_idx, b_idx = alive[0::2], alive[1::2]
        a_idx = a_idx[~prot[a_idx]]
        if len(a_idx) == 0 or len(b_idx) == 0:
            break
        sim = cos_matrix(m[a_idx], m[b_idx])
        best, partner = sim.max(-1)
        r = min(len(alive) - k, len(a_idx))
        order = torch.sort(best, descending=True, stable=True).indices[:r]
        src, dst = a_idx[order], b_idx[partner[order]]
        msum = m * size[:, None]
        msum.index_add_(0, dst, msum[src])
        size.index_add_(0, dst, size[src])
        m = msum / size[:, None].clamp(min=1e-12)
        mapping = torch.arange(n)
        mapping[src] = dst
        group = mapping[group]
        gone = torch.zeros(n, dtype=torch.bool)
        gone[src] = True
        alive = alive[~gone[alive]]
    keep = alive.sort().values
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[keep] = torch.arange(len(keep))
    return keep, pos[group]


def kcenter(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity (k-center) on cosine distance.

    First pick: the token whose nearest neighbour is farthest; then repeatedly the token whose distance to
    the selected set is largest. Returns the selected indices in selection order.
    """
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    dist = (1.0 - cos_matrix(x)).cpu()
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    first = int(d.min(0).values.argmax())
    sel = [first]
    closest = dist[first].clone()
    for _ in range(k - 1):
        closest[sel] = -1.0
        j = int(closest.argmax())
        sel.append(j)
        closest = torch.minimum(closest, dist[j])
    return torch.tensor(sel, dtype=torch.long)


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Fast greedy MAP inference for a DPP (Chen et al., NeurIPS'18): k indices in selection order."""
    n = kernel.shape[0]
    k = min(k, n)
    kernel = kernel.double().cpu()
    cis = torch.zeros(k, n, dtype=torch.float64)
    di2 = kernel.diagonal().clone()
    sel = []
    for i in range(k):
        j = int(di2.argmax())
        sel.append(j)
        if di2[j] <= 1e-12:  # kernel exhausted (rank-deficient): fill with the best remaining diagonal
            rest = [t for t in torch.sort(kernel.diagonal(), descending=True, stable=True).indices.tolist() if t not in sel]
            sel.extend(rest[: k - len(sel)])
            break
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(di2[j]))
        cis[i] = e
        di2 = di2 - e * e
        di2[sel] = float("-inf")
    return torch.tensor(sel[:k], dtype=torch.long)


def knee(values: torch.Tensor) -> int:
    """Knee of a curve sorted in decreasing order (Kneedle): the index whose point lies farthest below the
    chord from the first to the last point, on axes scaled to [0, 1]. Returns the count of points before it
    (the head), at least 1."""
    v = values.double().cpu()
    n = len(v)
    if n <= 2:
        return n
    y = (v - v[-1]) / (v[0] - v[-1]) if v[0] > v[-1] else torch.zeros(n, dtype=torch.float64)
    x = torch.arange(n, dtype=torch.float64) / (n - 1)
    gap = (1.0 - x) - y  # chord minus curve
    return max(1, int(gap.argmax()))


def grid_coords(tokens: Tokens, seg: int):
    """Per token of segment ``seg``: ``(frame, row, col)`` from its grid and original position, or None
    when the segment has no grid. Tokens past the grid (a trailing newline) get frame -1."""
    grid = tokens.grids[seg] if seg < len(tokens.grids) else None
    if grid is None:
        return None
    t, h, w = grid
    sl = tokens.segment_slices()[seg]
    pos = tokens.positions()[sl]
    inside = pos < t * h * w
    f = torch.where(inside, pos // (h * w), torch.full_like(pos, -1))
    r = torch.where(inside, (pos % (h * w)) // w, torch.zeros_like(pos))
    c = torch.where(inside, pos % w, torch.zeros_like(pos))
    return f, r, c


def sub_tokens(tokens: Tokens, seg: int) -> Tokens:
    """The ``Tokens`` of one segment (per-token fields sliced; text / question shared)."""
    sl = tokens.segment_slices()[seg]

    def cut(t, dim=0):
        if t is None:
            return None
        return t[sl] if dim == 0 else t[:, sl]

    return Tokens(
        features=tokens.features[sl], segments=[sl.stop - sl.start], budgets=[tokens.budgets[seg]],
        grids=[tokens.grids[seg] if seg < len(tokens.grids) else None], attn=cut(tokens.attn),
        text=tokens.text, layer=tokens.layer, cls_attn=cut(tokens.cls_attn), keys=cut(tokens.keys),
        cls_sim=cut(tokens.cls_sim), tome_groups=cut(tokens.tome_groups), question=tokens.question, text_attn=cut(tokens.text_attn, 1),
        llm_keys=cut(tokens.llm_keys), pos=tokens.positions()[sl], sizes=tokens.token_sizes()[sl],
        origin=None if tokens.origin is None else [tokens.origin[seg]],
    )


def segmentwise(tokens: Tokens, fn) -> Plan:
    """Run ``fn(one_segment_tokens) -> Plan`` per segment and stitch the plans into one (global indices)."""
    keeps, assigns, weights, scores = [], [], [], []
    any_assign = any_weight = any_score = False
    offset = 0
    for i, sl in enumerate(tokens.segment_slices()):
        n = sl.stop - sl.start
        if n == 0:
            continue
        plan = fn(sub_tokens(tokens, i))
        keep = plan.keep.long().cpu()
        base = sum(len(k) for k in keeps)
        keeps.append(keep + sl.start)
        if plan.assign is not None:
            any_assign = True
            a = plan.assign.long().cpu()
            assigns.append(torch.where(a >= 0, a + base, a))
        else:
            a = torch.full((n,), -1, dtype=torch.long)
            a[keep] = torch.arange(len(keep)) + base
            assigns.append(a)
        weights.append(torch.ones(n) if plan.weight is None else plan.weight.float().cpu())
        any_weight |= plan.weight is not None
        scores.append(torch.zeros(n) if plan.scores is None else plan.scores.float().cpu())
        any_score |= plan.scores is not None
        offset += n
    if not keeps:
        return Plan(keep=torch.zeros(0, dtype=torch.long))
    keep = torch.cat(keeps)
    order = torch.argsort(keep)
    plan = Plan(keep=keep[order])
    if any_assign:
        remap = torch.empty_like(order)
        remap[order] = torch.arange(len(order))
        a = torch.cat(assigns)
        plan.assign = torch.where(a >= 0, remap[a.clamp(min=0)], a)
        plan.weight = torch.cat(weights) if any_weight else None
    if any_score:
        plan.scores = torch.cat(scores)
    return plan
