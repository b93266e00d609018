"""Published VLM architectures as transformers configs (random init, no weights), optionally shrunk.

Every number below is copied from the model's ``config.json`` as published on the Hugging Face Hub (the
source is named above each entry); what a config.json leaves out is the transformers default for that
class, which is what loading the checkpoint gives too. ``shrink=S`` divides widths and depths by ``S`` so
the same *shapes* (visual-token counts, prompt layout, GQA ratio, head size, M-RoPE sections) run on a
CPU:

- attention heads ``H -> max(1, round(H / S))``; ``head_dim`` stays as published (M-RoPE sections and
  rotary sizes depend on it), so ``hidden = heads * head_dim`` (LLaVA-7B: 4096 -> 512 at S=8; Qwen2-VL-7B:
  3584 -> 512, the nearest whole head to 448);
- KV heads ``-> max(1, round(KV / S))``, lowered to a divisor of the query heads;
- MLP widths ``-> round(I / S)``; decoder depth ``-> max(3, ceil(L / S))`` (3 so FastV's default layer
  2 still has a layer to prune); vision depth ``-> ceil(D / S)`` with family minimums (CLIP reads layer
  -2; Qwen3-VL keeps its three deepstack levels distinct);
- Qwen2.5-VL's full-attention vision blocks keep their 1-in-8 ratio (at least the last block);
  Qwen3-VL's deepstack indexes are rescaled to the new depth.

Vocabulary sizes and placeholder token ids stay as published.

Example:
    >>> from mmprune.bench.archs import ARCHS, build_config
    >>> cfg = build_config("llava-1.5-7b", shrink=8)
    >>> cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.vision_config.hidden_size
    (512, 4, 128)
    >>> "qwen3-vl-8b" in ARCHS
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Arch:
    """One published architecture: family, config values and the input defaults its processor uses."""

    name: str
    family: str  # transformers model_type
    source: str  # Hub repo whose config.json the numbers come from
    text: dict
    vision: dict
    top: dict = field(default_factory=dict)
    image_size: int = 336  # default --image-size (pixels, square)
    video_frames: int = 0  # default --frames when the family takes video (0 = images only)
    video_size: int = 336  # frame side for --frames


_VICUNA_7B = dict(  # lmsys/vicuna-7b-v1.5 = LlamaConfig defaults + these (text_config of both LLaVA repos)
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    vocab_size=32064,
)
_CLIP_L_336 = dict(  # openai/clip-vit-large-patch14-336, vision_config of both LLaVA repos
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
)
_QWEN2_7B = dict(  # Qwen2-7B text stack (Qwen2-VL-7B, Qwen2.5-VL-7B, LLaVA-OneVision-7B)
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
)
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645)
_OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]  # 36 grids, 384..2304

ARCHS: dict[str, Arch] = {
    # https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json
    "llava-1.5-7b": Arch(
        "llava-1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf",
        text=_VICUNA_7B, vision=_CLIP_L_336,
        top=dict(image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu",
                 vision_feature_layer=-2, vision_feature_select_strategy="default"),
        image_size=336,
    ),
    # https://huggingface.co/llava-hf/llava-v1.6-vicuna-7b-hf/blob/main/config.json
    "llava-next-7b": Arch(
        "llava-next-7b", "llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf",
        text={**_VICUNA_7B, "pad_token_id": 0}, vision=_CLIP_L_336,
        top=dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
                 vision_feature_select_strategy="default", use_image_newline_parameter=True,
                 image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        image_size=672,  # -> best fit 672x672: base + 4 tiles, 2928 visual tokens (the paper's "up to 2880" + newlines)
    ),
    # https://huggingface.co/llava-hf/llava-onevision-qwen2-7b-ov-hf/blob/main/config.json
    # (SigLIP-so400m with its last layer removed: 26 layers; feature layer -1; anyres_max_9 over 36 grids)
    "llava-onevision-7b": Arch(
        "llava-onevision-7b", "llava_onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        text=dict(model_type="qwen2", **_QWEN2_7B, vocab_size=152128, rope_theta=1000000.0),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                    vision_use_head=False),
        top=dict(image_token_index=151646, video_token_index=151647, projector_hidden_act="gelu",
                 vision_feature_layer=-1, vision_feature_select_strategy="full",
                 vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=_OV_PINPOINTS),
        image_size=384, video_frames=8, video_size=384,
    ),
    # https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json
    "qwen2-vl-2b": Arch(
        "qwen2-vl-2b", "qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct",
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, vocab_size=151936,
                  tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3),
        top=dict(_QWEN_IDS, tie_word_embeddings=True),
        image_size=672, video_frames=8, video_size=336,
    ),
    # https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
    "qwen2-vl-7b": Arch(
        "qwen2-vl-7b", "qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct",
        text=dict(**_QWEN2_7B, vocab_size=152064,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3),
        top=dict(_QWEN_IDS),
        image_size=672, video_frames=8, video_size=336,
    ),
    # https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
    "qwen2.5-vl-7b": Arch(
        "qwen2.5-vl-7b", "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct",
        text=dict(**_QWEN2_7B, vocab_size=152064,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3),
        top=dict(_QWEN_IDS),
        image_size=672, video_frames=8, video_size=336,
    ),
    # https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json
    "qwen3-vl-8b": Arch(
        "qwen3-vl-8b", "qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct",
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=262144,
                  vocab_size=151936,
                  rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                                   "rope_theta": 5000000.0}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], in_channels=3),
        top=dict(_QWEN_IDS),
        image_size=768, video_frames=8, video_size=384,  # 768 px / 32-px units -> 24x24 = 576 tokens
    ),
}


def arch_names() -> list[str]:
    return list(ARCHS)


def get_arch(name: str) -> Arch:
    """The Arch called ``name``; ValueError naming the accepted ones otherwise."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; accepted: {', '.join(ARCHS)}")
    return ARCHS[name]


# --------------------------------------------------------------------------------------------- shrink


def _heads(h: int, s: int) -> int:
    return max(1, int(math.floor(h / s + 0.5)))


def _kv_heads(kv: int, heads: int, s: int) -> int:
    k = min(heads, _heads(kv, s))
    while heads % k:
        k -= 1
    return k


def _width(x: int, s: int) -> int:
    return max(1, int(math.floor(x / s + 0.5)))


def _shrink_text(t: dict, s: int) -> dict:
    t = dict(t)
    if s == 1:
        return t
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    heads = _heads(t["num_attention_heads"], s)
    t["num_key_value_heads"] = _kv_heads(t.get("num_key_value_heads", t["num_attention_heads"]), heads, s)
    t["num_attention_heads"] = heads
    t["hidden_size"] = heads * head_dim
    if "head_dim" in t:
        t["head_dim"] = head_dim
    t["intermediate_size"] = _width(t["intermediate_size"], s)
    t["num_hidden_layers"] = max(3, math.ceil(t["num_hidden_layers"] / s))
    return t


def _shrink_vision(family: str, v: dict, s: int) -> dict:
    v = dict(v)
    if s == 1:
        return v
    if family in ("llava", "llava_next", "llava_onevision"):
        hd = v["hidden_size"] // v["num_attention_heads"]
        v["num_attention_heads"] = _heads(v["num_attention_heads"], s)
        v["hidden_size"] = v["num_attention_heads"] * hd
        v["intermediate_size"] = _width(v["intermediate_size"], s)
        v["num_hidden_layers"] = max(2, math.ceil(v["num_hidden_layers"] / s))
        return v
    width_key = "embed_dim" if family == "qwen2_vl" else "hidden_size"
    hd = v[width_key] // v["num_heads"]
    v["num_heads"] = _heads(v["num_heads"], s)
    v[width_key] = v["num_heads"] * hd
    if "intermediate_size" in v:
        v["intermediate_size"] = _width(v["intermediate_size"], s)
    depth0 = v["depth"]
    ds = v.get("deepstack_visual_indexes")
    v["depth"] = max(len(ds) + 1 if ds else 1, math.ceil(depth0 / s))
    if ds:  # rescale and keep distinct, last level strictly inside the tower
        new = []
        for i in ds:
            j = min(v["depth"] - 1, (i * v["depth"]) // depth0)
            while j in new:
                j += 1
            new.append(min(j, v["depth"] - 1))
        v["deepstack_visual_indexes"] = sorted(set(new))
    fa = v.get("fullatt_block_indexes")
    if fa:  # keep the 1-in-(depth/len) ratio, anchored on the last block
        n_full = max(1, round(len(fa) * v["depth"] / depth0))
        step = max(1, v["depth"] // n_full)
        v["fullatt_block_indexes"] = sorted(v["depth"] - 1 - k * step for k in range(n_full))
    return v


# --------------------------------------------------------------------------------------------- build


def build_config(name: str, shrink: int = 1, attn: str = "sdpa"):
    """The transformers config of ``name`` with widths and depths divided by ``shrink``.

    Example:
        >>> build_config("qwen2-vl-7b", shrink=8).text_config.num_key_value_heads
        1
    """
    import transformers

    if isinstance(shrink, bool) or not isinstance(shrink, int) or shrink < 1:
        raise ValueError(f"shrink must be an int >= 1 (1 = the published size); got {shrink!r}")
    arch = get_arch(name)
    text = _shrink_text(arch.text, shrink)
    vision = _shrink_vision(arch.family, arch.vision, shrink)
    top = dict(arch.top)
    if arch.family in ("llava", "llava_next", "llava_onevision"):
        text_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[text.pop("model_type")]
        vis_cls = {"clip_vision_model": transformers.CLIPVisionConfig,
                   "siglip_vision_model": transformers.SiglipVisionConfig}[vision.pop("model_type")]
        cls = {"llava": transformers.LlavaConfig, "llava_next": transformers.LlavaNextConfig,
               "llava_onevision": transformers.LlavaOnevisionConfig}[arch.family]
        cfg = cls(text_config=text_cls(**text), vision_config=vis_cls(**vision), **top)
    else:
        cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
               "qwen3_vl": transformers.Qwen3VLConfig}[arch.family]
        vision = dict(vision)
        if arch.family == "qwen2_vl":
            vision["hidden_size"] = text["hidden_size"]  # the merger projects to the LLM width
        else:
            vision["out_hidden_size"] = text["hidden_size"]
        ids = {k: top.pop(k) for k in list(top) if k.endswith("token_id")}
        text.update({k: ids[k] for k in ("bos_token_id", "eos_token_id")})
        cfg = cls(text_config=text, vision_config=vision, **ids, **top)
    cfg._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = attn
    cfg._mmprune_arch = name
    return cfg


def build_model(name: str, shrink: int = 1, dtype=None, device="cpu", attn: str = "sdpa", seed: int = 0):
    """A random-init ``*ForConditionalGeneration`` of ``name`` (eval mode) on ``device``.

    Initialised directly on the device in ``dtype``, so a full-size 7B model takes seconds on a GPU.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = build_config(name, shrink, attn)
    torch.manual_seed(seed)
    dtype = dtype or torch.float32
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()
