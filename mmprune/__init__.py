"""mmprune: merge, prune and pre-fuse visual tokens in Hugging Face vision-language models.

Nothing heavy is imported here: torch and transformers load on first use of an API function.

Example:
    >>> import mmprune
    >>> "fastv" in mmprune.policies()
    True
"""

from __future__ import annotations

from .config import PruneConfig
from .errors import UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "wrap",
    "unwrap",
    "disabled",
    "trace",
    "save_config",
    "policies",
    "PruneConfig",
    "UnsupportedModelError",
    "Trace",
    "StageTrace",
]


# ``mmprune.policies`` is the registry subpackage, and calling it lists the names: ``mmprune.policies()``.
from . import policies  # noqa: E402  (light: no torch import)


def __getattr__(name):
    if name in ("wrap", "unwrap", "disabled", "trace", "is_wrapped", "save_config"):
        from . import api

        return getattr(api, name)
    if name in ("Trace", "StageTrace"):
        from . import traces as _t

        return getattr(_t, name)
    raise AttributeError(f"module 'mmprune' has no attribute {name!r}")
