"""Tokenizer, processors and tiny model configs of the test-bed models.

Everything here turns generated items into the inputs of *real* transformers classes, saved with
``save_pretrained`` so they load like a hub checkpoint:

* :func:`build_tokenizer` -- a word-level ``tokenizers`` tokenizer over the closed vocabulary of the
  ``shapes`` and ``motion`` questions (plus common prompt words), wrapped as ``PreTrainedTokenizerFast``
  with a chat template. Text is lower-cased; punctuation is split off.
* :func:`build_llava_processor` -- ``LlavaProcessor`` + the PIL ``CLIPImageProcessor``.
* :func:`build_qwen2vl_processor` -- ``Qwen2VLProcessor`` + the PIL ``Qwen2VLImageProcessor`` + a video
  processor. transformers' own ``Qwen2VLVideoProcessor`` needs torchvision, which cannot be installed
  here; :class:`Qwen2VLVideoProcessorNoTV` reproduces it in plain torch (:func:`qwen2vl_video_inputs`),
  saves the same ``video_preprocessor_config.json``, and :func:`load_processor` puts it in place when
  ``AutoProcessor`` cannot load a Qwen2-VL processor for want of torchvision.
* :func:`build_testbed_model` -- a randomly initialised ``LlavaForConditionalGeneration`` (CLIP tower
  with [CLS], Llama text model) or ``Qwen2VLForConditionalGeneration`` (2x2 merger, M-RoPE), about
  4 M parameters (16 MB in float32 safetensors).

Example:
    >>> import tempfile
    >>> from mmprune.testbed.vocab import build_llava_processor, build_testbed_model
    >>> proc = build_llava_processor(tempfile.mkdtemp())
    >>> model = build_testbed_model("llava", proc.tokenizer)
    >>> type(model).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHAT_TEMPLATES",
    "SPECIAL_TOKENS",
    "Qwen2VLVideoProcessorNoTV",
    "build_llava_processor",
    "build_qwen2vl_processor",
    "build_testbed_model",
    "build_tokenizer",
    "count_parameters",
    "load_processor",
    "qwen2vl_video_inputs",
    "vocabulary",
]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE = "<image>"
VISION_START, IMAGE_PAD, VIDEO_PAD, VISION_END = (
    "<|vision_start|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_end|>",
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Fixed order: the first ids never move, whatever words are added later.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, VISION_START, IMAGE_PAD, VIDEO_PAD, VISION_END, IM_START, IM_END)

# Words an eval prompt or a chat template may add around a test-bed question.
_PROMPT_WORDS = """
user assistant system you are a helpful answer the question using single word or phrase with one only
short yes no number letter of and in this image video picture frame please briefly what which is color colour
""".split()
_PUNCTUATION = list("?.,:;!'\"()-")

CHAT_TEMPLATES = {
    # llava-1.5 style: "USER: <image>\n{question} ASSISTANT: {answer}</s>"
    "llava": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %} "
        "{% elif message['role'] == 'user' %}USER: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %} "
        "{% else %}ASSISTANT: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    # Qwen2-VL's template without the default system prompt (it would only cost tokens here).
    "qwen2vl": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def vocabulary() -> list[str]:
    """The tokenizer's words in id order after :data:`SPECIAL_TOKENS`: every question/answer word, sorted.

    Example:
        >>> v = vocabulary(); "circles" in v and "appears" in v and "?" in v
        True
    """
    from . import motion, shapes

    words = shapes.question_words() | motion.question_words() | set(_PROMPT_WORDS) | set(_PUNCTUATION)
    words |= {str(d) for d in range(10)}
    return sorted(w.lower() for w in words)


def build_tokenizer(style: str = "qwen2vl", save_dir: str | os.PathLike | None = None):
    """A word-level ``PreTrainedTokenizerFast`` with the chat template and eos of ``style``.

    Both styles share one vocabulary (same ids); they differ in eos (``</s>`` for llava,
    ``<|im_end|>`` for qwen2vl, as in the real models) and the chat template. Padding is on the left,
    as batched generation needs.

    Example:
        >>> tok = build_tokenizer("llava")
        >>> tok.decode(tok("What colour is the star?")["input_ids"])
        'what colour is the star ?'
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if style not in CHAT_TEMPLATES:
        raise ValueError(f"style must be one of {sorted(CHAT_TEMPLATES)}, got {style!r}")
    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    # Whitespace splits on \w+|[^\w\s]+: "circle?" -> "circle", "?"; newlines in templates vanish.
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS if style == "llava" else IM_END,
        unk_token=UNK,
        padding_side="left",
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATES[style]
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


# ----------------------------------------------------------------------------------------------------
# Processors


def build_llava_processor(save_dir: str | os.PathLike, image_size: int = 224, patch_size: int = 16):
    """Build, save and reload (``AutoProcessor``) the llava test-bed processor.

    The image processor is the PIL ``CLIPImageProcessor`` (resize shortest edge + centre crop to
    ``image_size``, CLIP mean/std); the processor expands ``<image>`` to
    ``(image_size // patch_size) ** 2`` tokens (the [CLS] token is dropped by the "default" strategy).

    Example:
        >>> import tempfile
        >>> p = build_llava_processor(tempfile.mkdtemp(), image_size=112)
        >>> p.patch_size, type(p).__name__
        (16, 'LlavaProcessor')
    """
    from transformers import AutoProcessor, LlavaProcessor

    image_processor = _pil_image_processor(
        "CLIPImageProcessor",
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    tokenizer = build_tokenizer("llava")
    proc = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP [CLS] token
        chat_template=CHAT_TEMPLATES["llava"],
    )
    proc.save_pretrained(save_dir)
    return AutoProcessor.from_pretrained(save_dir)


def _pil_image_processor(name: str, **kwargs):
    """The PIL backend of an image processor, whether or not torchvision is installed."""
    import transformers

    cls = getattr(transformers, name + "Pil", None)
    if cls is None:  # pragma: no cover - older transformers without the Pil-suffixed classes
        cls = getattr(transformers, name)
    return cls(**kwargs)


def build_qwen2vl_processor(
    save_dir: str | os.PathLike,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 256,
):
    """Build, save and reload (:func:`load_processor`) the Qwen2-VL test-bed processor.

    ``min_pixels``/``max_pixels`` bound both images and video frames, so 224 px images (64 tokens) and
    112 px frames (16 tokens per 2 frames) go through unresized; the stock video default
    (``min_pixels = 128 * 28 * 28``) would upscale 112 px frames to 336 px.

    The saved folder is a standard Qwen2-VL processor: where torchvision exists, ``AutoProcessor``
    loads it with transformers' own ``Qwen2VLVideoProcessor``.

    Example:
        >>> import tempfile
        >>> p = build_qwen2vl_processor(tempfile.mkdtemp())
        >>> type(p).__name__, p.video_processor.merge_size
        ('Qwen2VLProcessor', 2)
    """
    image_processor = _pil_image_processor(
        "Qwen2VLImageProcessor", min_pixels=min_pixels, max_pixels=max_pixels
    )
    video_processor = Qwen2VLVideoProcessorNoTV(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = _make_processor(
        "Qwen2VLProcessor",
        image_processor=image_processor,
        tokenizer=build_tokenizer("qwen2vl"),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATES["qwen2vl"],
    )
    proc.save_pretrained(save_dir)
    return load_processor(save_dir)


def _make_processor(class_name: str, **parts):
    """Instantiate a transformers processor class, accepting a video processor that is not torchvision-based.

    Without torchvision, ``ProcessorMixin``'s type check of the ``video_processor`` argument cannot
    even look its base class up (transformers 5.23), so it is bypassed for that one argument.
    """
    import transformers
    from transformers.processing_utils import ProcessorMixin

    cls = getattr(transformers, class_name)
    try:
        return cls(**parts)
    except (AttributeError, ValueError, TypeError, ImportError):
        if not isinstance(parts.get("video_processor"), Qwen2VLVideoProcessorNoTV):
            raise
    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, Qwen2VLVideoProcessorNoTV):
            return type(argument)
        return original(self, argument_name, argument)

    cls.check_argument_for_proper_class = check  # on the subclass only, removed right after
    try:
        return cls(**parts)
    finally:
        del cls.check_argument_for_proper_class


# transformers' processors whose video processor is Qwen2VLVideoProcessor and need no extra video inputs.
_QWEN2VL_PROCESSORS = ("Qwen2VLProcessor",)


def load_processor(path: str | os.PathLike):
    """``AutoProcessor.from_pretrained(path)``, or, for Qwen2-VL without torchvision, the same processor
    with :class:`Qwen2VLVideoProcessorNoTV` as its video processor.

    transformers 5.23 cannot load *any* Qwen2-VL processor without torchvision (its video processor
    requires it); the eval's model loading should go through this function for that reason.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); _ = build_qwen2vl_processor(d)
        >>> type(load_processor(d)).__name__
        'Qwen2VLProcessor'
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        folder = Path(path)
        config = _read_json(folder / "processor_config.json")
        processor_class = config.get("processor_class")
        if processor_class not in _QWEN2VL_PROCESSORS or not folder.is_dir():
            raise
    # transformers 5 nests sub-processor configs in processor_config.json; older saves use their own file.
    video_config = dict(
        config.get("video_processor") or _read_json(folder / "video_preprocessor_config.json")
    )
    video_config.pop("video_processor_type", None)
    video_config.pop("processor_class", None)
    chat_template = None
    if (folder / "chat_template.jinja").exists():
        chat_template = (folder / "chat_template.jinja").read_text()
    elif "chat_template" in config:
        chat_template = config["chat_template"]
    return _make_processor(
        processor_class,
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        video_processor=Qwen2VLVideoProcessorNoTV(**video_config),
        chat_template=chat_template,
    )


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------
# Qwen2-VL video patchification without torchvision

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' ``qwen2_vl`` ``smart_resize``, copied: sides multiples of ``factor``, pixels in bounds."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _video_settings(processor_or_config: Any) -> dict[str, Any]:
    """Patchification settings from a processor, a (video/image) processor, or a plain dict."""
    src = processor_or_config
    if src is None:
        src = {}
    if hasattr(src, "video_processor") and getattr(src, "video_processor", None) is not None:
        src = src.video_processor
    elif hasattr(src, "image_processor"):
        src = src.image_processor
    get = (
        (lambda k, d=None: src.get(k, d)) if isinstance(src, dict) else (lambda k, d=None: getattr(src, k, d))
    )
    size = get("size") or {}
    size = dict(size) if not isinstance(size, dict) else size
    min_pixels = get("min_pixels") or size.get("shortest_edge") or 56 * 56
    max_pixels = get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    return {
        "patch_size": int(get("patch_size", 14) or 14),
        "temporal_patch_size": int(get("temporal_patch_size", 2) or 2),
        "merge_size": int(get("merge_size", 2) or 2),
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "image_mean": tuple(get("image_mean", OPENAI_CLIP_MEAN) or OPENAI_CLIP_MEAN),
        "image_std": tuple(get("image_std", OPENAI_CLIP_STD) or OPENAI_CLIP_STD),
        "rescale_factor": float(get("rescale_factor", 1 / 255) or 1 / 255),
        "do_resize": bool(get("do_resize", True) if get("do_resize", True) is not None else True),
        "do_rescale": bool(get("do_rescale", True) if get("do_rescale", True) is not None else True),
        "do_normalize": bool(get("do_normalize", True) if get("do_normalize", True) is not None else True),
    }


def _as_video_tensor(video: Any):
    """One video as a ``(T, C, H, W)`` uint8/float tensor from (T,H,W,C)/(T,C,H,W) arrays, tensors or PIL lists."""
    import torch

    if isinstance(video, (list, tuple)) and video and not isinstance(video[0], (int, float)):
        video = np.stack(
            [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in video]
        )
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor) or video.ndim != 4:
        raise ValueError(
            f"a video must be (T, H, W, C) or (T, C, H, W); got {type(video).__name__} {getattr(video, 'shape', '')}"
        )
    if video.shape[-1] in (1, 3) and video.shape[1] not in (1, 3):
        video = video.permute(0, 3, 1, 2)
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    return video.contiguous()


def _resize_like_torchvision(video, height: int, width: int):
    """Bicubic, antialiased resize of a (T, C, H, W) tensor, as ``torchvision.transforms.v2.functional.resize``.

    torchvision resizes uint8 on CPU with aten's native uint8 kernel (the one that matches PIL); elsewhere
    it resizes a float copy and clamps and rounds back. Same branches here, same kernels.
    """
    import torch

    if tuple(video.shape[-2:]) == (height, width):
        return video
    kw = {"size": (height, width), "mode": "bicubic", "align_corners": False, "antialias": True}
    if video.dtype == torch.uint8 and video.device.type == "cpu":
        return torch.nn.functional.interpolate(video, **kw)
    out = torch.nn.functional.interpolate(video.to(torch.float32), **kw)
    if video.dtype == torch.uint8:
        return out.clamp_(0, 255).round_().to(torch.uint8)
    return out.to(video.dtype)


def qwen2vl_video_inputs(frames: Any, processor_or_config: Any = None):
    """``(pixel_values_videos, video_grid_thw)`` for one video or a list of videos, as Qwen2VLVideoProcessor makes them.

    Same steps, in plain torch: ``smart_resize`` to multiples of ``patch_size * merge_size`` within
    ``[min_pixels, max_pixels]`` (bicubic, antialiased, as torchvision's tensor resize), fused
    rescale+normalise (CLIP mean/std), padding to a multiple of ``temporal_patch_size`` by repeating
    the last frame, and the ``(t, h/m, w/m, m, m, C, tp, p, p)`` patch order. Frames are used as given
    (no frame sampling; ``do_sample_frames`` is off by default in transformers too).

    ``frames``: a ``(T, H, W, 3)`` uint8 array or tensor, ``(T, 3, H, W)``, a list of PIL images, or a
    list of such videos. ``processor_or_config``: a Qwen2-VL processor, its video or image processor,
    or a dict (``patch_size``, ``temporal_patch_size``, ``merge_size``, ``min_pixels``, ``max_pixels``,
    ``image_mean``, ``image_std``); ``None`` means Qwen2-VL's defaults.

    Example:
        >>> pv, thw = qwen2vl_video_inputs(np.zeros((4, 56, 84, 3), np.uint8), {"min_pixels": 56 * 56})
        >>> tuple(pv.shape), thw.tolist()
        ((48, 1176), [[2, 4, 6]])
    """
    import torch

    cfg = _video_settings(processor_or_config)
    if isinstance(frames, (list, tuple)) and frames and _is_video(frames[0]):
        videos = [_as_video_tensor(v) for v in frames]
    else:
        videos = [_as_video_tensor(frames)]
    p, tp, m = cfg["patch_size"], cfg["temporal_patch_size"], cfg["merge_size"]
    mean = torch.tensor(cfg["image_mean"], dtype=torch.float32)
    std = torch.tensor(cfg["image_std"], dtype=torch.float32)
    if cfg["do_rescale"] and cfg["do_normalize"]:
        # transformers fuses the two: (x - mean / rf) / (std / rf), in float32
        mean, std = mean * (1.0 / cfg["rescale_factor"]), std * (1.0 / cfg["rescale_factor"])
    all_patches, grids = [], []
    for video in videos:
        if cfg["do_resize"]:
            h, w = smart_resize(
                video.shape[-2], video.shape[-1], p * m, cfg["min_pixels"], cfg["max_pixels"]
            )
            video = _resize_like_torchvision(video, h, w)
        x = video.to(torch.float32)
        if cfg["do_normalize"]:
            x = (x - mean[:, None, None]) / std[:, None, None]
        elif cfg["do_rescale"]:
            x = x * cfg["rescale_factor"]
        if pad := -x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        t, c, h, w = x.shape
        gt, gh, gw = t // tp, h // p, w // p
        patches = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        all_patches.append(patches.reshape(gt * gh * gw, c * tp * p * p))
        grids.append([gt, gh, gw])
    return torch.cat(all_patches, dim=0), torch.tensor(grids, dtype=torch.long)


def _is_video(x: Any) -> bool:
    """True for one video (4-D array/tensor or a list of PIL frames), false for a single frame."""
    if hasattr(x, "ndim"):
        return x.ndim == 4
    return isinstance(x, (list, tuple)) and bool(x) and hasattr(x[0], "convert")


def _video_processor_base():
    # transformers >= 5.2x splits a torchvision-free VideoProcessorMixin off BaseVideoProcessor; before
    # that, BaseVideoProcessor itself is the base (and instantiates without torchvision).
    try:
        from transformers.video_processing_utils import VideoProcessorMixin

        return VideoProcessorMixin
    except ImportError:  # pragma: no cover - depends on the transformers version
        from transformers.video_processing_utils import BaseVideoProcessor

        return BaseVideoProcessor


class Qwen2VLVideoProcessorNoTV(_video_processor_base()):
    """A torchvision-free stand-in for transformers' ``Qwen2VLVideoProcessor`` (same defaults, same output).

    Its saved config names ``Qwen2VLVideoProcessor``, so a folder saved with it loads with the real
    class wherever torchvision is installed. Inputs: a video or a list of videos as accepted by
    :func:`qwen2vl_video_inputs`.

    Example:
        >>> vp = Qwen2VLVideoProcessorNoTV(min_pixels=56 * 56)
        >>> out = vp(np.zeros((2, 56, 56, 3), np.uint8), return_tensors="pt")
        >>> out["video_grid_thw"].tolist()
        [[1, 4, 4]]
    """

    # The class attributes of transformers' Qwen2VLVideoProcessor (5.23).
    resample = 3  # PILImageResampling.BICUBIC
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    image_mean = list(OPENAI_CLIP_MEAN)
    image_std = list(OPENAI_CLIP_STD)
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    min_frames = 4
    max_frames = 768
    do_sample_frames = False
    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    _SETTINGS = (
        "resample", "image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize",
        "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames",
        "do_sample_frames",
    )  # fmt: skip

    def __init__(self, **kwargs):
        size = kwargs.pop("size", None)
        size = dict(self.size) if size is None else dict(size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
        # Instance attributes for every setting, so the saved config is complete like the real class's.
        for key in self._SETTINGS:
            kwargs.setdefault(key, getattr(type(self), key))
        super().__init__(size=size, **kwargs)

    def preprocess(self, videos, return_tensors=None, **kwargs):
        from transformers.image_processing_utils import BatchFeature

        if kwargs.get("do_sample_frames"):
            raise NotImplementedError(
                "frame sampling: pass the frames to use (the eval's reader samples them)"
            )
        settings = {k: getattr(self, k) for k in ("patch_size", "temporal_patch_size", "merge_size", "size")}
        settings.update({k: getattr(self, k) for k in ("image_mean", "image_std", "rescale_factor")})
        settings.update({k: getattr(self, k) for k in ("do_resize", "do_rescale", "do_normalize")})
        settings.update({k: v for k, v in kwargs.items() if v is not None and k in settings})
        pixel_values, grid = qwen2vl_video_inputs(videos, settings)
        return BatchFeature(
            {"pixel_values_videos": pixel_values, "video_grid_thw": grid}, tensor_type=return_tensors
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["video_processor_type"] = "Qwen2VLVideoProcessor"  # load as the real class where it can be
        return out


# ----------------------------------------------------------------------------------------------------
# Tiny models


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token!r} token")
    return int(tid)


def build_testbed_model(kind: str, tokenizer, seed: int = 0, **overrides):
    """A randomly initialised test-bed model (float32, in eval mode) of ``kind`` ``"llava"`` or ``"qwen2vl"``.

    Defaults (overridable by keyword, e.g. ``text_layers=2``): vision width 128, 4 layers, 4 heads;
    text width 256, 4 layers, 4 heads (2 KV heads), MLP 704.

    * llava: CLIP tower, 224 px / patch 16 with [CLS] (196 image tokens; the shipped testbed-llava
      overrides patch 28: 64 tokens, one per layout cell of ``shapes``), features from the last
      layer (``vision_feature_layer=-1``) with the "default" strategy. The [CLS] output then feeds
      nothing, so training must give it a loss of its own (e.g. predict the scene's objects from
      ``pooler_output``), or [CLS]-attention policies read an untrained query.
    * qwen2vl: patch 14, 2x2 merger, temporal patch 2, M-RoPE sections (8, 12, 12).

    Example:
        >>> m = build_testbed_model("qwen2vl", build_tokenizer("qwen2vl"), text_layers=1, vision_layers=1)
        >>> m.config.vision_config.spatial_merge_size
        2
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    o = {
        "vision_width": 128,
        "vision_layers": 4,
        "vision_heads": 4,
        "text_width": 256,
        "text_layers": 4,
        "text_heads": 4,
        "text_kv_heads": 2,
        "text_mlp": 704,
        "image_size": 224,
        "patch_size": 16,
        "max_positions": 2048,
        "vision_feature_layer": -1,
    }
    unknown = set(overrides) - set(o)
    if unknown:
        raise TypeError(f"unknown overrides {sorted(unknown)}; known: {sorted(o)}")
    o.update(overrides)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": o["text_width"],
        "intermediate_size": o["text_mlp"],
        "num_hidden_layers": o["text_layers"],
        "num_attention_heads": o["text_heads"],
        "num_key_value_heads": o["text_kv_heads"],
        "max_position_embeddings": o["max_positions"],
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        **ids,
    }
    torch.manual_seed(seed)
    if kind == "llava":
        vision = CLIPVisionConfig(
            hidden_size=o["vision_width"],
            intermediate_size=4 * o["vision_width"],
            num_hidden_layers=o["vision_layers"],
            num_attention_heads=o["vision_heads"],
            image_size=o["image_size"],
            patch_size=o["patch_size"],
            projection_dim=o["vision_width"],
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **text),
            image_token_index=_token_id(tokenizer, IMAGE),
            image_seq_length=(o["image_size"] // o["patch_size"]) ** 2,
            vision_feature_select_strategy="default",
            # The last layer by default: a tiny tower cannot spare one (llava-1.5 uses -2; adapters read
            # this). Its [CLS] query only learns something if training gives [CLS] a loss of its own.
            vision_feature_layer=o["vision_feature_layer"],
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
            **ids,
        )
        model = LlavaForConditionalGeneration(config)
    elif kind == "qwen2vl":
        head_dim = o["text_width"] // o["text_heads"]
        half = head_dim // 2  # M-RoPE sections (t, h, w) split the rotary half-dimension
        sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        config = Qwen2VLConfig(
            vision_config={
                "depth": o["vision_layers"],
                "embed_dim": o["vision_width"],
                "num_heads": o["vision_heads"],
                "mlp_ratio": 4,
                "hidden_size": o["text_width"],
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            text_config={
                **text,
                "rope_parameters": {"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0},
            },
            image_token_id=_token_id(tokenizer, IMAGE_PAD),
            video_token_id=_token_id(tokenizer, VIDEO_PAD),
            vision_start_token_id=_token_id(tokenizer, VISION_START),
            vision_end_token_id=_token_id(tokenizer, VISION_END),
            tie_word_embeddings=False,
        )
        model = Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(f"kind must be 'llava' or 'qwen2vl', got {kind!r}")
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        ids["pad_token_id"],
        ids["bos_token_id"],
        ids["eos_token_id"],
    )
    gen.do_sample = False
    gen.max_new_tokens = 4  # every answer is one word
    return model.eval()


def count_parameters(model) -> dict[str, int]:
    """Parameters per part (vision tower, projector/merger, language model) and in total.

    Example:
        >>> m = build_testbed_model("llava", build_tokenizer("llava"), text_layers=1, vision_layers=1)
        >>> c = count_parameters(m); c["total"] == c["vision"] + c["projector"] + c["language"]
        True
    """
    parts = {"vision": 0, "projector": 0, "language": 0}
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name or "visual.merger" in name:
            parts["projector"] += p.numel()
        elif "vision_tower" in name or "visual." in name:
            parts["vision"] += p.numel()
        else:
            parts["language"] += p.numel()
    parts["total"] = sum(parts.values())
    return parts
