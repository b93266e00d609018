"""Count the operations that make a GPU wait for the host: the audit behind issue 19's sync-free engine.

On a GPU every one of these stalls the launch queue until the device catches up (measured on an H200: a
pruned llava-1.5-7b prefill made 28 ``cudaStreamSynchronize``, and was slower than unpruned at batch 1).
They are visible on a CPU too, which is how the test suite proves a path is sync-free without a GPU:

- data-dependent aten ops, seen by a ``TorchDispatchMode``: ``nonzero`` (and ``argwhere``),
  ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``, ``if t:``), ``masked_select``,
  ``unique*``, boolean-mask ``index`` / ``index_put_`` (``x[mask]``, ``x[mask] = v``), ``repeat_interleave``
  with tensor repeats (its output size is data), and ``_to_copy`` / ``copy_`` from a device to the CPU;
- host transfers the dispatcher does not see on a CPU-only machine: ``Tensor.tolist``, ``Tensor.cpu``,
  ``Tensor.numpy`` and ``Tensor.to("cpu")`` are counted by patching those methods for the duration.

A wrapped model's own cost is ``wrapped - unwrapped`` on the same inputs (transformers itself syncs, e.g.
Qwen's placeholder check): :func:`added_syncs` does that subtraction.

Example:
    >>> import torch
    >>> with SyncRecorder() as rec:
    ...     x = torch.arange(5)
    ...     _ = x[x > 2]
    ...     _ = x.sum().item()
    ...     _ = x.tolist()
    >>> sorted(rec.counts.items())
    [('_local_scalar_dense', 1), ('index[bool]', 1), ('tolist', 1)]
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {
    "nonzero": "nonzero",
    "argwhere": "nonzero",
    "_local_scalar_dense": "_local_scalar_dense",
    "masked_select": "masked_select",
    "unique": "unique",
    "_unique": "unique",
    "_unique2": "unique",
    "unique_consecutive": "unique",
    "unique_dim": "unique",
}
_HOST_METHODS = ("tolist", "cpu", "numpy")


_HOST = threading.local()


def compiling() -> bool:
    """True while ``torch.compile`` / ``torch.export`` trace a wrapped forward (issue 20). Host-only
    bookkeeping (the engine's thread lock, wall-clock timers, sync counting) is skipped there: dynamo cannot
    trace it (each would be a graph break), and a compiled graph would not run it again anyway."""
    return torch.compiler.is_compiling()


def clock() -> float:
    """``time.perf_counter()`` in eager mode; 0.0 while tracing (a compiled stage records no seconds)."""
    return 0.0 if compiling() else time.perf_counter()


@contextlib.contextmanager
def real_tensors():
    """Real tensors inside: host metadata (a data-free policy's layout plan) while ``torch.export`` traces
    with fake tensors, where a ``.tolist()`` of them would be a data-dependent guard. The result is a constant
    of the exported program, as ``assume_constant_result`` makes it one of a compiled graph."""
    if not torch.compiler.is_exporting():
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


@torch.compiler.disable
def host_list(t: torch.Tensor) -> list:
    """``t.tolist()`` for a policy's documented once-per-stage read: under ``torch.compile`` one graph break
    (dynamo breaks at every element of a bare ``tolist``: 15 breaks for DART on a tiny LLaVA, measured)."""
    return t.tolist()


@contextlib.contextmanager
def host_side():
    """Mark work on host copies (layout metadata already read, plans of data-free policies): ops inside
    touch no device data, so the recorder does not count them. The read that made the host copy is
    counted where it happens."""
    if compiling():
        yield
        return
    depth = getattr(_HOST, "depth", 0)
    _HOST.depth = depth + 1
    try:
        yield
    finally:
        _HOST.depth = depth


def _is_bool_index(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


class SyncRecorder(TorchDispatchMode):
    """Context manager: ``counts`` (a ``Counter`` of op name -> calls) of what would sync on a GPU.

    ``stacks=True`` also keeps, per op, the innermost ``mmprune`` source lines that led to it (where to look).
    """

    def __init__(self, stacks: bool = False):
        super().__init__()
        self.counts: Counter = Counter()
        self.where: dict = {}
        self.stacks = stacks
        self._saved: list = []
        self._busy = False

    def _hit(self, name: str) -> None:
        if getattr(_HOST, "depth", 0):
            return
        self.counts[name] += 1
        if self.stacks:
            import traceback

            frames = [f for f in traceback.extract_stack()[:-2] if "/mmprune/" in f.filename
                      and not f.filename.endswith("syncs.py")]
            if frames:
                f = frames[-1]
                key = f"{f.filename.rsplit('/mmprune/', 1)[-1]}:{f.lineno}"
                self.where.setdefault(name, Counter())[key] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _DATA_DEPENDENT:
            self._hit(_DATA_DEPENDENT[name])
        elif name in ("index", "_index_put_impl_", "index_put_", "index_put") and len(args) > 1 and _is_bool_index(args[1]):
            self._hit(f"{name.strip('_').replace('_impl', '')}[bool]")
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and (
            len(args) == 1 or isinstance(args[1], torch.Tensor)
        ):
            self._hit("repeat_interleave")
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self._hit("to_cpu")
        return func(*args, **kwargs)

    def _patch(self) -> None:
        rec = self

        def counting(method, name):
            def wrapper(t, *a, **k):
                if not rec._busy:
                    rec._hit(name)
                rec._busy = True  # a counted method calling another (numpy -> cpu) counts once
                try:
                    return method(t, *a, **k)
                finally:
                    rec._busy = False

            return wrapper

        for name in _HOST_METHODS:
            old = getattr(torch.Tensor, name)
            self._saved.append((name, old))
            setattr(torch.Tensor, name, counting(old, name))
        old_to = torch.Tensor.to
        self._saved.append(("to", old_to))

        def to(t, *a, **k):
            target = k.get("device", a[0] if a else None)
            if not rec._busy and (target == "cpu" or (isinstance(target, torch.device) and target.type == "cpu"
                                                     and t.device.type != "cpu")):
                rec._hit("to_cpu")
            return old_to(t, *a, **k)

        torch.Tensor.to = to

    def __enter__(self):
        self._patch()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, old in reversed(self._saved):
                setattr(torch.Tensor, name, old)
            self._saved.clear()


def count_syncs(fn, stacks: bool = False) -> SyncRecorder:
    """Run ``fn()`` under a :class:`SyncRecorder`; returns the recorder (``.counts``, ``.where``)."""
    rec = SyncRecorder(stacks=stacks)
    with rec:
        fn()
    return rec


def added_syncs(wrapped: Counter, unwrapped: Counter) -> Counter:
    """What the wrap added: per op, ``wrapped - unwrapped`` (only the positive part; ``Counter`` subtraction)."""
    return Counter(wrapped) - Counter(unwrapped)
