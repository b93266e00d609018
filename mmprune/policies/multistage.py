"""Multi-stage and pre-fusion policies: ``aim``, ``todre``, ``prefusion``.

Each expands at wrap time into several stages (``Policy.expand``); the stage policies below are not
registered under their own names, and appear in the trace as ``aim/merge``, ``todre/withdraw``, ...
"""

from __future__ import annotations

import torch

from ..config import PruneConfig
from ._ops import bipartite_merge, kcenter, segmentwise, topk_indices
from .base import Plan, Policy, Tokens
from .inllm import _text_relevance


def _stage_options(config, keys) -> dict:
    return {k: config.options[k] for k in keys if k in config.options}


class AIM(Policy):
    """AIM (Zhong et al., ICCV'25): iterative similarity merging before the LLM + progressive pruning inside.

    Stage ``aim/merge`` (pre-LLM): bipartite soft matching on the projected features, repeated until the
    budget (per image) is met, as AIM's ``bipartite_soft_matching_merge`` (LaVi-Lab/AIM
    ``llava/model/token_merge.py``, commit edc24e9): the features are their own metric, and a merged token
    is the *unweighted* ``scatter_reduce(mean)`` of the current tokens (a token that already stands for
    several counts once), so budget 0.25 reproduces AIM's two rounds ``r = N//2, N//4`` exactly
    (``tests/test_faithful.py``). Stages ``aim/prune`` (one per
    decoder layer from ``prune_start``, default half the depth, to the last layer): the visual tokens with
    the least attention from the question tokens are dropped, with the kept fraction falling linearly
    so that ``final`` (default 0.25) of the merged tokens remain after the last layer.

    Deviations: AIM ranks by a PageRank-style score over the text-to-visual attention; we use the mean
    attention of the question tokens (one step of it). Budget = tokens per image after merging; the in-LLM
    schedule is relative to that (non-adaptive).

    Example:
        >>> [p.name for _, p, _ in AIM.expand(PruneConfig("aim", 0.5), 4)]
        ['aim/merge', 'aim/prune', 'aim/prune']
    """

    name = "aim"
    stages = ("pre", "llm")
    signals = ("text_attn",)
    paper = "AIM, ICCV'25"
    summary = "iterative similarity merging before the LLM + progressive importance pruning inside"

    @classmethod
    def option_defaults(cls):
        return {"prune_start": None, "final": 0.25}

    @classmethod
    def expand(cls, config, num_layers):
        cls(**config.options)  # validate options
        start = config.options.get("prune_start")
        start = max(1, num_layers // 2) if start is None else int(start)
        layers = list(range(start, num_layers))
        out = [(PruneConfig("aim", config.budget, None, {}), AimMerge(), None)]
        final = float(config.options.get("final", 0.25))
        for i, layer in enumerate(layers):
            pol = AimPrune(final=final)
            pol.stage_index, pol.num_stages = i, len(layers)
            out.append((PruneConfig("aim", 1.0, layer, {}), pol, layer))
        return out


class AimMerge(Policy):
    name = "aim/merge"
    stages = ("pre",)

    def select(self, tokens: Tokens) -> Plan:
        def one(t):
            keep, assign, weight = bipartite_merge(t.features, t.token_sizes(), t.budgets[0], mode="mean")
            return Plan(keep=keep, assign=assign, weight=weight)

        return segmentwise(tokens, one)


class AimPrune(Policy):
    name = "aim/prune"
    stages = ("llm",)
    signals = ("text_attn",)
    stage_index, num_stages = 0, 1

    @classmethod
    def option_defaults(cls):
        return {"final": 0.25}

    def select(self, tokens: Tokens) -> Plan:
        drop = 1.0 - float(self.options["final"])
        i, s = self.stage_index, self.num_stages
        ratio = (1.0 - drop * (i + 1) / s) / (1.0 - drop * i / s)
        k = sum(max(1, int(round(n * ratio))) for n in tokens.segments if n)
        score = _text_relevance(tokens)
        return Plan(keep=topk_indices(score, min(k, tokens.n)), scores=score)


class ToDRE(Policy):
    """ToDRE (Li et al., 2025): k-center diversity before the LLM + task-relevance withdrawal inside.

    Stage ``todre/diverse`` (pre-LLM): greedy k-center on the projected features keeps a diverse subset
    of the budget's size per image (as ``divprune``). Stage ``todre/withdraw`` at ``layer`` (default half
    the depth): the question tokens' attention to the visual tokens is read at the previous layer; if its
    total mass is below ``mass`` (default 0.05: the information has migrated into the text), all visual
    tokens are withdrawn, else those with below-average relevance are. Adaptive in the second stage;
    the budget is the first stage's (exact) count.

    Deviations: the paper's v2 uses greedy max-sum diversification in stage 1; the withdrawal rule
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


class ToDREDiverse(Policy):
    name = "todre/diverse"
    stages = ("pre",)

    def select(self, tokens: Tokens) -> Plan:
        return segmentwise(tokens, lambda t: Plan(keep=kcenter(t.features, t.budgets[0]).sort().values))


class ToDREWithdraw(Policy):
    name = "todre/withdraw"
    stages = ("llm",)
    signals = ("text_attn",)
    adaptive = True

    @classmethod
    def option_defaults(cls):
        return {"mass": 0.05}

    def select(self, tokens: Tokens) -> Plan:
        rel = _text_relevance(tokens)
        if tokens.text_attn is not None and float(rel.sum()) < float(self.options["mass"]):
            return Plan(keep=torch.zeros(0, dtype=torch.long), scores=rel)
        return Plan(keep=(rel >= rel.mean()).nonzero().flatten(), scores=rel)


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
