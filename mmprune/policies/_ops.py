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


def _tome_merge(x: torch.Tensor, idx, reduce: str) -> torch.Tensor:
    """ToMe's ``merge`` closure on ``x [t, c]``: rows ``[A unmerged, B with the merged A rows reduced in]``."""
    unm_idx, src_idx, dst_idx = idx
    src, dst = x[0::2], x[1::2]
    dst = dst.scatter_reduce(0, dst_idx[:, None].expand(-1, x.shape[1]), src[src_idx], reduce=reduce)
    return torch.cat([src[unm_idx], dst])


def bipartite_merge(metric: torch.Tensor, sizes: torch.Tensor, k: int, protect: torch.Tensor | None = None,
                    mode: str = "size"):
    """ToMe's bipartite soft matching, repeated until ``k`` tokens remain, exactly as the official code.

    Reference: facebookresearch/ToMe ``tome/merge.py`` (commit af95e4b), ``bipartite_soft_matching`` +
    ``merge_wavg``. Each round splits the *current* token order alternately into A (even) and B (odd),
    matches every A token to its most similar B token (cosine of the metric), and merges the
    ``r = min(n - k, (n - protected) // 2)`` best-matched A tokens into their B partners (ToMe merges at
    most half of the unprotected tokens per round, so an odd count leaves the extra A token alone). The
    next round's order is ToMe's output order: the unmerged A tokens in descending match score (ascending
    A index when a token is protected, as ToMe's ``class_token``), then the B tokens.

    ``mode="size"`` (ToMe): a merged token's metric is the size-weighted mean, so a group's feature is the
    plain mean of its originals. ``mode="mean"`` (AIM, LaVi-Lab/AIM ``llava/model/token_merge.py``, commit
    edc24e9): ``scatter_reduce(mean)`` of the current tokens, each counting once whatever it stands for.
    ``protect`` marks tokens never merged away. Returns ``(keep, assign, weight)``: surviving original
    indices (sorted; a group sits at its B token), per original token its group's position in ``keep``,
    and per original token its weight in its group's mean (``sizes`` for "size"; the nested ``1/count``
    products for "mean").
    """
    if mode not in ("size", "mean"):
        raise ValueError(f"bipartite_merge mode must be 'size' or 'mean'; got {mode!r}")
    n = metric.shape[0]
    m = metric.float().cpu().clone()  # current tokens, in ToMe's current order
    size = sizes.float().cpu().clone()
    ids = torch.arange(n)  # original index of each current token (its representative)
    row = torch.arange(n)  # original -> current row of its group
    weight = size.clone() if mode == "size" else torch.ones(n)
    prot = torch.zeros(n, dtype=torch.bool) if protect is None else protect.bool().cpu().clone()
    while len(ids) > k:
        t = len(ids)
        r = min(t - k, (t - int(prot[ids].sum())) // 2)
        if r <= 0:
            break
        mn = m / m.norm(dim=-1, keepdim=True)
        scores = mn[0::2] @ mn[1::2].T
        scores[prot[ids[0::2]]] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
        if protect is not None:
            unm_idx = unm_idx.sort().values
        dst_idx = node_idx[src_idx]

        idx = (unm_idx, src_idx, dst_idx)
        if mode == "size":  # merge_wavg: x * size summed, divided by the summed size
            msum = _tome_merge(m * size[:, None], idx, "sum")
            size = _tome_merge(size[:, None], idx, "sum")[:, 0]
            m = msum / size[:, None]
        else:
            count = _tome_merge(torch.ones(t, 1), idx, "sum")[:, 0]
            m = _tome_merge(m, idx, "mean")
        a_rows, b_rows = torch.arange(0, t, 2), torch.arange(1, t, 2)
        new_row = torch.empty(t, dtype=torch.long)
        new_row[a_rows[unm_idx]] = torch.arange(len(unm_idx))
        new_row[b_rows] = torch.arange(len(unm_idx), len(unm_idx) + len(b_rows))
        new_row[a_rows[src_idx]] = new_row[b_rows[dst_idx]]
        row = new_row[row]
        ids = torch.cat([ids[a_rows[unm_idx]], ids[b_rows]])
        if mode == "mean":
            weight = weight / count[row]
    order = torch.argsort(ids)
    keep = ids[order]
    pos = torch.empty(len(ids), dtype=torch.long)
    pos[order] = torch.arange(len(ids))
    return keep, pos[row], weight


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
    """Fast greedy MAP inference for a DPP (Chen et al., NeurIPS'18): k indices in selection order.

    Operation for operation the loop of CDPruner's ``encode_images`` (Theia-4869/CDPruner
    ``llava/model/llava_arch.py``, commit ed9c12d), in float32 as there, so near-ties resolve the same way.
    One guard the official loop lacks: once the kernel is exhausted (rank-deficient, e.g. duplicated tokens;
    the official loop would take the square root of a non-positive gain and continue on NaN), the rest is
    filled with the largest remaining diagonal entries.
    """
    n = kernel.shape[0]
    k = min(k, n)
    kernel = kernel.float()[None]  # [1, N, N]: the official code's batch of one
    cis = torch.zeros((k, 1, n), device=kernel.device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    b = torch.arange(1, device=kernel.device)
    sel: list[int] = []
    for i in range(k):
        j = torch.argmax(di2s, dim=-1)
        if float(di2s[b, j]) <= 0:
            order = torch.sort(kernel[0].diagonal().cpu(), descending=True, stable=True).indices.tolist()
            sel.extend([t for t in order if t not in sel][: k - len(sel)])
            break
        sel.append(int(j))
        eis = (kernel[b, j] - torch.einsum("tb,tbn->bn", cis[:i, b, j], cis[:i])) / torch.sqrt(di2s[b, j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[b, j] = -float("inf")
    return torch.tensor(sel, dtype=torch.long)


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
        cls_sim=cut(tokens.cls_sim), tome_groups=cut(tokens.tome_groups), tower_cls=cut(tokens.tower_cls), tower_assign=cut(tokens.tower_assign),
        next_cls_attn=cut(tokens.next_cls_attn), next_keys=cut(tokens.next_keys), question=tokens.question, text_attn=cut(tokens.text_attn, 1),
        llm_keys=cut(tokens.llm_keys), pagerank=cut(tokens.pagerank), question_keys=tokens.question_keys, normed=cut(tokens.normed),
        question_normed=tokens.question_normed, visual_embeds=tokens.visual_embeds,
        question_embeds=tokens.question_embeds, rows=cut(tokens.rows), question_rows=tokens.question_rows,
        pos=tokens.positions()[sl], sizes=tokens.token_sizes()[sl],
        origin=None if tokens.origin is None else [tokens.origin[seg]],
    )


def premerged_plan(t: Tokens) -> Plan | None:
    """The plan of a merge already applied before the projector (``Tokens.tower_assign``), or None."""
    if t.tower_assign is None:
        return None
    rep = t.tower_assign.long().cpu()
    pos = t.positions()
    keep = (rep == pos).nonzero().flatten()
    where = torch.full((int(max(pos.max(), rep.max())) + 2,), -1, dtype=torch.long)
    where[pos[keep]] = torch.arange(len(keep))
    assign = torch.where(rep >= 0, where[rep.clamp(min=0)], -1)
    if bool(((rep >= 0) & (assign < 0)).any()):  # a representative was dropped by an earlier stage
        return None
    return Plan(keep=keep, assign=assign, premerged=True)


def segmentwise(tokens: Tokens, fn) -> Plan:
    """Run ``fn(one_segment_tokens) -> Plan`` per segment and stitch the plans into one (global indices)."""
    keeps, assigns, weights, scores, blocks = [], [], [], [], []
    reduce, premerged = "mean", False
    any_assign = any_weight = any_score = False
    offset = 0
    for i, sl in enumerate(tokens.segment_slices()):
        n = sl.stop - sl.start
        if n == 0:
            continue
        plan = fn(sub_tokens(tokens, i))
        reduce, premerged = plan.reduce, plan.premerged
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
        blocks.append((base, sl, plan.combine))
        offset += n
    if not keeps:
        return Plan(keep=torch.zeros(0, dtype=torch.long))
    keep = torch.cat(keeps)
    order = torch.argsort(keep)
    plan = Plan(keep=keep[order], reduce=reduce, premerged=premerged)
    if any_assign:
        remap = torch.empty_like(order)
        remap[order] = torch.arange(len(order))
        a = torch.cat(assigns)
        plan.assign = torch.where(a >= 0, remap[a.clamp(min=0)], a)
        plan.weight = torch.cat(weights) if any_weight else None
    if any_score:
        plan.scores = torch.cat(scores)
    if any(c is not None for _, _, c in blocks):  # block-diagonal combine over the segments
        if any(c is None for _, _, c in blocks):
            raise ValueError("segmentwise: either every segment's plan has a combine matrix or none")
        combine = torch.zeros(len(keep), tokens.n)
        for base, sl, c in blocks:
            combine[base : base + c.shape[0], sl] = c.float().cpu()
        plan.combine = combine[order]
    return plan
