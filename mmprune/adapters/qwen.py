"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, 2x2 patch merger, M-RoPE, images and video.

Per-item token counts come from ``grid_thw.prod() // merge**2``; M-RoPE position ids ``(3|4, B, L)`` are
gathered row-wise by the engine, so pruned tokens keep their original (t, h, w) positions. Qwen3-VL adds
deepstack features to the visual rows of the first decoder layers: they are pruned with the same indices
(pre-LLM) and re-indexed inside the LLM when a stage acts at or before the last deepstack layer.
"""

from __future__ import annotations

import functools

import torch

from .base import Adapter


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    modalities = ("image", "video")

    def grid_of(self, modality, n, i, args, kwargs):
        grid = kwargs.get(f"{modality}_grid_thw")
        if grid is None and len(args) > 1:
            grid = args[1]
        if grid is None:
            return None
        m = self.config.vision_config.spatial_merge_size
        t, h, w = (int(v) for v in grid[i])
        return (t, h // m, w // m) if t * (h // m) * (w // m) == n else None


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def prune_lm_kwargs(self, kwargs, run) -> None:
        vpm, ds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if vpm is None:
            return
        # flat order of deepstack rows = visual positions, row-major over (sample, position)
        offsets = torch.cumsum(torch.tensor([0] + [int(v) for v in vpm.sum(-1).tolist()[:-1]]), 0)
        flat = torch.cat([off + ids.cpu() for off, ids in zip(offsets.tolist(), run.vis_ids)]).to(vpm.device)
        kwargs["visual_pos_masks"] = _gather_mask(vpm, run.orig)
        if ds is not None:
            kwargs["deepstack_visual_embeds"] = [d[flat] for d in ds]

    def install_extras(self, engine) -> None:
        lm = self.language_model()
        original = lm._deepstack_process

        @functools.wraps(original)
        def deepstack(hidden_states, visual_pos_masks, visual_embeds):
            run = engine.run
            if run is not None and run.pruned_in_llm and hidden_states.shape[1] != visual_pos_masks.shape[1]:
                # a stage at or before this deepstack layer dropped rows: follow them
                keep_flat = torch.cat(
                    [
                        off + torch.searchsorted(vis, ids)
                        for off, vis, ids in _visual_index(visual_pos_masks, run)
                    ]
                )
                visual_pos_masks = _gather_mask(visual_pos_masks, run.rel)
                visual_embeds = visual_embeds[keep_flat]
            return original(hidden_states, visual_pos_masks, visual_embeds)

        engine._patch(lm, "_deepstack_process", deepstack)


def _gather_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.gather(mask, 1, index.clamp(min=0))
    return out & (index >= 0)


def _visual_index(vpm: torch.Tensor, run):
    """Per sample: (flat offset, LM-input rows that are visual, LM-input rows of the surviving visual rows)."""
    off = 0
    for b in range(vpm.shape[0]):
        vis = vpm[b].nonzero().flatten()
        kept = run.rel[b][run.vis_rows[b]]
        yield off, vis, kept
        off += len(vis)
