"""Resizing Qwen-VL images and videos *before* the vision tower, on the processor's outputs (the ``downsample``
policy): the patches of each item are put back into frames, resized, and cut into patches again, and each
item's run of placeholder tokens in ``input_ids`` shrinks to the new token count. The model then simply sees a
smaller image: its tower, its M-RoPE positions and its cache are the unwrapped model's on that input.

Layout (``Qwen2VLImageProcessor._preprocess``, transformers 5.24): frames ``[t * tps, C, h * ps, w * ps]`` become
``[t, tps, C, h/m, m, ps, w/m, m, ps]``, transposed ``(0, 3, 6, 4, 7, 2, 1, 5, 8)``, flattened to
``[t * h * w, C * tps * ps * ps]``; ``m`` is the spatial merge size, ``h * w / m^2`` tokens per temporal patch.

Example:
    >>> import torch
    >>> x = torch.randn(1 * 4 * 6, 3 * 2 * 14 * 14)
    >>> torch.equal(patchify(unpatchify(x, (1, 4, 6), 3, 2, 14, 2), 2, 14, 2), x)
    True
"""

from __future__ import annotations

import math

import torch

_PERM = (0, 3, 6, 4, 7, 2, 1, 5, 8)
_INV = tuple(_PERM.index(i) for i in range(9))


def unpatchify(flat: torch.Tensor, grid, channels: int, tps: int, ps: int, m: int) -> torch.Tensor:
    """``[t*h*w, C*tps*ps*ps]`` -> frames ``[t*tps, C, h*ps, w*ps]``."""
    t, h, w = grid
    x = flat.reshape(t, h // m, w // m, m, m, channels, tps, ps, ps).permute(*_INV)
    return x.reshape(t * tps, channels, h * ps, w * ps)


def patchify(frames: torch.Tensor, tps: int, ps: int, m: int) -> torch.Tensor:
    """Frames ``[t*tps, C, H, W]`` (H, W multiples of ``ps * m``) -> ``[t*h*w, C*tps*ps*ps]``."""
    tt, c, hh, ww = frames.shape
    t, h, w = tt // tps, hh // ps, ww // ps
    x = frames.reshape(t, tps, c, h // m, m, ps, w // m, m, ps).permute(*_PERM)
    return x.reshape(t * h * w, c * tps * ps * ps)


def target_grid(grid, fraction: float, m: int):
    """``(t, h, w)`` scaled so that ``h * w`` shrinks by about ``fraction`` (each side by its square root),
    rounded to multiples of ``m`` and at least ``m``: ``(t, h', w')``."""
    t, h, w = grid
    s = math.sqrt(max(fraction, 0.0))
    return t, max(m, round(h * s / m) * m), max(m, round(w * s / m) * m)


def resize_items(pixels: torch.Tensor, grids: list, fractions: list, vision_config, mode: str = "bicubic"):
    """Every item of one modality resized: returns (new flat patches, new grids)."""
    ps, tps, m = vision_config.patch_size, vision_config.temporal_patch_size, vision_config.spatial_merge_size
    c = pixels.shape[1] // (tps * ps * ps)
    out, new_grids, start = [], [], 0
    for grid, f in zip(grids, fractions):
        n = grid[0] * grid[1] * grid[2]
        flat = pixels[start : start + n]
        start += n
        new = target_grid(grid, f, m)
        if new == tuple(grid):
            out.append(flat)
        else:
            frames = unpatchify(flat.float(), grid, c, tps, ps, m)
            frames = torch.nn.functional.interpolate(frames, size=(new[1] * ps, new[2] * ps), mode=mode,
                                                     antialias=mode in ("bilinear", "bicubic"), align_corners=False)
            out.append(patchify(frames, tps, ps, m).to(pixels.dtype))
        new_grids.append(new)
    return torch.cat(out) if out else pixels, new_grids
