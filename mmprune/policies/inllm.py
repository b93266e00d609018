"""Policies acting inside the LLM: ``vtw``, ``pyramiddrop``, ``sparsevlm``, ``atp``.

Multi-layer policies expand into one stage per layer at wrap time (see ``Policy.expand``), so the trace
shows every drop. Their budget is what remains after the *last* stage (float: fraction of the image's
visual tokens; int: tokens per image), reached by a geometric schedule over the stages.
"""

from __future__ import annotations

import math

import torch

from ..config import PruneConfig
from ._ops import attention_received, evenly_spaced, kcenter, normed, topk_indices
from .base import Plan, Policy, Tokens, resolve_budget


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
    stages = ("llm",)
    paper = "VTW, AAAI'25"
    summary = "withdraw all visual tokens at layer K"

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
    paper = "PyramidDrop, CVPR'25"
    summary = "last-instruction-token attention, geometric schedule over layers"

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


class SparseVLM(Staged):
    """SparseVLM (Zhang et al., ICML'25): text raters, rank-adaptive deletion, recycling.

    At each stage (default layers 2, 6, 15 of 32, scaled to the model's depth) the question tokens'
    attention to the visual tokens is computed at the previous layer (SDPA-compatible tap). Raters are the
    question tokens whose mean attention to the image is at least the average; a visual token's score is
    its mean attention from the raters. The number deleted is rank-adaptive, ``lambda * (N - rank(P))``
    for the raters' attention matrix ``P``, with ``lambda`` set so that a full-rank ``P`` meets the stage's
    target exactly: a rank-deficient ``P`` (redundant raters) deletes more, so the budget is a cap.
    Recycling: the best-scored ``pool`` fraction of the deleted tokens is clustered into ``recycle`` x
    kept-count merged tokens (score-weighted means), which take slots of the budget.

    Deviations: clusters come from k-center seeds + nearest assignment (the paper uses density-peak
    clustering), and a recycled token sits at its seed's position. Adaptive (cap).

    Example:
        >>> ta = torch.tensor([[.1, .5, .2, .1, .1], [.2, .4, .3, .05, .05]])
        >>> SparseVLM(recycle=0.0).select(Tokens(torch.randn(5, 4), [5], [2], text_attn=ta)).keep.tolist()
        [1, 2]
    """

    name = "sparsevlm"
    stages = ("llm",)
    signals = ("text_attn",)
    adaptive = True
    paper = "SparseVLM, ICML'25"
    summary = "question tokens rate visual tokens, rank-adaptive count, recycling"

    @classmethod
    def option_defaults(cls):
        return {"layers": None, "recycle": 0.1, "pool": 0.3}

    @classmethod
    def default_layers(cls, config, num_layers):
        if config.options.get("layers") is not None or config.layer is not None:
            return super().default_layers(config, num_layers)
        return pyramid_layers(num_layers, fractions=(2 / 32, 6 / 32, 15 / 32))

    def select(self, tokens: Tokens) -> Plan:
        n = tokens.n
        k = min(n, sum(self.targets(tokens)))
        p = tokens.text_attn.float().cpu() if tokens.text_attn is not None and tokens.text_attn.shape[0] else None
        if p is None:
            score, rank, full = _text_relevance(tokens), n, n
        else:
            rel = p.mean(-1)
            raters = p[rel >= rel.mean()]
            score = raters.mean(0)
            rank = int(torch.linalg.matrix_rank(raters.double()))
            full = min(raters.shape[0], n)
        lam = (n - k) / max(n - full, 1)
        n_del = min(n - 1, max(n - k, int(round(lam * (n - rank)))))
        keep_n = n - n_del
        c = max(0, min(keep_n - 1, int(round(float(self.options["recycle"]) * keep_n)))) if n_del else 0
        top = topk_indices(score, keep_n - c)
        if c == 0:
            return Plan(keep=top, scores=score)
        gone = torch.ones(n, dtype=torch.bool)
        gone[top] = False
        deleted = gone.nonzero().flatten()
        deleted = deleted[torch.sort(score[deleted], descending=True, stable=True).indices]
        pool = deleted[: max(c, math.ceil(float(self.options["pool"]) * len(deleted)))]
        seeds = pool[kcenter(tokens.features[pool.to(tokens.features.device)], c)]
        keep = torch.cat([top, seeds]).sort().values
        assign = torch.full((n,), -1, dtype=torch.long)
        assign[keep] = torch.arange(len(keep))
        f = normed(tokens.features)
        near = (f[pool.to(f.device)] @ f[seeds.to(f.device)].T).argmax(-1).cpu()
        assign[pool] = torch.searchsorted(keep, seeds)[near]
        assign[seeds] = torch.searchsorted(keep, seeds)
        return Plan(keep=keep, assign=assign, weight=score.clamp(min=1e-12) * tokens.token_sizes(), scores=score)


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

    Deviations: ATP-LLaVA learns its thresholds and spatial term (trained towards a target average ratio);
    here both are fixed rules, so the average is only met for symmetric importance: long-tailed importance,
    as in trained models, keeps fewer (9 of a 49-token target on the built-in test-bed LLaVA).

    Example:
        >>> ta = torch.tensor([[.5, .3, .05, .05, .05, .05]])
        >>> ATP(spatial=0.0).select(Tokens(torch.zeros(6, 2), [6], [3], text_attn=ta)).keep.tolist()
        [0, 1]
    """

    name = "atp"
    stages = ("llm",)
    signals = ("text_attn", "attn")
    adaptive = True
    paper = "ATP-LLaVA, CVPR'25"
    summary = "instance- and layer-adaptive threshold on importance, spatial term"

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
