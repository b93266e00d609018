"""Torch reference implementations of the token gather / scatter / merge ops.

These are the semantics every Triton kernel in this package must reproduce exactly (gathers, scatters)
or within a dtype tolerance (weighted means). They run on any device and support autograd; on CPU
they are also the production path (``impl="auto"`` picks them there).

Conventions: ``index`` is ``[B, K]`` int64 with ``-1`` marking an empty slot (ragged batches are
padded with ``-1``); ``x`` is ``[B, N, D]``.

Example:
    >>> import torch
    >>> x = torch.arange(12.).view(1, 4, 3)
    >>> gather_tokens_torch(x, torch.tensor([[2, -1]]))
    tensor([[[6., 7., 8.],
             [0., 0., 0.]]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_index(index: torch.Tensor, n: int, name: str = "index") -> None:
    """Raise a one-line ValueError if ``index`` holds values outside ``[-1, n)``.

    One ``aminmax`` and one host read: on CUDA that is a single device sync, not two.

    Example:
        >>> check_index(torch.tensor([[0, -1]]), 1)
        >>> check_index(torch.tensor([[0, 3]]), 3)
        Traceback (most recent call last):
        ...
        ValueError: index values must lie in [-1, 3) (-1 = empty slot); got min 0, max 3
    """
    if index.numel() == 0:
        return
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor; got {index.dtype}")
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(index)).tolist())
    if lo < -1 or hi >= n:
        raise ValueError(f"{name} values must lie in [-1, {n}) (-1 = empty slot); got min {lo}, max {hi}")


def gather_tokens_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, index[b, k]]``, zeros where ``index == -1``.

    Example:
        >>> gather_tokens_torch(torch.ones(1, 3, 2), torch.tensor([[1, -1]])).sum().item()
        2.0
    """
    valid = index >= 0
    safe = index.clamp(min=0)
    out = torch.gather(x, 1, safe.unsqueeze(-1).expand(*safe.shape, x.shape[-1]))
    # where, not a multiply by the mask: a NaN/inf in row 0 must not leak into the empty slots. Always,
    # never behind an ``if valid.all()``: that test is a host sync on a GPU (the GPU-native issue).
    return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def scatter_tokens_torch(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out of place: a copy of ``dst`` with ``out[b, index[b, k]] = src[b, k]``; ``-1`` slots ignored.

    Duplicate indices in one row are undefined (here: the last write wins on CPU).

    Example:
        >>> scatter_tokens_torch(torch.zeros(1, 3, 1), torch.tensor([[2, -1]]), torch.ones(1, 2, 1)).flatten()
        tensor([0., 0., 1.])
    """
    b, n, d = dst.shape
    # -1 slots write into one spare row past the end, cut off afterwards: no nonzero / boolean indexing
    # (host syncs on a GPU).
    out = torch.cat([dst, dst.new_zeros(b, 1, d)], dim=1)
    slot = torch.where(index >= 0, index, n)
    out = out.scatter(1, slot.unsqueeze(-1).expand(*slot.shape, d), src.to(out.dtype))
    return out[:, :n]


def merge_acc_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """fp32, or fp64 when ``x`` or ``weight`` is fp64: the dtype of merge sums and totals."""
    wide = x.dtype == torch.float64 or (weight is not None and weight.dtype == torch.float64)
    return torch.float64 if wide else torch.float32


def merge_tokens_torch(
    x: torch.Tensor, assign: torch.Tensor, num_out: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``x`` rows per group ``assign[b, n]`` in ``[0, num_out)`` (``-1`` = dropped).

    Returns ``(out [B, num_out, D], total [B, num_out])`` where ``total`` is the summed weight of each
    group (the token "size" ToMe uses for size-weighted merging and proportional attention). Empty groups
    give zeros. Accumulation and ``total`` are fp32 whatever the input dtype (fp64 if x or weight is fp64,
    so that gradcheck works).

    Example:
        >>> out, total = merge_tokens_torch(torch.tensor([[[1.], [3.], [9.]]]), torch.tensor([[0, 0, -1]]), 1)
        >>> out.flatten().tolist(), total.tolist()
        ([2.0], [[2.0]])
    """
    b, n, d = x.shape
    acc_dtype = merge_acc_dtype(x, weight)
    w = torch.ones(b, n, device=x.device, dtype=acc_dtype) if weight is None else weight.to(acc_dtype)
    valid = assign >= 0
    w = w * valid
    safe = assign.clamp(min=0)
    acc = torch.zeros(b, num_out, d, device=x.device, dtype=acc_dtype)
    acc = acc.scatter_add(1, safe.unsqueeze(-1).expand(b, n, d), x.to(acc_dtype) * w.unsqueeze(-1))
    total = torch.zeros(b, num_out, device=x.device, dtype=acc_dtype).scatter_add(1, safe, w)
    out = acc / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return out.to(x.dtype), total


def _as_list(v: int | Sequence[int], count: int, name: str) -> list[int]:
    if isinstance(v, int):
        return [v] * count
    v = list(v)
    if len(v) != count:
        raise ValueError(f"{name} must be an int or one int per tensor ({count}); got {len(v)}")
    return v


def token_layout(t: torch.Tensor, dim: int, batch_dim: int, batch: int) -> tuple[int, int, int, int, int]:
    """Split ``t``'s shape into ``(A, B, C, N, R)``: before batch, batch, between, tokens, after.

    Every multi-tensor gather views a tensor as ``[A, B, C, N, R]`` and gathers along ``N`` with index row
    ``b``. Raises a one-line ValueError if the dims are inconsistent.

    Example:
        >>> token_layout(torch.empty(3, 2, 7), dim=2, batch_dim=1, batch=2)  # Qwen2-VL mrope position ids
        (3, 2, 1, 7, 1)
    """
    nd = t.dim()
    dim, batch_dim = dim % nd if nd else dim, batch_dim % nd if nd else batch_dim
    if not 0 <= batch_dim < dim < nd:
        raise ValueError(f"need batch_dim < dim < ndim; got batch_dim={batch_dim}, dim={dim} for shape {tuple(t.shape)}")
    if t.shape[batch_dim] != batch:
        raise ValueError(f"tensor of shape {tuple(t.shape)} has {t.shape[batch_dim]} rows on batch_dim "
                         f"{batch_dim}, index has {batch} (expand broadcast batches first)")
    s = t.shape
    return (
        int(torch.Size(s[:batch_dim]).numel()),
        batch,
        int(torch.Size(s[batch_dim + 1 : dim]).numel()),
        int(s[dim]),
        int(torch.Size(s[dim + 1 :]).numel()),
    )


def _gather_nd_torch(t: torch.Tensor, index: torch.Tensor, dim: int, batch_dim: int) -> torch.Tensor:
    a, b, c, n, r = token_layout(t, dim, batch_dim, index.shape[0])
    k = index.shape[1]
    v = t.reshape(a, b, c, n, r)
    safe = index.clamp(min=0).view(1, b, 1, k, 1).expand(a, b, c, k, r)
    out = torch.gather(v, 3, safe)
    valid = (index >= 0).view(1, b, 1, k, 1)
    out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
    shape = list(t.shape)
    shape[dim % t.dim()] = k
    return out.reshape(shape)


def gather_tokens_multi_torch(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor,
    dim: int | Sequence[int] = 1,
    batch_dim: int | Sequence[int] = 0,
) -> list[torch.Tensor]:
    """Gather each tensor along its token ``dim`` with one ``index [B, K]`` (``-1`` = zero slot).

    ``batch_dim`` names the dim that matches the index's rows (e.g. 1 for Qwen2-VL's ``[3, B, N]``
    position ids). Both may be per-tensor lists.

    Example:
        >>> h, pos = torch.randn(2, 5, 4), torch.arange(5).expand(3, 2, 5)
        >>> out = gather_tokens_multi_torch([h, pos], torch.tensor([[4, 0], [1, -1]]), dim=[1, 2], batch_dim=[0, 1])
        >>> [tuple(o.shape) for o in out], out[1][0].tolist()
        ([(2, 2, 4), (3, 2, 2)], [[4, 0], [1, 0]])
    """
    dims = _as_list(dim, len(tensors), "dim")
    bdims = _as_list(batch_dim, len(tensors), "batch_dim")
    return [_gather_nd_torch(t, index, d, bd) for t, d, bd in zip(tensors, dims, bdims)]


def compact_kv_torch(caches: Sequence[torch.Tensor], index: torch.Tensor, dim: int = 2) -> list[torch.Tensor]:
    """Keep tokens ``index [B, K]`` of each K or V cache ``[B, H, L, hd]`` (token ``dim``, batch dim 0).

    Example:
        >>> k = torch.randn(1, 2, 6, 4)
        >>> compact_kv_torch([k, k], torch.tensor([[5, 1]]))[0].shape
        torch.Size([1, 2, 2, 4])
    """
    return [_gather_nd_torch(t, index, dim, 0) for t in caches]
