"""Adapter registry: ``adapter_for(model)`` picks the family from ``config.model_type`` (lazy imports).

Example:
    >>> from mmprune.adapters import supported_families
    >>> "qwen2_vl" in supported_families()
    True
"""

from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError

# model_type -> "module:Class"
_ADAPTERS = {
    "llava": "llava:LlavaAdapter",
    "llava_next": "llava:LlavaNextAdapter",
    "llava_onevision": "llava:LlavaOnevisionAdapter",
    "qwen2_vl": "qwen:QwenVLAdapter",
    "qwen2_5_vl": "qwen:Qwen25VLAdapter",
    "qwen3_vl": "qwen:Qwen3VLAdapter",
}


def supported_families() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model):
    """The adapter instance for ``model``; UnsupportedModelError naming the supported families otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base = model.model if hasattr(model, "lm_head") else model  # a *ForConditionalGeneration, or the bare base
    if model_type not in _ADAPTERS or not hasattr(getattr(base, "language_model", None), "layers"):
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); mmprune supports the "
            f"*ForConditionalGeneration and base *Model classes of: {', '.join(supported_families())}"
        )
    mod, cls = _ADAPTERS[model_type].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)(model)
