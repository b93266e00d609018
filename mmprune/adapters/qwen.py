"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, 2x2 patch merger, M-RoPE, images and video.

Per-item token counts come from ``grid_thw.prod() // merge**2``; M-RoPE position ids ``(3|4, B, L)`` are
gathered row-wise by the engine, so pruned tokens keep their original (t, h, w) positions. Qwen3-VL adds
deepstack features to the visual rows of the first decoder layers: they are pruned with the same indices
(pre-LLM; merged with the same groups and weights when a policy merges) and re-indexed inside the LLM when
a stage acts at or before the last deepstack layer (there a merged token keeps its representative's
deepstack rows).

Vision-tower signals: Qwen towers have no [CLS] token. A pre-hook on the last vision block's attention
recomputes q/k from its fused ``qkv`` (+ the tower's 2-D rotary, through the model module's own
``apply_rotary_pos_emb_vision``) and gives ``cls_attn`` = the mean attention each patch receives within its
attention chunk (``cu_seqlens``: one image, or one temporal patch of a video), head-averaged, and ``keys``
= pre-rotary keys averaged over heads; both are then averaged over each 2x2 merge group (the tower orders
patches group by group, so a group is 4 consecutive rows), and Qwen2.5-VL's window permutation is undone
with the model's own ``get_vision_window_index``. ``cls_sim`` is not provided (policies fall back).
"""

from __future__ import annotations

import functools
import itertools
import sys

import torch

from ..apply import flat_valid, gather_rows, valid_index
from ..syncs import host_side
from .base import Adapter, VisionCapture


class QwenTowerCapture(VisionCapture):
    def _install(self) -> None:
        attn = self.adapter.inner().visual.blocks[-1].attn
        self.handles.append(attn.register_forward_pre_hook(self._guard(self._tap), with_kwargs=True))

    def _tap(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [S, D], after norm1
        cu = self._host_cu(kwargs["cu_seqlens"])
        cos, sin = kwargs["position_embeddings"]
        s = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        qr, kr = rope(q, k, cos, sin)
        qr, kr = qr.transpose(0, 1).float(), kr.transpose(0, 1).float()  # [H, S, hd]
        recv = torch.zeros(s, device=hidden.device)
        for a, b in zip(cu[:-1], cu[1:]):
            for h in range(qr.shape[0]):  # one head at a time: memory O(chunk^2)
                p = torch.softmax(qr[h, a:b] @ kr[h, a:b].T * module.scaling, dim=-1)
                recv[a:b] += p.mean(0)
        recv /= qr.shape[0]
        self.rows.append(torch.cat([recv[:, None], k.float().mean(1)], dim=-1))  # [S, 1 + hd]

    def _host_cu(self, cu: torch.Tensor) -> list[int]:
        """The block's ``cu_seqlens`` on the host: from the grid the engine copied before the tower ran (one
        sequence per frame, full attention), else a read."""
        visual = self.adapter.inner().visual
        full = not hasattr(visual, "window_size") or (len(visual.blocks) - 1) in getattr(visual, "fullatt_block_indexes", ())
        pre = self.adapter.host_copies.get(f"{self.modality}_grid_thw")
        if full and pre is not None:
            frames = [int(h) * int(w) for t, h, w in pre[1].values() for _ in range(int(t))]
            out = [0, *itertools.accumulate(frames)]
            if len(out) == cu.shape[0]:
                return out
        return cu.tolist()

    def _items(self, output, args, kwargs):
        if len(self.rows) != 1:
            raise ValueError(f"expected one tower call, saw {len(self.rows)}")
        grid = kwargs.get(f"{self.modality}_grid_thw")
        if grid is None and len(args) > 1:
            grid = args[1]
        visual = self.adapter.inner().visual
        m2 = visual.spatial_merge_size**2
        sig = self.rows[0]
        sig = sig.view(sig.shape[0] // m2, m2, -1).mean(1)
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: blocks run in window order
            host = self.adapter.host_of(f"{self.modality}_grid_thw", grid)  # the engine's prefetched copy
            from transformers.vision_utils import get_vision_window_index

            with host_side():  # the window layout from the host grid: no device read
                window_index, _ = get_vision_window_index(
                    host, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                    patch_size=visual.patch_size,
                )
            sig = sig[torch.argsort(window_index).to(sig.device, non_blocking=True)]
        sizes = [t * h * w // m2 for t, h, w in self.adapter.host_values(f"{self.modality}_grid_thw", grid)]
        feats = output.pooler_output
        if [int(f.shape[0]) for f in feats] != sizes:
            raise ValueError("signal layout does not match the encoder's tokens")
        return [{"cls_attn": p[:, 0], "keys": p[:, 1:]} for p in torch.split(sig, sizes)]


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    modalities = ("image", "video")
    text_positions = False  # M-RoPE: the model derives decode positions from its rope_deltas

    def grid_of(self, modality, n, i, args, kwargs):
        grid = kwargs.get(f"{modality}_grid_thw")
        if grid is None and len(args) > 1:
            grid = args[1]
        if grid is None:
            return None
        m = self.config.vision_config.spatial_merge_size
        t, h, w = self.host_values(f"{modality}_grid_thw", grid)[i]  # a read only if the engine did not prefetch it
        return (t, h // m, w // m) if t * (h // m) * (w // m) == n else None


    def vision_capture(self, modality, names):
        return QwenTowerCapture(self, modality, names)


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
        kwargs["visual_pos_masks"] = _gather_mask(vpm, run.orig)
        if ds is not None:  # flat rows in (sample, position) order; merged tokens get their groups' weighted mean
            n0 = [sum(o) for o in run.origin]
            kwargs["deepstack_visual_embeds"] = [
                flat_valid(run.merge_originals(unflat(d, n0)) if run.merged else gather_rows(unflat(d, n0), run.vid, 1),
                           run.totals)
                for d in ds
            ]

    def install_extras(self, engine) -> None:
        lm = self.language_model()
        original = lm._deepstack_process

        @functools.wraps(original)
        def deepstack(hidden_states, visual_pos_masks, visual_embeds):
            run = engine.run
            if run is not None and run.pruned_in_llm and hidden_states.shape[1] != visual_pos_masks.shape[1]:
                # a stage at or before this deepstack layer dropped rows: follow them (rows of the LM input)
                off = torch.tensor([0, *itertools.accumulate(run.lm_totals)][:-1], device=run.lm_slot.device)
                keep_flat = flat_valid((off.view(-1, 1) + run.lm_slot.clamp(min=0)).unsqueeze(-1), run.totals)
                visual_pos_masks = _gather_mask(visual_pos_masks, run.rel)
                visual_embeds = visual_embeds[keep_flat.flatten()]
            return original(hidden_states, visual_pos_masks, visual_embeds)

        engine._patch(lm, "_deepstack_process", deepstack)


def unflat(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Flat rows ``[sum(counts), ...]`` in (sample, position) order -> ``[B, max(counts), ...]`` (zero padded)."""
    v = max(counts, default=0)
    out = x.new_zeros(len(counts) * v, *x.shape[1:])
    out[valid_index(counts, v, x.device)] = x
    return out.view(len(counts), v, *x.shape[1:])


def _gather_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.gather(mask, 1, index.clamp(min=0))
    return out & (index >= 0)
