"""Apply: carry out a stage's ``BatchPlan`` on the working state of one prefill, as batched tensor algebra.

Rows are dropped and re-padded on the left with gathers whose widths come from host mirrors of the
per-sample counts (never from reading the device); merges are one ``merge_tokens`` over the batch; the
bookkeeping every later step needs (original column of each row, the 2-D mask, each visual slot's row,
original id and segment, and per original visual token its representative and weight, which Qwen3-VL's
deepstack rows and later stages' token sizes follow) is gathers and scatters over fixed-width tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .kernels import gather_tokens, merge_tokens, scatter_tokens
from .policies.batch import BatchPlan, slot_mask
from .traces import StageTrace, Trace


@dataclass
class Run:
    """Working state of one prefill forward through the language model (batched; ``N`` visual slots).

    Device: ``orig / rel / mask2d [B, P]`` (current row -> original column / LM-input row, -1 pad; the 2-D
    mask); ``rows / vid / seg [B, N]`` (visual slot -> current row, original visual id, segment; -1 pad);
    ``pos0 / cols0 [B, V0]`` (original visual token -> index in its segment, LM-input column);
    ``rep / alpha [B, V0]`` (original -> representative's original id, -1 gone; its weight in that mean);
    ``mix [B, N, V0]`` once a ``combine`` plan ran. Host mirrors: ``totals[b]`` visual tokens now,
    ``counts[b][s]`` per segment (None: not known without a read), ``nrows[b]`` real rows, ``origin[b][s]``.
    """

    ctx: Any
    cache: Any
    orig: torch.Tensor
    rel: torch.Tensor
    mask2d: torch.Tensor
    rows: torch.Tensor
    vid: torch.Tensor
    seg: torch.Tensor
    pos0: torch.Tensor
    cols0: torch.Tensor
    rep: torch.Tensor
    alpha: torch.Tensor
    totals: list
    counts: list | None
    nrows: list
    origin: list
    grids: list
    vsig: list = field(default_factory=list)  # per sample: {vision signal: [V0_b, ...] or None}
    mix: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    pos_emb: Any = None
    pos_ids: Any = None
    masks: dict = field(default_factory=dict)
    pruned_in_llm: bool = False
    signals: dict = field(default_factory=dict)
    trace: Trace = field(default_factory=Trace)
    embeds0: torch.Tensor | None = None
    merged: bool = False
    changed: bool = False  # some stage dropped a token (else the post-hook scatter is the identity)
    lm_slot: torch.Tensor | None = None  # [B, N] each slot's index among the LM input's visual slots
    lm_totals: list = field(default_factory=list)  # visual tokens per sample in the LM input

    # per-sample views for the slow path (host-known widths: slicing, no sync)
    @property
    def vis_rows(self) -> list:
        return [self.rows[b, :n] for b, n in enumerate(self.totals)]

    @property
    def vis_ids(self) -> list:
        return [self.vid[b, :n] for b, n in enumerate(self.totals)]

    def seg_counts(self) -> list:
        """``counts`` (host), reading the device once where an earlier stage's count was data (FastV over a
        sample with several images keeps a data-dependent share of each)."""
        if self.counts is None:
            s = max([len(o) for o in self.origin], default=0)
            valid = self.seg >= 0
            one = torch.zeros(self.seg.shape[0], s + 1, dtype=torch.long, device=self.seg.device)
            one.scatter_add_(1, torch.where(valid, self.seg, s), valid.long())
            host = one[:, :s].tolist()
            self.counts = [host[b][: len(o)] for b, o in enumerate(self.origin)]
        return self.counts

    def sequence_index(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [B, K]`` (current rows, -1 pad) -> each row's index in its sample's unpadded sequence."""
        return gather_slots(self.mask2d.long().cumsum(1) - 1, rows)

    def slot_positions(self) -> torch.Tensor:
        """``[B, N]``: each surviving slot's original index inside its segment (0 on padding)."""
        return torch.where(self.vid >= 0, torch.gather(self.pos0, 1, self.vid.clamp(min=0)), 0)

    def slot_of_original(self) -> torch.Tensor:
        """``[B, V0]``: each original visual token's current slot (-1: not a surviving slot)."""
        b, n = self.vid.shape
        v0 = self.rep.shape[1]
        inv = torch.full((b, v0 + 1), -1, dtype=torch.long, device=self.vid.device)
        src = torch.arange(n, device=self.vid.device).expand(b, n)
        inv.scatter_(1, torch.where(self.vid >= 0, self.vid, v0), src)
        return inv[:, :v0]

    def group_slot(self) -> torch.Tensor:
        """``[B, V0]``: the slot each original token's representative occupies now (N: gone)."""
        n = self.vid.shape[1]
        inv = self.slot_of_original()
        live = self.rep >= 0
        j = torch.gather(inv, 1, self.rep.clamp(min=0))
        return torch.where(live & (j >= 0), j, n)

    def sizes(self) -> torch.Tensor:
        """``[B, N]``: how many original tokens each surviving slot stands for."""
        b, n = self.vid.shape
        out = torch.zeros(b, n + 1, device=self.vid.device)
        out.scatter_add_(1, self.group_slot(), torch.ones_like(self.alpha))
        return out[:, :n]

    def mixing(self) -> torch.Tensor:
        """``[B, N, V0]`` mixing matrix (surviving slot <- original tokens) from representatives and weights."""
        if self.mix is not None:
            return self.mix
        b, n = self.vid.shape
        v0 = self.rep.shape[1]
        out = torch.zeros(b, n + 1, v0, device=self.vid.device)
        out.scatter_add_(1, self.group_slot().unsqueeze(1), self.alpha.unsqueeze(1))
        return out[:, :n]

    def merge_originals(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``x [B, V0, ...]`` of the original visual tokens -> ``[B, N, ...]`` one per surviving slot,
        merged with the same groups and weights as the features (Qwen3-VL's deepstack inputs)."""
        b, n = self.vid.shape
        flat = x.flatten(2).float()
        if self.mix is not None:
            out = self.mix.to(x.device) @ flat
        else:
            out = torch.zeros(b, n + 1, flat.shape[-1], device=x.device)
            out.scatter_add_(1, self.group_slot().unsqueeze(-1).expand_as(flat), flat * self.alpha.unsqueeze(-1))
            out = out[:, :n]
        return out.view(b, n, *x.shape[2:]).to(x.dtype)


def gather_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``index [B, K]`` along ``dim`` of a tensor whose batch dim is ``dim - 1`` (pads -> 0)."""
    if dim == 1 and t.dim() == 3:
        return gather_tokens(t, index, check=False)  # engine-built indices: valid, no sync
    if t.shape[dim - 1] == 1 and index.shape[0] > 1:  # positions shared across the batch
        t = t.expand(*t.shape[: dim - 1], index.shape[0], *t.shape[dim:])
    view = [1] * t.dim()
    view[dim - 1], view[dim] = index.shape[0], index.shape[1]
    expand = list(t.shape)
    expand[dim] = index.shape[1]
    out = torch.gather(t, dim, index.clamp(min=0).view(view).expand(expand))
    return out.masked_fill((index < 0).view(view).expand(expand), 0)


def gather_slots(t: torch.Tensor, index: torch.Tensor, fill: int = -1) -> torch.Tensor:
    """``t [B, N]`` at ``index [B, K]`` (-1 -> ``fill``)."""
    return torch.where(index >= 0, torch.gather(t, 1, index.clamp(min=0)), fill)


def valid_index(counts: list[int], width: int, device) -> torch.Tensor:
    """Flat positions of the first ``counts[b]`` entries of each row of a ``[B, width]`` layout (host-built)."""
    idx = torch.cat([torch.arange(c) + b * width for b, c in enumerate(counts)]) if counts else torch.zeros(0, dtype=torch.long)
    return idx.to(device, non_blocking=True)


def flat_valid(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The first ``counts[b]`` rows of each sample of ``x [B, K, ...]``, concatenated."""
    return x.flatten(0, 1)[valid_index(counts, x.shape[1], x.device)]


def left_pad_index(alive: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``[B, P_new]``: the alive rows of each sample in order, left-padded with -1; ``counts[b]`` is how many
    rows sample b keeps (host), so the width needs no read of ``alive``."""
    b, p = alive.shape
    width = max(counts, default=0)
    n_alive = torch.tensor(counts, device=alive.device).view(b, 1)
    dest = width - n_alive + alive.long().cumsum(1) - 1
    dest = torch.where(alive, dest, width)
    out = torch.full((b, width + 1), -1, dtype=torch.long, device=alive.device)
    out.scatter_(1, dest, torch.arange(p, device=alive.device).expand(b, p))
    return out[:, :width]


def merged_features(features: torch.Tensor, plan: BatchPlan, k: int) -> torch.Tensor:
    """``[B, K, D]``: each kept slot's merged feature (group mean, weighted sum, or ``combine``)."""
    if plan.combine is not None:
        return (plan.combine.to(features.device).float() @ features.float()).to(features.dtype)
    assign = plan.assign.to(features.device).long()
    w = None if plan.weight is None else plan.weight.to(features.device)
    out, total = merge_tokens(features, assign, k, w, check=False)  # engine-checked plans: no sync
    if plan.reduce == "sum":
        return (out.float() * total.unsqueeze(-1)).to(out.dtype)
    return out


def merge_one(features: torch.Tensor, plan, k: int) -> torch.Tensor:
    """One sample's merged kept features ``[k, D]`` for a per-sample ``Plan`` (the tower merge's path)."""
    one = BatchPlan(plan.keep[None], plan.assign[None], None if plan.weight is None else plan.weight[None],
                    reduce=plan.reduce, combine=None if plan.combine is None else plan.combine[None])
    return merged_features(features[None], one, k)[0]


def track_groups(run: Run, plan: BatchPlan) -> None:
    """Update each original visual token's representative and weight (and the mixing matrix after a
    ``combine`` plan) for the plan's keep / assign."""
    keep = plan.keep
    b, n = run.vid.shape
    k = keep.shape[1]
    dev = keep.device
    if plan.assign is not None:  # each token's group column and its weight in it (0: dropped)
        a = plan.assign.long()
        w = torch.ones(b, n, device=dev) if plan.weight is None else plan.weight.float()
        w = torch.where(a >= 0, w, 0.0)
    if plan.combine is not None or run.mix is not None:
        mix = run.mixing()
        if plan.combine is not None:
            step = plan.combine.float()
        elif plan.assign is not None:
            step = torch.zeros(b, k + 1, n, device=dev)
            step.scatter_(1, torch.where(a >= 0, a, k).unsqueeze(1), w.unsqueeze(1))
            step = step[:, :k]
            if plan.reduce == "mean":
                step = step / step.sum(2, keepdim=True).clamp(min=1e-30)
        else:
            step = torch.zeros(b, k, n + 1, device=dev)
            step.scatter_(2, torch.where(keep >= 0, keep, n).unsqueeze(-1), 1.0)
            step = step[:, :, :n]
        run.mix = step @ mix
    if plan.assign is not None:
        total = torch.zeros(b, k + 1, device=dev).scatter_add_(1, torch.where(a >= 0, a, k), w)[:, :k]
        if plan.reduce == "sum":
            total = torch.ones_like(total)
        new_slot = torch.where(a >= 0, gather_slots(keep, a.clamp(min=0)), -1)
        factor = torch.where(a >= 0, w / torch.gather(total, 1, a.clamp(min=0)).clamp(min=1e-30), 0.0)
    else:
        new_slot = torch.where(slot_mask(keep, n), torch.arange(n, device=dev), -1)
        factor = torch.ones(b, n, device=dev)
    new_rep = gather_slots(run.vid, new_slot)
    j = torch.gather(run.slot_of_original(), 1, run.rep.clamp(min=0))
    live = (run.rep >= 0) & (j >= 0)
    jj = j.clamp(min=0)
    run.rep = torch.where(live, torch.gather(new_rep, 1, jj), -1)
    run.alpha = torch.where(live, run.alpha * torch.gather(factor, 1, jj), run.alpha)


def apply_plan(run: Run, plan: BatchPlan, feats: torch.Tensor, totals: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge where planned, drop the other visual rows, re-pad; returns (features of the survivors ``[B, P',
    D]``, the index ``[B, P']`` into the old rows). ``totals[b]``: tokens sample b keeps (host)."""
    keep = plan.keep
    b, p = run.orig.shape
    dev = feats.device
    k = keep.shape[1]
    rows_k = gather_slots(run.rows, keep)
    if plan.assign is not None and not plan.premerged:
        vis = gather_rows(feats, run.rows, 1)
        feats = scatter_tokens(feats.clone(), rows_k, merged_features(vis, plan, k), check=False)
    track_groups(run, plan)
    drop = slot_mask(run.rows, p) & ~slot_mask(rows_k, p)  # visual rows the plan does not keep
    alive = (run.orig >= 0) & ~drop
    nrows = [r - (t0 - t1) for r, t0, t1 in zip(run.nrows, run.totals, totals)]
    index = left_pad_index(alive, nrows)
    inv = torch.full((b, p + 1), -1, dtype=torch.long, device=dev)
    inv.scatter_(1, torch.where(index >= 0, index, p), torch.arange(index.shape[1], device=dev).expand_as(index))
    run.rows = torch.where(rows_k >= 0, torch.gather(inv, 1, torch.where(rows_k >= 0, rows_k, p)), -1)
    run.vid = gather_slots(run.vid, keep)
    run.seg = gather_slots(run.seg, keep)
    if run.lm_slot is not None:
        run.lm_slot = gather_slots(run.lm_slot, keep)
    run.orig = gather_rows(run.orig.unsqueeze(-1) + 1, index, 1).squeeze(-1) - 1
    run.rel = gather_rows(run.rel.unsqueeze(-1) + 1, index, 1).squeeze(-1) - 1
    run.mask2d = gather_rows(run.mask2d.unsqueeze(-1), index, 1).squeeze(-1)
    run.nrows = nrows
    run.changed = run.changed or any(t1 < t0 for t0, t1 in zip(run.totals, totals))
    run.totals = list(totals)
    run.counts = plan.counts
    if run.counts is None and all(len(o) <= 1 for o in run.origin):  # one segment per sample: its total
        run.counts = [[t] if o else [] for t, o in zip(totals, run.origin)]
    return gather_rows(feats, index, 1), index


def stage_trace(policy: str, layer, plan: BatchPlan, before: list[int], after: list[int], seconds: float) -> StageTrace:
    """The stage's trace, converted to per-sample host lists only when read (``StageTrace`` is lazy)."""
    return StageTrace.lazy(policy, layer, list(before), list(after), plan.assign is not None, seconds, plan.keep,
                           plan.scores, plan.assign)
