"""The batched policy interface: the whole batch's visual tokens as padded tensors in, a padded plan out.

A stage hands a policy one ``BatchTokens`` (``[B, N, D]`` features, ``[B, N]`` validity, segment ids and
in-segment positions, per-segment counts and budgets as ``[B, S]`` tensors with host mirrors, the declared
signals batched the same way) and gets one ``BatchPlan`` (``keep [B, K]`` sorted, -1 padded at the end;
optional ``assign [B, N]`` / ``weight [B, N]``). ``K`` is the largest per-sample kept count, known on the
host before any data is read whenever the policy's count is fixed by its budget, so the engine sizes every
tensor without a device-to-host synchronisation (issue 19: a pruned llava prefill made 28
``cudaStreamSynchronize`` on an H200, each a stall of the launch pipeline).

Three ways a policy gets there:

- ``select_batch`` of its own (``Policy.batched = True``): device-resident selection over the whole batch
  (every registered policy with data-dependent selection has one; it returns None for the cases it leaves
  to ``select``).
- ``Policy.data_free = True``: the plan depends only on the layout (counts, budgets, grids), never on
  features (uniform, random, pool, none, vtw); the engine runs the per-sample ``select`` once on host
  metadata, caches the batched plan per layout and device, and reuses it.
- Neither (custom policies written against ``select(Tokens)``): the engine builds each sample's ``Tokens``
  and calls ``select`` sample by sample (the slow path, which syncs).

Per-image work runs once over every image of the batch: ``segment_rows`` lays each (sample, image) out as
one row, the batched ``_ops`` equivalents (``kcenter_rows``, ``dpp_rows``, ``bipartite_rows``, ``topk_keep``)
select per row, and ``keep_from_rows`` / ``rows_to_batch`` put the result back per sample.

Example:
    >>> import torch
    >>> from mmprune.policies.base import Tokens
    >>> bt = BatchTokens.from_tokens([Tokens(torch.zeros(4, 2), [4], [2]), Tokens(torch.zeros(3, 2), [1, 2], [1, 1])])
    >>> bt.valid.tolist(), bt.segment.tolist(), bt.k_max
    ([[True, True, True, True], [True, True, True, False]], [[0, 0, 0, 0], [0, 1, 1, -1]], 2)
    >>> topk_keep(torch.tensor([[.1, .4, .3, .2], [.5, .1, .9, 0.]]), bt.valid, [2, 1]).tolist()
    [[1, 2], [2, -1]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..syncs import host_list
from ._ops import normed
from .base import Plan, Tokens


def meta_tokens(counts: list[int], budgets: list[int], grids: list, layer, origin: list[int]) -> Tokens:
    """One sample's host metadata as a ``Tokens`` with no features (``[n, 0]`` on the CPU): what count rules
    (``Staged.targets``) and data-free policies read."""
    return Tokens(torch.zeros(sum(counts), 0), list(counts), list(budgets), grids=list(grids), layer=layer,
                  origin=list(origin))


@dataclass
class BatchTokens:
    """The visual tokens of the whole batch entering a stage, padded to ``N`` per sample.

    ``features [B, N, D]``; ``valid [B, N]`` (padding slots False, always at the end of a row); ``segment
    [B, N]`` each token's segment (image / video) within its sample, in sequence order (-1 padding);
    ``pos [B, N]`` its original index inside that segment; ``sizes [B, N]`` how many original tokens it
    stands for. Host mirrors, read without touching the device: ``counts[b][s]`` current tokens per
    segment, ``budgets[b][s]`` tokens to keep per segment, ``origin[b][s]`` the count before the first
    stage, ``grids[b][s]``. ``budget [B, S]`` is ``budgets`` on the device (0 padded). Signals, where
    declared and available, are the per-sample ``Tokens`` fields stacked on a leading batch dimension and
    padded along the token dimension (``attn [B, N]``, ``keys [B, N, Dk]``, ...; None otherwise).
    """

    features: torch.Tensor
    valid: torch.Tensor
    segment: torch.Tensor
    pos: torch.Tensor
    sizes: torch.Tensor
    counts: list[list[int]]
    budgets: list[list[int]]
    origin: list[list[int]]
    grids: list[list]
    layer: int | None = None
    signals: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.counts)

    @property
    def k_max(self) -> int:
        """The widest per-sample kept count when every segment keeps its budget."""
        return max([sum(b) for b in self.budgets], default=0)

    @property
    def budget(self) -> torch.Tensor:
        s = max([len(b) for b in self.budgets], default=0)
        rows = [b + [0] * (s - len(b)) for b in self.budgets]
        return torch.tensor(rows, dtype=torch.long).to(self.features.device, non_blocking=True)

    def __getattr__(self, name):  # signals read like Tokens fields: bt.attn, bt.keys, ...
        sig = self.__dict__.get("signals")
        if sig is not None and name in sig:
            return sig[name]
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def fixed_counts(self) -> list[list[int]]:
        """Per sample, per segment: ``min(budget, count)``, what a policy keeping each segment's budget keeps."""
        return [[min(k, c) if c else 0 for c, k in zip(cs, bs)] for cs, bs in zip(self.counts, self.budgets)]

    def meta(self, b: int) -> Tokens:
        """Sample b's host metadata as a ``Tokens`` with no features (``meta_tokens``)."""
        return meta_tokens(self.counts[b], self.budgets[b], self.grids[b], self.layer, self.origin[b])

    @classmethod
    def from_tokens(cls, tokens: list[Tokens]) -> BatchTokens:
        """Stack per-sample ``Tokens`` (the reference interface) into one ``BatchTokens``: what tests use to
        hold a batched policy to its per-sample reference on the same inputs."""
        n = max([t.n for t in tokens], default=0)
        b = len(tokens)
        ref = tokens[0].features
        feats = ref.new_zeros(b, n, ref.shape[-1])
        valid = torch.zeros(b, n, dtype=torch.bool)
        seg = torch.full((b, n), -1, dtype=torch.long)
        pos = torch.zeros(b, n, dtype=torch.long)
        sizes = torch.ones(b, n)
        signals: dict = {}
        for i, t in enumerate(tokens):
            feats[i, : t.n] = t.features
            valid[i, : t.n] = True
            seg[i, : t.n] = torch.repeat_interleave(torch.arange(len(t.segments)), torch.tensor(t.segments, dtype=torch.long))
            pos[i, : t.n] = t.positions()
            sizes[i, : t.n] = t.token_sizes()
        qs = [t.question if t.question is not None and len(t.question) else t.text for t in tokens]
        if any(q is not None for q in qs):  # the question (else all text), padded: question [B, Q, D] + validity
            width = max([len(q) for q in qs if q is not None], default=0)
            signals["question"] = ref.new_zeros(b, width, ref.shape[-1])
            signals["question_valid"] = torch.zeros(b, width, dtype=torch.bool)
            for i, q in enumerate(qs):
                if q is not None:
                    signals["question"][i, : len(q)] = q
                    signals["question_valid"][i, : len(q)] = True
        if all(t.visual_embeds is not None for t in tokens):  # SparseVLM's raters
            width = max(len(t.visual_embeds) for t in tokens)
            signals["visual_embeds"] = tokens[0].visual_embeds.new_zeros(b, width, tokens[0].visual_embeds.shape[-1])
            signals["visual_valid"] = torch.zeros(b, width, dtype=torch.bool)
            for i, t in enumerate(tokens):
                signals["visual_embeds"][i, : len(t.visual_embeds)] = t.visual_embeds
                signals["visual_valid"][i, : len(t.visual_embeds)] = True
        for name in ("question_keys", "question_normed", "question_rows", "question_embeds"):  # like the question
            vals = [getattr(t, name) for t in tokens]
            if all(v is not None for v in vals):
                width = max(len(v) for v in vals)
                out = vals[0].new_full((b, width, *vals[0].shape[1:]), -1 if name == "question_rows" else 0)
                for i, v in enumerate(vals):
                    out[i, : len(v)] = v
                signals[name] = out
        tas = [t.text_attn for t in tokens]
        if all(ta is not None for ta in tas):  # [Q, N] per sample -> [B, Q, N] + validity
            width = max(ta.shape[0] for ta in tas)
            signals["text_attn"] = torch.zeros(b, width, n)
            signals["text_attn_valid"] = torch.zeros(b, width, dtype=torch.bool)
            for i, ta in enumerate(tas):
                signals["text_attn"][i, : ta.shape[0], : ta.shape[1]] = ta
                signals["text_attn_valid"][i, : ta.shape[0]] = True
        for name in ("attn", "cls_attn", "keys", "cls_sim", "llm_keys", "pagerank", "normed", "tower_cls", "rows"):
            vals = [getattr(t, name) for t in tokens]
            if all(v is not None for v in vals):
                out = vals[0].new_zeros(b, n, *vals[0].shape[1:])
                for i, v in enumerate(vals):
                    out[i, : len(v)] = v
                signals[name] = out
        return cls(feats, valid, seg, pos, sizes, [list(t.segments) for t in tokens], [list(t.budgets) for t in tokens],
                   [list(t.origin or t.segments) for t in tokens], [list(t.grids) for t in tokens],
                   layer=tokens[0].layer, signals=signals)


@dataclass
class BatchPlan:
    """What each sample keeps: ``keep [B, K]`` sorted slot indices, -1 padding at the end of each row.

    ``assign [B, N]`` (optional) is the column of ``keep`` each token merges into (-1: dropped outright;
    kept tokens map to themselves); ``weight [B, N]`` weights a token in its group's mean; ``reduce`` and
    ``premerged`` as in ``Plan``; ``combine [B, K, N]`` a general linear merge. ``counts[b][s]``, the host
    mirror of how many tokens each segment keeps, lets the engine size the next tensors without reading
    the device; None (adaptive counts) makes it read them once. ``totals[b]``: tokens sample b keeps, where
    known when per-segment counts are not (FastV ranks a sample's images together).
    """

    keep: torch.Tensor
    assign: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    reduce: str = "mean"
    combine: torch.Tensor | None = None
    premerged: bool = False
    counts: list[list[int]] | None = None
    totals: list[int] | None = None

    def __post_init__(self):
        if self.totals is None and self.counts is not None:
            self.totals = [sum(c) for c in self.counts]

    def sample(self, b: int, n: int | None = None) -> Plan:
        """Sample b's plan in the per-sample form (padding removed); ``n`` trims ``assign`` / ``weight`` to
        the sample's token count."""
        keep = self.keep[b]
        keep = keep[keep >= 0]
        cut = slice(None) if n is None else slice(0, n)
        return Plan(
            keep=keep,
            assign=None if self.assign is None else self.assign[b, cut],
            weight=None if self.weight is None else self.weight[b, cut],
            scores=None if self.scores is None else self.scores[b, cut],
            reduce=self.reduce,
            combine=None if self.combine is None else self.combine[b, : len(keep), cut],
            premerged=self.premerged,
        )

    @classmethod
    def stack(cls, plans: list[Plan | None], ns: list[int], device=None) -> BatchPlan:
        """Per-sample plans (None: a sample without visual tokens) -> one padded ``BatchPlan`` with host
        counts (the slow path's and the data-free policies' way in)."""
        k = max([len(p.keep) for p in plans if p is not None], default=0)
        n = max(ns, default=0)
        b = len(plans)
        keep = torch.full((b, k), -1, dtype=torch.long)
        live = [p for p in plans if p is not None]
        merge = any(p.assign is not None for p in live)
        assign = torch.full((b, n), -1, dtype=torch.long) if merge else None
        weight = torch.zeros(b, n) if any(p.weight is not None for p in live) else None
        scores = torch.zeros(b, n) if any(p.scores is not None for p in live) else None
        combine = torch.zeros(b, k, n) if any(p.combine is not None for p in live) else None
        totals = []
        for i, (p, ni) in enumerate(zip(plans, ns)):
            kp = 0 if p is None else len(p.keep)
            totals.append(kp)
            if p is None:
                continue
            keep[i, :kp] = p.keep.long().cpu()
            if assign is not None:
                if p.assign is not None:
                    assign[i, :ni] = p.assign.long().cpu()
                else:
                    assign[i, p.keep.long().cpu()] = torch.arange(kp)
            if weight is not None:
                weight[i, :ni] = 1.0 if p.weight is None else p.weight.float().cpu()
            if scores is not None and p.scores is not None:
                scores[i, :ni] = p.scores.detach().float().cpu()
            if combine is not None and p.combine is not None:
                combine[i, :kp, :ni] = p.combine.float().cpu()
        red = next((p.reduce for p in live), "mean")
        pre = any(p.premerged for p in live)
        out = cls(keep, assign, weight, scores, red, combine, pre, totals=totals)
        return out.to(device) if device is not None else out

    def to(self, device) -> BatchPlan:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return BatchPlan(mv(self.keep), mv(self.assign), mv(self.weight), mv(self.scores), self.reduce,
                         mv(self.combine), self.premerged, self.counts, self.totals)


def topk_keep(score: torch.Tensor, valid: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Per row, the ``ks[b]`` highest-scoring valid slots, sorted, -1 padded to ``max(ks)``; ties go to the
    lower index, as ``_ops.topk_indices`` (a stable descending sort), so batched and per-sample agree.
    No host synchronisation: ``ks`` is host data and every shape follows from it."""
    k = max(ks, default=0)
    b = score.shape[0]
    if k == 0:
        return torch.full((b, 0), -1, dtype=torch.long, device=score.device)
    s = score.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    limit = torch.tensor(ks, device=score.device).view(b, 1)
    big = score.shape[1]
    order = torch.where(torch.arange(k, device=score.device).view(1, k) < limit, order, big)
    order = order.sort(dim=1).values
    return order.masked_fill(order == big, -1)


def segment_rows(tokens: BatchTokens) -> tuple[torch.Tensor, list[int], list[int]]:
    """Every (sample, segment) of the batch as one row of slot indices (-1 padded): ``(index [S, m], owner
    [S] sample of each row, ks [S] budget of each row)``. Per-image policies (DivPrune's k-center) then run
    once over all images of the batch. The index is built on the host from the host counts."""
    rows, owner, ks, m = [], [], [], 0
    for b, (counts, budgets) in enumerate(zip(tokens.counts, tokens.budgets)):
        start = 0
        for c, k in zip(counts, budgets):
            if c:
                rows.append(torch.arange(start, start + c))
                owner.append(b)
                ks.append(min(k, c))
                m = max(m, c)  # not max(generator, default=0): torch 2.13's dynamo breaks the graph on that call
            start += c
    index = torch.full((len(rows), m), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
    return index.to(tokens.features.device, non_blocking=True), owner, ks


def segment_features(x: torch.Tensor, index: torch.Tensor, owner: list[int]) -> torch.Tensor:
    """``x [B, N, ...]`` at ``segment_rows``' index -> ``[S, m, ...]`` (padding rows read slot 0)."""
    who = torch.tensor(owner, dtype=torch.long).to(x.device, non_blocking=True)
    return x[who.view(-1, 1), index.clamp(min=0)]


def keep_from_rows(sel: torch.Tensor, index: torch.Tensor, owner: list[int], ks: list[int], batch: int,
                   n: int) -> torch.Tensor:
    """Per-row selections ``sel [S, k]`` (positions into each row of ``index``; the first ``ks[s]`` count) ->
    the batch's ``keep [B, K]`` over ``n`` slots, sorted, -1 padded."""
    totals = [0] * batch
    src, dst = [], []
    width = max([sum(k for k, o in zip(ks, owner) if o == b) for b in range(batch)], default=0)
    for s, (b, k) in enumerate(zip(owner, ks)):
        src.append(torch.arange(k) + s * sel.shape[1])
        dst.append(torch.arange(k) + b * width + totals[b])
        totals[b] += k
    out = torch.full((batch * width,), -1, dtype=torch.long, device=sel.device)
    if src:
        dev = sel.device
        slots = torch.gather(index, 1, sel.clamp(min=0)).flatten()
        out[torch.cat(dst).to(dev, non_blocking=True)] = slots[torch.cat(src).to(dev, non_blocking=True)]
    out = out.view(batch, width)
    big = n + 1
    out = torch.where(out >= 0, out, big).sort(dim=1).values
    return out.masked_fill(out == big, -1)


def kcenter_rows(x: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """``_ops.kcenter`` over rows at once: ``x [S, m, D]``, ``valid [S, m]`` -> ``[S, k]`` positions in
    selection order (rows needing fewer take their first picks). Same distances (``1 - cos``), same first
    pick (the token whose nearest neighbour is farthest), same ties (the first maximum)."""
    s, m, _ = x.shape
    if k == 0 or m == 0:
        return torch.zeros(s, 0, dtype=torch.long, device=x.device)
    xn = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-8)
    dist = 1.0 - xn @ xn.transpose(1, 2)
    pair = valid.unsqueeze(1) & valid.unsqueeze(2)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    d = dist.masked_fill(eye | ~pair, float("inf"))
    first = d.min(1).values.masked_fill(~valid, float("-inf")).argmax(-1)
    dist = dist.masked_fill(~valid.unsqueeze(1), float("-inf"))  # padding columns never win
    closest = torch.gather(dist, 1, first.view(s, 1, 1).expand(s, 1, m)).squeeze(1)
    closest = closest.scatter(1, first.view(s, 1), -1.0)
    sel = [first]
    # a picked token's distance is set to -1 once and stays there (every 1 - cos >= -1): as the reference's
    # closest[sel] = -1, with three kernels a round (argmax, gather, minimum) and one scatter
    for _ in range(k - 1):
        j = closest.argmax(-1, keepdim=True)
        sel.append(j.view(s))
        closest = torch.minimum(closest, torch.gather(dist, 1, j.unsqueeze(-1).expand(s, 1, m)).squeeze(1))
        closest.scatter_(1, j, -1.0)
    return torch.stack(sel, 1)


def rows_to_batch(vals: torch.Tensor, index: torch.Tensor, owner: list[int], batch: int, n: int, fill=0) -> torch.Tensor:
    """Values per ``segment_rows`` position ``vals [S, m]`` -> ``[B, n]`` per slot (``fill`` elsewhere)."""
    dev = vals.device
    who = torch.tensor(owner, dtype=torch.long).to(dev, non_blocking=True).view(-1, 1)
    flat = torch.where(index >= 0, who * n + index, batch * n)
    out = torch.full((batch * n + 1,), fill, dtype=vals.dtype, device=dev)
    out.scatter_(0, flat.flatten(), vals.flatten())
    return out[: batch * n].view(batch, n)


def slot_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` bool, True at every valid (``>= 0``) entry of ``index [B, K]``."""
    out = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    out.scatter_(1, torch.where(index >= 0, index, n), True)
    return out[:, :n]


def mask_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` True positions of each row of ``mask [S, m]``, ascending (-1 where a row has fewer)."""
    m = mask.shape[1]
    pos = torch.where(mask, torch.arange(m, device=mask.device), m).sort(dim=1).values[:, :k]
    return pos.masked_fill(pos == m, -1)


def position_in_keep(keep: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """Column of ``keep [B, K]`` (sorted, -1 padded) holding each of ``slots [B, N]`` (-1 stays -1)."""
    sorted_keep = torch.where(keep >= 0, keep, n + 1)
    pos = torch.searchsorted(sorted_keep.contiguous(), slots.clamp(min=0).contiguous())
    return torch.where(slots >= 0, pos, -1)


def mean_similarity_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``_ops.mean_similarity`` per row of ``x [S, m, D]``: each token's cosine to its row's mean valid token."""
    x = x.float()
    mean = (x * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
    return (normed(x) @ normed(mean).unsqueeze(-1)).squeeze(-1)


def attention_received_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``_ops.attention_received`` per row of ``x [S, m, D]``: mean over valid queries of
    ``softmax(X Xᵀ / sqrt(d))`` over valid keys."""
    x = x.float()
    logits = (x @ x.transpose(1, 2)) / math.sqrt(x.shape[-1])
    att = torch.softmax(logits.masked_fill(~valid.unsqueeze(1), float("-inf")), dim=-1)
    att = att.masked_fill(~valid.unsqueeze(2), 0.0)
    return att.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)


def _tome_merge_rows(x: torch.Tensor, idx, reduce: str = "sum") -> torch.Tensor:
    """ToMe's ``merge`` closure on ``x [G, t, c]``: ``[A unmerged, B with the merged A rows reduced in]``."""
    unm_idx, src_idx, dst_idx = idx
    src, dst = x[:, 0::2], x[:, 1::2]
    w = x.shape[-1]
    moved = torch.gather(src, 1, src_idx.unsqueeze(-1).expand(-1, -1, w))
    dst = dst.scatter_reduce(1, dst_idx.unsqueeze(-1).expand(-1, -1, w), moved, reduce=reduce)
    return torch.cat([torch.gather(src, 1, unm_idx.unsqueeze(-1).expand(-1, -1, w)), dst], 1)


def bipartite_rows(metric: torch.Tensor, sizes: torch.Tensor, k: int, mode: str = "size"):
    """``_ops.bipartite_merge`` (ToMe's ``bipartite_soft_matching`` + ``merge_wavg``, nothing protected) for
    ``G`` rows of the same length at once, as the official code batches images: rounds of
    ``r = min(t - k, t // 2)`` merges (host counts) until ``k`` remain. ``mode="mean"``: AIM's unweighted
    ``scatter_reduce(mean)`` and nested ``1 / count`` weights. Returns ``(keep [G, k], assign [G, n], weight
    [G, n])`` as there. Ties in the match scores go to the lower index (a stable sort)."""
    g, n, c = metric.shape
    dev = metric.device
    m = metric.float()
    size = sizes.float()
    ids = torch.arange(n, device=dev).expand(g, n)
    row = ids
    weight = sizes.float() if mode == "size" else torch.ones(g, n, device=dev)
    t = n
    while t > k:
        r = min(t - k, t // 2)
        if r <= 0:
            break
        mn = m / m.norm(dim=-1, keepdim=True)
        scores = mn[:, 0::2] @ mn[:, 1::2].transpose(1, 2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = torch.gather(node_idx, 1, src_idx)

        idx = (unm_idx, src_idx, dst_idx)
        if mode == "size":
            msum = _tome_merge_rows(m * size.unsqueeze(-1), idx)
            size = _tome_merge_rows(size.unsqueeze(-1), idx)[..., 0]
            m = msum / size.unsqueeze(-1)
        else:
            count = _tome_merge_rows(torch.ones(g, t, 1, device=dev), idx)[..., 0]
            m = _tome_merge_rows(m, idx, "mean")
        tb = t // 2
        nu = (t + 1) // 2 - r  # A tokens left unmerged
        new_row = torch.empty(g, t, dtype=torch.long, device=dev)
        new_row[:, 0::2] = -1
        new_row.scatter_(1, 2 * unm_idx, torch.arange(nu, device=dev).expand(g, nu))
        new_row[:, 1::2] = torch.arange(nu, nu + tb, device=dev).expand(g, tb)
        new_row.scatter_(1, 2 * src_idx, torch.gather(new_row[:, 1::2], 1, dst_idx))
        row = torch.gather(new_row, 1, row)
        ids = torch.cat([torch.gather(ids[:, 0::2], 1, unm_idx), ids[:, 1::2]], 1)
        t = nu + tb
        if mode == "mean":
            weight = weight / torch.gather(count, 1, row)
    keep, order = ids.sort(dim=1)
    pos = torch.empty_like(order).scatter_(1, order, torch.arange(ids.shape[1], device=dev).expand_as(order))
    return keep, torch.gather(pos, 1, row), weight


def bipartite_rounds(t: int, k: int) -> int:
    """How many rounds ``bipartite_rows`` takes from ``t`` tokens to ``k`` (fewer tokens never take more)."""
    n = 0
    while t > k and min(t - k, t // 2) > 0:
        t, n = t - min(t - k, t // 2), n + 1
    return n


def bipartite_ragged(metric: torch.Tensor, sizes: torch.Tensor, t: torch.Tensor, k: torch.Tensor,
                     rounds: int) -> torch.Tensor:
    """``bipartite_rows`` (mode "size") for rows whose token counts live on the device: row ``g`` holds
    ``t[g]`` tokens (its first ``t[g]`` positions of ``metric [G, W, c]``) and merges down to ``k[g]``. Every
    row runs ``rounds`` rounds (a host bound: rounds are needed while ``t > k``); a round's
    ``r = min(t - k, t // 2)`` is a tensor, a row with ``r = 0`` passes through. Returns, per position, the
    position of the token its group ends at (``ids[row]`` of ``bipartite_rows``), -1 past ``t``. Unmerged
    A tokens keep ToMe's order (descending match score, then B), so the result equals ``bipartite_rows`` on
    each row alone."""
    g, w, c = metric.shape
    dev = metric.device
    ar = torch.arange(w, device=dev).expand(g, w)
    t = t0 = t.view(-1, 1).long()
    k = k.view(-1, 1).long()
    m = torch.where((ar < t).unsqueeze(-1), metric.float(), 1.0)
    size = torch.where(ar < t, sizes.float(), 1.0)
    ids, row = ar, ar
    wa, wb = (w + 1) // 2, w // 2
    if wb == 0:  # at most one token a row: nothing to merge
        rounds = 0
    ea = torch.arange(wa, device=dev).view(1, -1)
    eb = torch.arange(wb, device=dev).view(1, -1)
    for _ in range(rounds):
        r = torch.minimum(t - k, t // 2).clamp(min=0)
        na, nb = (t + 1) // 2, t // 2
        mn = m / m.norm(dim=-1, keepdim=True)
        scores = (mn[:, 0::2] @ mn[:, 1::2].transpose(1, 2)).masked_fill((eb >= nb).unsqueeze(1), float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        edge = torch.sort(node_max.masked_fill(ea >= na, float("-inf")), dim=-1, descending=True, stable=True).indices
        is_src = ea < r  # by rank: the r best-matched A tokens merge (r <= nb <= na)
        dst = torch.where(is_src, torch.gather(node_idx, 1, edge), wb)  # wb: a spare column
        xs = torch.cat([m * size.unsqueeze(-1), size.unsqueeze(-1)], -1)
        moved = torch.gather(xs[:, 0::2], 1, edge.unsqueeze(-1).expand(-1, -1, c + 1))
        b_x = torch.cat([xs[:, 1::2], xs.new_zeros(g, 1, c + 1)], 1).scatter_reduce(
            1, dst.unsqueeze(-1).expand(-1, -1, c + 1), moved, reduce="sum")[:, :wb]
        nu = na - r
        new_a = torch.where((ea >= r) & (ea < na), ea - r, w)  # rank e -> its new place, w: dropped
        new_b = torch.where(eb < nb, nu + eb, w)
        out = xs.new_zeros(g, w + 1, c + 1).scatter_(1, new_a.unsqueeze(-1).expand(-1, -1, c + 1), moved)
        out = out.scatter_(1, new_b.unsqueeze(-1).expand(-1, -1, c + 1), b_x)[:, :w]
        t = t - r
        live = ar < t
        size = torch.where(live, out[..., c], 1.0)
        m = torch.where(live.unsqueeze(-1), out[..., :c] / out[..., c:].clamp(min=1e-30), 1.0)
        # current position -> next position: A by its rank (merged ones follow their B partner), B in order
        rank = torch.empty_like(edge).scatter_(1, edge, ea.expand_as(edge))
        nxt = torch.empty(g, w, dtype=torch.long, device=dev)
        nxt[:, 0::2] = torch.where(rank < r, nu + node_idx, rank - r)
        nxt[:, 1::2] = nu + eb
        row = torch.gather(nxt, 1, row)
        stays = torch.ones(g, w, dtype=torch.bool, device=dev)
        stays[:, 0::2] = rank >= r  # a merged A token hands its place to its B partner's id
        ids = torch.full((g, w + 1), -1, dtype=torch.long, device=dev).scatter_(
            1, torch.where((ar < t + r) & stays, nxt, w), ids)[:, :w]
    return torch.where(ar < t0, torch.gather(ids, 1, row), -1)


def dpp_rows(kernel: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """``_ops.dpp_greedy`` over rows at once (the official loop is batched the same way): ``kernel [S, m, m]``,
    ``valid [S, m]`` -> ``[S, k]`` picks in selection order. ``dpp_greedy``'s guard, which the official loop lacks
    (once a row's best gain is <= 0, an exhausted kernel, it takes the largest remaining diagonal entries from then
    on), is applied after the loop, in one pass: a row's rounds after its first non-positive gain are replaced by
    its remaining diagonal in descending order (ties to the lower index, as ``argmax``). The loop itself is only
    the official arithmetic, which on a CPU is dispatch-bound: 8 ops a round instead of 16 took llava-1.5's
    144-of-576 pick from 6.4 to 4.7 ms (1 thread)."""
    s, m, _ = kernel.shape
    dev = kernel.device
    kernel = kernel.float()
    rows = torch.arange(s, device=dev)
    diag = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~valid, float("-inf"))
    di2s = diag.clone()
    cis = torch.zeros(k, s, m, device=dev)
    sel = torch.zeros(s, k, dtype=torch.long, device=dev)
    gains = torch.zeros(s, k, device=dev)
    for i in range(k):  # rows past their guard compute NaNs, confined to the row and replaced below
        gain, j = di2s.max(-1)
        sel[:, i], gains[:, i] = j, gain
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(gain).unsqueeze(-1)
        cis[i] = eis
        di2s = di2s - torch.square(eis)
        di2s[rows, j] = float("-inf")
    if k == 0:
        return sel
    bad = ~(gains > 0)
    first = torch.where(bad.any(1), bad.int().argmax(1), k)  # each row's first exhausted round (k: none)
    before = torch.arange(k, device=dev) < first.unsqueeze(1)
    taken = torch.where(before, float("-inf"), float("inf"))  # the picks before it leave the fallback's pool
    rest = diag.scatter_reduce(1, sel, taken, "amin", include_self=True)
    order = torch.sort(rest, dim=1, descending=True, stable=True).indices
    late = (torch.arange(k, device=dev) - first.unsqueeze(1)).clamp(min=0, max=m - 1)
    return torch.where(before, sel, order.gather(1, late))


def premerged_batch(bt: BatchTokens, counts: list[list[int]] | None = None) -> BatchPlan:
    """``_ops.premerged_plan`` for the batch: the groups a merge before the projector made
    (``tower_assign``: each token's representative, its in-image index) as a plan. ``counts`` (host, per
    segment) where the policy's count is fixed; None reads the kept counts once (adaptive policies)."""
    b, n = bt.valid.shape
    rep = bt.tower_assign.long()
    slot = torch.arange(n, device=rep.device).expand(b, n)
    kept = bt.valid & (rep == bt.pos)
    if counts is None:
        seg = torch.where(kept, bt.segment, 0)
        s = max([len(c) for c in bt.counts], default=0)
        per = torch.zeros(b, s + 1, dtype=torch.long, device=rep.device).scatter_add_(1, seg, kept.long())
        host = host_list(per[:, :s])  # the adaptive count: one read
        counts = [host[i][: len(cs)] for i, cs in enumerate(bt.counts)]
    totals = [sum(c) for c in counts]
    keep = mask_positions(kept, max(totals, default=0))
    rep_slot = torch.where(bt.valid & (rep >= 0), slot - bt.pos + rep, -1)
    return BatchPlan(keep, position_in_keep(keep, rep_slot, n), premerged=True, counts=counts, totals=totals)


def unflatten_counts(counts: list[list[int]], per_row: list[int]) -> list[list[int]]:
    """Per ``segment_rows`` row counts -> per sample, per segment (0 for empty segments)."""
    it = iter(per_row)
    return [[next(it) if c else 0 for c in cs] for cs in counts]


def combine_batch(rows: torch.Tensor, members: torch.Tensor, index: torch.Tensor, owner: list[int],
                  keep: torch.Tensor, n: int) -> torch.Tensor:
    """Per-image combine rows ``rows [S, m, m]`` (row p: the merged feature of member p over the image's
    tokens) -> the batch's ``combine [B, K, N]`` (keep columns x slots)."""
    b, k = keep.shape
    dev = rows.device
    s, m = index.shape
    who = torch.tensor(owner, dtype=torch.long).to(dev, non_blocking=True).view(-1, 1)
    slot_col = position_in_keep(keep, torch.arange(n, device=dev).expand(b, n), n)  # slot -> keep column
    valid = index >= 0
    col = torch.where(members & valid, slot_col[who.expand(s, m), index.clamp(min=0)], -1)
    row_id = torch.where(col >= 0, who * k + col, b * k)  # [S, m]
    col_id = torch.where(valid, index, n)  # [S, m]
    flat = row_id.unsqueeze(-1) * (n + 1) + col_id.unsqueeze(1)  # [S, m, m]
    out = torch.zeros((b * k + 1) * (n + 1), device=dev)
    out.scatter_(0, flat.flatten(), rows.float().flatten())
    return out.view(b * k + 1, n + 1)[: b * k, :n].view(b, k, n)
