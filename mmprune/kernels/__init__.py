"""Token gather / scatter / merge: one dispatcher over a torch reference and Triton kernels.

Every op takes ``impl="auto" | "torch" | "triton"``: ``auto`` picks Triton for CUDA tensors when Triton
is importable and torch otherwise. ``"triton"`` on a CPU tensor runs Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment (that is how CI tests the kernels without a GPU). Triton is
imported only on the Triton path, never by ``import mmprune.kernels``.

Index conventions: ``index [B, K]`` integer, ``-1`` = empty slot (ragged batches); values outside
``[-1, N)`` raise ValueError. That check reads two numbers back to the host, a device sync that cost
0.08-0.15 ms per call on the H100 VM here (more than the kernel below ~100 MB moved): inside
``index_checks(False)`` out-of-range values are instead treated as ``-1`` on the device, with no sync.
All ops support autograd on both paths.

Example:
    >>> import torch
    >>> from mmprune.kernels import gather_tokens
    >>> gather_tokens(torch.ones(2, 5, 3), torch.tensor([[0, 4], [1, -1]])).shape
    torch.Size([2, 2, 3])
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence

import torch

from .reference import (
    _as_list,
    check_index,
    compact_kv_torch,
    gather_tokens_multi_torch,
    gather_tokens_torch,
    merge_tokens_torch,
    scatter_tokens_torch,
)

__all__ = [
    "gather_tokens",
    "scatter_tokens",
    "merge_tokens",
    "gather_tokens_multi",
    "compact_kv",
    "check_index",
    "index_checks",
    "set_index_checks",
    "triton_available",
]

_IMPLS = ("auto", "torch", "triton")
_TRITON: bool | None = None
_CHECKS = [True]


def set_index_checks(enabled: bool) -> bool:
    """Turn the host-side index range check on (default) or off, process-wide; returns the old setting.

    Off: no device sync per call, and out-of-range indices act as ``-1`` (empty slot / dropped row)
    instead of raising. Memory stays safe either way.
    """
    old = _CHECKS[0]
    _CHECKS[0] = bool(enabled)
    return old


@contextlib.contextmanager
def index_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of ``set_index_checks``.

    Example:
        >>> with index_checks(False):
        ...     gather_tokens(torch.ones(1, 2, 1), torch.tensor([[1, 7]])).flatten().tolist()
        [1.0, 0.0]
    """
    old = set_index_checks(enabled)
    try:
        yield
    finally:
        set_index_checks(old)


def _checked(index: torch.Tensor, n: int, name: str, check: bool | None = None) -> torch.Tensor:
    """Range-check ``index`` (sync, raise) or, with checks off, map out-of-range values to -1 (no sync).

    ``check=None`` follows the process-wide setting; the engine passes ``False`` for indices it built itself
    (valid by construction), so its hot path never syncs whatever the user's setting."""
    if _CHECKS[0] if check is None else check:
        check_index(index, n, name)
        return index.long()
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor; got {index.dtype}")
    index = index.long()
    return torch.where((index >= 0) & (index < n), index, -1)


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def _resolve(impl: str, t: torch.Tensor) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")
    if impl == "auto":
        return "triton" if t.device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package, which is not importable here; use impl='torch'")
        if t.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                raise ValueError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (Triton's interpreter); "
                                 "use impl='torch' or a CUDA tensor")
        elif t.device.type != "cuda":
            raise ValueError(f"impl='triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1); got {t.device}")
    return impl


def _index(index: torch.Tensor, ref: torch.Tensor, n: int, name: str = "index", check: bool | None = None) -> torch.Tensor:
    if index.dim() != 2 or index.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} must be [B, K] with B = {ref.shape[0]}; got shape {tuple(index.shape)}")
    if index.device != ref.device:
        raise ValueError(f"{name} is on {index.device}, the data on {ref.device}")
    return _checked(index, n, name, check)


def _rank3(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, D]; got shape {tuple(x.shape)}")


def gather_tokens(x: torch.Tensor, index: torch.Tensor, impl: str = "auto", check: bool | None = None) -> torch.Tensor:
    """``[B, N, D]`` x ``[B, K]`` -> ``[B, K, D]``; index ``-1`` gives a zero row. ``check``: range-check
    the index (a host sync); None follows ``set_index_checks``.

    Example:
        >>> gather_tokens(torch.arange(6.).view(1, 3, 2), torch.tensor([[2, -1]])).tolist()
        [[[4.0, 5.0], [0.0, 0.0]]]
    """
    _rank3(x, "x")
    index = _index(index, x, x.shape[1], check=check)
    if _resolve(impl, x) == "triton":
        from . import triton_backend

        return triton_backend.gather(x, index)
    return gather_tokens_torch(x, index)


def scatter_tokens(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, impl: str = "auto",
                   check: bool | None = None) -> torch.Tensor:
    """Out-of-place ``dst[b, index[b, k]] = src[b, k]``; index ``-1`` is ignored; ``check`` as ``gather_tokens``.

    Duplicate indices in one row are undefined (either source row may land; on CPU the last one does).

    Example:
        >>> scatter_tokens(torch.zeros(1, 3, 1), torch.tensor([[2, -1]]), torch.ones(1, 2, 1)).flatten().tolist()
        [0.0, 0.0, 1.0]
    """
    _rank3(dst, "dst")
    _rank3(src, "src")
    index = _index(index, dst, dst.shape[1], check=check)
    if src.shape[:2] != index.shape or src.shape[2] != dst.shape[2] or src.device != dst.device:
        raise ValueError(f"src must be [B, K, D] = {(*index.shape, dst.shape[2])} on {dst.device}; "
                         f"got {tuple(src.shape)} on {src.device}")
    if _resolve(impl, dst) == "triton":
        from . import triton_backend

        return triton_backend.scatter(dst, index, src)
    return scatter_tokens_torch(dst, index, src)


def merge_tokens(
    x: torch.Tensor, assign: torch.Tensor, num_out: int, weight: torch.Tensor | None = None, impl: str = "auto",
    check: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean per group; returns ``(out [B, num_out, D], total [B, num_out])``.

    ``assign [B, N]`` maps each row to a group in ``[0, num_out)`` or ``-1`` (dropped); ``weight [B, N]``
    (default ones) weights the mean and sums into ``total`` (fp32), the group sizes for size-weighted
    merging and proportional attention. Empty groups give zero rows and total 0.

    Example:
        >>> out, total = merge_tokens(torch.tensor([[[1.], [3.], [9.]]]), torch.tensor([[0, 0, -1]]), 1)
        >>> out.flatten().tolist(), total.tolist()
        ([2.0], [[2.0]])
    """
    _rank3(x, "x")
    if assign.shape != x.shape[:2]:
        raise ValueError(f"assign must be [B, N] = {tuple(x.shape[:2])}; got {tuple(assign.shape)}")
    assign = _index(assign, x, num_out, "assign", check=check)
    if weight is not None and (weight.shape != assign.shape or weight.device != x.device):
        raise ValueError(f"weight must be [B, N] = {tuple(assign.shape)} on {x.device}; got {tuple(weight.shape)}")
    if _resolve(impl, x) == "triton":
        from . import triton_backend

        return triton_backend.merge(x, assign, num_out, weight)
    return merge_tokens_torch(x, assign, num_out, weight)


def gather_tokens_multi(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor,
    dim: int | Sequence[int] = 1,
    batch_dim: int | Sequence[int] = 0,
    impl: str = "auto",
) -> list[torch.Tensor]:
    """Gather several tensors with one ``index [B, K]`` along their token ``dim``: one launch on Triton.

    For the hidden states, cos, sin and position ids of a pruning stage. ``dim`` / ``batch_dim`` (int or
    one per tensor) name each tensor's token dim and the dim matching the index's batch; dtypes and
    layouts may differ. Up to four tensors share a launch.

    Example:
        >>> h, cos, pos = torch.randn(2, 6, 8), torch.randn(2, 6, 4), torch.arange(6).expand(3, 2, 6)
        >>> idx = torch.tensor([[5, 0, 2], [1, 3, -1]])
        >>> out = gather_tokens_multi([h, cos, pos], idx, dim=[1, 1, 2], batch_dim=[0, 0, 1])
        >>> [tuple(o.shape) for o in out]
        [(2, 3, 8), (2, 3, 4), (3, 2, 3)]
    """
    tensors = list(tensors)
    if not tensors:
        return []
    dims = _as_list(dim, len(tensors), "dim")
    bdims = _as_list(batch_dim, len(tensors), "batch_dim")
    if index.dim() != 2:
        raise ValueError(f"index must be [B, K]; got shape {tuple(index.shape)}")
    for t, d, bd in zip(tensors, dims, bdims):
        if t.device != tensors[0].device:
            raise ValueError(f"all tensors must share one device; got {t.device} and {tensors[0].device}")
        if not -t.dim() <= d < t.dim() or not -t.dim() <= bd < t.dim():
            raise ValueError(f"dim {d} / batch_dim {bd} out of range for shape {tuple(t.shape)}")
        # token_layout raises for batch mismatch; token counts must agree for one index.
    ns = {t.shape[d] for t, d in zip(tensors, dims)}
    if len(ns) != 1:
        raise ValueError(f"all tensors must have the same token count along dim; got {sorted(ns)}")
    ref = tensors[0]
    if index.device != ref.device:
        raise ValueError(f"index is on {index.device}, the data on {ref.device}")
    index = _checked(index, ns.pop(), "index")
    if _resolve(impl, ref) == "triton":
        from . import triton_backend

        return triton_backend.gather_multi(tensors, index, [d % t.dim() for t, d in zip(tensors, dims)],
                                           [bd % t.dim() for t, bd in zip(tensors, bdims)])
    return gather_tokens_multi_torch(tensors, index, dims, bdims)


def compact_kv(caches: Sequence[torch.Tensor], index: torch.Tensor, dim: int = 2, impl: str = "auto") -> list[torch.Tensor]:
    """Keep tokens ``index [B, K]`` of every K / V cache ``[B, H, L, hd]``: one launch on Triton.

    All caches of one dtype and layout (a model's pruned layers, K and V) are compacted by a single
    kernel launch; the outputs are slices of one new buffer. ``-1`` gives zero rows.

    Example:
        >>> ks = [torch.randn(1, 2, 7, 4) for _ in range(4)]
        >>> out = compact_kv(ks, torch.tensor([[6, 0, 3]]))
        >>> len(out), tuple(out[0].shape), torch.equal(out[2][0, :, 1], ks[2][0, :, 0])
        (4, (1, 2, 3, 4), True)
    """
    caches = list(caches)
    if not caches:
        return []
    ref = caches[0]
    length = ref.shape[dim]
    # get_device() (an int) rather than .device: this loop runs over every layer's K and V.
    if len({t.get_device() for t in caches}) > 1 or any(t.dim() < 3 or t.shape[dim] != length for t in caches):
        raise ValueError("caches must share one device and their length along dim, each at least [B, H, L]; "
                         f"got shapes {sorted({tuple(t.shape) for t in caches})}")
    if index.dim() != 2 or index.device != ref.device:
        raise ValueError(f"index must be [B, K] on {ref.device}; got {tuple(index.shape)} on {index.device}")
    index = _checked(index, length, "index")
    if _resolve(impl, ref) == "triton":
        from . import triton_backend

        return triton_backend.compact_kv(caches, index, dim % ref.dim())
    return compact_kv_torch(caches, index, dim)
