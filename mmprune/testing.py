"""Tiny random-weight models of every supported family, and inputs for them, built without downloads.

Used by the test suite, the example script and the CPU benchmarks. Inputs are built the way the
processors build them (placeholder runs of the right length, Qwen's ``mm_token_type_ids`` and grids),
with per-image token counts learned from the model itself so that anyres layouts are exact.

Example:
    >>> from mmprune.testing import tiny_model, make_inputs
    >>> model = tiny_model("llava")
    >>> batch = make_inputs(model, [[1], [1]], prompt_lens=[5, 3])
    >>> batch["input_ids"].shape[0]
    2
"""

from __future__ import annotations

import torch

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VOCAB = 160
IMAGE_ID, VIDEO_ID, PAD_ID, BOS_ID = 150, 151, 0, 1


def _llama_text(**kw):
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if kw.pop("qwen2", False) else LlamaConfig
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=2,
    )
    base.update(kw)
    return cls(**base)


def _clip(image_size=28, patch=7):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )


def tiny_config(family: str, layers: int = 4, hidden: int = 64):
    """A small config of ``family`` (random init is done by the model class)."""
    from transformers import (
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3VLConfig,
    )

    text = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden)
    if family == "llava":
        return LlavaConfig(vision_config=_clip(), text_config=_llama_text(**text), image_token_index=IMAGE_ID)
    if family == "llava_next":
        return LlavaNextConfig(
            vision_config=_clip(), text_config=_llama_text(**text), image_token_index=IMAGE_ID,
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
        )
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=_siglip(), text_config=_llama_text(qwen2=True, **text), image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID, image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
            vision_feature_layer=-1,
        )
    heads = 4
    head_dim = hidden // heads
    sec = [head_dim // 8, head_dim // 8 + (head_dim // 2 - 3 * (head_dim // 8)) // 2]
    sec.append(head_dim // 2 - sum(sec))
    rope = {"rope_type": "default", "mrope_section": sec, "rope_theta": 10000.0}
    qtext = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512, rope_parameters=rope,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2,
    )
    common = dict(bos_token_id=BOS_ID, eos_token_id=2, pad_token_id=PAD_ID, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=152, vision_end_token_id=153)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return Qwen2VLConfig(vision_config=vision, text_config=qtext, **common)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=hidden, num_heads=2, intermediate_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], in_channels=3)
        return Qwen2_5_VLConfig(vision_config=vision, text_config=qtext, **common)
    if family == "qwen3_vl":
        vision = dict(depth=3, hidden_size=32, out_hidden_size=hidden, num_heads=2, intermediate_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1], in_channels=3)
        rope3 = {"rope_type": "default", "mrope_section": sec, "mrope_interleaved": True, "rope_theta": 10000.0}
        qtext3 = {**qtext, "rope_parameters": rope3, "head_dim": head_dim}
        return Qwen3VLConfig(vision_config=vision, text_config=qtext3, **common)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _siglip():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=7)


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa", dtype=torch.float32, layers: int = 4, hidden: int = 64):
    """A random-init ``*ForConditionalGeneration`` of ``family`` in eval mode."""
    from transformers import AutoModelForImageTextToText

    cfg = tiny_config(family, layers=layers, hidden=hidden)
    cfg._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        if hasattr(cfg, sub):
            getattr(cfg, sub)._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=attn)
    return model.to(dtype).eval()


def _qwen_pixels(grid, cfg, gen):
    t, h, w = grid
    v = cfg.vision_config
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return torch.randn(t * h * w, dim, generator=gen)


def make_inputs(model, images_per_sample, prompt_lens=None, seed=0, video=False, grids=None, image_sizes=None):
    """Left-padded batch: for sample b, ``prompt_lens[b]`` text tokens, then its images, then 3 text tokens.

    ``images_per_sample[b]`` lists the images of sample b (the values are size indices for anyres / Qwen
    grids: 1 = base size, 2 = a larger one), so ragged visual counts come from different image sizes or
    counts. With ``video=True`` (Qwen, OneVision) each item is a video instead.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    fam = cfg.model_type
    b = len(images_per_sample)
    prompt_lens = prompt_lens or [4] * b
    tok = VIDEO_ID if video else IMAGE_ID
    extra: dict = {}
    counts: list[list[int]] = []
    if fam == "llava":
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        k = sum(len(x) for x in images_per_sample)
        extra["pixel_values"] = torch.randn(k, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=gen)
        counts = [[n] * len(x) for x in images_per_sample]
    elif fam in ("llava_next", "llava_onevision") and not video:
        sizes_lut = {1: (28, 28), 2: (28, 56), 3: (56, 56)}
        sizes = [sizes_lut[s] for x in images_per_sample for s in x]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n_patch = [image_size_to_num_patches(sz, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for sz in sizes]
        pmax = max(n_patch)
        pv = torch.randn(len(sizes), pmax, 3, 28, 28, generator=gen)
        extra["pixel_values"] = pv
        extra["image_sizes"] = torch.tensor(sizes)
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=pv.to(model.dtype), image_sizes=extra["image_sizes"],
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            ).pooler_output
        it = iter(int(f.shape[0]) for f in feats)
        counts = [[next(it) for _ in x] for x in images_per_sample]
    elif fam == "llava_onevision" and video:
        k = sum(len(x) for x in images_per_sample)
        frames = 2
        pv = torch.randn(k, frames, 3, 28, 28, generator=gen)
        extra["pixel_values_videos"] = pv
        with torch.no_grad():
            feats = model.model.get_video_features(
                pixel_values_videos=pv.to(model.dtype), vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            ).pooler_output
        n = int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[1])
        counts = [[n] * len(x) for x in images_per_sample]
    else:  # qwen family
        lut = {1: (1, 4, 4), 2: (1, 4, 6), 3: (1, 6, 6)} if not video else {1: (2, 4, 4), 2: (2, 4, 6), 3: (3, 4, 4)}
        gs = [lut[s] for x in images_per_sample for s in x] if grids is None else grids
        m2 = cfg.vision_config.spatial_merge_size ** 2
        key = "video" if video else "image"
        extra[f"pixel_values{'_videos' if video else ''}"] = torch.cat([_qwen_pixels(g, cfg, gen) for g in gs])
        extra[f"{key}_grid_thw"] = torch.tensor(gs)
        it = iter(t * h * w // m2 for t, h, w in gs)
        counts = [[next(it) for _ in x] for x in images_per_sample]
        ft = iter(t for t, _, _ in gs)
        item_frames = [[next(ft) for _ in x] for x in images_per_sample]
    if not fam.startswith("qwen"):
        item_frames = [[1] * len(x) for x in images_per_sample]
    rows = []
    for i in range(b):
        ids = [BOS_ID] + torch.randint(3, 140, (prompt_lens[i],), generator=gen).tolist()
        for j, c in enumerate(counts[i]):
            ids += [152] if fam.startswith("qwen") else []
            t = item_frames[i][j] if fam == "qwen3_vl" and video else 1
            for f in range(t):  # Qwen3-VL: one run per temporal patch, separated by timestamp text
                ids += [tok] * (c // t) + ([7, 8] if f < t - 1 else [])
            ids += [153] if fam.startswith("qwen") else []
            ids += torch.randint(3, 140, (2,), generator=gen).tolist()
        ids += torch.randint(3, 140, (3,), generator=gen).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((b, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r)
        attention_mask[i, length - len(r):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    if fam.startswith("qwen"):
        batch["mm_token_type_ids"] = (input_ids == IMAGE_ID).int() + 2 * (input_ids == VIDEO_ID).int()
    for k_, v in batch.items():
        if v.is_floating_point():
            batch[k_] = v.to(model.dtype)
    return batch
