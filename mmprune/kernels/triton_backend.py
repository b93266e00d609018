"""Launchers and autograd for the Triton kernels in ``triton_ops.py``.

Imported only from the Triton path of the dispatcher in ``__init__.py``, never at ``import mmprune``
time. Public entry points mirror the dispatcher: ``gather``, ``scatter``, ``merge``, ``gather_multi``,
``compact_kv``; each checks nothing (the dispatcher validated shapes and index ranges) and goes through
a ``torch.autograd.Function`` only when a gradient is needed.

Example (interpreted on CPU):
    >>> import os, torch
    >>> os.environ["TRITON_INTERPRET"] = "1"
    >>> from mmprune.kernels import triton_backend as tb
    >>> tb.gather(torch.arange(6.).view(1, 3, 2), torch.tensor([[2, -1]])).tolist()
    [[[4.0, 5.0], [0.0, 0.0]]]
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

import torch

from .reference import merge_acc_dtype, token_layout

# Tile size of one program, in bytes, and warps per program. Swept on the H100 at B8 N2880 D4096 bf16
# (benchmarks/bench_kernels.py --sweep): gather and scatter moved within 3% of each other from 4 to 32 KB
# and at 4 or 8 warps (2420-2630 GB/s); the merge kernel needs 16 KB at 4 warps (1558 GB/s, against
# 258 GB/s with 4 KB tiles and 798 GB/s with 16 KB at 8 warps). See NOTES.md beside this file.
TILE_BYTES = 16384
NUM_WARPS = 4
# Cap on rows per merge iteration (group members loaded together).
MAX_CHUNK = 8
# Scatter copies dst and writes src rows over it when src is smaller than this (launch-bound sizes);
# above it, one pass through the inverse index.
# Measured on the H100 (bf16, D 4096): copy + write won below 34 MB of src traffic, the inverse index above
# 94 MB (B8 N2880: 0.147 vs 0.166 ms), and they tied at 34 MB.
SCATTER_CLONE_BELOW = 48 << 20

_TINY = torch.finfo(torch.float32).tiny
_MODULES: dict[bool, ModuleType] = {}
_LOCK = threading.Lock()


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels(interpret: bool) -> ModuleType:
    """The kernel module compiled for the GPU (``interpret=False``) or run by Triton's interpreter.

    ``triton.jit`` picks interpreter or compiler when it decorates, so ``triton_ops.py`` is executed
    once per mode under its own module name: an interpreted CPU test and a compiled GPU run can share
    one process without one mode leaking into the other.
    """
    mod = _MODULES.get(interpret)
    if mod is not None:
        return mod
    with _LOCK:
        if interpret in _MODULES:
            return _MODULES[interpret]
        import triton

        name = f"{__package__}._triton_ops_{'interp' if interpret else 'jit'}"
        path = os.path.join(os.path.dirname(__file__), "triton_ops.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
        saved_env = os.environ.get("TRITON_INTERPRET")
        saved_knob = knobs.__dict__.get("interpret", _MISSING) if knobs is not None else _MISSING
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        if knobs is not None:
            knobs.__dict__["interpret"] = interpret  # an explicit knob would beat the env var
        try:
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        finally:
            if saved_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved_env
            if knobs is not None:
                if saved_knob is _MISSING:
                    knobs.__dict__.pop("interpret", None)
                else:
                    knobs.__dict__["interpret"] = saved_knob
        _MODULES[interpret] = mod
        return mod


_MISSING = object()


def _mode(t: torch.Tensor) -> bool:
    """True when ``t``'s kernels must run interpreted (CPU tensors, or TRITON_INTERPRET=1)."""
    return t.device.type != "cuda" or _env_interpret()


def _on(t: torch.Tensor):
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile(r: int, itemsize: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)``: a power-of-two tile of about ``TILE_BYTES`` over rows of ``r`` elements.

    Example:
        >>> tile(4096, 2), tile(257, 4), tile(1, 8)
        ((2, 4096), (8, 512), (2048, 1))
    """
    elems = 1 << (max(1, TILE_BYTES // itemsize).bit_length() - 1)  # a power of two
    block = min(_pow2(max(r, 1)), elems)
    return elems // block, block


def _num_warps(rows: int, block: int, itemsize: int) -> int:
    # One warp per 2 KB of tile (four 16-byte vectors per thread), between 1 and NUM_WARPS.
    return max(1, min(NUM_WARPS, rows * block * itemsize // 2048))


# ----------------------------------------------------------------------------------------------- rows


def _rows(
    index: torch.Tensor,
    k: int,
    d: int,
    out_dtype: torch.dtype,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``rows_kernel``: ``out[b, j] = index[b, j] >= 0 ? x[b, index] * scale : y[b, j]``.

    With ``into`` (a ``[B, N, D]`` contiguous tensor) it scatters instead: ``into[b, index[b, j]] = x[b, j]``.
    """
    ref = x if x is not None else y
    b = index.shape[0]
    out = into if into is not None else torch.empty(b, k, d, dtype=out_dtype, device=ref.device)
    if b * k * d == 0:
        return out
    mod = kernels(_mode(ref))
    rows, block = tile(d, max(ref.element_size(), out.element_size()))
    xs = x.stride() if x is not None else (0, 0, 0)
    ys = y.stride() if y is not None else (0, 0, 0)
    ss = scale.stride() if scale is not None else (0, 0)
    grid = (triton_cdiv(b * k, rows), triton_cdiv(d, block))
    with _on(ref):
        mod.rows_kernel[grid](
            x if x is not None else out, y if y is not None else out, index,
            scale if scale is not None else out, out,
            b * k, k, d, out.shape[1],
            *xs, *ys, *index.stride(), *ss,
            HAS_X=x is not None, HAS_Y=y is not None, HAS_SCALE=scale is not None, SCATTER=into is not None,
            ROWS=rows, BLOCK_D=block, num_warps=_num_warps(rows, block, out.element_size()),
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _inverse(index: torch.Tensor, n: int) -> torch.Tensor:
    """``inv[b, j] = k`` where ``index[b, k] == j`` (largest k on duplicates: last write wins), else -1.

    Two launches (a fill and ``invert_kernel``); the torch form (full, arange, where, scatter_reduce) took
    0.0245 ms at B8 N2880 K720 on the H100, most of it launch gaps.
    """
    b, k = index.shape
    inv = torch.full((b, n), -1, dtype=torch.int32, device=index.device)
    if b * k:
        block = 1024
        with _on(index):
            kernels(_mode(index)).invert_kernel[(triton_cdiv(b * k, block),)](
                index, inv, b * k, k, n, *index.stride(), BLOCK=block, num_warps=4)
    return inv


@functools.lru_cache(maxsize=64)
def _bounds(b: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached key bases ``(b * (m + 1) + 1) * n + j`` ``[b, n]`` and group boundaries ``[b * (m + 1)]``."""
    rows = torch.arange(b, dtype=dtype, device=device).view(b, 1) * ((m + 1) * n)
    base = rows + n + torch.arange(n, dtype=dtype, device=device)
    bounds = (rows + torch.arange(1, m + 2, dtype=dtype, device=device) * n).reshape(-1)
    return base, bounds


def _segments(assign: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted composite keys of ``assign [B, N]`` and the start of each group ``[B * (M + 1)]``.

    Keys ``(b * (M + 1) + assign + 1) * N + n`` are unique, so an unstable sort orders by batch, then
    group, then n (sums are deterministic). The first version (a stable per-row sort of the int64
    assignment plus searchsorted) took 0.055 ms at B8 N2880 on the H100, a third of the merge; int32 keys
    where they fit halve the radix passes.
    """
    b, n = assign.shape
    dtype = torch.int32 if b * (m + 1) * n < 2**31 else torch.int64
    base, bounds = _bounds(b, m, n, dtype, assign.device)
    keys = torch.add(base, assign.to(dtype), alpha=n)
    # Row b's keys all lie in [b (M + 1) N, (b + 1)(M + 1) N), so rows sorted one by one are sorted flat.
    # Measured at B8 N2880 (int32 keys): per-row sort 0.029 ms, flat sort 0.0515 ms; torch sorts rows of
    # up to 4096 in place, longer ones with a segmented radix sort, where one flat sort is used instead.
    keys = torch.sort(keys, dim=1)[0].view(-1) if n <= 4096 else torch.sort(keys.view(-1))[0]
    # starts[b * (M + 1) + m] = first key of group m of batch b; its end is the next entry (for m = M - 1,
    # the first key of batch b + 1, whose dropped rows sort before its group 0).
    return keys, torch.searchsorted(keys, bounds)


def _segment(
    x: torch.Tensor,
    assign: torch.Tensor,
    m: int,
    weight: torch.Tensor | None,
    normalize: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``segment_kernel`` over ``x [B, N, D]`` grouped by ``assign [B, N]`` into ``m`` groups."""
    b, n, d = x.shape
    out = torch.empty(b, m, d, dtype=out_dtype, device=x.device)
    total = torch.empty(b, m, dtype=torch.float32, device=x.device)  # every group's program writes it
    if b * m == 0:
        return out, total
    if n == 0 or d == 0:
        return out.zero_(), total.zero_()
    keys, starts = _segments(assign, m)
    chunk = max(1, min(MAX_CHUNK, _pow2(triton_cdiv(n, m))))
    # The fp32 accumulator is CHUNK x BLOCK_D: keep it near TILE_BYTES.
    block = max(16, min(_pow2(d), (TILE_BYTES // 4) // chunk))
    ws = weight.stride() if weight is not None else (0, 0)
    mod = kernels(_mode(x))
    with _on(x):
        mod.segment_kernel[(b * m, triton_cdiv(d, block))](
            x, keys, starts, weight if weight is not None else total, out, total,
            m, n, d, *x.stride(), *ws,
            HAS_W=weight is not None, NORMALIZE=normalize, WRITE_TOTAL=True,
            CHUNK=chunk, BLOCK_D=block, INTERPRET=_mode(x), num_warps=NUM_WARPS,
        )
    return out, total


# ------------------------------------------------------------------------------------------ autograd


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.n = x.shape[1]
        return _rows(index, index.shape[1], x.shape[2], x.dtype, x=x)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        # Backward of a gather is a scatter-add: a segmented sum of grad rows grouped by their source row.
        gx, _ = _segment(grad, index, ctx.n, None, False, grad.dtype)
        return gx, None


def _scatter(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out-of-place scatter: two launches when small, one pass over the output when large.

    Small (src under ``SCATTER_CLONE_BELOW`` bytes): copy dst, then write the src rows in place, which
    moves 2K extra rows but saves the inverse-index launches. Large: build the inverse index and write
    every output row once from src or dst (2N rows moved, the minimum).
    """
    if 2 * src.numel() * src.element_size() < SCATTER_CLONE_BELOW:
        out = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device).copy_(dst)
        return _rows(index, index.shape[1], dst.shape[2], dst.dtype, x=src, into=out)
    return _rows(_inverse(index, dst.shape[1]), dst.shape[1], dst.shape[2], dst.dtype, x=src, y=dst)


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dst, index, src):
        inv = _inverse(index, dst.shape[1])
        ctx.save_for_backward(index, inv)
        ctx.src_dtype = src.dtype
        return _rows(inv, dst.shape[1], dst.shape[2], dst.dtype, x=src, y=dst)

    @staticmethod
    def backward(ctx, grad):
        index, inv = ctx.saved_tensors
        g_dst = g_src = None
        if ctx.needs_input_grad[0]:  # the overwritten rows got no gradient through dst
            g_dst = _rows(inv, grad.shape[1], grad.shape[2], grad.dtype, y=grad)
        if ctx.needs_input_grad[2]:
            g_src = _rows(index, index.shape[1], grad.shape[2], ctx.src_dtype, x=grad)
        return g_dst, None, g_src


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, assign, num_out, weight):
        out, total = _segment(x, assign, num_out, weight, True, x.dtype)
        # x is kept only for the weight gradient.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, assign, weight, total)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        if weight is None:
            ctx.mark_non_differentiable(total)
        return out, total

    @staticmethod
    def backward(ctx, grad_out, grad_total):
        x, assign, weight, total = ctx.saved_tensors
        valid = assign >= 0
        safe = assign.clamp(min=0)
        t_n = total.gather(1, safe).clamp(min=_TINY)
        w = weight.float() if weight is not None else torch.ones_like(t_n)
        g_x = g_w = None
        n, d = ctx.x_shape[1], ctx.x_shape[2]
        if grad_out is None:
            grad_out = torch.zeros(*total.shape, d, dtype=ctx.x_dtype, device=total.device)
        if ctx.needs_input_grad[0]:
            # d out[a_n] / d x_n = w_n / total[a_n]: a gather of grad rows with a per-row scale.
            scale = torch.where(valid, w / t_n, 0.0)
            g_x = _rows(assign, n, d, ctx.x_dtype, x=grad_out, scale=scale)
        if weight is not None and ctx.needs_input_grad[3]:
            # d out[m] / d w_n = (x_n - out[m]) / total[m]; g . out[m] is the weighted mean of e_n = g . x_n,
            # computed in fp32 so the rounded bf16 output does not enter the gradient.
            g_rows = _rows(assign, n, d, torch.float32, x=grad_out)
            e = (g_rows * x.float()).sum(-1)
            wv = torch.where(valid, w, 0.0)
            s = torch.zeros_like(total).scatter_add(1, safe, wv * e) / total.clamp(min=_TINY)
            g = (e - s.gather(1, safe)) / t_n
            if grad_total is not None:
                g = g + grad_total.gather(1, safe)
            g_w = torch.where(valid, g, 0.0).to(weight.dtype)
        return g_x, None, None, g_w


def _scatter_add_nd(grad: torch.Tensor, index: torch.Tensor, t_shape, dim: int, batch_dim: int) -> torch.Tensor:
    """Backward of a multi-tensor gather for one tensor (torch scatter_add; training rarely needs it fast)."""
    a, b, c, n, r = token_layout(torch.empty(t_shape, device="meta"), dim, batch_dim, index.shape[0])
    k = index.shape[1]
    g = grad.reshape(a, b, c, k, r)
    valid = (index >= 0).view(1, b, 1, k, 1)
    g = torch.where(valid, g, torch.zeros((), dtype=g.dtype, device=g.device))
    safe = index.clamp(min=0).view(1, b, 1, k, 1).expand(a, b, c, k, r)
    out = torch.zeros(a, b, c, n, r, dtype=grad.dtype, device=grad.device).scatter_add_(3, safe, g)
    return out.view(t_shape)


class _Multi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, dims, bdims, table, *tensors):
        ctx.save_for_backward(index)
        ctx.meta = [(t.shape, d, bd, t.dtype) for t, d, bd in zip(tensors, dims, bdims)]
        outs = _table(list(tensors), index, dims[0]) if table else _multi(list(tensors), index, dims, bdims)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        (index,) = ctx.saved_tensors
        out = []
        for g, (shape, d, bd, dtype), need in zip(grads, ctx.meta, ctx.needs_input_grad[4:]):
            out.append(_scatter_add_nd(g, index, shape, d, bd).to(dtype) if need and g is not None else None)
        return (None, None, None, None, *out)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# ------------------------------------------------------------------------------------ multi & table


def _layout_view(t: torch.Tensor, layout) -> tuple[bool, tuple[int, ...]]:
    """``(needs_copy, strides)`` of ``t`` seen as ``layout = (A, B, C, N, R)``."""
    try:
        return False, t.view(layout).stride()
    except RuntimeError:  # dims that cannot be merged without a copy
        return True, torch.empty(layout, device="meta").stride()


@functools.lru_cache(maxsize=256)
def _multi_plan(sig: tuple, dims: tuple, bdims: tuple, bsz: int, k: int) -> tuple:
    """Everything about a multi-tensor gather that depends on shapes only, so a repeat call is cheap.

    The host side of the first version (layout, view, tile per tensor, per call) cost about 65 us for four
    tensors, the same order as the kernel itself at LLaVA-1.5 sizes.
    """
    per, specs = [], []
    for i, ((shape, stride, dtype), d, bd) in enumerate(zip(sig, dims, bdims)):
        meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        a, b, c, n, r = token_layout(meta, d, bd, bsz)
        copy, strides = _layout_view(meta, (a, b, c, n, r))
        out_shape = list(shape)
        out_shape[d] = k
        per.append((tuple(out_shape), copy))
        n_rows = a * b * c * k
        if n_rows * r:
            rows, block = tile(r, meta.element_size())
            tiles = triton_cdiv(n_rows, rows) * triton_cdiv(r, block)
            specs.append((i, c, r, n_rows, strides, rows, block, tiles, meta.element_size()))
    launches = []
    for j0 in range(0, len(specs), 4):
        group = specs[j0 : j0 + 4]
        pad = group + [group[-1]] * (4 - len(group))
        template, consts, end = [], {"NUM": len(group)}, 0
        for j, (i, c, r, n_rows, st, rows, block, tiles, _) in enumerate(pad):
            end += tiles if j < len(group) else 0
            template += [("in", i), ("out", i), c, r, n_rows, *st]
            if j < 3:
                template.append(end)
            consts[f"ROWS{j}"], consts[f"BLOCK{j}"] = rows, block
        consts["num_warps"] = max(_num_warps(g[5], g[6], g[8]) for g in group)
        launches.append((end, template, consts))
    return tuple(per), tuple(launches)


def _multi(tensors: list[torch.Tensor], index: torch.Tensor, dims: list[int], bdims: list[int]) -> list[torch.Tensor]:
    """Gather up to four tensors per launch with ``multi_kernel`` (more are chunked in fours)."""
    sig = tuple((t.shape, t.stride(), t.dtype) for t in tensors)
    bsz, k = index.shape
    per, launches = _multi_plan(sig, tuple(dims), tuple(bdims), bsz, k)
    ref = tensors[0]
    ins = [t.contiguous() if copy else t for t, (_, copy) in zip(tensors, per)]
    outs = [torch.empty(shape, dtype=t.dtype, device=t.device) for t, (shape, _) in zip(tensors, per)]
    if launches:
        mod = kernels(_mode(ref))
        head = (index, *index.stride(), k, bsz)
        with _on(ref):
            for end, template, consts in launches:
                args = [(ins if v[0] == "in" else outs)[v[1]] if isinstance(v, tuple) else v for v in template]
                mod.multi_kernel[(end,)](*head, *args, **consts)
    return outs


def _table(caches: list[torch.Tensor], index: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Gather same-layout caches with ``table_kernel``: one launch per (dtype, shape, strides) group."""
    t0 = caches[0]
    dtype0, shape0, stride0 = t0.dtype, t0.shape, t0.stride()
    if all(t.stride() == stride0 and t.shape == shape0 and t.dtype == dtype0 for t in caches):
        groups = {(dtype0, shape0, stride0): list(range(len(caches)))}  # the usual case: all layers alike
    else:
        groups = {}
        for i, t in enumerate(caches):
            groups.setdefault((t.dtype, t.shape, t.stride()), []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(caches)
    bsz, k = index.shape
    for (dtype, shape, _), members in groups.items():
        ts = [caches[i] for i in members]
        t0 = ts[0]
        a, b, c, n, r = token_layout(t0, dim, 0, bsz)
        copy, strides = _layout_view(t0, (a, b, c, n, r))
        if copy:
            ts = [t.contiguous() for t in ts]
        out_shape = list(shape)
        out_shape[dim] = k
        buf = torch.empty(len(ts), *out_shape, dtype=dtype, device=t0.device)
        for i, o in zip(members, buf.unbind(0)):
            outs[i] = o
        if buf.numel() == 0:
            continue
        es = t0.element_size()
        ptrs = [t.data_ptr() for t in ts]
        lo = min(ptrs)
        base = ts[ptrs.index(lo)]
        deltas = [(p - lo) // es for p in ptrs]
        align = max(1, 16 // es)
        if lo % 16 or any(dl % align for dl in deltas):
            align = 1
        delta_t = torch.tensor(deltas, dtype=torch.int64, device=t0.device)
        rows, block = tile(r, es)
        n_rows = a * b * c * k
        grid = (triton_cdiv(n_rows, rows) * triton_cdiv(r, block), len(ts))
        with _on(t0):
            kernels(_mode(t0)).table_kernel[grid](
                base, delta_t, buf, buf[0].numel(),
                index, *index.stride(), k, b, c, r, n_rows, *strides,
                ALIGN=align, ROWS=rows, BLOCK_R=block, num_warps=_num_warps(rows, block, es),
            )
    return outs  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- public


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton ``gather_tokens``; see ``mmprune.kernels.gather_tokens``."""
    if _needs_grad(x):
        return _Gather.apply(x, index)
    return _rows(index, index.shape[1], x.shape[2], x.dtype, x=x)


def scatter(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Triton ``scatter_tokens``; see ``mmprune.kernels.scatter_tokens``."""
    # Cast a mismatched src up front (torch rounds to nearest even; Triton's interpreter truncates
    # fp32 -> bf16, seen with triton 3.9), so the result is bit-exact with the reference on both.
    src = src.to(dst.dtype)
    if _needs_grad(dst, src):
        return _Scatter.apply(dst, index, src)
    return _scatter(dst, index, src)


def merge(
    x: torch.Tensor, assign: torch.Tensor, num_out: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``merge_tokens``; see ``mmprune.kernels.merge_tokens``."""
    if _needs_grad(x, weight):
        out, total = _Merge.apply(x, assign, num_out, weight)
    else:
        out, total = _segment(x, assign, num_out, weight, True, x.dtype)
    # The kernel sums in fp32 always; fp64 callers get the reference's total dtype, not its precision.
    return out, total.to(merge_acc_dtype(x, weight))


def gather_multi(
    tensors: Sequence[torch.Tensor], index: torch.Tensor, dims: list[int], bdims: list[int]
) -> list[torch.Tensor]:
    """Triton ``gather_tokens_multi``; see ``mmprune.kernels.gather_tokens_multi``."""
    if _needs_grad(*tensors):
        return list(_Multi.apply(index, dims, bdims, False, *tensors))
    return _multi(list(tensors), index, dims, bdims)


def compact_kv(caches: Sequence[torch.Tensor], index: torch.Tensor, dim: int = 2) -> list[torch.Tensor]:
    """Triton ``compact_kv``; see ``mmprune.kernels.compact_kv``."""
    if _needs_grad(*caches):
        n = len(caches)
        return list(_Multi.apply(index, [dim] * n, [0] * n, True, *caches))
    return _table(list(caches), index, dim)
