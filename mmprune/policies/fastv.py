"""FastV (Chen et al., ECCV'24, "An Image is Worth 1/2 Tokens After Layer 2")."""

from __future__ import annotations

from ._ops import topk_indices
from .base import Plan, Policy, Tokens
from .batch import BatchPlan, BatchTokens, topk_keep


class FastV(Policy):
    """Keep the visual tokens the last token attends to most at layer K-1 (head-averaged); drop at K.

    Default K = 2 as in the paper. The attention row is computed by mmprune's SDPA-compatible tap (no
    eager attention, no ``output_attentions``). Deviation: the paper ranks all image tokens of the prompt
    together; so do we (one top-k over the sample's visual tokens, k = sum of per-image budgets).

    Runs batched (``select_batch``: one stable top-k over the padded batch, ties to the lower index as
    ``select``), so selection makes no host synchronisation.

    Example:
        >>> import torch
        >>> t = Tokens(torch.zeros(4, 2), [4], [2], attn=torch.tensor([0.1, 0.4, 0.2, 0.3]))
        >>> FastV().select(t).keep
        tensor([1, 3])
    """

    name = "fastv"
    stages = ("llm",)
    signals = ("attn",)
    default_layer = 2
    batched = True
    paper = "FastV, ECCV'24"
    summary = "last token's attention at layer K-1, keep top"
    where = "LLM layer 2"
    paper_url = "https://arxiv.org/abs/2403.06764"

    def select(self, tokens: Tokens) -> Plan:
        k = min(tokens.total_budget, tokens.n)
        return Plan(keep=topk_indices(tokens.attn, k), scores=tokens.attn)  # ties: the lower index

    def select_batch(self, tokens: BatchTokens) -> BatchPlan | None:
        if tokens.attn is None:
            return None
        ks = [min(sum(b), sum(c)) for b, c in zip(tokens.budgets, tokens.counts)]
        return BatchPlan(topk_keep(tokens.attn, tokens.valid, ks), scores=tokens.attn, totals=ks)
