"""LLaVA-1.5, LLaVA-NeXT (anyres tiles + image_newline) and LLaVA-OneVision (images and video).

All three place one contiguous run of placeholder tokens per image (NeXT/OneVision: base tile, sub-tiles
and newline tokens together), and ``get_image_features`` returns one ``[N_i, D]`` tensor per image, which
is where per-image token counts come from.

Vision-tower signals (``Tokens.cls_attn`` / ``keys`` / ``cls_sim``): a pre-hook on the attention module of
the tower layer that produces the selected feature (``vision_feature_layer``, -2 for LLaVA-1.5: the
penultimate layer, as VisionZip / PruMerge read it) recomputes q/k from that module's own projections
(CLIP/SigLIP have no RoPE). CLIP: the [CLS] row of the attention, head-averaged. SigLIP (OneVision) has no
[CLS]: the mean attention each patch *receives* (over all queries, head-averaged) stands in, and
``cls_sim`` is the cosine to the mean patch. The per-tile rows are mapped to visual tokens by running them
through the model's own layout code (``pack_image_features`` for anyres tiles, unpadding, OneVision's
bilinear downscaling and newline tokens; ``apply_pooling`` for OneVision video), with a zero "newline"
row, so every signal lines up with the placeholder tokens exactly; a length mismatch raises (fallback).

ToMe inside the CLIP tower (LLaVA-1.5 only; ``install_encoder_merge``): between the blocks up to the
feature layer, a pre-hook on block j merges the ``r`` most similar token pairs (bipartite soft matching on
block j-1's keys, [CLS] protected, size-weighted means, ToMe's [unmerged, merged] order) and passes ToMe's
proportional-attention bias ``log(size)`` as the block's additive attention mask; ``r`` is scheduled so
that the budget is reached by the feature layer where the bipartite limit (half the tokens per block)
allows. A post-hook on the tower then *unmerges* every hidden state it returns (each original patch
gets its group's row), so the model's own projector and placeholder count are untouched, and the groups
travel to the pre-LLM ``tome`` stage as ``Tokens.tome_groups``, which keeps one token per group (and
merges further after the projector if the budget asks for more).
"""

from __future__ import annotations

import inspect
import math

import torch

from ..policies.base import resolve_budget
from ..syncs import host_side
from .base import Adapter, VisionCapture, split_channels


def _feature_layer(adapter, kwargs):
    fl = kwargs.get("vision_feature_layer")
    if fl is None:
        fl = adapter.config.vision_feature_layer
    return fl[-1] if isinstance(fl, (list, tuple)) else int(fl)


def _strategy(adapter, kwargs):
    st = kwargs.get("vision_feature_select_strategy")
    return st if st is not None else adapter.config.vision_feature_select_strategy


class ClipTowerCapture(VisionCapture):
    """[CLS] attention (or mean attention received), keys and [CLS] similarity at the feature layer."""

    def __init__(self, adapter, modality, names):
        super().__init__(adapter, modality, names)
        tower = adapter.inner().vision_tower
        vm = getattr(tower, "vision_model", tower)
        self.layers = vm.encoder.layers
        self.has_cls = hasattr(vm.embeddings, "class_embedding")

    def _install(self) -> None:
        n = len(self.layers)
        j = _feature_layer(self.adapter, {}) % (n + 1)  # index into hidden_states (0 = embeddings)
        self.hs_index = j
        attn = self.layers[max(j - 1, 0)].self_attn
        self.handles.append(attn.register_forward_pre_hook(self._guard(self._tap), with_kwargs=True))
        if {"next_cls_attn", "next_keys"} & set(self.names) and self.has_cls and j < n:
            nxt = self.layers[j].self_attn
            self.handles.append(nxt.register_forward_pre_hook(self._guard(self._tap_next), with_kwargs=True))
        if getattr(self.adapter, "_tower_merge", None) is not None and "tower_assign" in self.names:
            proj = self.adapter.inner().multi_modal_projector
            self.handles.append(proj.register_forward_pre_hook(self._merge_before_projector, with_kwargs=True))

    def _reset(self) -> None:
        self.next_rows: list = []
        self.tower_assign: list = []

    def _merge_before_projector(self, module, args, kwargs):
        """VisionZip / PruMerge+ as their official code: select on the tower signals and merge the *tower*
        features (the projector's input), one tile per image (LLaVA-1.5, default strategy). The pre-LLM stage
        then keeps the merged rows as they are (``Tokens.tower_assign``). On any failure nothing is merged
        here and the stage merges after the projector (said in the trace)."""
        from ..apply import gather_slots, merged_features
        from ..kernels import scatter_tokens
        from ..policies.base import Tokens
        from ..policies.batch import BatchPlan, BatchTokens

        if not self.active:
            return None
        engine, policy = self.adapter._tower_merge
        x = args[0] if args else kwargs["image_features"]
        try:
            att, keys = self.rows[0]
            t, s, _ = x.shape
            if len(self.rows) != 1 or att.shape != (t, s + 1) or _strategy(self.adapter, {}) != "default":
                raise ValueError("not one [CLS] + patch grid per image")
            nxt = self.next_rows[0] if len(self.next_rows) == 1 and self.next_rows[0][0].shape == att.shape else None
            budget = next(st.config.budget for st in engine.pre_stages if st.policy is policy)
            side, k = math.isqrt(s), resolve_budget(budget, s)
            sig = {"cls_attn": att[:, 1:], "keys": keys[:, 1:], "tower_cls": torch.ones(t, s, device=x.device)}
            if nxt is not None:
                sig.update(next_cls_attn=nxt[0][:, 1:], next_keys=nxt[1][:, 1:])
            plan = None
            if policy.batched:  # every image at once, on the device
                dev = x.device
                bt = BatchTokens(x, torch.ones(t, s, dtype=torch.bool, device=dev),
                                 torch.zeros(t, s, dtype=torch.long, device=dev),
                                 torch.arange(s, device=dev).expand(t, s), torch.ones(t, s, device=dev),
                                 [[s]] * t, [[k]] * t, [[s]] * t, [[(1, side, side)]] * t, signals=sig)
                plan = policy.select_batch(bt)
            if plan is None:
                plans = [policy.select(Tokens(x[i], [s], [k], grids=[(1, side, side)],
                                              **{name: v[i] for name, v in sig.items()})) for i in range(t)]
                plan = BatchPlan.stack(plans, [s] * t, device=x.device)
            out = x
            if plan.assign is not None:
                out = scatter_tokens(x.clone(), plan.keep, merged_features(x, plan, plan.keep.shape[1]), check=False)
                rep = torch.where(plan.assign >= 0, gather_slots(plan.keep, plan.assign.clamp(min=0)), -1)
            else:
                rep = torch.full((t, s + 1), -1, dtype=torch.long, device=x.device)
                rep.scatter_(1, torch.where(plan.keep >= 0, plan.keep, s), torch.where(plan.keep >= 0, plan.keep, -1))
                rep = rep[:, :s]
            self.tower_assign = list(rep.unbind(0))
        except Exception as e:
            self.tower_assign = []
            self.error = self.error or f"merging before the projector failed ({type(e).__name__}: {e})"
            return None
        if args:
            return (out, *args[1:]), kwargs
        kwargs["image_features"] = out
        return args, kwargs

    def _tap_next(self, module, args, kwargs):
        """PruMerge's reading (42Shawn/LLaVA-PruMerge ``clip_encoder.py``, commit 097c041: hooks on layer 23's
        q_proj / k_proj, the block after LLaVA's feature layer): q and k as one full-width head,
        ``softmax(q k^T * C^-0.5)``; the [CLS] row, and the full keys."""
        hidden = args[0] if args else kwargs["hidden_states"]
        q, k = module.q_proj(hidden).float(), module.k_proj(hidden).float()
        att = torch.softmax(q[:, :1] @ k.transpose(-1, -2) * hidden.shape[-1] ** -0.5, dim=-1)[:, 0]
        self.next_rows.append((att, k))  # [T, S], [T, S, D]

    def _tap(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [T, S, D], after layer_norm1 (maybe ToMe-merged)
        t, s, _ = hidden.shape
        h, hd = module.num_heads, module.head_dim
        q = module.q_proj(hidden).view(t, s, h, hd).transpose(1, 2).float()
        k = module.k_proj(hidden).view(t, s, h, hd).transpose(1, 2).float()
        if self.has_cls:
            att = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * module.scale, dim=-1)[:, :, 0].mean(1)
        else:  # no [CLS]: mean attention received, one head at a time (memory O(T * S^2))
            att = torch.zeros(t, s, device=hidden.device)
            for i in range(h):
                att += torch.softmax(q[:, i] @ k[:, i].transpose(-1, -2) * module.scale, dim=-1).mean(1)
            att /= h
        self.rows.append((att, k.mean(1)))  # [T, S], [T, S, hd]

    def _rows(self, output, kwargs) -> torch.Tensor:
        """[T, P, C] per tile / frame: channels cls_attn, cls_sim, keys, valid; [CLS] column dropped as the
        model drops it."""
        if len(self.rows) != 1:
            raise ValueError(f"expected one tower call, saw {len(self.rows)}")
        att, keys = self.rows[0]
        tome = getattr(self.adapter, "_tome", None)
        if tome is not None and tome.maps and att.shape[1] in tome.maps:  # merged inside the tower: unmerge
            idx = tome.maps[att.shape[1]]
            att = torch.gather(att, 1, idx)
            keys = torch.gather(keys, 1, idx[..., None].expand(-1, -1, keys.shape[-1]))
        hs = output.hidden_states[self.hs_index].float()
        ref = hs[:, :1] if self.has_cls else hs.mean(1, keepdim=True)
        sim = torch.nn.functional.cosine_similarity(hs, ref.expand_as(hs), dim=-1)
        parts = [att[..., None], sim[..., None], keys]
        self.layout = [("cls_attn", 1), ("cls_sim", 1), ("keys", keys.shape[-1])]
        if len(self.next_rows) == 1 and self.next_rows[0][0].shape == att.shape:  # not ToMe-merged
            n_att, n_keys = self.next_rows[0]
            parts += [n_att[..., None], n_keys]
            self.layout += [("next_cls_attn", 1), ("next_keys", n_keys.shape[-1])]
        sig = torch.cat([*parts, torch.ones_like(att)[..., None]], dim=-1)
        if _strategy(self.adapter, kwargs) == "default":
            sig = sig[:, 1:]
        return sig

    def _items(self, output, args, kwargs):
        sig = self._rows(output, kwargs)
        per_item = self.adapter.layout_signals(self.modality, sig, args, kwargs)
        feats = output.pooler_output
        feats = list(feats) if not isinstance(feats, (list, tuple)) else feats
        if len(per_item) != len(feats) or any(p.shape[0] != f.shape[0] for p, f in zip(per_item, feats)):
            raise ValueError("signal layout does not match the encoder's tokens")
        out = [split_channels(p, self.layout) for p in per_item]
        if self.has_cls:  # VisionZip reserves a dominant slot for [CLS] where the tower has one
            for item in out:
                item["tower_cls"] = torch.ones_like(item["cls_attn"])
        if len(self.tower_assign) == len(out):
            for item, rep in zip(out, self.tower_assign):
                item["tower_assign"] = rep.to(item["cls_attn"].device).float()
        tome = getattr(self.adapter, "_tome", None)
        if tome is not None and tome.groups is not None and "tome_groups" in self.names:
            groups = tome.groups
            if _strategy(self.adapter, kwargs) == "default":
                groups = groups[:, 1:] - 1
            for item, g in zip(out, groups):
                item["tome_groups"] = g
        return out


class ToMeEncoder:
    """ToMe between the CLIP tower's blocks (one per wrap); see the module docstring."""

    def __init__(self, engine, policy, layers, feature_block: int):
        self.engine, self.policy, self.layers, self.sel = engine, policy, layers, feature_block
        self.reset()

    def reset(self):
        self.maps: dict = {}  # sequence length -> [T, S0] index of each original token in that sequence
        self.groups = None  # [T, S0] original index of each original token's representative
        self.metric = None
        self.active = False

    def _budget(self) -> float | int:
        for st in self.engine.pre_stages:
            if st.policy is self.policy:
                return st.config.budget
        return 1.0

    def tower_pre(self, module, args, kwargs):
        self.reset()
        if not self.engine.enabled:
            return None
        pv = args[0] if args else kwargs.get("pixel_values")
        side = module.config.image_size // module.config.patch_size
        n = side * side
        self.todo = n - resolve_budget(self._budget(), n)
        self.active = self.todo > 0 and pv is not None
        if self.active:
            t = pv.shape[0]
            self.cur = torch.arange(n + 1, device=pv.device).expand(t, -1).clone()  # original -> current row
            self.ident = self.cur.clone()  # current row -> original index of the token it continues
            self.size = torch.ones(t, n + 1, device=pv.device)
            self.maps[n + 1] = self.cur.clone()
        return None

    def keys_pre(self, module, args, kwargs):
        if self.active:
            hidden = args[0] if args else kwargs["hidden_states"]
            t, s, _ = hidden.shape
            self.metric = module.k_proj(hidden).view(t, s, module.num_heads, -1).mean(2).float()
        return None

    def block_pre(self, j: int):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if j <= self.sel and self.todo > 0 and self.metric is not None:
                hidden = self._merge(hidden, j)
            if hidden.shape[1] == self.size.shape[1] and (self.size > 1).any():
                bias = self.size.log().to(hidden.dtype)[:, None, None, :]  # proportional attention
                if args and len(args) > 1:
                    args = (hidden, bias, *args[2:])
                else:
                    kwargs["attention_mask"] = bias
                    args = (hidden, *args[1:]) if args else args
                if not args:
                    kwargs["hidden_states"] = hidden
                return args, kwargs
            return None

        return hook

    def _merge(self, x, j):
        t, s, d = x.shape
        left = self.sel - j + 1  # merge points left, this one included
        a_idx = torch.arange(0, s, 2, device=x.device)
        b_idx = torch.arange(1, s, 2, device=x.device)
        r = min(-(-self.todo // left), len(a_idx) - 1, len(b_idx))
        if r <= 0:
            return x
        m = torch.nn.functional.normalize(self.metric, dim=-1)
        scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)
        scores[:, 0] = float("-inf")  # [CLS] (row 0, in A) never merges
        best, partner = scores.max(-1)
        # ToMe's order (tome/merge.py, commit af95e4b): the r best-matched A rows merge; the next block sees
        # [unmerged A rows in ascending order ([CLS] first, as with class_token=True), then every B row].
        edge = best.argsort(dim=-1, descending=True)
        order, unm = edge[:, :r], edge[:, r:].sort(dim=-1).values
        src = a_idx[order]  # [T, r] current rows merged away
        dst = b_idx[torch.gather(partner, 1, order)]
        size = self.size
        w = size[..., None]
        acc = (x.float() * w).scatter_add(1, dst[..., None].expand(-1, -1, d), torch.gather(x.float() * w, 1, src[..., None].expand(-1, -1, d)))
        tot = size.scatter_add(1, dst, torch.gather(size, 1, src))
        x = (acc / tot[..., None]).to(x.dtype)
        rows = torch.cat([a_idx[unm], b_idx.expand(t, -1)], dim=1)  # [T, s - r] old row of each new row
        new_pos = torch.empty(t, s, dtype=torch.long, device=x.device)
        new_pos.scatter_(1, rows, torch.arange(s - r, device=x.device).expand(t, -1))
        new_pos = new_pos.scatter(1, src, torch.gather(new_pos, 1, dst))
        self.cur = torch.gather(new_pos, 1, self.cur)
        self.ident = torch.gather(self.ident, 1, rows)
        self.size = torch.gather(tot, 1, rows)
        self.todo -= r
        self.maps[s - r] = self.cur.clone()
        return torch.gather(x, 1, rows[..., None].expand(-1, -1, d))

    def tower_post(self, module, args, kwargs, output):
        if not self.active or len(self.maps) < 2:
            return None
        n0 = max(self.maps)

        def unmerge(h):
            if h is None or h.dim() != 3 or h.shape[1] == n0 or h.shape[1] not in self.maps:
                return h
            idx = self.maps[h.shape[1]]
            return torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))

        self.groups = torch.gather(self.ident, 1, self.maps[min(self.maps)])
        if output.hidden_states is not None:
            output.hidden_states = tuple(unmerge(h) for h in output.hidden_states)
        output.last_hidden_state = unmerge(output.last_hidden_state)
        return output


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)

    def grid_of(self, modality, n, i, args, kwargs):
        side = math.isqrt(n)
        return (1, side, side) if side * side == n else None

    def vision_capture(self, modality, names):
        tower = self.inner().vision_tower
        if not hasattr(getattr(tower, "vision_model", tower), "encoder"):
            return None
        return ClipTowerCapture(self, modality, names)

    def layout_signals(self, modality, sig, args, kwargs):
        """Per-tile signal rows -> one ``[N_i, C]`` tensor per image (LLaVA-1.5: one tile per image)."""
        return list(sig)

    def install_tower_merge(self, engine, policy) -> bool:
        """Merge before the projector, as VisionZip's and PruMerge+'s official code (LLaVA-1.5 only, as the
        first pre-LLM stage); False elsewhere (the policy merges projected features)."""
        if type(self) is not LlavaAdapter or not engine.pre_stages or engine.pre_stages[0].policy is not policy:
            return False
        self._tower_merge = (engine, policy)
        return True

    def install_encoder_merge(self, engine, policy) -> bool:
        """ToMe between CLIP blocks (LLaVA-1.5 only); False where unsupported (tome merges after the projector)."""
        if type(self) is not LlavaAdapter:
            return False
        tower = self.inner().vision_tower
        vm = getattr(tower, "vision_model", tower)
        if not hasattr(vm, "encoder") or not hasattr(vm.embeddings, "class_embedding"):
            return False
        layers = vm.encoder.layers
        sel = max(_feature_layer(self, {}) % (len(layers) + 1) - 1, 0)  # block producing the feature
        if sel < 1:
            return False  # no block boundary before the feature layer
        state = ToMeEncoder(engine, policy, layers, sel)
        self._tome = state
        h = engine.handles
        h.append(tower.register_forward_pre_hook(state.tower_pre, with_kwargs=True))
        h.append(tower.register_forward_hook(state.tower_post, with_kwargs=True))
        for i in range(sel):
            h.append(layers[i].self_attn.register_forward_pre_hook(state.keys_pre, with_kwargs=True))
        for j in range(1, len(layers)):
            h.append(layers[j].register_forward_pre_hook(state.block_pre(j), with_kwargs=True))
        return True


class LlavaNextAdapter(LlavaAdapter):
    """Anyres: the token count depends on the image size; tiles and newlines make no single grid."""

    family = "llava_next"
    model_types = ("llava_next",)

    def grid_of(self, modality, n, i, args, kwargs):
        return None

    def _image_sizes(self, args, kwargs):
        sizes = kwargs.get("image_sizes")
        if sizes is None and len(args) > 1:
            sizes = args[1]
        if sizes is None:
            raise ValueError("image_sizes unavailable")
        return self.host_of("image_sizes", sizes) if isinstance(sizes, torch.Tensor) else sizes

    def _tiles(self, sizes, kwargs):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.config
        with host_side():  # host sizes (the engine's prefetched copy): no device read
            return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]

    def layout_signals(self, modality, sig, args, kwargs):
        sizes = self._image_sizes(args, kwargs)
        tiles = self._tiles(sizes, kwargs)
        if sum(tiles) != sig.shape[0]:
            raise ValueError(f"{sig.shape[0]} tower rows for {sum(tiles)} tiles")
        pack = self.inner().pack_image_features
        accepted = inspect.signature(pack).parameters
        extra = {}
        if "vision_feature_select_strategy" in accepted:
            extra["vision_feature_select_strategy"] = _strategy(self, kwargs)
        if "vision_aspect_ratio" in accepted:
            extra["vision_aspect_ratio"] = kwargs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        newline = torch.zeros(sig.shape[-1], dtype=sig.dtype, device=sig.device)  # valid = 0
        with host_side():  # the packing reads only the host sizes
            packed, _ = pack(list(torch.split(sig, tiles)), sizes, image_newline=newline, **extra)
        return list(packed)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """OneVision: images as NeXT (anyres), videos as pooled per-frame grids + one newline token."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    modalities = ("image", "video")

    def encoder_items(self, modality, output, args, kwargs):
        feats = output.pooler_output
        if modality == "video" and not isinstance(feats, (list, tuple)):
            # get_video_features returns [num_videos, frames * tokens, D]; the forward flattens it.
            feats = list(feats)
        return [(int(f.shape[0]), self.grid_of(modality, int(f.shape[0]), i, args, kwargs)) for i, f in enumerate(feats)]

    def grid_of(self, modality, n, i, args, kwargs):
        """Video: ``(frames, h, w)`` of the 2x2-pooled frame grid; the video's newline token trails it."""
        if modality != "video":
            return None
        pv = kwargs.get("pixel_values_videos", args[0] if args else None)
        if pv is None or pv.dim() != 5:
            return None
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        h = w = math.ceil(side / 2)
        frames = int(pv.shape[1])
        return (frames, h, w) if frames * h * w + 1 == n else None

    def _tiles(self, sizes, kwargs):
        tiles = super()._tiles(sizes, kwargs)
        bni = kwargs.get("batch_num_images")
        if bni is not None:  # multi-image samples are not tiled (as in the model)
            patching = [int(n) == 1 for n in bni for _ in range(int(n))]
            tiles = [t if p else 1 for t, p in zip(tiles, patching)]
        return tiles

    def layout_signals(self, modality, sig, args, kwargs):
        if modality != "video":
            return super().layout_signals(modality, sig, args, kwargs)
        pv = kwargs.get("pixel_values_videos", args[0] if args else None)
        b, frames = int(pv.shape[0]), int(pv.shape[1])
        pooled = self.inner().apply_pooling(sig)  # [B*F, P', C], bilinear as the features
        pooled = pooled.reshape(b, frames * pooled.shape[1], -1)
        newline = torch.zeros(b, 1, sig.shape[-1], dtype=sig.dtype, device=sig.device)
        return list(torch.cat([pooled, newline], dim=1))
