"""Locate: where each sample's visual tokens sit, and how they split into images / videos (segments).

The result is a ``Layout``: host lists (per sample: segments with token counts, grids and vision-tower
signals) and device tensors over a fixed-width slot layout ``[B, V]`` (``V`` = the most visual tokens in a
sample): the LM-input column of each visual token, its segment and its index inside the segment.

No device-to-host synchronisation at batch 1 with one modality: every visual token belongs to the
encoder's items in order (transformers checks that placeholder and feature counts match), so the counts are
host data and the columns come from ``torch.nonzero_static`` with that known size. Otherwise (batch > 1,
images and videos in one call, or items unknown) the split of items over samples is data: it is read from
a host copy of ``input_ids`` that the top-level hook starts before the vision tower is queued
(``prefetch_ids``), so the one copy overlaps the encoder instead of stalling the language model's launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .syncs import host_side


@dataclass
class Layout:
    """``segs[b]``: list of ``(start, count, grid, signals)`` in visual order; ``n[b]`` visual tokens of sample b;
    ``cols [B, V]`` their LM-input columns, ``seg [B, V]`` segment, ``pos [B, V]`` index in the segment
    (-1 / 0 padding past ``n[b]``); ``host_read``: whether the layout needed the host copy of ``input_ids``."""

    segs: list
    n: list[int]
    cols: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor
    host_read: bool = False


class HostCopy:
    """A host copy of a small device tensor (``input_ids``, Qwen's ``*_grid_thw``) started asynchronously (pinned memory, ``non_blocking``), waited for only
    when read. On a CPU it is the tensor itself."""

    def __init__(self, ids: torch.Tensor):
        self.event, self.list = None, None
        if ids.device.type == "cuda":
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = ids

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host

    def values(self) -> list:
        """``get().tolist()``, read once and kept. Under ``torch.compile`` the engine reads it in the top-level
        hook (``_host_values`` runs eagerly), so hooks deep inside the towers see constants instead of
        breaking their graphs (Qwen2-VL's tower tap: 5 extra graphs on a tiny model before, measured)."""
        if self.list is None:
            self.list = _host_values(self)
        return self.list


@torch.compiler.disable
def _host_values(copy: HostCopy) -> list:
    with host_side():  # the host copy is counted where it was made
        return copy.get().tolist()


def prefetch_ids(ids: torch.Tensor | None, items_hint: int) -> HostCopy | None:
    """Start the host copy of ``input_ids`` where the layout will need it (batch > 1 or several modalities)."""
    if ids is None or (ids.shape[0] == 1 and items_hint <= 1):
        return None
    return HostCopy(ids)


def _queues(ctx) -> dict:
    out = {}
    for m, v in ctx.items.items():
        sig = ctx.signals.get(m)
        if sig is None or len(sig) != len(v):
            sig = [None] * len(v)
        out[m] = [(cnt, grid, sg) for (cnt, grid), sg in zip(v, sig)]
    return out


@torch.compiler.disable
def host_rows(host: HostCopy, adapter) -> tuple[list, list]:
    """Per sample, the visual tokens' columns and modalities, read from the host copy of ``input_ids``.

    Run eagerly under ``torch.compile`` (the values are data). The engine calls it in the top-level hook when
    compiling, so a compiled forward breaks its graph once, at the outermost frame, instead of inside the
    language model's nested frames (measured on a tiny LLaVA at batch 3: 11 graphs from a read inside the LM
    hook, 8 from here; the unwrapped model has 7)."""
    ids = host.get()
    with host_side():
        vis, tm = adapter.visual_mask(ids), adapter.token_modalities()
        pos = [vis[b].nonzero().flatten().tolist() for b in range(ids.shape[0])]
        return pos, [[tm.get(t) for t in ids[b, p].tolist()] for b, p in enumerate(pos)]


def host_segments(rows: tuple[list, list], queues: dict) -> list:
    """Per sample: ``(start, n_tokens, grid, signals)`` over its visual tokens (``rows``: ``host_rows``).

    Items (images / videos, with counts from the encoder output) are matched to the placeholder tokens of
    their modality in order; an item may span several runs (Qwen3-VL separates a video's frames by
    timestamp text). Tokens no item accounts for become one segment per contiguous run.
    """
    out = []
    for pos, mods in zip(*rows):
        segs, j = [], 0
        while j < len(pos):
            q = queues.get(mods[j])
            same = [k for k in range(j, len(pos)) if mods[k] == mods[j]]
            if q and q[0][0] <= len(same):
                cnt, grid, sg = q[0]
                if same[cnt - 1] - j + 1 == cnt:  # contiguous in visual order
                    q.pop(0)
                    segs.append((j, cnt, grid, sg))
                    j += cnt
                    continue
            k = j + 1  # unknown split: this contiguous run is one segment
            while k < len(pos) and pos[k] == pos[k - 1] + 1 and mods[k] == mods[j]:
                k += 1
            segs.append((j, k - j, None, None))
            j = k
        out.append(segs)
    return out


def _slot_tensors(segs: list, n: list[int], dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-built ``seg [B, V]`` and ``pos [B, V]``, moved to ``dev`` (a host-to-device copy, no sync)."""
    v = max(n, default=0)
    seg = torch.full((len(n), v), -1, dtype=torch.long)
    pos = torch.zeros(len(n), v, dtype=torch.long)
    for b, sample in enumerate(segs):
        for i, (start, cnt, _, _) in enumerate(sample):
            seg[b, start : start + cnt] = i
            pos[b, start : start + cnt] = torch.arange(cnt)
    return seg.to(dev, non_blocking=True), pos.to(dev, non_blocking=True)


def locate(ctx, adapter, dev) -> Layout:
    """The visual layout of one prefill (see the module docstring for when it reads the host copy)."""
    visual = ctx.visual
    b = visual.shape[0]
    queues = _queues(ctx)
    if b == 1 and len(queues) == 1 and ctx.host_ids is None:
        (items,) = queues.values()
        segs, start = [], 0
        for cnt, grid, sg in items:
            segs.append((start, cnt, grid, sg))
            start += cnt
        if start:
            cols = torch.nonzero_static(visual[0], size=start, fill_value=-1).view(1, start)
            with host_side():
                seg, pos = _slot_tensors([segs], [start], dev)
            return Layout([segs], [start], cols, seg, pos)
    if torch.compiler.is_exporting():  # an exported program cannot depend on a host read of input_ids
        raise ValueError(f"torch.export of a wrapped model takes one sample with one image or video (got batch {b}, "
                         f"{sum(len(q) for q in queues.values())} items): the layout of several is read from "
                         "input_ids on the host; export the single-sample forward, or use torch.compile")
    rows = ctx.host_rows or host_rows(ctx.host_ids or HostCopy(ctx.input_ids), adapter)
    with host_side():
        segs = host_segments(rows, queues)
        n = [len(p) for p in rows[0]]
        cols = torch.full((b, max(n, default=0)), -1, dtype=torch.long)
        for i, p in enumerate(rows[0]):
            cols[i, : n[i]] = torch.tensor(p, dtype=torch.long)
        seg, pos = _slot_tensors(segs, n, dev)
    return Layout(segs, n, cols.to(dev, non_blocking=True), seg, pos, host_read=True)
