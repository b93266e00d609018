"""LLaVA-NeXT anyres inputs re-tiled for a smaller image: ``downsample``'s path for LLaVA-NeXT.

The processor turns an image of size ``(h, w)`` into a base tile (the whole image squashed to the tower's side
``S``) and the tiles of a canvas: ``select_best_resolution`` picks a grid pinpoint ``(H, W)``, the image is resized
to fit it (aspect kept, ``get_patch_output_size``), padded centred with 0 before normalisation and cut into
``S x S`` tiles in row-major order; the model unpads the tiles' features by ``image_sizes`` and adds a newline
token per row. A smaller image picks a smaller pinpoint, so fewer tiles reach the tower. Here that is done on the
processor's output: the old canvas is stitched back from its tiles, its content (without padding) resized to the
content size the smaller image would get, padded and cut again; the base tile is kept (it shows the whole image at
``S`` either way). Token counts come from transformers' own ``select_best_resolution`` and ``unpad_image``, so
they are the model's. (transformers ``models/llava_next/image_processing_llava_next.py``, v5.24.)

Example:
    >>> from transformers import LlavaNextConfig
    >>> cfg = LlavaNextConfig()  # llava-v1.6: 336 px tiles of 24 x 24 tokens
    >>> anyres_tokens(cfg, (672, 672)), anyres_tokens(cfg, (336, 336))  # 2x2 tiles; 1x2, unpadded to one
    (2928, 1176)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# transformers' OPENAI_CLIP_MEAN / STD: what LLaVA-NeXT's processors normalise with, for the padding's value
# when the original canvas had no padding to read it from
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _best(cfg, size) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(tuple(size), cfg.image_grid_pinpoints))


def _side(cfg) -> tuple[int, int]:
    """(tile side in pixels, tokens per tile side)."""
    s = cfg.vision_config.image_size
    return s, s // cfg.vision_config.patch_size


def anyres_tokens(cfg, size) -> int:
    """Visual tokens the model makes of one image of ``size = (h, w)``: base tile + unpadded tile grid + a newline
    per row (``pack_image_features``)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    s, p = _side(cfg)
    bh, bw = _best(cfg, size)
    grid = unpad_image(torch.empty(1, bh // s * p, bw // s * p, device="meta"), list(size))
    return p * p + grid.shape[1] * (grid.shape[2] + 1)


def tile_count(cfg, size) -> int:
    """Tiles the processor makes of an image of ``size``, the base tile included."""
    s, _ = _side(cfg)
    bh, bw = _best(cfg, size)
    return 1 + (bh // s) * (bw // s)


def smaller_size(cfg, size, target: float) -> tuple[int, int]:
    """The image size, aspect kept, whose token count is the largest not above ``target`` (the original when none
    is smaller; the fewest tokens the pinpoints allow when ``target`` is below them). Each pinpoint is tried at the
    scale that makes the image just fit it."""
    h, w = size
    best_size, best_n = tuple(size), anyres_tokens(cfg, size)
    if best_n <= target:
        return best_size
    options = []
    for ph, pw in cfg.image_grid_pinpoints:
        s = min(1.0, ph / h, pw / w)
        cand = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
        options.append((anyres_tokens(cfg, cand), cand))
    fits = [o for o in options if o[0] <= target]
    n, cand = max(fits) if fits else min(options)
    return cand if n < best_n else best_size


def _content(size, canvas) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the resized image inside a canvas (``get_patch_output_size`` and the centred
    padding of ``_pad_for_patching``)."""
    h, w = size
    ch, cw = canvas
    if cw / w < ch / h:
        nw, nh = cw, min(math.ceil(h * cw / w), ch)
    else:
        nh, nw = ch, min(math.ceil(w * ch / h), cw)
    return (ch - nh) // 2, (cw - nw) // 2, nh, nw


def retile(cfg, tiles: torch.Tensor, size, new_size, mode: str = "bicubic") -> torch.Tensor:
    """One image's processor output ``tiles [1 + n, C, S, S]`` (base first) for ``size`` -> the tiles a
    ``new_size`` image would give, ``[1 + n', C, S, S]``, the base tile kept."""
    s, _ = _side(cfg)
    bh, bw = _best(cfg, size)
    gh, gw = bh // s, bw // s
    c = tiles.shape[1]
    canvas = tiles[1 : 1 + gh * gw].reshape(gh, gw, c, s, s).permute(2, 0, 3, 1, 4).reshape(c, bh, bw)
    top, left, nh, nw = _content(size, (bh, bw))
    if nh < bh or nw < bw:  # the processor's padding, read where there is some: the bottom-right pixel is padding
        pad = canvas[:, -1, -1]  # (the centred padding puts the odd row / column at the bottom / right)
    else:
        mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        pad = ((0 - mean) / std).to(tiles)
    nbh, nbw = _best(cfg, new_size)
    ntop, nleft, nnh, nnw = _content(new_size, (nbh, nbw))
    content = canvas[:, top : top + nh, left : left + nw].float()[None]
    content = F.interpolate(content, size=(nnh, nnw), mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None,
                            antialias=mode in ("bilinear", "bicubic"))[0].to(tiles.dtype)
    new_canvas = pad.view(c, 1, 1).expand(c, nbh, nbw).clone()
    new_canvas[:, ntop : ntop + nnh, nleft : nleft + nnw] = content
    ngh, ngw = nbh // s, nbw // s
    new_tiles = new_canvas.reshape(c, ngh, s, ngw, s).permute(1, 3, 0, 2, 4).reshape(ngh * ngw, c, s, s)
    return torch.cat([tiles[:1], new_tiles])
