"""Evaluation: benchmark tasks, metrics, video reading and the output store behind ``mmprune eval``.

Importing this package is cheap (no torch, no pyarrow): names are resolved from the submodules on
first use.

Example:
    >>> from mmprune.eval import get_task, list_tasks
    >>> get_task("pope").metric
    'f1'
    >>> len(list_tasks()) >= 10
    True
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tasks": (
        "TASKS", "Sample", "Task", "TaskError", "TaskSpec", "get_task", "list_tasks", "register_task",
        "task_names",
    ),
    "store": (
        "SampleLog", "StoreError", "load_results", "make_record", "merge_shards", "read_jsonl", "run_key",
        "shard", "split_records", "write_report", "write_results",
    ),
    "video": ("VideoReadError", "read_frames", "read_video"),
}  # fmt: skip
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["metrics", "store", "tasks", "video"]


def __getattr__(name: str) -> Any:
    if name in ("metrics", "store", "tasks", "video"):
        return importlib.import_module(f"{__name__}.{name}")
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
