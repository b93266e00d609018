"""The built-in test-bed: generated image/video QA and the small VLMs trained on it.

* :mod:`mmprune.testbed.shapes` -- ``shapes``, image QA about small shapes on cluttered backgrounds.
* :mod:`mmprune.testbed.motion` -- ``motion``, video QA about moving / appearing / changing shapes (mp4).
* :mod:`mmprune.testbed.vocab` -- the word-level tokenizer, the llava and Qwen2-VL processors (with a
  torchvision-free Qwen2-VL video processor) and the tiny model configs.

Importing this package is cheap: nothing below is imported until used (torch and transformers only by
``vocab``).

Example:
    >>> from mmprune import testbed
    >>> item = testbed.make_shapes("test", 1)[0]
    >>> item.kind, item.answer in testbed.shapes.ANSWERS[item.kind]
    ('colour', True)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Item": "shapes",
    "make_shapes": "shapes",
    "render_shapes_item": "shapes",
    "contact_sheet": "shapes",
    "make_motion": "motion",
    "render_motion_clip": "motion",
    "build_tokenizer": "vocab",
    "build_llava_processor": "vocab",
    "build_qwen2vl_processor": "vocab",
    "build_testbed_model": "vocab",
    "load_processor": "vocab",
    "qwen2vl_video_inputs": "vocab",
}
_SUBMODULES = ("shapes", "motion", "vocab")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
