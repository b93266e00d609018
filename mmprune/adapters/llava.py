"""LLaVA-1.5, LLaVA-NeXT (anyres tiles + image_newline) and LLaVA-OneVision (images and video).

All three place one contiguous run of placeholder tokens per image (NeXT/OneVision: base tile, sub-tiles
and newline tokens together), and ``get_image_features`` returns one ``[N_i, D]`` tensor per image, which
is where per-image token counts come from.
"""

from __future__ import annotations

import math

from .base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)

    def grid_of(self, modality, n, i, args, kwargs):
        side = math.isqrt(n)
        return (1, side, side) if side * side == n else None


class LlavaNextAdapter(LlavaAdapter):
    """Anyres: the token count depends on the image size; tiles and newlines make no single grid."""

    family = "llava_next"
    model_types = ("llava_next",)

    def grid_of(self, modality, n, i, args, kwargs):
        return None


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
        return [(int(f.shape[0]), None) for f in feats]
