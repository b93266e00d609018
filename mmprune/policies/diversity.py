"""Diversity-driven pruning: ``divprune``, ``cdpruner``, ``dart``."""

from __future__ import annotations

import torch

from ._ops import cos_matrix, dpp_greedy, kcenter, normed, segmentwise
from .base import Plan, Policy, Tokens


class DivPrune(Policy):
    """DivPrune (Alvar et al., CVPR'25): greedy max-min diversity (k-center) on the projected features.

    Cosine distance ``1 - cos`` between the image's tokens (after the projector, as the paper); the first
    token is the one whose nearest neighbour is farthest, each next one maximises its distance to the
    selected set. Per image, exactly the budget. No deviation beyond running per image.

    Example:
        >>> x = torch.tensor([[1., 0.], [0.99, 0.1], [0., 1.], [0.1, 0.99], [-1., 0.]])
        >>> DivPrune().select(Tokens(x, [5], [3])).keep.tolist()
        [0, 2, 4]
    """

    name = "divprune"
    paper = "DivPrune, CVPR'25"
    summary = "greedy max-min diversity (k-center) on projected features"

    def select(self, tokens: Tokens) -> Plan:
        return segmentwise(tokens, lambda t: Plan(keep=kcenter(t.features, t.budgets[0]).sort().values))


class CDPruner(Policy):
    """CDPruner (Zhang et al., 2025): conditional DPP, feature similarity x instruction relevance, greedy MAP.

    Kernel ``L = diag(r) S diag(r)`` with ``S`` the cosine similarity of the image's projected features
    and ``r`` each token's relevance to the instruction: the mean cosine similarity to the question's token
    embeddings (the LLM's input embeddings of the text after the image), min-max normalised to (0, 1].
    Tokens are picked by fast greedy MAP inference (Chen et al., 2018) until the budget is met.

    Deviations: the paper takes ``S`` from the vision encoder's features and ``r`` from CLIP's text encoder
    (LLaVA); families without an aligned text encoder get the LLM embedding space instead, which we use
    for all. The reference code negates the CLIP relevance before normalising; ``negate=True`` does the
    same (default False: more similar to the instruction = more relevant). No question -> plain DPP.

    Example:
        >>> x = torch.tensor([[1., 0.], [1., 0.01], [0., 1.], [0.7, 0.7]])
        >>> CDPruner().select(Tokens(x, [4], [2], question=torch.tensor([[0., 1.]]))).keep.tolist()
        [2, 3]
    """

    name = "cdpruner"
    signals = ("question",)
    paper = "CDPruner, 2025"
    summary = "conditional DPP: feature similarity x instruction relevance, greedy MAP"

    @classmethod
    def option_defaults(cls):
        return {"negate": False}

    def select(self, tokens: Tokens) -> Plan:
        q = tokens.question if tokens.question is not None and len(tokens.question) else None

        def one(t: Tokens) -> Plan:
            x = t.features
            sim = cos_matrix(x).cpu().double()
            if q is None:
                rel = torch.ones(t.n, dtype=torch.float64)
            else:
                rel = (normed(x) @ normed(q).T).mean(-1).cpu().double()
                rel = -rel if self.options["negate"] else rel
                rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min() + 1e-6)
            kernel = rel[:, None] * sim * rel[None, :]
            return Plan(keep=dpp_greedy(kernel, t.budgets[0]).sort().values, scores=rel.float())

        return segmentwise(tokens, one)


class DART(Policy):
    """DART (Wen et al., 2025): duplication-aware pruning around pivot tokens.

    Pivots: per image the ``pivots`` visual tokens with the largest key L1 norm (layer K-1 keys inside
    the LLM, as the paper; the features' L1 norm before the LLM) plus the ``text_pivots`` question tokens
    with the largest feature L1 norm. Image pivots are kept; each pivot then claims its share of the rest
    of the budget among the tokens *least* similar to it (cosine of the layer-K input hidden states, i.e.
    the duplicates of a pivot are what is dropped); leftovers go round-robin, so each image meets its
    budget exactly. Default stage: LLM layer 2 (the paper's K); pre-LLM works as well.

    Deviations: text-pivot norms use hidden states, not keys; selection is per image rather than over the
    whole prompt.

    Example:
        >>> x = torch.tensor([[3., 0.], [2.9, 0.1], [0., 1.], [0.1, 1.]])
        >>> DART(pivots=1, text_pivots=0).select(Tokens(x, [4], [2])).keep.tolist()
        [0, 2]
    """

    name = "dart"
    signals = ("question", "llm_keys")
    default_layer = 2
    paper = "DART, 2025"
    summary = "pivot tokens; drop the tokens most similar to them"

    @classmethod
    def option_defaults(cls):
        return {"pivots": 4, "text_pivots": 4}

    def select(self, tokens: Tokens) -> Plan:
        q = tokens.question if tokens.question is not None else torch.zeros(0, tokens.features.shape[-1])
        n_txt = min(int(self.options["text_pivots"]), len(q))
        tp = torch.topk(q.float().abs().sum(-1), n_txt).indices if n_txt else torch.zeros(0, dtype=torch.long)
        text_piv = q[tp.to(q.device)] if n_txt else q[:0]

        def one(t: Tokens) -> Plan:
            n, k = t.n, t.budgets[0]
            key = t.llm_keys if t.llm_keys is not None else t.features
            p = min(int(self.options["pivots"]), k)
            img_piv = torch.sort(key.float().abs().sum(-1).cpu(), descending=True, stable=True).indices[:p]
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[img_piv] = True
            piv = torch.cat([t.features[img_piv.to(t.features.device)], text_piv.to(t.features)], 0)
            left = k - p
            if left > 0 and len(piv):
                sim = cos_matrix(piv, t.features).cpu()  # [pivots, n]
                quota = [left // len(piv)] * len(piv)
                for i in range(left - sum(quota)):
                    quota[i % len(piv)] += 1
                for i, qn in enumerate(quota):
                    s = sim[i].masked_fill(chosen, float("inf"))
                    pick = torch.sort(s, stable=True).indices[:qn]
                    chosen[pick] = True
            elif left > 0:
                chosen[torch.nonzero(~chosen).flatten()[:left]] = True
            return Plan(keep=chosen.nonzero().flatten())

        return segmentwise(tokens, one)
