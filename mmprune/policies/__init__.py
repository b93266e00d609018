"""Policy registry with lazy imports: ``get_policy(name)`` and ``policies()``.

Example:
    >>> from mmprune.policies import policies, get_policy
    >>> "fastv" in policies()
    True
    >>> get_policy("uniform").name
    'uniform'
"""

from __future__ import annotations

import importlib
import sys
import types

# name -> "module:Class"; modules are imported only when a policy is used.
_REGISTRY: dict[str, str] = {
    "none": "basic:NoPrune",
    "uniform": "basic:Uniform",
    "random": "basic:Random",
    "fastv": "fastv:FastV",
    # pre-LLM / vision encoder
    "tome": "merging:ToMe",
    "visionzip": "merging:VisionZip",
    "prumerge+": "merging:PruMergePlus",
    "pool": "merging:Pool",
    "temporal": "merging:Temporal",
    "divprune": "diversity:DivPrune",
    "cdpruner": "diversity:CDPruner",
    "dart": "diversity:DART",
    "cls_tail": "relevance:ClsTail",
    "simignore": "relevance:SimIgnore",
    # in-LLM
    "vtw": "inllm:VTW",
    "pyramiddrop": "inllm:PyramidDrop",
    "sparsevlm": "inllm:SparseVLM",
    "atp": "inllm:ATP",
    # multi-stage / pre-fusion
    "aim": "multistage:AIM",
    "todre": "multistage:ToDRE",
    "prefusion": "multistage:PreFusion",
    # before the vision tower
    "downsample": "downsample:Downsample",
}


def register_policy(name: str, target: str | type) -> None:
    """Register a policy class (or a lazy ``"package.module:Class"`` path) under ``name``."""
    _REGISTRY[name] = target


def policies() -> list[str]:
    """Sorted names of all registered policies."""
    return sorted(_REGISTRY)


def get_policy(name: str):
    """The policy class registered as ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(policies())}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        mod, cls = target.split(":")
        module = importlib.import_module(mod if "." in mod else f"{__name__}.{mod}")
        target = getattr(module, cls)
        _REGISTRY[name] = target
    return target


class _CallableModule(types.ModuleType):
    """Lets ``mmprune.policies()`` list the names while ``mmprune.policies`` stays this subpackage."""

    def __call__(self) -> list[str]:
        return policies()


sys.modules[__name__].__class__ = _CallableModule
