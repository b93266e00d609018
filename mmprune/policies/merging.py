"""Merging policies: ``tome``, ``visionzip``, ``prumerge+``, ``pool``, ``temporal``.

Each returns a ``Plan`` with ``assign``: dropped tokens fold into a kept representative, whose feature
becomes the (weighted) mean of its group and which keeps its own position (RoPE / M-RoPE ids).
"""

from __future__ import annotations

import torch

from ..syncs import host_list
from ._ops import (
    attention_received,
    bipartite_merge,
    evenly_spaced,
    grid_coords,
    premerged_plan,
    segmentwise,
)
from .base import Plan, Policy, Tokens
from .batch import (
    BatchPlan,
    BatchTokens,
    attention_received_rows,
    bipartite_ragged,
    bipartite_rounds,
    bipartite_rows,
    combine_batch,
    keep_from_rows,
    mask_positions,
    position_in_keep,
    premerged_batch,
    rows_to_batch,
    segment_features,
    segment_rows,
    slot_mask,
    topk_keep,
    unflatten_counts,
)


def _install_tower_merge(policy: Policy, engine) -> None:
    """``where="auto"``: merge the tower's features before the projector where the adapter can (LLaVA-1.5),
    as VisionZip's and PruMerge+'s official code; ``"projector"``: always after it."""
    merge = getattr(engine.adapter, "install_tower_merge", None)
    if policy.options["where"] == "auto" and merge is not None:
        merge(engine, policy)


class ToMe(Policy):
    """ToMe: bipartite soft matching on key similarity, size-weighted means (Bolya et al., ICLR'23).

    Tokens are split alternately into sets A and B; each A token is matched to its most similar B token
    (cosine of the vision tower's keys, head-averaged, as ToMe uses; the stage's features where no keys
    exist, e.g. inside the LLM); the ``r`` best-matched A tokens merge into their partners; repeated until
    the budget is met exactly. Merged features are size-weighted means (a token that already stands for s
    originals weighs s), so the result equals the plain mean of the original tokens of each group. Each
    round is the official ``bipartite_soft_matching`` (facebookresearch/ToMe ``tome/merge.py``, commit
    af95e4b): at most ``(n - protected) // 2`` merges, and the next round splits ToMe's output order
    ``[unmerged A by score, B]`` (see ``mmprune.policies._ops.bipartite_merge``); proven equal to a
    reference written from that file in ``tests/test_faithful.py``.

    Where: ``where="auto"`` merges between the CLIP tower's blocks for LLaVA-1.5 (with proportional
    attention, ToMe's ``log(size)`` bias, in the tower's later blocks; see ``mmprune.adapters.llava``), and
    after the projector elsewhere; ``"encoder"`` / ``"projector"`` force one (``"encoder"`` falls back to
    the projector for towers without support: NeXT / OneVision anyres packing and the Qwen towers).
    Inside the encoder ToMe merges ``r`` tokens per block up to the feature layer, at most half of them
    per block; whatever the budget still asks for is merged after the projector, on the tower keys.

    Deviations: after the projector the LLM gets no proportional attention (its masks carry no per-token
    bias); per image, not per batch; ToMe's ``r`` per block is replaced by an exact budget.

    Example:
        >>> x = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0., 1.], [1., 1.], [-1., 1.]])
        >>> plan = ToMe().select(Tokens(x, [6], [4]))
        >>> plan.keep.tolist(), plan.assign.tolist()
        ([1, 3, 4, 5], [0, 0, 1, 1, 2, 3])
    """

    name = "tome"
    signals = ("keys", "tome_groups")
    batched = True
    paper = "ToMe, ICLR'23"
    summary = "bipartite soft matching on key similarity, size-weighted merge"
    where = "inside the CLIP tower (LLaVA-1.5), else after the projector"
    paper_url = "https://arxiv.org/abs/2210.09461"
    code_url = "https://github.com/facebookresearch/ToMe/tree/af95e4b1befa172dadccd8c81e223b10090f9579"
    option_choices = {"where": ("auto", "encoder", "projector")}

    @classmethod
    def option_defaults(cls):
        return {"where": "auto"}

    def install_encoder(self, engine) -> None:
        if self.options["where"] == "projector":
            return
        merge = getattr(engine.adapter, "install_encoder_merge", None)
        done = merge is not None and merge(engine, self)
        if not done and self.options["where"] == "encoder":
            engine.notes.append(f"tome: merging inside the {engine.adapter.family} vision tower is not supported; "
                                "merging after the projector instead")

    @staticmethod
    def _encoder_groups(t: Tokens):
        """Per token: the token (index in t) representing its tower-side group, or None."""
        if t.tome_groups is None:
            return None
        pos = t.positions()
        where = torch.full((int(max(pos.max(), t.tome_groups.max())) + 1,), -1, dtype=torch.long)
        where[pos] = torch.arange(t.n)
        rep = where[t.tome_groups.long().cpu()]
        return None if bool((rep < 0).any()) else rep  # a representative was dropped earlier: start afresh

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        """``select`` for every image of the batch: images of equal token count (and budget) run as the rows
        of one batched ``bipartite_soft_matching``, as the official code batches. Groups already formed in
        the vision tower (``tome_groups``) take the per-sample path."""
        if bt.tome_groups is not None:
            return None
        return bipartite_batch(bt, bt.keys if bt.keys is not None else bt.features, "size")


    def select(self, tokens: Tokens) -> Plan:
        def one(t: Tokens) -> Plan:
            metric = t.keys if t.keys is not None else t.features
            sizes = t.token_sizes()
            first = self._encoder_groups(t)
            if first is None:
                keep, assign, weight = bipartite_merge(metric, sizes, t.budgets[0])
                return Plan(keep=keep, assign=assign, weight=weight)
            reps, inv = first.unique(return_inverse=True)  # groups formed in the tower: continue from them
            gsize = torch.zeros(len(reps)).index_add_(0, inv, sizes)
            keep_r, assign_r, _ = bipartite_merge(metric[reps.to(metric.device)], gsize, t.budgets[0])
            return Plan(keep=reps[keep_r], assign=assign_r[inv], weight=sizes)

        return segmentwise(tokens, one)


def bipartite_batch(bt: BatchTokens, metric_src: torch.Tensor, mode: str) -> BatchPlan:
    """Bipartite merging of every image of the batch to its budget (ToMe: ``mode="size"``; AIM: "mean")."""
    index, owner, ks = segment_rows(bt)
    b, n = bt.features.shape[:2]
    ns = [c for cs in bt.counts for c in cs if c]
    metric = segment_features(metric_src, index, owner)
    sizes = segment_features(bt.sizes, index, owner)
    rep_pos = torch.full(index.shape, -1, dtype=torch.long, device=index.device)
    weight = torch.zeros(index.shape, device=index.device)
    kept = torch.zeros(index.shape[0], index.shape[1] + 1, dtype=torch.bool, device=index.device)
    shapes: dict = {}
    for s, key in enumerate(zip(ns, ks)):
        shapes.setdefault(key, []).append(s)
    for (n_s, k_s), rows in shapes.items():  # one batched merge per distinct (tokens, budget)
        sel = torch.tensor(rows).to(index.device, non_blocking=True)
        keep_r, assign_r, w_r = bipartite_rows(metric[sel, :n_s], sizes[sel, :n_s], k_s, mode)
        rep_pos[sel, :n_s] = torch.gather(keep_r, 1, assign_r)
        weight[sel, :n_s] = w_r
        kept[sel.view(-1, 1), keep_r] = True
    keep = keep_from_rows(mask_positions(kept[:, :-1], max(ks, default=0)), index, owner, ks, b, n)
    rep_slot = torch.where(rep_pos >= 0, torch.gather(index, 1, rep_pos.clamp(min=0)), -1)
    assign = position_in_keep(keep, rows_to_batch(rep_slot, index, owner, b, n, fill=-1), n)
    counts = bt.fixed_counts()
    return BatchPlan(keep, assign, rows_to_batch(weight, index, owner, b, n, fill=0.0), counts=counts)


class VisionZip(Policy):
    """VisionZip (Yang et al., CVPR'25): dominant tokens by [CLS] attention + contextual merged tokens.

    As the official ``CLIPVisionTower_VisionZip.forward`` (dvlab-research/VisionZip
    ``visionzip/clip_encoder.py``, commit 3151f6d) with its LLaVA-1.5 setting ``dominant=54, contextual=10``
    per 64 tokens: of the budget's ``round(budget * 54 / 64)`` dominant slots, one belongs to [CLS] (the
    official ``dominant_num = dominant - 1``), so ``dominant - 1`` patches with the highest [CLS] attention
    at the feature layer are kept (``topk`` of the head-summed [CLS] row); of the remaining patches in
    raster order, every ``max(1, len // contextual)``-th (the first ``contextual``) is a contextual target,
    every other remaining patch joins the target whose key (head-averaged, normalised) is most similar, and
    a contextual token is ``target + mean(its assigned patches)`` (``Plan.reduce = "sum"``). Proven equal
    to a reference written from that file (``tests/test_faithful.py``): kept patches, groups and merged
    features.

    What differs by construction, and why: the official code feeds [CLS] itself to the LLM as one of the
    dominant tokens; Hugging Face LLaVA's LLM input has no [CLS] row (only patch placeholders), so its slot
    stays empty: a budget of 64 gives the LLM the official 63 patch tokens. ``cls_slot="patch"`` spends the
    slot on one more dominant patch instead (the budget exactly, not the paper's set). Towers without [CLS]
    (SigLIP, the Qwen towers: mean attention received stands in) have no slot to reserve: all dominant slots
    go to patches. The official code merges CLIP hidden states and then projects: so does ``where="auto"``
    on LLaVA-1.5 (the selection and merge run on the projector's input, one tile per image); LLaVA-NeXT /
    OneVision tiles and the Qwen towers merge the projected features instead (``where="projector"`` forces
    that everywhere). Kept tokens keep their original positions and order (the official code appends the
    contextual tokens after the dominant ones and renumbers positions).

    Example:
        >>> t = Tokens(torch.eye(6), [6], [3], cls_attn=torch.tensor([.2, .5, .1, .1, .1, .1]))
        >>> VisionZip(dominant_ratio=0.67, cls_slot="patch").select(t).keep.tolist()
        [0, 1, 2]
    """

    name = "visionzip"
    stages = ("pre",)
    batched = True
    signals = ("cls_attn", "keys", "tower_cls", "tower_assign")
    paper = "VisionZip, CVPR'25"
    summary = "dominant tokens by [CLS] attention + contextual tokens merged by key similarity"
    where = "on the tower's features (LLaVA-1.5: before the projector)"
    paper_url = "https://arxiv.org/abs/2412.04467"
    code_url = "https://github.com/dvlab-research/VisionZip/tree/3151f6df4fca36a4cd1c985e5956e725b1f9ad02"
    option_choices = {"cls_slot": ("paper", "patch"), "where": ("auto", "projector")}

    @classmethod
    def option_defaults(cls):
        return {"dominant_ratio": 54 / 64, "cls_slot": "paper", "where": "auto"}

    def install_encoder(self, engine) -> None:
        _install_tower_merge(self, engine)

    def __init__(self, **options):
        super().__init__(**options)
        ratio = float(self.options["dominant_ratio"])
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"visionzip dominant_ratio must be in [0, 1]; got {ratio}")

    def _split(self, n: int, k: int, has_cls: bool) -> tuple[int, int, int]:
        """Host counts of one image: (dominant patches, contextual targets, target stride over the rest)."""
        dominant = min(k, int(round(k * float(self.options["dominant_ratio"]))))
        contextual = k - dominant
        if has_cls and self.options["cls_slot"] == "paper" and dominant > 0:
            dominant -= 1  # the official dominant_num: [CLS] takes one dominant slot
        dominant = min(dominant, n)
        rest = n - dominant
        if contextual == 0 or rest == 0:
            return dominant, 0, 1
        step = max(1, rest // contextual)
        return dominant, min(contextual, -(-rest // step)), step

    def select(self, tokens: Tokens) -> Plan:
        def one(t: Tokens) -> Plan:
            done = premerged_plan(t)
            if done is not None:  # selected and merged before the projector, as the official code
                return done
            n, k = t.n, t.budgets[0]
            score = (t.cls_attn if t.cls_attn is not None else attention_received(t.features)).float().cpu()
            has_cls = t.tower_cls is not None and bool(t.tower_cls.any())
            dominant, contextual, _ = self._split(n, k, has_cls)
            dom = score.topk(dominant).indices.sort().values
            rest = torch.ones(n, dtype=torch.bool)
            rest[dom] = False
            rest = rest.nonzero().flatten()
            if contextual == 0 or len(rest) == 0:
                return Plan(keep=dom, scores=score)
            step = max(1, len(rest) // contextual)
            tsel = torch.arange(0, len(rest), step)[:contextual]
            targets = rest[tsel]
            keep = torch.cat([dom, targets]).sort().values
            metric = (t.keys if t.keys is not None else t.features).float().cpu()
            metric = metric / metric.norm(dim=-1, keepdim=True)
            is_target = torch.zeros(len(rest), dtype=torch.bool)
            is_target[tsel] = True
            others = rest[~is_target]
            tpos = torch.searchsorted(keep, targets)
            assign = torch.full((n,), -1, dtype=torch.long)
            assign[keep] = torch.arange(len(keep))
            weight = torch.ones(n)
            if len(others):
                near = (metric[others] @ metric[targets].T).argmax(dim=-1)
                assign[others] = tpos[near]
                count = torch.bincount(near, minlength=len(targets)).clamp(min=1).float()
                weight[others] = 1.0 / count[near]  # target + mean(assigned): the official aggregation
            return Plan(keep=keep, assign=assign, weight=weight, scores=score, reduce="sum")

        return segmentwise(tokens, one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        """``select`` for every image of the batch at once (one row per image), no host synchronisation.
        Same counts, targets, groups and weights; the dominant set is a stable top-k (ties to the lower
        index; ``select`` uses ``torch.topk``, equal whenever the [CLS] attention has no ties)."""
        index, owner, _ = segment_rows(bt)
        has_cls = bt.tower_cls is not None  # the engine gives tower_cls only for [CLS] towers (all ones)
        splits = [self._split(c, min(k, c), has_cls) for cs, ks in zip(bt.counts, bt.budgets) for c, k in zip(cs, ks) if c]
        ks = [d + c for d, c, _ in splits]
        b, n = bt.features.shape[:2]
        counts = unflatten_counts(bt.counts, ks)
        totals = [sum(c) for c in counts]
        valid = index >= 0
        if bt.tower_assign is not None:  # merged before the projector: read the groups it made
            return premerged_batch(bt, counts)
        dev = bt.features.device
        if bt.cls_attn is not None:
            score = segment_features(bt.cls_attn.float(), index, owner)
        else:
            score = attention_received_rows(segment_features(bt.features, index, owner), valid)
        score = score.masked_fill(~valid, 0.0)
        m = index.shape[1]
        dom = slot_mask(topk_keep(score, valid, [d for d, _, _ in splits]), m)
        rest = valid & ~dom
        rank = rest.long().cumsum(1) - 1
        step = torch.tensor([st for _, _, st in splits]).to(dev, non_blocking=True).view(-1, 1)
        n_t = torch.tensor([c for _, c, _ in splits]).to(dev, non_blocking=True).view(-1, 1)
        target = rest & (rank % step == 0) & (rank // step < n_t)
        others = rest & ~target & (n_t > 0)  # no contextual token: the rest is dropped outright
        metric = segment_features(bt.keys if bt.keys is not None else bt.features, index, owner).float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        tpos = mask_positions(target, max([c for _, c, _ in splits], default=0))  # [S, T] targets in order
        tmetric = torch.gather(metric, 1, tpos.clamp(min=0).unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
        sim = (metric @ tmetric.transpose(1, 2)).masked_fill((tpos < 0).unsqueeze(1), float("-inf"))
        if tpos.shape[1]:  # rows without a target have no "others" either: their -1 never gets used
            near = torch.gather(tpos, 1, sim.argmax(-1)).clamp(min=0)
        else:
            near = torch.zeros_like(rank)
        count = torch.zeros(len(ks), m + 1, device=dev).scatter_add_(1, torch.where(others, near, m),
                                                                      others.float())[:, :m].clamp(min=1)
        weight = torch.where(others, 1.0 / torch.gather(count, 1, near), 1.0)
        rep_pos = torch.where(others, near, torch.where(dom | target, torch.arange(m, device=dev), -1))
        rep_slot = torch.where(rep_pos >= 0, torch.gather(index, 1, rep_pos.clamp(min=0)), -1)
        keep = keep_from_rows(mask_positions(dom | target, max(ks, default=0)), index, owner, ks, b, n)
        assign = position_in_keep(keep, rows_to_batch(rep_slot, index, owner, b, n, fill=-1), n)
        return BatchPlan(keep, assign, rows_to_batch(weight, index, owner, b, n, fill=0.0),
                         scores=rows_to_batch(score, index, owner, b, n, fill=0.0), reduce="sum",
                         counts=counts, totals=totals)


class PruMergePlus(Policy):
    """LLaVA-PruMerge+ (Shang et al.): IQR outliers of [CLS] attention + spatial samples, kNN merge.

    As the official ``token_prune_merge_advanced_plus`` (42Shawn/LLaVA-PruMerge
    ``llava/model/multimodal_encoder/clip_encoder.py``, commit 097c041), its default ``if_adaptive=True``:
    the signal is the [CLS] row of ``softmax(q k^T / sqrt(C))`` with q and k the full-width projections of
    the tower block *after* the feature layer (layer 23 of LLaVA-1.5's 24; ``Tokens.next_cls_attn``), the
    ratio is the fraction of IQR outliers (``> Q3 + 1.5 IQR``); the ``int(N * ratio)`` highest tokens are
    kept, then the samples ``arange(0, N - 1, int(int(1 / ratio) / 3))`` not already kept. Each kept token
    becomes itself plus the attention-weighted *sum* of its 32 nearest tokens by key cosine (kept or not),
    and one extra token, the attention-weighted sum of every pruned token, is appended (``Plan.combine``;
    it sits at the last pruned token's position). The count is adaptive (the official code ignores any
    ratio given to it); the budget caps it: past ``budget - 1`` the last samples are left out, so the
    extra token still fits. Proven equal to a reference written from that file (``tests/test_faithful.py``).

    Where: as the official code, ``where="auto"`` selects and merges the CLIP tower's features before the
    projector on LLaVA-1.5; other families merge the projected features (``where="projector"`` forces
    that). Kept tokens keep their original positions and order (the official order is by score, then
    samples, then the extra token). Fallbacks:
    towers without [CLS] or without a block after the feature layer use ``cls_attn`` / ``keys`` (mean
    attention received, head-averaged keys), said in the trace; no outlier at all keeps the top ``1/8``.

    ``adaptive=False`` (deviation, for a fixed count): outliers first (highest first, at most the budget),
    then evenly spaced samples among the rest to fill the budget exactly, merged the same way, no extra
    token.

    Example:
        >>> a = torch.full((16,), 0.01); a[5] = 0.9
        >>> PruMergePlus(adaptive=False).select(Tokens(torch.randn(16, 4), [16], [3], cls_attn=a)).keep.tolist()
        [3, 5, 12]
    """

    name = "prumerge+"
    stages = ("pre",)
    batched = True
    adaptive = True  # the official count follows the IQR outliers (option adaptive=False: fixed)
    signals = ("cls_attn", "keys", "next_cls_attn", "next_keys", "tower_assign", "grid")
    paper = "LLaVA-PruMerge(+), 2024"
    summary = "IQR outliers of [CLS] attention + spatial samples, kNN merge"
    where = "on the tower's features (LLaVA-1.5: before the projector)"
    paper_url = "https://arxiv.org/abs/2403.15388"
    code_url = "https://github.com/42Shawn/LLaVA-PruMerge/tree/097c04116a58465e4bcb58cec44a94018a68ff1a"
    option_choices = {"where": ("auto", "projector")}

    @classmethod
    def option_defaults(cls):
        return {"adaptive": True, "where": "auto"}

    def install_encoder(self, engine) -> None:
        _install_tower_merge(self, engine)

    def select(self, tokens: Tokens) -> Plan:
        return segmentwise(tokens, self._one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        """``select`` for every image of the batch at once. The adaptive count (IQR outliers, spatial samples,
        the budget's cap) is computed on the device and read once per stage; ``adaptive=False`` reads
        nothing. Same kept set, nearest-32 sums and extra token as ``select``."""
        adaptive = bool(self.options["adaptive"])
        index, owner, ks = segment_rows(bt)
        b, n = bt.features.shape[:2]
        dev = index.device
        fixed = bt.fixed_counts()
        if bt.tower_assign is not None:  # selected and merged before the projector, as the official code
            return premerged_batch(bt, None if adaptive else fixed)
        s_rows, m = index.shape
        valid = index >= 0
        ns = [c for cs in bt.counts for c in cs if c]
        sig = bt.next_cls_attn if bt.next_cls_attn is not None else bt.cls_attn
        if sig is not None:
            score = segment_features(sig.float(), index, owner)
        else:
            score = attention_received_rows(segment_features(bt.features, index, owner), valid)
        score = score.masked_fill(~valid, 0.0)
        kf = bt.next_keys if bt.next_keys is not None else (bt.keys if bt.keys is not None else bt.features)
        kn = torch.nn.functional.normalize(segment_features(kf, index, owner).float(), p=2, dim=-1)
        q1 = torch.zeros(s_rows, device=dev)
        q3 = torch.zeros(s_rows, device=dev)
        shapes: dict = {}
        for i, c in enumerate(ns):
            shapes.setdefault(c, []).append(i)
        for c, rows in shapes.items():  # np.percentile's linear rule, per image length
            sel = torch.tensor(rows).to(dev, non_blocking=True)
            q = torch.quantile(score[sel, :c], torch.tensor([0.25, 0.75], device=dev), dim=-1)
            q1[sel], q3[sel] = q[0], q[1]
        outl = ((score > (q3 + 1.5 * (q3 - q1)).unsqueeze(-1)) & valid).sum(1, keepdim=True)
        order = torch.sort(score.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
        ar = torch.arange(m, device=dev).expand(s_rows, m)
        rank = torch.empty_like(order).scatter_(1, order, ar)
        n_t = torch.tensor(ns, dtype=torch.float64).to(dev, non_blocking=True).view(-1, 1)
        k_t = torch.tensor(ks).to(dev, non_blocking=True).view(-1, 1)
        if adaptive:  # the official count: outliers (else 1/8), then every step-th token, capped by the budget
            ratio = torch.where(outl > 0, outl / n_t, 1.0 / 8)
            t = (n_t * ratio).floor().long()
            step = ((1.0 / ratio).floor() / 3).floor().clamp(min=1).long()
            top = rank < t
            samples = valid & ~top & (ar % step == 0) & (ar < (n_t.long() - 1).clamp(min=1))
            length = t + samples.sum(1, keepdim=True)
            cap = (length + (length < n_t.long()).long()) > k_t
            length = torch.where(cap, (k_t - 1).clamp(min=1), length)
            srank = samples.long().cumsum(1) - 1
            kept = valid & ((top & (rank < length)) | (samples & (srank < length - t)))
            extra = length < n_t.long()  # the extra token: every pruned token, attention-weighted
            count = (length + extra.long()).view(-1)
            counts_h = host_list(count)  # the adaptive count: one read per stage
        else:  # outliers first (highest first, at most the budget), then evenly spaced samples of the rest
            ntop = torch.minimum(outl, k_t)
            top = valid & (rank < ntop)
            rest = valid & ~top
            rr = rest.long().cumsum(1) - 1
            big_r, k2 = n_t.long() - ntop, k_t - ntop
            i = torch.arange(max(ks, default=0), device=dev, dtype=torch.float64).view(1, -1)
            pick = ((i + 0.5) * big_r / k2.clamp(min=1)).floor().long().clamp(max=(big_r - 1).clamp(min=0))
            hit = slot_mask(torch.where(i < k2, pick, -1), m)  # rest ranks the samples pick
            kept = top | (rest & torch.gather(hit, 1, rr.clamp(min=0)))
            extra = torch.zeros(s_rows, 1, dtype=torch.bool, device=dev)
            counts_h = list(ks)
        # each kept token: itself + the score-weighted sum of its 32 nearest others by key cosine
        sim = (kn @ kn.transpose(1, 2)).masked_fill(~valid.unsqueeze(1) | torch.eye(m, dtype=torch.bool, device=dev), float("-inf"))
        kk = min(32, max(m - 1, 0))
        near_v, near = torch.topk(sim, kk, dim=-1) if kk else (sim[..., :0], sim[..., :0].long())
        near_ok = (torch.arange(kk, device=dev).view(1, 1, -1) < (n_t.long() - 1).clamp(max=32).view(-1, 1, 1)) & (near_v > float("-inf"))
        rows_c = torch.zeros(s_rows, m, m + 1, device=dev)
        rows_c.scatter_add_(2, torch.where(near_ok, near, m), torch.gather(score.unsqueeze(1).expand(-1, m, -1), 2, near.clamp(min=0)) * near_ok)
        rows_c = rows_c[..., :m] + torch.eye(m, device=dev)
        compl = valid & ~kept
        last = torch.where(compl, ar, -1).amax(1, keepdim=True)  # the extra token sits at the last pruned one
        ext_row = (extra & (ar == last))
        rows_c = torch.where(ext_row.unsqueeze(-1), (score * compl).unsqueeze(1).expand(-1, m, -1), rows_c)
        members = kept | ext_row
        rep_pos = torch.where(members, ar, torch.where(compl & extra, last.expand(-1, m), -1))
        keep = keep_from_rows(mask_positions(members, max(counts_h, default=0)), index, owner, counts_h, b, n)
        rep_slot = torch.where(rep_pos >= 0, torch.gather(index, 1, rep_pos.clamp(min=0)), -1)
        assign = position_in_keep(keep, rows_to_batch(rep_slot, index, owner, b, n, fill=-1), n)
        combine = combine_batch(rows_c, members, index, owner, keep, n)
        counts = fixed if not adaptive else unflatten_counts(bt.counts, counts_h)
        return BatchPlan(keep, assign, combine=combine, scores=rows_to_batch(score, index, owner, b, n, fill=0.0), counts=counts)

    def _one(self, t: Tokens) -> Plan:
        done = premerged_plan(t)
        if done is not None:  # selected and merged before the projector, as the official code
            return done
        n, k = t.n, t.budgets[0]
        score = t.next_cls_attn if t.next_cls_attn is not None else t.cls_attn
        score = (score if score is not None else attention_received(t.features)).float().cpu()
        keys = t.next_keys if t.next_keys is not None else t.keys
        keys = (keys if keys is not None else t.features).float().cpu()
        q1, q3 = torch.quantile(score, 0.25), torch.quantile(score, 0.75)  # np.percentile's linear rule
        outliers = int((score > q3 + 1.5 * (q3 - q1)).sum())
        if self.options["adaptive"]:
            ratio = outliers / n if outliers else 1 / 8
            idx = torch.topk(score, int(n * ratio), largest=True).indices
            step = max(1, int(int(1 / ratio) / 3))
            taken = set(idx.tolist())
            extra = [x for x in range(0, max(n - 1, 1), step) if x not in taken]
            idx = torch.cat([idx, torch.tensor(extra, dtype=torch.long)])
            if len(idx) + (len(idx) < n) > k:  # the budget caps the count, the extra token included
                idx = idx[: max(k - 1, 1)]
        else:
            top = torch.sort(score, descending=True, stable=True).indices[: min(outliers, k)]
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[top] = True
            rest = (~chosen).nonzero().flatten()
            idx = torch.cat([top, rest[evenly_spaced(len(rest), min(len(rest), k - len(top)))]])
        compl = torch.ones(n, dtype=torch.bool)
        compl[idx] = False
        compl = compl.nonzero().flatten()
        # each kept token: itself + the attention-weighted sum of its 32 nearest others (kept first, in idx
        # order, then the pruned ones), as the official per-token loop
        kn = torch.nn.functional.normalize(keys, p=2, dim=-1)
        rows = torch.zeros(len(idx), n)
        for i in range(len(idx)):
            others = torch.cat([idx[:i], idx[i + 1 :], compl])
            if len(others) == 0:
                rows[i, idx[i]] = 1.0
                continue
            sim = torch.bmm(kn[idx[i]][None, None], kn[others][None].transpose(1, 2))[0, 0]  # the official op
            near = others[torch.topk(sim, k=min(32, len(others)), largest=True).indices]
            rows[i].index_add_(0, near, score[near])
            rows[i, idx[i]] += 1.0
        members = idx
        if self.options["adaptive"] and len(compl):  # the extra token: every pruned token, attention-weighted
            rows = torch.cat([rows, torch.zeros(1, n).index_put_((torch.zeros_like(compl), compl), score[compl])])
            members = torch.cat([idx, compl[-1:]])
        order = torch.argsort(members)
        keep = members[order]
        assign = torch.full((n,), -1, dtype=torch.long)
        assign[keep] = torch.arange(len(keep))
        if self.options["adaptive"] and len(compl):
            assign[compl] = int(torch.searchsorted(keep, compl[-1:]))
        return Plan(keep=keep, assign=assign, combine=rows[order], scores=score)


class Pool(Policy):
    """Average pooling on the patch grid, LLaVA-OneVision style (its videos are 2x2-pooled per frame).

    ``size=None`` (default) pools each image to its budget: the frame grid is cut into ``oh x ow`` windows
    (``oh * ow <= budget``, aspect ratio closest to the grid's; videos keep one window row per frame while
    the budget allows, else windows span frames), then the largest windows are halved along their longer
    side until the count equals the budget exactly. ``size=2`` / ``size=3`` pool fixed s x s windows per
    frame instead (the count follows the grid and the budget is ignored). A merged token is the plain mean
    of its window and sits at the window member nearest the window's centre.

    Fallback: images without a single grid (LLaVA-NeXT / OneVision anyres: base tile + unpadded sub-tiles
    + newline tokens) are pooled 1-D, in sequence order, into budget-many equal chunks; tokens past a
    grid (OneVision's video newline) stay alone.

    Example:
        >>> x = torch.arange(16.).view(16, 1)  # a 4x4 grid holding 0..15
        >>> plan = Pool().select(Tokens(x, [16], [4], grids=[(1, 4, 4)]))
        >>> plan.keep.tolist(), plan.assign.view(4, 4).tolist()
        ([0, 2, 8, 10], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    """

    name = "pool"
    signals = ("grid",)
    data_free = True
    paper = "LLaVA-OneVision spatial pooling"
    summary = "average pooling on the patch grid (2x2, 3x3 or to the budget)"
    where = "before the LLM (after the projector)"
    paper_url = "https://arxiv.org/abs/2408.03326"

    @classmethod
    def option_defaults(cls):
        return {"size": None}

    def select(self, tokens: Tokens) -> Plan:
        size = self.options["size"]
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"pool option size must be None or an int >= 1; got {size!r}")
        return segmentwise(tokens, lambda t: self._one(t, size))

    @staticmethod
    def _windows(grid, target: int):
        t, h, w = grid
        ot = min(t, target)
        q = max(1, target // ot)
        best = None
        for oh in range(1, h + 1):
            ow = min(w, q // oh)
            if ow < 1:
                continue
            key = (oh * ow, -abs(oh / ow - h / w))
            if best is None or key > best[0]:
                best = (key, oh, ow)
        return ot, best[1], best[2]

    def _one(self, t: Tokens, size) -> Plan:
        n, k = t.n, t.budgets[0]
        coords = grid_coords(t, 0)
        extra = torch.zeros(n, dtype=torch.bool)
        if coords is None:
            cid = (torch.arange(n) * k // n) if size is None else (torch.arange(n) // (size * size))
            return _plan_from_groups(cid, coords, t)
        f, r, c = coords
        extra = f < 0
        grid = t.grids[0]
        if size is not None:
            key = (f * (grid[1] // size + 1) + r // size) * (grid[2] // size + 1) + c // size
        else:
            target = max(1, k - int(extra.sum()))
            ot, oh, ow = self._windows(grid, target)
            key = ((f * ot // grid[0]) * oh + r * oh // grid[1]) * ow + c * ow // grid[2]
        key = torch.where(extra, -1 - torch.arange(n), key)
        _, gid = torch.unique(key, return_inverse=True)
        if size is None:
            gid = _split_to(gid, torch.stack([f, r, c], -1).float(), k)
        return _plan_from_groups(gid, coords, t)


def _split_to(gid: torch.Tensor, xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Halve the largest groups along their longest extent until there are k groups (or singletons)."""
    gid = gid.clone()
    while int(gid.max()) + 1 < k:
        counts = torch.bincount(gid)
        g = int(torch.sort(counts, descending=True, stable=True).indices[0])
        if counts[g] < 2:
            break
        members = (gid == g).nonzero().flatten()
        pts = xyz[members]
        axis = int((pts.max(0).values - pts.min(0).values).argmax())
        order = torch.sort(pts[:, axis], stable=True).indices
        gid[members[order[len(order) // 2 :]]] = int(gid.max()) + 1
    return gid


def _plan_from_groups(gid: torch.Tensor, coords, t: Tokens) -> Plan:
    """Plan merging each group to the member nearest the group's centre (plain / size-weighted mean)."""
    n = len(gid)
    _, gid = torch.unique(gid, return_inverse=True)
    g = int(gid.max()) + 1
    xyz = torch.arange(n, dtype=torch.float32)[:, None] if coords is None else torch.stack(coords, -1).float()
    sums = torch.zeros(g, xyz.shape[1]).index_add_(0, gid, xyz)
    centre = sums / torch.bincount(gid, minlength=g)[:, None]
    dist = ((xyz - centre[gid]) ** 2).sum(-1) + torch.arange(n) * 1e-6  # ties -> lowest index
    best = torch.full((g,), float("inf")).scatter_reduce(0, gid, dist, "amin")
    cand = torch.where(dist == best[gid], torch.arange(n), torch.full((n,), n))
    reps = torch.full((g,), n, dtype=torch.long).scatter_reduce(0, gid, cand, "amin")
    keep = reps.sort().values
    pos = torch.empty(g, dtype=torch.long)
    pos[torch.argsort(reps)] = torch.arange(g)
    return Plan(keep=keep, assign=pos[gid], weight=t.token_sizes())


class Temporal(Policy):
    """Video: merge tokens repeated across adjacent frames (FastVID / DyCoke / FrameFusion family).

    Per video: (1) frames are cut into segments where the cosine similarity of consecutive frame
    descriptors (the frame's mean token) drops below ``threshold``; (2) inside a segment, each token is
    compared with the token at the same grid position in the previous frame, and the most similar pairs
    merge (chains follow the token back to its first frame: a static region becomes one token) until the
    budget is met; (3) if temporal merges alone cannot reach the budget, the rest is merged spatially by
    ToMe-style bipartite matching among the survivors. Merged tokens are size-weighted means at the
    position of their earliest frame. Frame boundaries come from the video grid: Qwen-VL ``t`` temporal
    patches of ``h*w/4`` tokens, LLaVA-OneVision frames of 2x2-pooled tokens plus a trailing newline token
    (never merged).

    Images (one frame) and items without a grid fall back to step (3) alone. This is a composite of the
    family's ideas, not any one paper's code: no differential test against an official implementation.
    Deviations: FastVID's
    density-based spatio-temporal merging inside segments is replaced by same-position temporal merging
    plus bipartite spatial merging; no in-LLM pruning stage.

    Example:
        >>> x = torch.randn(2, 4).repeat(2, 1)  # 2 frames of 2 tokens, frame 2 repeats frame 1
        >>> Temporal().select(Tokens(x, [4], [2], grids=[(2, 1, 2)])).keep.tolist()
        [0, 1]
    """

    name = "temporal"
    signals = ("frames",)
    batched = True
    paper = "FastVID / DyCoke / FrameFusion"
    summary = "merge tokens repeated across adjacent frames, segmented by frame similarity"
    where = "before the LLM (videos)"
    paper_url = "https://arxiv.org/abs/2503.11187"

    @classmethod
    def option_defaults(cls):
        return {"threshold": 0.8}

    def select(self, tokens: Tokens) -> Plan:
        return segmentwise(tokens, self._one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        """``select`` for every image / video of the batch at once: frame descriptors, cuts, same-cell
        predecessors and their ranking as batched tensor algebra, chains resolved by pointer jumping (no
        loop over tokens), the spatial merging by ``bipartite_ragged`` with device-side counts: no read."""
        if not any(g is not None and g[0] > 1 for gs in bt.grids for g in gs):
            # images only: every token is a root, so this is ToMe's merging to the budget, on the metric ``_one``
            # uses (each token's size-weighted mean of itself)
            f, w = bt.features.float(), bt.sizes.float().unsqueeze(-1)
            return bipartite_batch(bt, torch.where(w > 0, f * w / w, f), "size")
        index, owner, ks = segment_rows(bt)
        b, n = bt.features.shape[:2]
        dev = index.device
        s_rows, m = index.shape
        valid = index >= 0
        ns = [c for cs in bt.counts for c in cs if c]
        grids = [g for cs, gs in zip(bt.counts, bt.grids) for c, g in zip(cs, list(gs) + [None] * len(cs)) if c]
        x = segment_features(bt.features, index, owner).float()
        sizes = segment_features(bt.sizes, index, owner).float().masked_fill(~valid, 0.0)
        pos = segment_features(bt.pos, index, owner)
        ar = torch.arange(m, device=dev).expand(s_rows, m)
        video = [g is not None and g[0] > 1 for g in grids]
        t_max = max(g[0] for g, v in zip(grids, video) if v)
        hw_max = max(g[1] * g[2] for g, v in zip(grids, video) if v)
        geo = torch.tensor([[g[0], g[1], g[2]] if v else [1, 1, 1] for g, v in zip(grids, video)])
        tt, hh, ww = (geo[:, i].to(dev, non_blocking=True).view(-1, 1) for i in range(3))
        is_vid = torch.tensor(video).to(dev, non_blocking=True).view(-1, 1)
        inside = valid & is_vid & (pos < tt * hh * ww)
        f = torch.where(inside, pos // (hh * ww), -1)
        cell = torch.where(inside, pos % (hh * ww), 0)
        slot_f = torch.where(inside, f, t_max)
        desc = torch.zeros(s_rows, t_max + 1, x.shape[-1], device=dev).index_put_(
            (torch.arange(s_rows, device=dev).view(-1, 1).expand(s_rows, m), slot_f), x, accumulate=True)
        cnt = torch.zeros(s_rows, t_max + 1, device=dev).scatter_add_(1, slot_f, inside.float())
        desc = desc[:, :t_max] / cnt[:, :t_max].clamp(min=1).unsqueeze(-1)
        fsim = torch.nn.functional.cosine_similarity(desc[:, 1:], desc[:, :-1], dim=-1)
        cut = torch.cat([torch.zeros(s_rows, 1, dtype=torch.bool, device=dev),
                         fsim < float(self.options["threshold"])], 1)
        scene = torch.cat([cut.long().cumsum(1), torch.zeros(s_rows, 1, dtype=torch.long, device=dev)], 1)
        table = torch.full((s_rows, t_max * hw_max + 1), -1, dtype=torch.long, device=dev)
        table.scatter_(1, torch.where(inside, f * hw_max + cell, t_max * hw_max), ar)
        fp = (f - 1).clamp(min=0)
        same = inside & (f > 0) & (torch.gather(scene, 1, f.clamp(min=0)) == torch.gather(scene, 1, fp))
        pred = torch.where(same, torch.gather(table, 1, torch.where(same, fp * hw_max + cell, t_max * hw_max)), -1)
        has = pred >= 0
        xp = torch.gather(x, 1, pred.clamp(min=0).unsqueeze(-1).expand_as(x))
        sim = torch.nn.functional.cosine_similarity(x, xp, dim=-1).masked_fill(~has, float("-inf"))
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, ar)
        budget = torch.tensor([max(0, c - k) for c, k in zip(ns, ks)]).to(dev, non_blocking=True).view(-1, 1)
        cand = has & (rank < budget)
        group = torch.where(cand, pred, ar)
        for _ in range(max(1, (t_max - 1).bit_length()) + 1):  # pointer jumping: every chain to its root
            group = torch.gather(group, 1, group)
        # spatial bipartite merging among the temporal groups' roots, down to k where more than k remain; the
        # roots' count is data (how many tokens found a predecessor in their scene), so every row runs the
        # rounds its worst case needs and a row already at k passes through (no read of the count)
        roots_mask = (group == ar) & valid
        roots = mask_positions(roots_mask, m)
        gsize = torch.zeros(s_rows, m, device=dev).scatter_add_(1, group, sizes)
        msum = torch.zeros(s_rows, m, x.shape[-1], device=dev).scatter_add_(
            1, group.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x * sizes.unsqueeze(-1))
        at = roots.clamp(min=0)
        rs = torch.gather(gsize, 1, at)
        rm = torch.gather(msum, 1, at.unsqueeze(-1).expand(-1, -1, x.shape[-1])) / rs.clamp(min=1e-30).unsqueeze(-1)
        kk = torch.tensor(ks).to(dev, non_blocking=True)
        rounds = max([bipartite_rounds(c, k) for c, k in zip(ns, ks)], default=0)
        rep = bipartite_ragged(rm, rs, roots_mask.sum(1), kk, rounds)  # root-list position -> its survivor's
        new_root = torch.gather(roots, 1, rep.clamp(min=0))
        rpos = torch.full((s_rows, m + 1), -1, dtype=torch.long, device=dev).scatter_(
            1, torch.where(roots >= 0, roots, m), ar)[:, :m]
        group = torch.gather(new_root, 1, torch.gather(rpos, 1, group).clamp(min=0))
        group = torch.where(valid, group, -1)
        keep = keep_from_rows(mask_positions((group == ar) & valid, max(ks, default=0)), index, owner, ks, b, n)
        rep_slot = torch.where(group >= 0, torch.gather(index, 1, group.clamp(min=0)), -1)
        assign = position_in_keep(keep, rows_to_batch(rep_slot, index, owner, b, n, fill=-1), n)
        return BatchPlan(keep, assign, rows_to_batch(sizes, index, owner, b, n, fill=0.0), counts=bt.fixed_counts())

    def _one(self, t: Tokens) -> Plan:
        n, k = t.n, t.budgets[0]
        x = t.features.float().cpu()
        sizes = t.token_sizes()
        coords = grid_coords(t, 0)
        group = torch.arange(n)
        if coords is not None and t.grids[0][0] > 1:
            f, r, c = coords
            frames = int(f.max()) + 1
            desc = torch.stack([x[f == i].mean(0) if (f == i).any() else torch.zeros(x.shape[1]) for i in range(frames)])
            fsim = torch.nn.functional.cosine_similarity(desc[1:], desc[:-1], dim=-1)
            cut = torch.cat([torch.zeros(1, dtype=torch.bool), fsim < float(self.options["threshold"])])
            seg_of_frame = torch.cumsum(cut.long(), 0)
            hw = t.grids[0][1] * t.grids[0][2]
            cell = r * t.grids[0][2] + c
            table = torch.full((frames, hw), -1, dtype=torch.long)  # (frame, cell) -> token
            inside = f >= 0
            table[f[inside], cell[inside]] = torch.arange(n)[inside]
            fp = (f - 1).clamp(min=0)
            same_seg = inside & (f > 0) & (seg_of_frame[f.clamp(min=0)] == seg_of_frame[fp])
            pred = torch.where(same_seg, table[fp, cell], torch.full_like(f, -1))
            sim = torch.full((n,), float("-inf"))
            has = pred >= 0
            sim[has] = torch.nn.functional.cosine_similarity(x[has], x[pred[has]], dim=-1)
            cand = (pred >= 0).nonzero().flatten()
            cand = cand[torch.sort(sim[cand], descending=True, stable=True).indices][: max(0, n - k)]
            parent = torch.arange(n)
            parent[cand] = pred[cand]
            for i in torch.sort(f, stable=True).indices.tolist():  # frames in order: roots resolve forwards
                group[i] = group[parent[i]] if parent[i] != i else i
        roots = group.unique()
        if len(roots) > k:  # spatial bipartite merging among the temporal groups
            gsize = torch.zeros(n).index_add_(0, group, sizes)
            msum = torch.zeros(n, x.shape[1]).index_add_(0, group, x * sizes[:, None])
            metric = msum[roots] / gsize[roots, None]
            keep_r, assign_r, _ = bipartite_merge(metric, gsize[roots], k)
            rpos = torch.full((n,), -1, dtype=torch.long)
            rpos[roots] = torch.arange(len(roots))
            group = roots[keep_r][assign_r[rpos[group]]]
        keep = group.unique().sort().values
        pos = torch.full((n,), -1, dtype=torch.long)
        pos[keep] = torch.arange(len(keep))
        return Plan(keep=keep, assign=pos[group], weight=sizes)
