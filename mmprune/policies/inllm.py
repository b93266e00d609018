"""Policies acting inside the LLM: ``vtw``, ``pyramiddrop``, ``sparsevlm``, ``atp``.

Multi-layer policies expand into one stage per layer at wrap time (see ``Policy.expand``), so the trace
shows every drop. Their budget is what remains after the *last* stage (float: fraction of the image's
visual tokens; int: tokens per image), reached by a geometric schedule over the stages.
"""

from __future__ import annotations

import torch

from ..config import PruneConfig
from ..syncs import host_list
from ._ops import attention_received, evenly_spaced, topk_indices
from .base import Plan, Policy, Tokens, resolve_budget
from .batch import (
    BatchPlan,
    BatchTokens,
    attention_received_rows,
    mask_positions,
    position_in_keep,
    slot_mask,
    topk_keep,
)


def pyramid_layers(num_layers: int, start: int | None = None, fractions=(0.25, 0.5, 0.75)) -> list[int]:
    """Decoder layers at the given depth fractions (>= 1, < num_layers, deduplicated); with ``start``, three
    layers evenly spaced from ``start`` to the end."""
    hi = num_layers - 1
    if start is not None:
        return sorted({min(hi, start + round((num_layers - start) * j / 3)) for j in range(3)})
    return sorted({min(hi, max(1, round(num_layers * f))) for f in fractions})


class Staged(Policy):
    """A policy run as stage ``stage_index`` of ``num_stages``; ``final_budget`` is the wrap's budget."""

    stage_index: int = 0
    num_stages: int = 1
    final_budget = None

    @classmethod
    def default_layers(cls, config, num_layers: int) -> list[int]:
        layers = config.options.get("layers")
        if layers is not None:
            return sorted({int(v) for v in layers})
        return pyramid_layers(num_layers, config.layer)

    @classmethod
    def expand(cls, config, num_layers: int):
        layers = cls.default_layers(config, num_layers)
        out = []
        for i, layer in enumerate(layers):
            pol = cls(**config.options)
            pol.stage_index, pol.num_stages, pol.final_budget = i, len(layers), config.budget
            out.append((PruneConfig(config.policy, config.budget, layer, dict(config.options)), pol, layer))
        return out

    def targets(self, tokens: Tokens) -> list[int]:
        """Per segment: tokens this stage keeps on the geometric schedule from the original count to the
        final budget (the last stage meets the budget exactly)."""
        if self.final_budget is None:
            return list(tokens.budgets)
        out = []
        origin = tokens.origin or tokens.segments
        for n0, n in zip(origin, tokens.segments):
            if n == 0:
                out.append(0)
                continue
            kf = resolve_budget(self.final_budget, n0)
            frac = (self.stage_index + 1) / self.num_stages
            out.append(max(1, min(n, max(kf, int(round(n0 * (kf / n0) ** frac))))))
        return out


def _text_relevance(tokens: Tokens) -> torch.Tensor:
    """Mean attention of the question tokens to each visual token; fallbacks: the last token's attention,
    then attention received among the visual tokens."""
    if tokens.text_attn is not None and tokens.text_attn.shape[0]:
        return tokens.text_attn.float().mean(0).cpu()
    if tokens.attn is not None:
        return tokens.attn.float().cpu()
    return attention_received(tokens.features).cpu()


def text_relevance_batch(bt: BatchTokens) -> torch.Tensor:
    """``_text_relevance`` for the batch ``[B, N]``: the question rows' mean attention, else the last token's,
    else attention received among the visual tokens (per sample, as the per-sample fallbacks)."""
    if bt.attn is not None:
        fallback = bt.attn.float()
    else:
        fallback = attention_received_rows(bt.features, bt.valid)
    if bt.text_attn is None:
        return fallback.masked_fill(~bt.valid, 0.0)
    qv = bt.text_attn_valid
    rel = (bt.text_attn.float() * qv.unsqueeze(-1)).sum(1) / qv.sum(1, keepdim=True).clamp(min=1)
    return torch.where(qv.any(1, keepdim=True), rel, fallback).masked_fill(~bt.valid, 0.0)


class VTW(Policy):
    """Visual Tokens Withdrawal (Lin et al., AAAI'25): withdraw all visual tokens at layer K.

    Visual information has migrated into the text tokens by the middle layers, so from layer K on the
    visual tokens (and their KV cache in layers >= K) are dropped entirely; the budget is ignored. The
    paper picks K per model on a calibration set by the KL divergence of the outputs; the default here is
    half the depth (give ``layer=`` from your own calibration).

    Example:
        >>> VTW().select(Tokens(torch.zeros(5, 2), [5], [2])).keep.tolist()
        []
    """

    name = "vtw"
    data_free = True
    stages = ("llm",)
    paper = "VTW, AAAI'25"
    summary = "withdraw all visual tokens at layer K"
    where = "LLM layer depth/2"
    paper_url = "https://arxiv.org/abs/2405.05803"

    @classmethod
    def layer_for(cls, num_layers: int) -> int:
        return max(1, num_layers // 2) if num_layers > 1 else 0

    def select(self, tokens: Tokens) -> Plan:
        return Plan(keep=torch.zeros(0, dtype=torch.long))


class PyramidDrop(Staged):
    """PyramidDrop (Xing et al., CVPR'25): drop by last-instruction-token attention at several depths.

    As the official ``pdrop_forward`` / ``pdrop_rank_drop`` (Cooperx521/PyramidDrop
    ``llava/model/modeling_llama_pdrop.py``, commit 6444f30): stages at 1/4, 1/2 and 3/4 of the depth
    (``layer_list [8, 16, 24]`` of 32; ``layers=[...]`` to choose, ``layer=K`` starts the pyramid at K). At
    stage s, *before* decoder layer K runs, layer K's own ``input_layernorm`` and q/k projections (with
    RoPE) are applied to its input, the last prompt token's attention over the prompt is averaged over
    heads, and the top ``int(N0 * ratio[s])`` visual tokens are kept, ``N0`` being the image's original
    token count and ``ratio[s] = lambda ** (s + 1)`` (``image_token_ratio_list`` with 1.0 prepended);
    ``int`` truncates, as there. The paper's ``lambda = 0.5`` over 3 stages is ``budget=0.125`` (the budget
    is what remains after the last stage: ``lambda = budget ** (1 / stages)``); an int budget is the final
    count per image. Proven equal to a reference written from that file (``tests/test_faithful.py``).

    Deviations: ranked over the whole sample when it holds several images (the official code handles one
    image per sample), with the sum of the images' counts; at least one token stays per image.

    Example:
        >>> p = PyramidDrop(); p.select(Tokens(torch.zeros(4, 2), [4], [2], attn=torch.tensor([.1, .4, .3, .2]))).keep.tolist()
        [1, 2]
    """

    name = "pyramiddrop"
    stages = ("llm",)
    signals = ("attn",)
    signal_layer = "own"
    batched = True
    paper = "PyramidDrop, CVPR'25"
    summary = "last-instruction-token attention, geometric schedule over layers"
    where = "LLM layers 1/4, 1/2, 3/4 of depth"
    paper_url = "https://arxiv.org/abs/2410.17247"
    code_url = "https://github.com/Cooperx521/PyramidDrop/tree/6444f304aee4b7edcb022839fb9e8cd07859704a"

    @classmethod
    def option_defaults(cls):
        return {"layers": None}

    def targets(self, tokens: Tokens) -> list[int]:
        if self.final_budget is None:
            return list(tokens.budgets)
        out = []
        for n0, n in zip(tokens.origin or tokens.segments, tokens.segments):
            if n == 0:
                out.append(0)
                continue
            frac = (self.stage_index + 1) / self.num_stages
            if isinstance(self.final_budget, float):
                # the official ratios are literals (0.5, 0.25, 0.125): round away pow's last-bit noise
                count = int(n0 * round(self.final_budget**frac, 12))
            else:
                kf = min(n0, int(self.final_budget))
                count = kf if self.stage_index == self.num_stages - 1 else int(n0 * round((kf / n0) ** frac, 12))
            out.append(max(1, min(n, count)))
        return out

    def select(self, tokens: Tokens) -> Plan:
        score = _text_relevance(tokens) if tokens.attn is None else tokens.attn.float().cpu()
        return Plan(keep=topk_indices(score, sum(self.targets(tokens))), scores=score)

    def select_batch(self, tokens: BatchTokens) -> BatchPlan | None:
        if tokens.attn is None:  # the text-relevance fallback runs per sample
            return None
        ks = [sum(self.targets(tokens.meta(b))) for b in range(tokens.batch)]
        return BatchPlan(topk_keep(tokens.attn, tokens.valid, ks), scores=tokens.attn.float(), totals=ks)


# SparseVLM's official kept counts after its three pruning layers, per "retained tokens" setting, for
# LLaVA-1.5's 576 visual tokens and 32 layers (Gumpest/SparseVLMs llava/model/language_model/score.py,
# commit 26a5f48, version 1_0): the setting is the average over layers, not the final count.
SPARSEVLM_COUNTS = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


def sparsevlm_counts(target: float, n0: int) -> list[int]:
    """Kept counts per stage for ``target`` tokens (the paper's average-over-layers budget) of ``n0``: the
    official table at 576 tokens; elsewhere its ratios, interpolated over ``target / n0`` between the
    official settings (scaled proportionally outside them)."""
    if n0 == 576 and target in SPARSEVLM_COUNTS:
        return list(SPARSEVLM_COUNTS[int(target)])
    keys = sorted(SPARSEVLM_COUNTS)
    f = target / n0
    xs = [k / 576 for k in keys]
    out = []
    for s in range(3):
        ys = [SPARSEVLM_COUNTS[k][s] / 576 for k in keys]
        if f <= xs[0]:
            r = ys[0] * f / xs[0]
        elif f >= xs[-1]:
            r = ys[-1] * f / xs[-1]
        else:
            j = max(i for i in range(len(xs)) if xs[i] <= f)
            j = min(j, len(xs) - 2)
            r = ys[j] + (ys[j + 1] - ys[j]) * (f - xs[j]) / (xs[j + 1] - xs[j])
        out.append(max(1, min(n0, int(n0 * min(r, 1.0)))))
    return out


def _distances(x: torch.Tensor) -> torch.Tensor:
    """``(x[:, :, None] - x[:, None]).norm(dim=-1)`` of ``x [G, M, C]`` as the official code writes it, without
    its ``[G, M, M, C]`` intermediate: ``torch.cdist``'s direct (not matmul-expanded) Euclidean distance,
    equal up to float rounding (2e-5 on 512-d rows), 4x faster on a CPU and O(M^2) memory (the broadcast
    needs 57 GB for 2000 recycled 3584-d video tokens)."""
    return torch.cdist(x.float(), x.float(), compute_mode="donot_use_mm_for_euclid_dist").to(x.dtype)


def density_peak_merge(x: torch.Tensor, cluster_num: int):
    """SparseVLM's ``cluster_and_merge`` (DPC-KNN; Gumpest/SparseVLMs ``llava/model/language_model/utils.py``,
    commit 26a5f48) on ``x [N, C]``: returns ``(centres, assign)``, the cluster centres (indices into x, in
    the official order) and each token's cluster. The official code breaks density ties with
    ``torch.rand * 1e-6`` from the global generator; here the noise comes from a generator seeded 0, so a
    run is reproducible (and equals the official one after ``torch.manual_seed(0)``)."""
    n, c = x.shape
    dist_matrix = _distances(x[None]) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=torch.Generator().manual_seed(0), dtype=density.dtype) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[0][index_down[0]].argmin(dim=0)
    idx_cluster[index_down[0]] = torch.arange(cluster_num)
    return index_down[0], idx_cluster


def density_peak_rows(x: torch.Tensor, cluster_num: int):
    """``density_peak_merge`` for ``G`` rows of the same size at once: ``x [G, M, C]`` -> ``(centres [G,
    cluster_num], assign [G, M])``; the same per-row noise (a generator seeded 0, as there)."""
    g, n, c = x.shape
    dist_matrix = _distances(x) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    noise = torch.rand((1, n), generator=torch.Generator().manual_seed(0), dtype=density.dtype)
    density = density + noise.to(density.device, non_blocking=True) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    rows = torch.gather(dist_matrix, 1, index_down.unsqueeze(-1).expand(-1, -1, n))  # [G, k, M]
    idx_cluster = rows.argmin(dim=1)
    idx_cluster.scatter_(1, index_down, torch.arange(cluster_num, device=x.device).expand(g, cluster_num))
    return index_down, idx_cluster


class SparseVLM(Staged):
    """SparseVLM (Zhang et al., ICML'25): text raters rate visual tokens; deleted tokens are recycled.

    As the official ``LlamaModel.forward`` (Gumpest/SparseVLMs ``llava/model/language_model/
    modelling_sparse_llama.py`` and ``score.py``, commit 26a5f48, default version 1_0):

    - Raters are chosen once, from the LLM's *input embeddings*: ``softmax_text(v t^T)`` averaged over the
      visual tokens, and the text tokens after the image scoring above its mean rate.
    - Pruning layers 2, 6, 15 of 32 (scaled to the model's depth; ``layers=[...]`` to choose): layer L's own
      attention (head-averaged, on its input) from the raters to the visual tokens ranks them, and the
      tokens are dropped *after* layer L, i.e. the stage runs at L + 1 with the signal of layer L.
    - Counts: the budget is the paper's average over layers; ``64`` keeps 66, 30, 17 after the three
      layers (the official table; other budgets and sizes use its ratios, ``sparsevlm_counts``), and
      ``min(count, n - 1)`` stay each time.
    - Recycling: of the deleted tokens, the ``int(0.3 * n_deleted) + 1`` best rated are clustered by
      density peaks into ``int(m / 10) + 1`` tokens (``density_peak_merge``, sums of ``x / (size + 1e-6)``
      as there), *added* to the kept tokens. The trace reports the true per-layer counts.

    Proven equal to a reference written from that code (``tests/test_faithful.py``). Deviations: a
    recycled token sits at its cluster centre's position (the official code appends it after the kept
    visual tokens and renumbers positions); several images of one sample are ranked together; the
    recycling's pairwise distances come from ``torch.cdist`` instead of a ``[M, M, C]`` broadcast (equal up
    to float rounding; see ``_distances``). ``recycle=False`` is version 2_0's "cancel merge" (no recycled tokens).

    Example:
        >>> sparsevlm_counts(64, 576), sparsevlm_counts(144, 576)  # the official table; interpolated
        ([66, 30, 17], [302, 132, 54])
    """

    name = "sparsevlm"
    stages = ("llm",)
    signals = ("text_attn", "input_embeds")
    batched = True
    paper = "SparseVLM, ICML'25"
    summary = "text raters rate visual tokens, official per-layer counts, recycling"
    where = "after LLM layers 2, 6, 15 of 32 (scaled)"
    paper_url = "https://arxiv.org/abs/2410.04417"
    code_url = "https://github.com/Gumpest/SparseVLMs/tree/26a5f48813c46cd1c7364160354e7fdd3febaa67"

    @classmethod
    def option_defaults(cls):
        return {"layers": None, "recycle": True}

    @classmethod
    def default_layers(cls, config, num_layers):
        if config.options.get("layers") is not None:
            signal = sorted({int(v) for v in config.options["layers"]})
        elif config.layer is not None:
            signal = pyramid_layers(num_layers, config.layer - 1)
        else:
            signal = pyramid_layers(num_layers, fractions=(2 / 32, 6 / 32, 15 / 32))
        return [v + 1 for v in signal if v + 1 < num_layers]  # the drop follows the layer that rated

    def counts(self, tokens: Tokens) -> int:
        out = 0
        for n0 in tokens.origin or tokens.segments:
            target = self.final_budget * n0 if isinstance(self.final_budget, float) else min(n0, int(self.final_budget))
            table = sparsevlm_counts(target, n0)
            out += table[min(self.stage_index, len(table) - 1) + max(0, 3 - self.num_stages)]
        return out

    def select(self, tokens: Tokens) -> Plan:
        n = tokens.n
        if tokens.text_attn is None or not tokens.text_attn.shape[0]:
            relation = _text_relevance(tokens)
        else:
            p = tokens.text_attn.float().cpu()
            if tokens.visual_embeds is not None and tokens.question_embeds is not None and len(tokens.question_embeds):
                v, t = tokens.visual_embeds.float(), tokens.question_embeds.float()
                m_v_t = (v @ t.T).softmax(1).mean(0).cpu()
                raters = m_v_t > m_v_t.mean()
            else:
                raters = torch.ones(p.shape[0], dtype=torch.bool)
            relation = p[raters].mean(0)
        # min(count, n - 1) as the official code (one token at least is deleted, so recycling has input);
        # a lone token stays (the official rule would delete it, which 576-token images never reach)
        keep_n = max(1, min(self.counts(tokens) if self.final_budget is not None else sum(tokens.budgets), n - 1))
        top = torch.topk(relation, keep_n).indices.sort().values
        if not self.options["recycle"] or keep_n >= n:  # nothing deleted: nothing to recycle
            return Plan(keep=top, scores=relation)
        deleted = torch.ones(n, dtype=torch.bool)
        deleted[top] = False
        deleted = deleted.nonzero().flatten()
        m = int(len(deleted) * 0.3) + 1
        pool = deleted[relation[deleted].topk(m).indices]
        cluster_num = int(m / 10) + 1
        centres, member = density_peak_merge(tokens.features[pool.to(tokens.features.device)].float().cpu(), cluster_num)
        keep = torch.cat([top, pool[centres]]).sort().values
        assign = torch.full((n,), -1, dtype=torch.long)
        assign[keep] = torch.arange(len(keep))
        assign[pool] = torch.searchsorted(keep, pool[centres])[member]
        size = torch.bincount(member, minlength=cluster_num).float()
        weight = torch.ones(n)
        weight[pool] = 1.0 / (size[member] + 1e-6)  # the official norm_weight
        return Plan(keep=keep, assign=assign, weight=weight, scores=relation, reduce="sum")

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        """``select`` for the whole batch: raters, ranking and density-peak recycling as batched tensor
        algebra (samples with equal counts cluster together); every count comes from the official table."""
        if bt.text_attn is None:
            return None  # the per-sample fallbacks
        b, n = bt.valid.shape
        dev = bt.valid.device
        ns = [sum(c) for c in bt.counts]
        qv = bt.text_attn_valid
        p = bt.text_attn.float()
        if bt.visual_embeds is not None and bt.question_embeds is not None:
            v, t = bt.visual_embeds.float(), bt.question_embeds.float()
            vv = bt.visual_valid
            m_v_t = (v @ t.transpose(1, 2)).masked_fill(~qv.unsqueeze(1), float("-inf")).softmax(2)
            m_v_t = (m_v_t * vv.unsqueeze(-1)).sum(1) / vv.sum(1, keepdim=True).clamp(min=1)  # [B, Q]
            mean = (m_v_t * qv).sum(1, keepdim=True) / qv.sum(1, keepdim=True).clamp(min=1)
            raters = qv & (m_v_t > mean)
        else:
            raters = qv
        relation = (p * raters.unsqueeze(-1)).sum(1) / raters.sum(1, keepdim=True).clamp(min=1)
        relation = torch.where(qv.any(1, keepdim=True), relation, text_relevance_batch(bt))
        relation = relation.masked_fill(~bt.valid, float("-inf"))
        keep_n = [max(1, min(self.counts(bt.meta(i)) if self.final_budget is not None else sum(bt.budgets[i]),
                             c - 1)) if c else 0 for i, c in enumerate(ns)]
        top = torch.topk(relation, max(keep_n, default=0), dim=-1).indices
        ok = torch.arange(top.shape[1], device=dev).view(1, -1) < torch.tensor(keep_n).to(dev).view(-1, 1)
        kept = slot_mask(torch.where(ok, top, -1), n)
        scores = relation.masked_fill(~bt.valid, 0.0)
        recycle = [bool(self.options["recycle"]) and 0 < k < c for k, c in zip(keep_n, ns)]
        assign = torch.where(kept, kept.long().cumsum(1) - 1, -1)  # kept tokens: their own column, for now
        weight = torch.ones(b, n, device=dev)
        rep = torch.where(kept, torch.arange(n, device=dev), -1)
        shapes: dict = {}
        for i, (r, k, c) in enumerate(zip(recycle, keep_n, ns)):
            if r:
                m = int((c - k) * 0.3) + 1
                shapes.setdefault((m, int(m / 10) + 1), []).append(i)
        for (m, cn), rows in shapes.items():  # recycling: the best-rated deleted tokens, clustered
            sel = torch.tensor(rows).to(dev, non_blocking=True)
            rel = relation[sel].masked_fill(kept[sel], float("-inf"))
            pool = torch.topk(rel, m, dim=-1).indices  # [G, m], the official order
            x = torch.gather(bt.features[sel].float(), 1, pool.unsqueeze(-1).expand(-1, -1, bt.features.shape[-1]))
            centres, member = density_peak_rows(x, cn)
            size = torch.zeros(len(rows), cn, device=dev).scatter_add_(1, member, torch.ones(len(rows), m, device=dev))
            centre_tok = torch.gather(pool, 1, centres)  # [G, cn] slots
            rep_g = rep[sel]
            rep_g.scatter_(1, pool, torch.gather(centre_tok, 1, member))
            rep[sel] = rep_g
            w_g = weight[sel]
            w_g.scatter_(1, pool, 1.0 / (torch.gather(size, 1, member) + 1e-6))  # the official norm_weight
            weight[sel] = w_g
        members = rep == torch.arange(n, device=dev)
        totals = [k + (int((c - k) * 0.3) + 1) // 10 + 1 if r else k for k, c, r in zip(keep_n, ns, recycle)]
        keep = mask_positions(members, max(totals, default=0))
        assign = position_in_keep(keep, rep, n)
        merged = any(recycle)
        return BatchPlan(keep, assign if merged else None, weight if merged else None, scores=scores,
                         reduce="sum" if merged else "mean", totals=totals)


class ATP(Staged):
    """ATP-LLaVA (Ye et al., CVPR'25), training-free form: instance- and layer-adaptive thresholds.

    At each stage (default 1/4, 1/2, 3/4 depth) a visual token's importance is its mean attention from the
    question tokens (SDPA-compatible tap at the previous layer). The threshold is the instance's mean
    importance at that layer: the count is ``target * (#tokens above the mean) / (N / 2)``, clamped to
    ``[1, min(N, 2 * target)]``, so it follows how concentrated this image's importance is, and the
    geometric schedule's target is met on average (exactly for symmetric score distributions): the budget
    is the target average. A ``spatial`` fraction of the count is spent on spatially uniform samples
    among the remaining tokens (the paper's spatial augmentation). Tokens above the threshold are taken
    in score order.

    The authors released no code we could find (public code searched 2026-12): this follows the text, no
    differential test is possible. Deviations: ATP-LLaVA learns its thresholds and spatial term (trained
    towards a target average ratio);
    here both are fixed rules, so the average is only met for symmetric importance: long-tailed importance,
    as in trained models, keeps fewer (9 of a 49-token target on the built-in test-bed LLaVA).

    Example:
        >>> ta = torch.tensor([[.5, .3, .05, .05, .05, .05]])
        >>> ATP(spatial=0.0).select(Tokens(torch.zeros(6, 2), [6], [3], text_attn=ta)).keep.tolist()
        [0, 1]
    """

    name = "atp"
    stages = ("llm",)
    batched = True
    signals = ("text_attn", "attn")
    adaptive = True
    paper = "ATP-LLaVA, CVPR'25"
    summary = "instance- and layer-adaptive threshold on importance, spatial term"
    where = "LLM layers 1/4, 1/2, 3/4 of depth"
    paper_url = "https://arxiv.org/abs/2412.00447"

    @classmethod
    def option_defaults(cls):
        return {"layers": None, "spatial": 0.25}

    def select(self, tokens: Tokens) -> Plan:
        n = tokens.n
        k = sum(self.targets(tokens))
        score = _text_relevance(tokens)
        above = int((score > score.mean()).sum())
        c = max(1, min(n, 2 * k, int(round(k * above / (n / 2)))))
        c_sp = int(round(float(self.options["spatial"]) * c)) if c > 1 else 0
        top = topk_indices(score, c - c_sp)
        rest = torch.ones(n, dtype=torch.bool)
        rest[top] = False
        rest = rest.nonzero().flatten()
        extra = rest[evenly_spaced(len(rest), min(c_sp, len(rest)))]
        return Plan(keep=torch.cat([top, extra]).sort().values, scores=score)

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        """The thresholds for the whole batch; the adaptive count is read once per stage."""
        score = text_relevance_batch(bt)
        ns = [sum(c) for c in bt.counts]
        n_t = torch.tensor(ns, dtype=torch.float64).to(score.device, non_blocking=True)
        mean = score.sum(1) / n_t.clamp(min=1)
        above = ((score > mean.unsqueeze(1)) & bt.valid).sum(1)
        ks = torch.tensor([sum(self.targets(bt.meta(b))) for b in range(bt.batch)], dtype=torch.float64)
        ks = ks.to(score.device, non_blocking=True)
        c = torch.round(ks * above / (n_t / 2).clamp(min=1e-30)).clamp(max=torch.minimum(n_t, 2 * ks)).clamp(min=1)
        cs = [int(v) if n else 0 for v, n in zip(host_list(c), ns)]  # the adaptive count: one read per stage
        sp = float(self.options["spatial"])
        c_sp = [int(round(sp * v)) if v > 1 else 0 for v in cs]
        top = topk_keep(score, bt.valid, [v - w for v, w in zip(cs, c_sp)])
        n = bt.valid.shape[1]
        taken = slot_mask(top, n)
        rest = mask_positions(bt.valid & ~taken, n)
        picks = [evenly_spaced(r, min(w, r)) for r, w in zip([x - (v - w) for x, v, w in zip(ns, cs, c_sp)], c_sp)]
        width = max([len(p) for p in picks], default=0)
        pick = torch.full((bt.batch, width), -1, dtype=torch.long)
        for b, p in enumerate(picks):  # host lists from host counts
            pick[b, : len(p)] = p
        pick = pick.to(score.device, non_blocking=True)
        taken = taken | slot_mask(torch.where(pick >= 0, torch.gather(rest, 1, pick.clamp(min=0)), -1), n)
        keep = mask_positions(taken, max(cs, default=0))
        return BatchPlan(keep, scores=score, totals=cs)
