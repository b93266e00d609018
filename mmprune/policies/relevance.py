"""Score-and-cut policies before the LLM: ``cls_tail`` (adaptive) and ``simignore``."""

from __future__ import annotations

import torch

from ._ops import knee, mean_similarity, normed, segmentwise, topk_indices
from .base import Plan, Policy, Tokens
from .batch import (
    BatchPlan,
    BatchTokens,
    keep_from_rows,
    mean_similarity_rows,
    rows_to_batch,
    segment_features,
    segment_rows,
    topk_keep,
    unflatten_counts,
)


class ClsTail(Policy):
    """Sparsity Meets Similarity (Yu et al., 2024): cut the long tail of [CLS] similarity at its knee.

    Each patch's cosine similarity to the vision tower's [CLS] output at the feature layer is long-tailed:
    a few tokens are very similar, most are not. Sorted in decreasing order, the curve's inflection point
    (located with Kneedle: the point farthest below the chord between the curve's ends) separates the
    head, which is kept, from the tail. Adaptive: the count is the image's own; the budget is a cap (the
    most similar ``budget`` tokens when the head is longer).

    Fallbacks: towers without [CLS] (SigLIP, and Qwen, which provides no tower similarity) use the
    cosine to the image's mean token. Deviations: the paper's second, text-visual pruning pass inside the
    LLM is not part of this stage; stack it, e.g. with ``PruneConfig("sparsevlm", ...)``.

    Example:
        >>> s = torch.tensor([1.0, 0.97, 0.95, 0.93, 0.3, 0.25, 0.22, 0.2, 0.19, 0.18])
        >>> ClsTail().select(Tokens(torch.zeros(10, 2), [10], [10], cls_sim=s)).keep.tolist()
        [0, 1, 2, 3]
    """

    name = "cls_tail"
    stages = ("pre",)
    signals = ("cls_sim",)
    adaptive = True
    batched = True
    paper = "Sparsity Meets Similarity, 2024"
    summary = "cut the sorted [CLS]-similarity curve at its inflection point"
    where = "before the LLM (tower output)"
    paper_url = "https://arxiv.org/abs/2409.01162"

    def select(self, tokens: Tokens) -> Plan:
        def one(t: Tokens) -> Plan:
            s = (t.cls_sim if t.cls_sim is not None else mean_similarity(t.features)).float().cpu()
            head = knee(torch.sort(s, descending=True).values)
            return Plan(keep=topk_indices(s, min(head, t.budgets[0])), scores=s)

        return segmentwise(tokens, one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        """``select`` for every image of the batch: knees of all sorted curves at once, then the one read an
        adaptive count needs (each image's head length), then one top-k."""
        index, owner, ks = segment_rows(bt)
        b, n = bt.features.shape[:2]
        valid = index >= 0
        if bt.cls_sim is not None:
            score = segment_features(bt.cls_sim.float(), index, owner)
        else:
            score = mean_similarity_rows(segment_features(bt.features, index, owner), valid)
        score = score.masked_fill(~valid, 0.0)
        v = torch.sort(score.double().masked_fill(~valid, float("-inf")), dim=1, descending=True).values
        cnt = valid.sum(1, keepdim=True)
        first, last = v[:, :1], torch.gather(v, 1, (cnt - 1).clamp(min=0))
        y = torch.where(first > last, (v - last) / (first - last), 0.0)
        xs = torch.arange(v.shape[1], device=v.device, dtype=torch.float64) / (cnt - 1).clamp(min=1)
        gap = ((1.0 - xs) - y).masked_fill(~valid, float("-inf"))
        head = torch.where(cnt <= 2, cnt, gap.argmax(1, keepdim=True).clamp(min=1)).view(-1)
        heads = head.tolist()  # the adaptive count: one read per stage
        ks = [min(h, k) for h, k in zip(heads, ks)]
        keep = keep_from_rows(topk_keep(score, valid, ks), index, owner, ks, b, n)
        counts = unflatten_counts(bt.counts, ks)
        return BatchPlan(keep, scores=rows_to_batch(score, index, owner, b, n, fill=0.0), counts=counts)


class SimIgnore(Policy):
    """Simignore (seed paper): ignore image tokens whose embedding similarity to the question is low.

    Score: mean cosine similarity between the token's projected feature and the question's token
    embeddings (LLM input space: the text after the image); the budget's most similar tokens are kept
    per image. ``reduce="max"`` scores by the best-matching question token instead.

    Fallback: no question text -> all text tokens; no text at all -> similarity to the image's mean token.

    Example:
        >>> x = torch.tensor([[1., 0.], [0., 1.], [0.7, 0.7]])
        >>> SimIgnore().select(Tokens(x, [3], [1], question=torch.tensor([[0., 1.]]))).keep.tolist()
        [1]
    """

    name = "simignore"
    stages = ("pre",)
    signals = ("question", "text")
    batched = True
    paper = "Simignore, 2024"
    summary = "drop visual tokens with low embedding similarity to the question"
    where = "before the LLM (after the projector)"
    paper_url = "https://arxiv.org/abs/2412.09817"
    option_choices = {"reduce": ("mean", "max")}

    @classmethod
    def option_defaults(cls):
        return {"reduce": "mean"}

    def select(self, tokens: Tokens) -> Plan:
        q = tokens.question if tokens.question is not None and len(tokens.question) else tokens.text

        def one(t: Tokens) -> Plan:
            if q is None or not len(q):
                s = mean_similarity(t.features)
            else:
                sim = normed(t.features) @ normed(q).T
                s = sim.mean(-1) if self.options["reduce"] == "mean" else sim.max(-1).values
            s = s.float().cpu()
            return Plan(keep=topk_indices(s, t.budgets[0]), scores=s)

        return segmentwise(tokens, one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        """``select`` for every image of the batch at once (masked means over each sample's question)."""
        if bt.question is None:
            return None
        index, owner, ks = segment_rows(bt)
        b, n = bt.features.shape[:2]
        valid = index >= 0
        who = torch.tensor(owner, dtype=torch.long).to(index.device, non_blocking=True)
        x = segment_features(bt.features, index, owner)
        xn = normed(x)
        q, qv = bt.question[who], bt.question_valid[who]
        sim = xn @ normed(q).transpose(1, 2)  # [S, m, Q]
        if self.options["reduce"] == "mean":
            s = (sim * qv.unsqueeze(1)).sum(-1) / qv.sum(-1, keepdim=True).clamp(min=1)
        else:
            s = sim.masked_fill(~qv.unsqueeze(1), float("-inf")).max(-1).values
        fallback = mean_similarity_rows(x, valid)  # no text at all: the image's mean token
        s = torch.where(qv.any(-1, keepdim=True), s, fallback).masked_fill(~valid, 0.0)
        keep = keep_from_rows(topk_keep(s, valid, ks), index, owner, ks, b, n)
        counts = bt.fixed_counts()
        return BatchPlan(keep, scores=rows_to_batch(s, index, owner, b, n, fill=0.0), counts=counts)
