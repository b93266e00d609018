"""State kept *beside* objects mmprune does not own (a user's KV cache, an encoder output), never on them.

transformers' caches and model outputs belong to the caller: writing attributes onto them leaks mmprune's
bookkeeping into objects users compare, copy and serialise. A ``Beside`` table maps an object's identity
to the state, through a weak reference whose callback drops the entry when the object dies, so nothing is
kept alive and a new object that reuses the address never sees the old state.

Example:
    >>> class Cache: pass
    >>> table, cache = Beside(), Cache()
    >>> table.put(cache, "pruned prompt"), table.get(cache), table.get(Cache())
    (True, 'pruned prompt', None)
    >>> del cache; len(table)
    0
"""

from __future__ import annotations

import weakref
from typing import Any


class Beside:
    """``id(obj) -> (weakref(obj), value)``; ``put`` on an object that cannot be weakly referenced (a
    tuple) keeps nothing and returns False."""

    def __init__(self) -> None:
        self._d: dict[int, tuple[weakref.ref, Any]] = {}

    def put(self, obj, value) -> bool:
        key = id(obj)
        table = self._d
        try:
            ref = weakref.ref(obj, lambda _, key=key: table.pop(key, None))
        except TypeError:
            return False
        table[key] = (ref, value)
        return True

    def get(self, obj, default=None):
        entry = self._d.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else default

    def __len__(self) -> int:
        return len(self._d)
