"""Diversity-driven pruning: ``divprune``, ``cdpruner``, ``dart``."""

from __future__ import annotations

import torch

from ..syncs import host_list
from ._ops import dpp_greedy, kcenter, segmentwise
from .base import Plan, Policy, Tokens
from .batch import (
    BatchPlan,
    BatchTokens,
    dpp_rows,
    kcenter_rows,
    keep_from_rows,
    mask_positions,
    rows_to_batch,
    segment_features,
    segment_rows,
    slot_mask,
    unflatten_counts,
)


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
    batched = True
    paper = "DivPrune, CVPR'25"
    summary = "greedy max-min diversity (k-center) on projected features"
    where = "before the LLM (after the projector)"
    paper_url = "https://arxiv.org/abs/2503.02175"

    def select(self, tokens: Tokens) -> Plan:
        return segmentwise(tokens, lambda t: Plan(keep=kcenter(t.features, t.budgets[0]).sort().values))

    def select_batch(self, tokens: BatchTokens) -> BatchPlan:
        # every image of the batch is one row of one batched k-center: k - 1 rounds of a few kernels
        # in all, where the per-image loop made k host round trips per image
        index, owner, ks = segment_rows(tokens)
        sel = kcenter_rows(segment_features(tokens.features, index, owner), index >= 0, max(ks, default=0))
        totals = [sum(k for k, o in zip(ks, owner) if o == b) for b in range(tokens.batch)]
        counts = tokens.fixed_counts()
        return BatchPlan(keep_from_rows(sel, index, owner, ks, tokens.batch, tokens.features.shape[1]), counts=counts, totals=totals)


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
    batched = True
    paper = "CDPruner, 2025"
    summary = "conditional DPP: feature similarity x instruction relevance, greedy MAP"
    where = "before the LLM (after the projector)"
    paper_url = "https://arxiv.org/abs/2506.10967"
    code_url = "https://github.com/Theia-4869/CDPruner/tree/ed9c12da9e85c747e76b61bfe8845081d6964372"

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

    def select_batch(self, bt: BatchTokens) -> BatchPlan:
        """``select`` for every image of the batch: one batched greedy MAP loop (``dpp_rows``)."""
        index, owner, ks = segment_rows(bt)
        b, n = bt.features.shape[:2]
        valid = index >= 0
        x = segment_features(bt.features, index, owner).float()
        xn = x / x.norm(dim=-1, keepdim=True)
        xn = xn.masked_fill(~valid.unsqueeze(-1), 0.0)
        sim = xn @ xn.transpose(1, 2)
        rel = torch.ones(valid.shape, device=x.device)
        if bt.question is not None:
            who = torch.tensor(owner, dtype=torch.long).to(x.device, non_blocking=True)
            q, qv = bt.question[who].float(), bt.question_valid[who]
            r = xn @ (q / q.norm(dim=-1, keepdim=True)).nan_to_num(0.0).transpose(1, 2)
            r = ((-r if self.options["negate"] else r) * qv.unsqueeze(1)).sum(-1) / qv.sum(-1, keepdim=True).clamp(min=1)
            lo = r.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
            span = r.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True) - lo
            r = torch.where(span > 0, (r - lo + 1e-6) / span, 1.0)
            rel = torch.where(qv.any(-1, keepdim=True), r, 1.0)  # no question: plain DPP
        rel = rel.masked_fill(~valid, 0.0)
        kernel = rel.unsqueeze(-1) * sim * rel.unsqueeze(1)
        keep = keep_from_rows(dpp_rows(kernel, valid, max(ks, default=0)), index, owner, ks, b, n)
        counts = bt.fixed_counts()
        return BatchPlan(keep, scores=rows_to_batch(rel, index, owner, b, n, fill=0.0), counts=counts)


class DART(Policy):
    """DART (Wen et al., 2025): duplication-aware pruning around pivot tokens.

    As DART in ModelTC/LightCompress (``llmc/compression/token_reduction/dart.py``, commit 9701d03,
    ``get_retained_image_token``), the implementation the paper's authors contributed there: pivots are
    the ``pivots`` image tokens and the ``text_pivots`` question tokens (the tokens after the image) whose
    layer K-1 *cached* keys (post-RoPE, heads concatenated) have the largest L1 norm. Each pivot in turn
    (in the official code's order: iteration over a Python ``set`` of the pivots' sequence indices) claims
    the ``int(k / (pivots + text_pivots))`` remaining image tokens *least* cosine-similar to it, the
    similarity taken on layer K's input hidden states through the LM's final norm; the image pivots and
    every claimed token are kept. So a budget of 64 (the paper's ``N (1 - reduction_ratio)``) keeps
    ``4 + 8 * int(64 / 8) = 68`` tokens, as the official code does, and the trace reports that count.
    Default stage: LLM layer 2 (the paper's K). Proven equal to a reference written from that file
    (``tests/test_faithful.py``).

    Fallbacks and deviations: before the LLM (``layer=None``) there are no cached keys or final norm, so
    keys and similarities use the stage's features, and the question's features stand for its keys; per
    image (the official code handles one image per prompt; the question pivots are shared by all images).

    Example:
        >>> x = torch.tensor([[3., 0.], [2.8, 0.1], [0., 1.], [0.1, 1.]])
        >>> DART(pivots=1, text_pivots=0).select(Tokens(x, [4], [2])).keep.tolist()  # pivot 0 + 2 claimed
        [0, 2, 3]
    """

    name = "dart"
    signals = ("question", "llm_keys", "final_norm")
    batched = True
    default_layer = 2
    paper = "DART, 2025"
    summary = "pivot tokens; drop the tokens most similar to them"
    where = "LLM layer 2"
    paper_url = "https://arxiv.org/abs/2502.11494"
    code_url = "https://github.com/ModelTC/LightCompress/tree/9701d035b0aac5df97a2ebaadb30bcf0707616f5"

    @classmethod
    def option_defaults(cls):
        return {"pivots": 4, "text_pivots": 4}

    @torch.compiler.disable  # its claim order is a CPython set's iteration order (see _claim_orders)
    def select(self, tokens: Tokens) -> Plan:
        p_img, p_txt = int(self.options["pivots"]), int(self.options["text_pivots"])
        q = tokens.question if tokens.question is not None else tokens.features[:0]
        q_keys = tokens.question_keys if tokens.question_keys is not None else q
        q_vec = tokens.question_normed if tokens.question_normed is not None else q
        q_rows = tokens.question_rows if tokens.question_rows is not None else torch.arange(len(q)) + tokens.n
        n_txt = min(p_txt, len(q_keys))
        txt = torch.norm(q_keys.float(), p=1, dim=-1).topk(n_txt).indices.cpu() if n_txt else torch.zeros(0, dtype=torch.long)

        def one(t: Tokens) -> Plan:
            n = t.n
            keys = t.llm_keys if t.llm_keys is not None else t.features
            vec = (t.normed if t.normed is not None else t.features).float()
            rows = (t.rows if t.rows is not None else torch.arange(n)).long().cpu()
            per = t.budgets[0] // max(p_img + p_txt, 1)
            img = torch.norm(keys.float(), p=1, dim=-1).topk(min(p_img, n)).indices.cpu()
            # the official loop, on sequence indices: its set iteration order decides which pivot claims first
            table = {int(r): j for j, r in enumerate(rows.tolist())}
            qv = q_vec.float().to(vec.device)
            vector = {int(rows[j]): vec[j] for j in img.tolist()}
            vector.update({int(q_rows[j]): qv[j] for j in txt.tolist()})
            image_indices = [int(rows[j]) for j in img.tolist()]
            query_indices = [int(q_rows[j]) for j in txt.tolist()]
            indices_set = set(image_indices + query_indices)
            valid = set(table) - set(image_indices)
            valid_list = list(valid)
            for item in list(indices_set):
                if per <= 0 or not valid_list:
                    break
                cand = vec[[table[r] for r in valid_list]]
                cos = -torch.nn.functional.cosine_similarity(vector[item], cand, dim=-1)
                top = cos.topk(min(per, len(valid_list))).indices.tolist()
                real = [valid_list[i] for i in top]
                indices_set.update(real)
                valid.difference_update(real)
                valid_list = list(valid)
            indices_set.difference_update(query_indices)
            keep = torch.tensor(sorted(table[r] for r in indices_set), dtype=torch.long)
            return Plan(keep=keep)

        return segmentwise(tokens, one)

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        """``select`` for every image of the batch inside the LLM: pivots by key norm on the device, one read
        of the pivots' sequence indices (the official claim order is a Python ``set``'s iteration order, so
        it is taken from a real ``set`` on the host), then the claims as batched top-k rounds."""
        if bt.llm_keys is None or bt.normed is None or bt.layer is None:
            return None  # before the LLM: the per-sample fallbacks
        p_img, p_txt = int(self.options["pivots"]), int(self.options["text_pivots"])
        index, owner, ks = segment_rows(bt)
        b, n = bt.features.shape[:2]
        dev = index.device
        valid = index >= 0
        ns = [c for cs in bt.counts for c in cs if c]
        who = torch.tensor(owner, dtype=torch.long).to(dev, non_blocking=True)
        norm_img = segment_features(bt.llm_keys, index, owner).float().abs().sum(-1).masked_fill(~valid, float("-inf"))
        n_img = [min(p_img, c) for c in ns]
        img = torch.topk(norm_img, max(n_img, default=0), dim=-1).indices if n_img else index[:, :0]
        rows = segment_features(bt.rows, index, owner)
        qv = bt.question_valid
        norm_q = bt.question_keys.float().abs().sum(-1).masked_fill(~qv, float("-inf"))
        n_q = min(p_txt, norm_q.shape[1])
        txt = torch.topk(norm_q, n_q, dim=-1).indices if n_q else qv[:, :0].long()
        flat = torch.cat([torch.gather(rows, 1, img).flatten(), torch.gather(bt.question_rows, 1, txt).flatten(), qv.sum(1)])
        orders, totals = _claim_orders(flat, ns, n_img, img.shape[1], n_q, b, owner, ks, p_img, p_txt)
        vec_rows = segment_features(bt.normed, index, owner).float()
        q_vec = bt.question_normed.float()[who]
        taken = slot_mask(img, index.shape[1])  # image pivots and every claimed token: what stays
        left = [c - k for c, k in zip(ns, n_img)]
        for step in range(max([len(o) for o in orders], default=0)):
            takes, src_kind, src_idx = [], [], []
            for i, o in enumerate(orders):
                per = ks[i] // max(p_img + p_txt, 1)
                t = min(per, left[i]) if step < len(o) and per > 0 else 0
                takes.append(t)
                left[i] -= t
                kind, j = o[step] if step < len(o) else ("img", 0)
                src_kind.append(kind == "txt")
                src_idx.append(j)
            if not any(takes):
                break
            is_txt = torch.tensor(src_kind).to(dev, non_blocking=True).view(-1, 1)
            j = torch.tensor(src_idx).to(dev, non_blocking=True).view(-1, 1)
            v_img = torch.gather(vec_rows, 1, torch.gather(img, 1, j.clamp(max=max(img.shape[1] - 1, 0))).unsqueeze(-1)
                                 .expand(-1, -1, vec_rows.shape[-1])) if img.shape[1] else vec_rows[:, :1]
            v_txt = torch.gather(q_vec, 1, torch.gather(txt[who], 1, j.clamp(max=max(n_q - 1, 0))).unsqueeze(-1)
                                 .expand(-1, -1, q_vec.shape[-1])) if n_q else q_vec[:, :1]
            vec = torch.where(is_txt.unsqueeze(-1), v_txt, v_img)
            cos = -torch.nn.functional.cosine_similarity(vec, vec_rows, dim=-1)
            cos = cos.masked_fill(~valid | taken, float("-inf"))
            kmax = max(takes)
            top = torch.topk(cos, kmax, dim=-1).indices
            ok = torch.arange(kmax, device=dev).view(1, -1) < torch.tensor(takes).to(dev).view(-1, 1)
            taken = taken | slot_mask(torch.where(ok, top, -1), index.shape[1])
        keep = keep_from_rows(mask_positions(taken, max(totals, default=0)), index, owner, totals, b, n)
        return BatchPlan(keep, counts=unflatten_counts(bt.counts, totals))


@torch.compiler.disable
def _claim_orders(flat, ns, n_img, width, n_q, b, owner, ks, p_img, p_txt) -> tuple[list, list]:
    """DART's one read per stage and what the official code derives from it: per image row, its pivots in
    the order the official loop visits them (``("img", j)`` / ``("txt", j)``) and the tokens it then keeps.
    That order is a Python ``set``'s iteration order over sequence indices, so it runs in CPython even under
    ``torch.compile``: dynamo models a ``set`` in insertion order, which kept other tokens (a tiny LLaVA's
    compiled logits differed by 0.5, measured)."""
    host = host_list(flat)
    img_rows = [host[i * width : i * width + n_img[i]] for i in range(len(ns))]
    off = len(ns) * width
    q_len = host[off + b * n_q :]
    txt_rows = [host[off + j * n_q : off + j * n_q + min(p_txt, q_len[j])] for j in range(b)]
    orders, totals = [], []
    for i, c in enumerate(ns):
        kind = {r: ("img", j) for j, r in enumerate(img_rows[i])}
        kind.update({r: ("txt", j) for j, r in enumerate(txt_rows[owner[i]])})
        orders.append([kind[r] for r in list(set(img_rows[i] + txt_rows[owner[i]]))])
        per, left, claimed = ks[i] // max(p_img + p_txt, 1), c - n_img[i], 0
        for _ in orders[-1]:
            if per <= 0 or left <= 0:
                break
            take = min(per, left)
            claimed, left = claimed + take, left - take
        totals.append(n_img[i] + claimed)
    return orders, totals
