"""Diversity-driven pruning: ``divprune``, ``cdpruner``, ``dart``."""

from __future__ import annotations

import torch

from ._ops import cos_matrix, dpp_greedy, kcenter, segmentwise
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

    As the official ``encode_images`` (Theia-4869/CDPruner ``llava/model/llava_arch.py``, commit ed9c12d):
    kernel ``L = diag(r) S diag(r)`` with ``S`` the cosine similarity of the image's projected features and
    ``r`` each token's *negated* mean cosine similarity to the instruction's token embeddings, min-max
    normalised as ``(r - min + 1e-6) / (max - min)``; tokens are picked by fast greedy MAP inference
    (``dpp_greedy``, float32 as there) until the budget is met. Proven equal to a reference written from that
    file (``tests/test_faithful.py``).

    What the paper reads and what we read: the official code takes ``r`` from CLIP's image embeddings and
    CLIP's text encoder on the instruction; Hugging Face VLMs carry no aligned text encoder (and the Qwen
    families no CLIP at all), so ``r`` compares the projected visual features with the LLM's input
    embeddings of the question, the same space for every family. Per image (the official LLaVA-NeXT path
    normalises ``r`` over all tiles of the batch and selects per tile). No question -> plain DPP.

    Options (deviations, never defaults): ``negate=False`` ranks tokens *more* similar to the question as
    more relevant (the sign the paper's text describes; the official code negates); the official
    normalisation divides by zero when every relevance is equal, where we use ``r = 1``.

    Example:
        >>> x = torch.tensor([[1., 0.], [1., 0.01], [0., 1.], [0.7, 0.7]])
        >>> CDPruner().select(Tokens(x, [4], [2], question=torch.tensor([[0., 1.]]))).keep.tolist()
        [0, 3]
        >>> CDPruner(negate=False).select(Tokens(x, [4], [2], question=torch.tensor([[0., 1.]]))).keep.tolist()
        [2, 3]
    """

    name = "cdpruner"
    signals = ("question",)
    paper = "CDPruner, 2025"
    summary = "conditional DPP: feature similarity x instruction relevance, greedy MAP"

    @classmethod
    def option_defaults(cls):
        return {"negate": True}

    def select(self, tokens: Tokens) -> Plan:
        q = tokens.question if tokens.question is not None and len(tokens.question) else None

        def one(t: Tokens) -> Plan:
            x = t.features.float()
            xn = x / x.norm(dim=-1, keepdim=True)
            sim = xn @ xn.T
            if q is None:
                rel = torch.ones(t.n, device=x.device)
            else:
                qf = q.to(x.device).float()
                rel = xn @ (qf / qf.norm(dim=-1, keepdim=True)).T
                rel = (-rel if self.options["negate"] else rel).mean(dim=-1)
                span = rel.max() - rel.min()
                rel = (rel - rel.min() + 1e-6) / span if float(span) > 0 else torch.ones_like(rel)
            kernel = rel[:, None] * sim * rel[None, :]
            return Plan(keep=dpp_greedy(kernel, t.budgets[0]).sort().values, scores=rel.cpu())

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
