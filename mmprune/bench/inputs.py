"""Benchmark inputs built without processors, sized the way each family's real processor sizes them.

One prompt per sample: ``BOS``, a third of the ``--prompt-tokens`` text tokens, the image (or video)
placeholder run(s), the rest of the text. Placeholder counts follow the processors:

- LLaVA-1.5: every image is resized and centre-cropped to 336 px -> 24 x 24 = 576 tokens, whatever
  ``image_size``.
- LLaVA-NeXT / OneVision (anyres): an ``image_size`` x ``image_size`` image is tiled on the best-fitting
  ``image_grid_pinpoints`` grid (base tile + sub-tiles, unpadded, one newline per row; OneVision pools
  above ``anyres_max_9``). The count is read from the model's own ``get_image_features`` on random
  pixels of the processor's shape, so it is exact by construction. OneVision video: ``F`` frames of
  27 x 27 patches pooled to 14 x 14, plus one newline token.
- Qwen2-VL / 2.5-VL: ``smart_resize`` to 28-px units (Qwen3-VL: 32-px units), ``(h/14) * (w/14) / 4``
  tokens per image; video frames are paired (temporal patch 2). Qwen3-VL puts a timestamp and
  ``<vision_start>``/``<vision_end>`` around every temporal step, as its processor does.

Example:
    >>> from mmprune.bench.inputs import qwen_grid
    >>> qwen_grid(672, 14, 2)            # 672 px -> 48 x 48 patches -> 576 tokens
    (1, 48, 48)
"""

from __future__ import annotations

import math

import torch

from ..testbed.vocab import smart_resize  # Qwen-VL's resize rule (transformers' copy needs torchvision)

# Published preprocessor_config.json limits (Qwen/Qwen2-VL-7B-Instruct: min_pixels 3136, max_pixels
# 12845056; Qwen/Qwen3-VL-8B-Instruct: shortest_edge 65536, longest_edge 16777216).
_QWEN_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056), "qwen3_vl": (65536, 16777216)}
_TEXT_LO, _TEXT_HI = 1000, 30000  # ordinary token ids in every vocabulary here (all >= 32064)


def qwen_grid(size: int, patch: int, merge: int, frames: int = 0, temporal: int = 2,
              pixels: tuple[int, int] = (3136, 12845056)) -> tuple[int, int, int]:
    """``(t, h, w)`` patch grid of a ``size`` x ``size`` image (``frames=0``) or video of ``frames`` frames."""
    h, w = smart_resize(size, size, patch * merge, *pixels)
    t = 1 if frames == 0 else max(1, math.ceil(frames / temporal))
    return t, h // patch, w // patch


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(_TEXT_LO, _TEXT_HI, (n,), generator=gen).tolist() if n > 0 else []


def _visual_tokens_from_model(model, kind: str, pixel: dict) -> int:
    """Run the model's own feature extractor once to count the placeholder tokens it will fill."""
    inner = model.model
    cfg = model.config
    with torch.no_grad():
        if kind == "image":
            out = inner.get_image_features(
                pixel_values=pixel["pixel_values"], image_sizes=pixel["image_sizes"],
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
        else:
            out = inner.get_video_features(
                pixel_values_videos=pixel["pixel_values_videos"], vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
    feats = out.pooler_output
    return int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[1])


def make_bench_inputs(model, *, batch_size: int = 1, image_size: int | None = None, frames: int = 0,
                      prompt_tokens: int = 64, seed: int = 0) -> dict:
    """Inputs for one image (``frames=0``) or one video per sample, identical across the batch.

    Returns the model kwargs plus ``_meta`` (visual tokens per sample, grid, pixel size) for the report;
    pop ``_meta`` before calling the model.

    Example:
        >>> from mmprune.bench.archs import build_model
        >>> m = build_model("llava-1.5-7b", shrink=32)
        >>> b = make_bench_inputs(m, prompt_tokens=10)
        >>> b["_meta"]["visual_tokens"], b["input_ids"].shape
        (576, torch.Size([1, 587]))
    """
    cfg = model.config
    fam = cfg.model_type
    gen = torch.Generator().manual_seed(seed)
    dev, dtype = model.device, model.dtype
    video = frames > 0
    if video and fam not in ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"--frames is accepted for video architectures only (llava-onevision, qwen*); "
                         f"{fam} takes images (use --image-size)")
    extra: dict = {}
    meta: dict = {"modality": "video" if video else "image", "frames": frames}
    vc = cfg.vision_config
    from mmprune.bench.archs import ARCHS

    arch = ARCHS.get(getattr(cfg, "_mmprune_arch", ""), None)
    if image_size is None and arch is not None:
        image_size = arch.video_size if video else arch.image_size
    if fam == "llava":
        side = vc.image_size  # the processor resizes + centre-crops to this
        extra["pixel_values"] = torch.randn(batch_size, 3, side, side, generator=gen)
        n_vis = (side // vc.patch_size) ** 2
        meta.update(pixels=side)
        runs = [n_vis]
        tok = cfg.image_token_index
    elif fam in ("llava_next", "llava_onevision") and not video:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = image_size or vc.image_size
        n_patch = image_size_to_num_patches((size, size), cfg.image_grid_pinpoints, vc.image_size)
        pv = torch.randn(1, n_patch, 3, vc.image_size, vc.image_size, generator=gen)
        sizes = torch.tensor([[size, size]])
        n_vis = _visual_tokens_from_model(model, "image", {"pixel_values": pv.to(dev, dtype),
                                                           "image_sizes": sizes.to(dev)})
        extra["pixel_values"] = pv.expand(batch_size, -1, -1, -1, -1).contiguous()
        extra["image_sizes"] = sizes.expand(batch_size, -1).contiguous()
        meta.update(pixels=size, tiles=n_patch)
        runs = [n_vis]
        tok = cfg.image_token_index
    elif fam == "llava_onevision":
        pv = torch.randn(1, frames, 3, vc.image_size, vc.image_size, generator=gen)
        n_vis = _visual_tokens_from_model(model, "video", {"pixel_values_videos": pv.to(dev, dtype)})
        extra["pixel_values_videos"] = pv.expand(batch_size, -1, -1, -1, -1).contiguous()
        meta.update(pixels=vc.image_size)
        runs = [n_vis]
        tok = cfg.video_token_index
    elif fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        size = image_size or 448
        grid = qwen_grid(size, vc.patch_size, vc.spatial_merge_size, frames, vc.temporal_patch_size,
                         _QWEN_PIXELS[fam])
        t, h, w = grid
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pv = torch.randn(t * h * w, dim, generator=gen)
        key = "video" if video else "image"
        extra[f"pixel_values{'_videos' if video else ''}"] = pv.repeat(batch_size, 1)
        extra[f"{key}_grid_thw"] = torch.tensor([grid] * batch_size)
        per_step = h * w // vc.spatial_merge_size ** 2
        n_vis = t * per_step
        runs = [per_step] * t if (fam == "qwen3_vl" and video) else [n_vis]
        tok = cfg.video_token_id if video else cfg.image_token_id
        meta.update(pixels=h * vc.patch_size, grid=list(grid))
    else:
        raise ValueError(f"no benchmark inputs for model_type {fam!r}")
    n_before = max(0, prompt_tokens // 3)
    n_after = max(1, prompt_tokens - n_before)
    ids = [int(cfg.text_config.bos_token_id or 1)] + _text(n_before, gen)
    qwen = fam.startswith("qwen")
    for r in runs:
        if fam == "qwen3_vl" and video:
            ids += _text(4, gen)  # "<1.0 seconds>" before every temporal step
        ids += ([cfg.vision_start_token_id] if qwen else []) + [tok] * r + ([cfg.vision_end_token_id] if qwen else [])
    ids += _text(n_after, gen)
    input_ids = torch.tensor([ids] * batch_size)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
    if qwen:
        batch["mm_token_type_ids"] = ((input_ids == cfg.image_token_id).int()
                                      + 2 * (input_ids == cfg.video_token_id).int())
    for k, v in list(batch.items()):
        batch[k] = v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
    meta.update(visual_tokens=n_vis, text_tokens=len(ids) - n_vis, seq_len=len(ids), batch_size=batch_size)
    batch["_meta"] = meta
    return batch
