"""Select: run a stage's policy over the batch and get one ``BatchPlan``.

Three routes, fastest first (``mmprune.policies.batch``): a policy's own ``select_batch`` on padded device
tensors; a data-free policy's plan, computed once per layout on the host and cached; or the per-sample
``select(Tokens)`` (custom policies, and the cases a batched policy hands back: ToMe continuing the CLIP
tower's groups, DART before the LLM, a signal a family cannot give), whose ``Tokens`` views this module
builds.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from .apply import Run, apply_plan, gather_rows, gather_slots, stage_trace
from .policies.base import Plan, Tokens, resolve_budget
from .policies.batch import BatchPlan, BatchTokens, mask_positions, meta_tokens, slot_mask
from .syncs import clock, compiling, host_side, real_tensors

if TYPE_CHECKING:
    from .engine import Stage


def _question_batch(run: Run) -> torch.Tensor:
    """``[B, Q]`` current rows of each sample's question (the valid text rows after its last visual row, else
    all its text rows), -1 padded; ``Q`` from the host counts (text rows at most), so no read."""
    b, p = run.mask2d.shape
    dev = run.mask2d.device
    vis = slot_mask(run.rows, p)
    text = run.mask2d.bool() & ~vis
    ar = torch.arange(p, device=dev)
    last = torch.where(vis, ar, -1).amax(1, keepdim=True) if p else torch.full((b, 1), -1, device=dev)
    after = text & (ar > last)
    q = torch.where(after.any(1, keepdim=True), after, text)
    return mask_positions(q, max([r - t for r, t in zip(run.nrows, run.totals)], default=0))


def _budgets(budget, counts) -> list:
    """Per sample, per segment: a stage's budget resolved on the segment's current count (0 for 0)."""
    return [[resolve_budget(budget, c) for c in cs] for cs in counts]


def _plan_counts(plans: list, counts: list, segs: list | None = None) -> list:
    """Host mirror of how many tokens each segment keeps after per-sample plans (host tensors)."""
    out = []
    for b, (plan, cs) in enumerate(zip(plans, counts)):
        if plan is None:
            out.append([0] * len(cs))
            continue
        keep = plan.keep.long().cpu()
        if segs is None:  # data-free: contiguous segments in order
            bounds = torch.tensor(list(itertools.accumulate(cs)))
            seg = torch.bucketize(keep, bounds, right=True)
        else:
            seg = segs[b][keep]
        out.append(torch.bincount(seg, minlength=len(cs)).tolist() if len(cs) else [])
    return out


@torch._dynamo.assume_constant_result
def _layout_plan(policy, budget, layer, counts: tuple, grids: tuple, origin: tuple, dev: str):
    """A data-free policy's ``(BatchPlan on dev, totals)`` for one layout, from its per-sample ``select`` on
    host metadata; cached on the policy. Under ``torch.compile`` this runs at trace time and its result is a
    constant of the graph (``assume_constant_result``): the host work it does (``.cpu()``, bincount) would
    otherwise break the graph (issue 20); the layout it depends on is guarded through its arguments."""
    key = (budget, dev, counts, grids)
    cache = policy.__dict__.setdefault("_plan_cache", {})
    hit = cache.get(key)
    if hit is None:
        with host_side(), real_tensors():
            plans, ns = [], []
            for cs, bs, gs, og in zip(counts, _budgets(budget, counts), grids, origin):
                n = sum(cs)
                ns.append(n)
                if not n:
                    plans.append(None)
                    continue
                plan = policy.select(meta_tokens(list(cs), bs, list(gs), layer, list(og)))
                SelectMixin._check_plan(policy, plan, n)
                plans.append(plan)
            batch = BatchPlan.stack(plans, ns)
            batch.counts = _plan_counts(plans, counts)
            hit = (batch.to(torch.device(dev)), batch.totals)
        if len(cache) > 64:
            cache.clear()
        cache[key] = hit
    return hit


class SelectMixin:
    """The engine's stage methods: select, then ``apply.apply_plan`` (mixed into ``Engine``)."""

    def _apply_stage(self, stage: Stage, run: Run, feats: torch.Tensor, scores=None):
        """Select (batched, data-free or per sample), merge if planned, drop rows; returns (feats of the
        survivors, index into the old rows)."""
        policy = stage.policy
        before = list(run.totals)
        t0 = clock()
        plan = None
        if getattr(policy, "batched", False):
            plan = policy.select_batch(self._batch_tokens(stage, run, feats, scores or {}))
        if plan is not None:
            totals = plan.totals if plan.totals is not None else [len(k) for k in self._host_keep(plan)]
        elif getattr(policy, "data_free", False) and not run.changed and not run.merged:
            plan, totals = self._data_free_plan(stage, run, feats.device)
        else:
            plan, totals = self._per_sample_plan(stage, run, feats, scores or {})
        seconds = clock() - t0
        run.merged = run.merged or plan.assign is not None
        out, index = apply_plan(run, plan, feats, totals)
        run.trace.stages.append(stage_trace(policy.name, stage.layer, plan, before, totals, seconds))
        return out, index

    @staticmethod
    def _host_keep(plan: BatchPlan) -> list:
        """Adaptive counts: read the plan's keep once (the documented sync of adaptive policies)."""
        keep = plan.keep.cpu()
        return [k[k >= 0] for k in keep]

    def _batch_tokens(self, stage: Stage, run: Run, feats, scores: dict) -> BatchTokens:
        """The batch's visual tokens as padded tensors (native ``select_batch`` policies)."""
        counts = run.seg_counts()
        budgets = _budgets(stage.config.budget, counts)
        signals = {}
        for name in ("attn", "pagerank"):  # LLM signals over the current rows -> the visual slots
            if scores.get(name) is not None:
                signals[name] = torch.where(run.rows >= 0, torch.gather(scores[name], 1, run.rows.clamp(min=0)), 0.0)
        for name in self.vision_signals:
            if name in stage.policy.signals:
                signals[name] = self._batched_signal(run, name)
        if "text_attn" in stage.policy.signals and scores.get("text_attn") is not None:
            ta = scores["text_attn"]  # [B, Q, P] over the current rows -> [B, Q, N] over the visual slots
            idx = run.rows.clamp(min=0).unsqueeze(1).expand(-1, ta.shape[1], -1)
            signals["text_attn"] = torch.gather(ta, 2, idx).masked_fill((run.rows < 0).unsqueeze(1), 0.0)
            signals["text_attn_valid"] = scores["text_rows"] >= 0
        sigs = set(stage.policy.signals)
        if {"question", "text", "llm_keys", "final_norm", "input_embeds"} & sigs:
            q_rows = _question_batch(run)
            signals["question"], signals["question_valid"] = gather_rows(feats, q_rows, 1), q_rows >= 0
            signals["rows"], signals["question_rows"] = run.sequence_index(run.rows), run.sequence_index(q_rows)
            if "input_embeds" in sigs and run.embeds0 is not None:  # SparseVLM's raters: the LM-input embeddings
                signals["visual_embeds"], signals["visual_valid"] = gather_rows(run.embeds0, run.cols0, 1), run.cols0 >= 0
                signals["question_embeds"] = gather_rows(run.embeds0, gather_slots(run.orig, q_rows), 1)
            if "llm_keys" in sigs and scores.get("llm_keys") is not None:  # DART's: the cache's keys at K-1
                signals["llm_keys"] = gather_rows(scores["llm_keys"], run.rows, 1)
                signals["question_keys"] = gather_rows(scores["llm_keys"], q_rows, 1)
            if "final_norm" in sigs and stage.layer is not None:  # DART's cosine space: the LM's final norm
                norm = self.adapter.final_norm()
                signals["normed"] = norm(gather_rows(feats, run.rows, 1))
                signals["question_normed"] = norm(signals["question"])
        valid = run.vid >= 0
        return BatchTokens(
            features=gather_rows(feats, run.rows, 1), valid=valid, segment=run.seg,
            pos=run.slot_positions(), sizes=run.sizes(),
            counts=counts, budgets=budgets, origin=run.origin, grids=run.grids, layer=stage.layer, signals=signals,
        )

    @staticmethod
    def _batched_signal(run: Run, name: str):
        """A vision signal for the surviving slots, ``[B, N, ...]`` (zero padded); None unless every sample
        with visual tokens has it (then the policy's fallback applies, as per sample)."""
        parts = [sig.get(name) for sig in run.vsig]
        if any(p is None and n for p, n in zip(parts, run.totals)) or all(p is None for p in parts):
            return None
        ref = next(p for p in parts if p is not None)
        v0 = run.rep.shape[1]
        out = ref.new_zeros(len(parts), v0, *ref.shape[1:])
        for b, p in enumerate(parts):  # per-sample tensors of host-known lengths: copies, no read
            if p is not None:
                out[b, : p.shape[0]] = p
        idx = run.vid.clamp(min=0)
        return torch.gather(out, 1, idx.view(*idx.shape, *([1] * (out.dim() - 2))).expand(*idx.shape, *out.shape[2:]))

    def _data_free_plan(self, stage: Stage, run: Run, dev):
        """Plans that depend only on the layout (counts, budgets, grids): computed once on the host by the
        policy's own ``select``, cached per layout and device, reused without touching the device."""
        counts = tuple(tuple(c) for c in run.seg_counts())
        grids = tuple(tuple(g) for g in run.grids)
        return _layout_plan(stage.policy, stage.config.budget, stage.layer, counts, grids,
                            tuple(tuple(o) for o in run.origin), str(dev))

    def _per_sample_plan(self, stage: Stage, run: Run, feats, scores: dict):
        """The slow path: each sample's ``Tokens``, the policy's per-sample ``select`` (custom policies and
        those without a batched port; syncs)."""
        sigs = set(stage.policy.signals)
        counts = run.seg_counts()
        budgets = _budgets(stage.config.budget, counts)
        # the engine's own host views of every sample in one read (sequence index, segment, position, size)
        host = torch.stack([run.sequence_index(run.rows).double(), run.seg.double(), run.slot_positions().double(),
                            run.sizes().double()]).cpu()
        q_all = _question_batch(run) if sigs & {"question", "llm_keys", "final_norm", "input_embeds"} else None
        q_seq = None if q_all is None else run.sequence_index(q_all)
        plans, ns = [], []
        for i in range(len(run.totals)):
            n = run.totals[i]
            ns.append(n)
            if not n:
                plans.append(None)
                continue
            q = None if q_all is None else (q_all[i][q_all[i] >= 0], q_seq[i][q_all[i] >= 0])
            tok = self._tokens(stage, run, i, feats, counts[i], budgets[i], scores, sigs, host[:, i, :n], q)
            plan: Plan = stage.policy.select(tok)
            self._check_plan(stage.policy, plan, n)
            plans.append(plan)
        batch = BatchPlan.stack(plans, ns)
        batch.counts = _plan_counts(plans, counts, [host[1, i, :n].long() for i, n in enumerate(ns)])
        return batch.to(feats.device), batch.totals

    def _tokens(self, stage, run: Run, i: int, feats, counts, budgets, scores: dict, sigs: set, host,
                question_rows) -> Tokens:
        """The ``Tokens`` view of sample i's visual rows, with the signals the stage's policy declared;
        ``host [4, n]``: its sequence indices, segments, positions and sizes, already on the host;
        ``question_rows``: (current rows, sequence indices) of its question, where a signal needs them."""
        n = run.totals[i]
        rows, ids = run.rows[i, :n], run.vid[i, :n]
        text = question = None
        extra = {"rows": host[0].long()}
        q_rows = None if question_rows is None else question_rows[0]
        if "text" in sigs or "question" in sigs:
            t = run.mask2d[i].bool().clone()
            t[rows] = False
            text = feats[i][t]
            if "question" in sigs:
                question = feats[i][q_rows]
        if q_rows is not None:
            extra["question_rows"] = question_rows[1].cpu()
        if "input_embeds" in sigs and run.embeds0 is not None:  # SparseVLM's raters: the LM-input embeddings
            extra["visual_embeds"] = run.embeds0[i, run.cols0[i, : sum(run.origin[i])]]
            extra["question_embeds"] = run.embeds0[i, run.orig[i, q_rows]]
        if "final_norm" in sigs and stage.layer is not None:  # DART's cosine space: the LM's final norm
            norm = self.adapter.final_norm()
            extra["normed"], extra["question_normed"] = norm(feats[i, rows]), norm(feats[i, q_rows])
        for name in self.vision_signals:
            if name in sigs and run.vsig[i].get(name) is not None:
                extra[name] = run.vsig[i][name][ids.to(run.vsig[i][name].device)]
        attn = scores.get("attn")
        if "text_attn" in sigs and scores.get("text_attn") is not None:
            q_rows = scores["text_rows"][i]
            ta = scores["text_attn"][i][q_rows >= 0]  # [Q, P]
            extra["text_attn"] = ta[:, rows]
        if "pagerank" in sigs and scores.get("pagerank") is not None:
            extra["pagerank"] = scores["pagerank"][i, rows]
        if "llm_keys" in sigs and scores.get("llm_keys") is not None:
            extra["llm_keys"] = scores["llm_keys"][i, rows]
            extra["question_keys"] = scores["llm_keys"][i, q_rows]
        return Tokens(
            features=feats[i, rows],
            segments=list(counts),
            budgets=list(budgets),
            grids=list(run.grids[i]),
            attn=None if attn is None else attn[i, rows],
            text=text if "text" in sigs else None,
            question=question,
            layer=stage.layer,
            pos=host[2].long(),
            sizes=host[3].float(),
            origin=list(run.origin[i]),
            **extra,
        )

    @staticmethod
    def _check_plan(policy, plan: Plan, n: int) -> None:
        if compiling():  # the checks read values; a traced plan was checked on its eager calls (or is built in)
            return
        keep = plan.keep.long().cpu()
        bad = len(keep) and (keep.min() < 0 or keep.max() >= n or not bool((keep[1:] > keep[:-1]).all()))
        bad = bad or plan.reduce not in ("mean", "sum")
        bad = bad or (plan.combine is not None and (plan.assign is None or tuple(plan.combine.shape) != (len(keep), n)))
        if plan.assign is not None and not bad:
            a = plan.assign.long().cpu()
            bad = a.shape != (n,) or a.max() >= len(keep) or not torch.equal(a[keep], torch.arange(len(keep)))
        if bad:
            raise ValueError(f"policy {policy.name!r} returned an invalid plan: keep must be sorted unique "
                             "indices < n, assign [n] must map kept tokens to their own position, reduce "
                             "must be 'mean' or 'sum', and combine (with assign) must be [len(keep), n]")
