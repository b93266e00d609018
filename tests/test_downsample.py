"""Issue 25, part 4: ``downsample`` resizes the image before the vision tower (Qwen-VL) — exactly the unwrapped
model on the resized input — and pools where the tower's resolution is fixed."""

from __future__ import annotations

import pytest
import torch

import mmprune
from mmprune.adapters.qwen_resize import patchify, target_grid, unpatchify
from mmprune.policies.downsample import downsample_inputs
from mmprune.testing import make_inputs, tiny_model

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@torch.no_grad()
def _same_as_rewritten(m, x, new, budget):
    """Generate with ``downsample`` on ``x`` equals the unwrapped model on the rewritten ``new``; the trace."""
    want = m.generate(**new, max_new_tokens=3, do_sample=False, pad_token_id=0)
    mmprune.wrap(m, "downsample", budget=budget)
    got = m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    tr = mmprune.trace(m)
    mmprune.unwrap(m)
    assert torch.equal(got[:, x["input_ids"].shape[1] :], want[:, new["input_ids"].shape[1] :])
    return tr


@pytest.mark.parametrize("grid", [(1, 4, 6), (2, 6, 4), (1, 2, 2), (3, 8, 10)])
def test_patches_round_trip(grid):
    x = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    frames = unpatchify(x, grid, 3, 2, 14, 2)
    assert frames.shape == (grid[0] * 2, 3, grid[1] * 14, grid[2] * 14)
    assert torch.equal(patchify(frames, 2, 14, 2), x)


def test_target_grid_keeps_the_merge_size_and_about_the_fraction():
    assert target_grid((1, 32, 48), 0.25, 2) == (1, 16, 24)
    assert target_grid((1, 32, 48), 1.0, 2) == (1, 32, 48)
    assert target_grid((1, 4, 4), 0.01, 2) == (1, 2, 2)  # never below one merged token


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("budget", [0.25, 0.5, 2])
@torch.no_grad()
def test_generate_is_the_unwrapped_model_on_the_resized_input(family, budget):
    m = tiny_model(family)
    x = make_inputs(m, [[1], [2, 1]], prompt_lens=[5, 3])
    new, originals = downsample_inputs(m, x, budget)
    want = m.generate(**new, max_new_tokens=4, do_sample=False, pad_token_id=0)
    mmprune.wrap(m, "downsample", budget=budget)
    got = m.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    tr = mmprune.trace(m)
    logits = m(**x).logits
    mmprune.unwrap(m)
    assert torch.equal(got[:, : x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt comes back
    assert torch.equal(got[:, x["input_ids"].shape[1] :], want[:, new["input_ids"].shape[1] :])
    n_new = (new["input_ids"] == m.config.image_token_id).sum(1).tolist()
    assert tr.n_visual == originals == (x["input_ids"] == m.config.image_token_id).sum(1).tolist()
    assert tr.visual_tokens_kept == n_new and all(k < n for k, n in zip(n_new, originals))
    if isinstance(budget, int):  # tokens per item: at most about the budget each
        assert all(k <= 2 * budget * 2 for k in n_new)
    assert torch.allclose(logits, m(**new).logits, atol=1e-5)  # a forward call sees the shortened prompt


@pytest.mark.parametrize("family", QWEN)  # Qwen3-VL: one placeholder run per temporal patch (timestamps between)
@torch.no_grad()
def test_videos_are_resized_frame_by_frame(family):
    m = tiny_model(family)
    x = make_inputs(m, [[1]], prompt_lens=[4], video=True)
    new, originals = downsample_inputs(m, x, 0.25)
    t, h, w = x["video_grid_thw"][0].tolist()
    assert new["video_grid_thw"][0].tolist() == list(target_grid((t, h, w), 0.25, 2))
    want = m.generate(**new, max_new_tokens=3, do_sample=False, pad_token_id=0)
    mmprune.wrap(m, "downsample", budget=0.25)
    got = m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    mmprune.unwrap(m)
    assert torch.equal(got[:, x["input_ids"].shape[1] :], want[:, new["input_ids"].shape[1] :])


@pytest.mark.parametrize("family", QWEN)
@torch.no_grad()
def test_budget_one_is_the_unwrapped_model(family):
    m = tiny_model(family)
    x = make_inputs(m, [[1], [2]], prompt_lens=[5, 3])
    want = m.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    mmprune.wrap(m, "downsample", budget=1.0)
    got = m.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    mmprune.unwrap(m)
    assert torch.equal(got, want)


def _pool_then_downsample(m, x):
    """The kept sets of ``pool`` and of ``downsample`` on the same images (``m`` left wrapped with downsample)."""
    kept = []
    for policy in ("pool", "downsample"):
        mmprune.wrap(m, policy, budget=0.25)
        m(**x)
        kept.append([k.tolist() for k in mmprune.trace(m).stages[0].kept])
    return kept


@torch.no_grad()
def test_fixed_resolution_towers_pool_and_say_so():
    m = tiny_model("llava")
    pooled, kept = _pool_then_downsample(m, make_inputs(m, [[1], [1]], prompt_lens=[5, 3]))
    tr = mmprune.trace(m)
    mmprune.unwrap(m)
    assert kept == pooled
    assert any("fixed resolution; pooled instead" in n for n in tr.notes)


@pytest.mark.parametrize("budget", [0.5, 0.25, 4])
@torch.no_grad()
def test_onevision_videos_keep_fewer_frames(budget):
    from mmprune.policies.downsample import fewer_frames

    m = tiny_model("llava_onevision")
    x = make_inputs(m, [[1], [1]], prompt_lens=[4, 3], video=True)  # two 2-frame videos
    new, originals = fewer_frames(m, x, budget)
    assert new["pixel_values_videos"].shape[1] == 1 < x["pixel_values_videos"].shape[1]
    tr = _same_as_rewritten(m, x, new, budget)
    assert tr.n_visual == originals and all(k < n for k, n in zip(tr.visual_tokens_kept, originals))
    assert any("fewer frames" in n for n in tr.notes)


@torch.no_grad()
def test_onevision_images_are_pooled_and_videos_kept_whole_by_the_stage():
    """A OneVision image goes through pool (its tower's resolution is fixed); the stage leaves the videos'
    (already fewer) frames alone."""
    m = tiny_model("llava_onevision")
    pooled, images = _pool_then_downsample(m, make_inputs(m, [[1], [1]], prompt_lens=[5, 3]))
    v = make_inputs(m, [[1]], prompt_lens=[4], video=True)
    m(**v)
    tr = mmprune.trace(m)
    mmprune.unwrap(m)
    assert images == pooled
    assert tr.visual_tokens_kept[0] == tr.stages[0].n_after[0] and tr.stages[0].kept[0].tolist() == list(range(5))


@torch.no_grad()
def test_flops_count_the_tower_on_the_resized_input():
    from mmprune.efficiency import prefill_flops
    from mmprune.eval.runner import per_sample_tflops

    m = tiny_model("qwen2_vl")
    x = make_inputs(m, [[2]], prompt_lens=[5])
    new, _ = downsample_inputs(m, x, 0.25)
    mmprune.wrap(m, "downsample", budget=0.25)
    m(**x)
    tr = mmprune.trace(m)
    mmprune.unwrap(m)
    assert tr.tower_inputs["image_grid_thw"].tolist() == new["image_grid_thw"].tolist()
    full_tower = prefill_flops(m, [[0]] * len(tr.layer_tokens), x, logits_positions=0)
    small_tower = prefill_flops(m, [[0]] * len(tr.layer_tokens), new, logits_positions=0)
    assert small_tower.vision < full_tower.vision
    got = per_sample_tflops(m, tr, x)[0]
    want = (prefill_flops(m, [[layer[0]] for layer in tr.layer_tokens]).total + small_tower.vision + small_tower.projector) / 1e12
    assert got == pytest.approx(want)


@torch.no_grad()
def test_placeholders_that_do_not_match_the_pixels_are_refused():
    m = tiny_model("qwen2_vl")
    x = make_inputs(m, [[1]], prompt_lens=[5])
    ids = x["input_ids"].clone()
    ids[0, (ids[0] == m.config.image_token_id).nonzero()[0]] = 7  # one placeholder fewer than the grid's
    with pytest.raises(ValueError, match="a run of 3 image placeholders where the pixels give 4"):
        downsample_inputs(m, {**x, "input_ids": ids}, 0.25)


# -- LLaVA-NeXT: fewer anyres tiles (a smaller image's tiles), the base tile kept


@pytest.mark.parametrize("size", [(336, 336), (672, 672), (500, 375), (375, 500), (1000, 300), (300, 1000), (1, 7), (801, 603)])
def test_next_token_counts_are_the_processors(size):
    """``anyres_tokens`` (what the placeholder runs must hold) equals LlavaNextProcessor's own count for
    llava-v1.6's pinpoints (default feature strategy: no [CLS])."""
    from types import SimpleNamespace

    from transformers import LlavaNextConfig, LlavaNextProcessor

    from mmprune.adapters.llava_tiles import anyres_tokens

    cfg = LlavaNextConfig()
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                           patch_size=14, num_additional_image_tokens=1)
    proc._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(proc, *a)
    assert anyres_tokens(cfg, size) == LlavaNextProcessor._get_number_of_features(proc, *size, 336, 336) - 1


def test_next_smaller_size_picks_the_largest_count_within_the_budget():
    from transformers import LlavaNextConfig

    from mmprune.adapters.llava_tiles import anyres_tokens, smaller_size

    cfg = LlavaNextConfig()
    assert anyres_tokens(cfg, (672, 672)) == 2928
    assert smaller_size(cfg, (672, 672), 2928) == (672, 672)  # within the budget already
    small = smaller_size(cfg, (672, 672), 0.5 * 2928)  # the 1x2 grid is all a square image can get below 2x2
    assert anyres_tokens(cfg, small) == 1176 and small[0] == small[1]
    assert smaller_size(cfg, (672, 672), 100) == small  # below every pinpoint: the fewest tokens there are
    wide = smaller_size(cfg, (336, 1008), 0.6 * anyres_tokens(cfg, (336, 1008)))
    assert anyres_tokens(cfg, wide) <= 0.6 * anyres_tokens(cfg, (336, 1008))


def test_next_retile_is_the_processor_on_the_smaller_image():
    """The re-tiled canvas is what the processor makes of the image resized to the new size: same tile grid,
    the same padding exactly, the content equal up to resampling (bicubic on tensors vs PIL)."""
    import numpy as np
    from PIL import Image
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from mmprune.adapters.llava_tiles import retile, smaller_size

    cfg = tiny_model("llava_next").config
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=cfg.image_grid_pinpoints)
    yy, xx = np.mgrid[0:48, 0:56]  # a smooth picture, 48 x 56: the 2x2 grid, padded top and bottom
    img = Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8))
    full = proc(img, return_tensors="pt")
    size = tuple(full["image_sizes"][0].tolist())
    new_size = smaller_size(cfg, size, 30)
    assert new_size == (24, 28)
    want = proc(img.resize(new_size[::-1], Image.BICUBIC), return_tensors="pt")["pixel_values"][0]
    got = retile(cfg, full["pixel_values"][0], size, new_size)
    assert got.shape == want.shape == (2, 3, 28, 28)  # base + the one-tile grid (was 2x2)
    assert torch.equal(got[0], full["pixel_values"][0, 0])  # the base tile kept
    pad = (want[1:] - got[1:]).abs()
    assert torch.equal(got[1:, :, :2], want[1:, :, :2]) and torch.equal(got[1:, :, -2:], want[1:, :, -2:])  # padding
    assert pad.mean() < 0.05 and pad.max() < 0.5


@pytest.mark.parametrize("budget", [0.5, 1.0, 20])
@torch.no_grad()
def test_next_generate_is_the_unwrapped_model_on_the_retiled_input(budget):
    from mmprune.policies.downsample import fewer_tiles

    m = tiny_model("llava_next")
    x = make_inputs(m, [[3], [2, 1]], prompt_lens=[4, 3])  # 4-, 2- and 1-tile images, ragged
    new, originals = fewer_tiles(m, x, budget)
    tr = _same_as_rewritten(m, x, new, budget)
    assert tr.n_visual == originals
    if budget == 1.0:
        assert torch.equal(new["input_ids"], x["input_ids"]) and tr.visual_tokens_kept == originals
    else:
        assert new["pixel_values"].shape[1] < x["pixel_values"].shape[1]
        assert all(k < n for k, n in zip(tr.visual_tokens_kept, originals))
    assert any("fewer anyres tiles" in n for n in tr.notes)
