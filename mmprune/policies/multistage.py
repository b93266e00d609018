"""Multi-stage and pre-fusion policies: ``aim``, ``todre``, ``prefusion``.

Each expands at wrap time into several stages (``Policy.expand``); the stage policies below are not
registered under their own names, and appear in the trace as ``aim/merge``, ``todre/withdraw``, ...
"""

from __future__ import annotations

import torch

from ..config import PruneConfig
from ._ops import bipartite_merge, segmentwise
from .base import Plan, Policy, Tokens, resolve_budget
from .batch import BatchPlan, BatchTokens, mask_positions, topk_keep
from .diversity import DivPrune
from .inllm import _text_relevance, text_relevance_batch


def _stage_options(config, keys) -> dict:
    return {k: config.options[k] for k in keys if k in config.options}


def aim_retain_rates(num_layers: int, start: int | None = None) -> list[float]:
    """AIM's in-LLM schedule: the fraction of the merged visual tokens kept after each decoder layer.

    The official scheduler (LaVi-Lab/AIM ``modeling_qwen2.py``, commit edc24e9, for 28 layers) is
    ``max(0, 1 - (l - 14 + 1) * 0.125)`` from layer 14 on: 12.5% less after each layer, none after layer 21.
    Other depths keep its shape: from ``start`` (default half the depth), a step of ``0.125 * 28 / L``.

    Example:
        >>> [round(r, 3) for r in aim_retain_rates(28)[13:23]]
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    """
    start = num_layers // 2 if start is None else int(start)
    step = 0.125 * 28 / num_layers
    return [max(0.0, 1.0 - (i - start + 1) * step) if i >= start else 1.0 for i in range(num_layers)]


class AIM(Policy):
    """AIM (Zhong et al., ICCV'25): iterative similarity merging before the LLM + progressive pruning inside.

    Stage ``aim/merge`` (pre-LLM): bipartite soft matching on the projected features, repeated until the
    budget (per image) is met, as AIM's ``bipartite_soft_matching_merge`` (LaVi-Lab/AIM
    ``llava/model/token_merge.py``, commit edc24e9): the features are their own metric, and a merged token
    is the *unweighted* ``scatter_reduce(mean)`` of the current tokens (a token that already stands for
    several counts once), so budget 0.25 reproduces AIM's two rounds ``r = N//2, N//4`` exactly.

    Stages ``aim/prune``: after each decoder layer l from ``prune_start`` (default half the depth) on, the
    visual tokens ranked by AIM's importance (PageRank over layer l's whole attention matrix at temperature
    0.1, ``get_importance``) are cut to ``int(N * rate(l))`` of the N merged tokens, ``rate`` falling by
    ``0.125 * 28 / L`` per layer (``aim_retain_rates``): on 28 layers 87.5% after layer 14, none after 21,
    as the official scheduler. The drop follows layer l, so each stage runs at l + 1 on layer l's signal.
    Proven equal to references written from both files (``tests/test_faithful.py``).

    Deviation by construction: the official code *masks* pruned tokens out of later layers' keys while
    still computing them, so they keep contributing query rows to later PageRank rounds; mmprune removes
    them, so stages after the first in-LLM one rank on the surviving tokens alone.

    Example:
        >>> [(p.name, layer) for _, p, layer in AIM.expand(PruneConfig("aim", 0.5), 8)][:3]
        [('aim/merge', None), ('aim/prune', 5), ('aim/prune', 6)]
    """

    name = "aim"
    stages = ("pre", "llm")
    signals = ("pagerank",)
    paper = "AIM, ICCV'25"
    summary = "iterative similarity merging before the LLM + progressive PageRank pruning inside"
    where = "merge before the LLM, prune from depth/2"
    paper_url = "https://arxiv.org/abs/2412.03248"
    code_url = "https://github.com/LaVi-Lab/AIM/tree/edc24e9f3dfa99496ad332bd43ce20fa7b2cd30c"

    @classmethod
    def option_defaults(cls):
        return {"prune_start": None}

    @classmethod
    def expand(cls, config, num_layers):
        cls(**config.options)  # validate options
        rates = aim_retain_rates(num_layers, config.options.get("prune_start"))
        out = [(PruneConfig("aim", config.budget, None, {}), AimMerge(), None)]
        for layer, rate in enumerate(rates):
            if rate >= 1.0 or layer + 1 >= num_layers:
                continue
            pol = AimPrune(rate=rate)
            pol.merged_budget = config.budget
            out.append((PruneConfig("aim", 1.0, layer + 1, {}), pol, layer + 1))
            if rate <= 0.0:
                break  # every visual token is gone
        return out


class AimMerge(Policy):
    name = "aim/merge"
    stages = ("pre",)
    batched = True

    def select(self, tokens: Tokens) -> Plan:
        def one(t):
            keep, assign, weight = bipartite_merge(t.features, t.token_sizes(), t.budgets[0], mode="mean")
            return Plan(keep=keep, assign=assign, weight=weight)

        return segmentwise(tokens, one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        from .merging import bipartite_batch

        return bipartite_batch(bt, bt.features, "mean")


class AimPrune(Policy):
    name = "aim/prune"
    stages = ("llm",)
    signals = ("pagerank",)
    batched = True
    merged_budget = 1.0

    @classmethod
    def option_defaults(cls):
        return {"rate": 1.0}

    def _k(self, tokens: Tokens) -> int:
        # N: the merged count entering the LLM (the merge stage meets its budget per image exactly)
        merged = sum(resolve_budget(self.merged_budget, n0) for n0 in (tokens.origin or tokens.segments))
        return min(tokens.n, int(merged * float(self.options["rate"])))

    def select(self, tokens: Tokens) -> Plan:
        k = self._k(tokens)
        score = tokens.pagerank.float().cpu() if tokens.pagerank is not None else _text_relevance(tokens)
        order = torch.sort(score, dim=-1, descending=True).indices  # the official sort
        return Plan(keep=order[:k].sort().values, scores=score)

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        """The top PageRank tokens of the batch (a stable sort: ties to the lower index, where the official
        ``torch.sort`` leaves them to the backend)."""
        if bt.pagerank is None:
            return None
        ks = [self._k(bt.meta(b)) for b in range(bt.batch)]
        return BatchPlan(topk_keep(bt.pagerank, bt.valid, ks), scores=bt.pagerank.float(), totals=ks)


class ToDRE(Policy):
    """ToDRE (Li et al., 2025): k-center diversity before the LLM + task-relevance withdrawal inside.

    Stage ``todre/diverse`` (pre-LLM): greedy k-center on the projected features keeps a diverse subset
    of the budget's size per image (as ``divprune``). Stage ``todre/withdraw`` at ``layer`` (default half
    the depth): the question tokens' attention to the visual tokens is read at the previous layer; if its
    total mass is below ``mass`` (default 0.05: the information has migrated into the text), all visual
    tokens are withdrawn, else those with below-average relevance are. Adaptive in the second stage;
    the budget is the first stage's (exact) count.

    The authors released no code we could find (public code searched 2026-12): this follows the text, no
    differential test is possible. Deviations: the paper's v2 uses greedy max-sum diversification in
    stage 1; the withdrawal rule
    (mass threshold, then above-average relevance) is our reading of its "information migration" step.

    Example:
        >>> [p.name for _, p, _ in ToDRE.expand(PruneConfig("todre", 0.5), 4)]
        ['todre/diverse', 'todre/withdraw']
    """

    name = "todre"
    stages = ("pre", "llm")
    signals = ("text_attn",)
    adaptive = True
    paper = "ToDRE, 2025"
    summary = "k-center diversity before the LLM + task-relevance withdrawal inside"
    where = "k-center before the LLM, withdrawal at depth/2"
    paper_url = "https://arxiv.org/abs/2505.18757"

    @classmethod
    def option_defaults(cls):
        return {"mass": 0.05}

    @classmethod
    def expand(cls, config, num_layers):
        cls(**config.options)
        layer = config.layer if config.layer is not None else max(1, num_layers // 2)
        return [
            (PruneConfig("todre", config.budget, None, {}), ToDREDiverse(), None),
            (PruneConfig("todre", 1.0, layer, {}), ToDREWithdraw(**_stage_options(config, ["mass"])), layer),
        ]


class ToDREDiverse(DivPrune):
    """ToDRE's first stage: DivPrune's k-center (batched, ``DivPrune.select_batch``)."""

    name = "todre/diverse"
    stages = ("pre",)


class ToDREWithdraw(Policy):
    name = "todre/withdraw"
    stages = ("llm",)
    signals = ("text_attn",)
    adaptive = True
    batched = True

    @classmethod
    def option_defaults(cls):
        return {"mass": 0.05}

    def select(self, tokens: Tokens) -> Plan:
        rel = _text_relevance(tokens)
        if tokens.text_attn is not None and float(rel.sum()) < float(self.options["mass"]):
            return Plan(keep=torch.zeros(0, dtype=torch.long), scores=rel)
        return Plan(keep=(rel >= rel.mean()).nonzero().flatten(), scores=rel)

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        """The withdrawal for the whole batch; the adaptive count is read once per stage."""
        if bt.text_attn is None:
            return None
        rel = text_relevance_batch(bt)
        mean = rel.sum(1, keepdim=True) / bt.valid.sum(1, keepdim=True).clamp(min=1)
        kept = bt.valid & (rel >= mean) & (rel.sum(1, keepdim=True) >= float(self.options["mass"]))
        totals = kept.sum(1).tolist()  # the adaptive count: one read per stage
        return BatchPlan(mask_positions(kept, max(totals, default=0)), scores=rel, totals=totals)


class PreFusion(Policy):
    """Pre-fusion (LLaVA-Mini's finding): visual tokens matter mostly in early layers, where their content
    fuses into the text tokens; keep all of them for the first ``layer`` layers, then compress them.

    One in-LLM stage at ``layer`` (default a quarter of the depth, at least 1): the visual tokens are
    compressed to the budget by ``compress`` (default ``"pool"``: pooled summary tokens, plain means of
    the hidden states over grid windows; any registered in-LLM-capable policy name works, e.g.
    ``"fastv"``), with ``compress_options`` passed on. Training-free: LLaVA-Mini trains a pre-fusion
    module and reaches a single token; a trained module can replace ``compress`` later.

    Example:
        >>> [(p.name, layer) for _, p, layer in PreFusion.expand(PruneConfig("prefusion", 4), 8)]
        [('prefusion/pool', 2)]
    """

    name = "prefusion"
    stages = ("llm",)
    signals = ("grid",)
    paper = "LLaVA-Mini, ICLR'25 (finding)"
    summary = "keep all visual tokens for the first L layers, then compress to the budget"
    where = "LLM layer depth/4"
    paper_url = "https://arxiv.org/abs/2501.03895"

    @classmethod
    def option_defaults(cls):
        return {"compress": "pool", "compress_options": {}}

    @classmethod
    def expand(cls, config, num_layers):
        from . import get_policy

        opts = cls(**config.options).options
        layer = config.layer if config.layer is not None else max(1, num_layers // 4)
        inner = get_policy(opts["compress"])
        if "llm" not in inner.stages:
            raise ValueError(f"prefusion compress policy {opts['compress']!r} cannot act inside the LLM")
        pol = inner(**dict(opts["compress_options"] or {}))
        pol.name = f"prefusion/{opts['compress']}"
        return [(PruneConfig("prefusion", config.budget, layer, dict(config.options)), pol, layer)]
