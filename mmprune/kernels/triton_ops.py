"""Triton kernels for the token ops; each names the torch reference (``reference.py``) it reproduces.

This module imports Triton at its top, so nothing imports it at ``import mmprune`` time: the launchers in
``triton_backend.py`` load it on the first Triton call, once per mode (compiled for CUDA tensors,
interpreted for CPU tensors under ``TRITON_INTERPRET=1``), because ``triton.jit`` fixes the mode when
it decorates.

All kernels are memory-bound row copies: each program moves a ``ROWS x BLOCK`` tile (about 16 KB, so
several 16-byte vector loads per thread are in flight) and computes its source rows from the index
once per row, not per element.

Example (interpreted on CPU):
    >>> import os, torch
    >>> os.environ["TRITON_INTERPRET"] = "1"
    >>> from mmprune.kernels import gather_tokens
    >>> gather_tokens(torch.ones(1, 4, 3), torch.tensor([[3, -1]]), impl="triton").sum().item()
    3.0
"""

from __future__ import annotations

import triton
import triton.language as tl

# Only builtins of triton.language below, no helpers from triton.language.standard (tl.zeros, tl.sum,
# tl.cdiv): those are decorated once, when triton is first imported, so they are compiled-mode objects
# that Triton's interpreter refuses to call if triton was imported before TRITON_INTERPRET=1 was set
# (seen with triton 3.9: "Cannot call @triton.jit'd outside of the scope of a kernel").


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def rows_kernel(
    x_ptr, y_ptr, idx_ptr, scale_ptr, out_ptr,
    n_rows, K, D, N_OUT,
    sxb, sxn, sxd, syb, syk, syd, sib, sik, ssb, ssk,
    HAS_X: tl.constexpr, HAS_Y: tl.constexpr, HAS_SCALE: tl.constexpr, SCATTER: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[b, k] = idx >= 0 ? x[b, idx] * scale[b, k] : y[b, k]`` (missing x or y reads as zeros).

    One kernel for five jobs: gather (x), scatter through the inverse index (x = src, y = dst), the
    backward of scatter w.r.t. dst (y only), and the backward of merge (x with scale = w / total).
    With ``SCATTER`` it instead writes ``out[b, idx] = x[b, k]`` (rows of x in order; out ``[B, N_OUT, D]``
    already holds a copy of dst). Reference: ``gather_tokens_torch`` / ``scatter_tokens_torch``.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_r * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    rmask = rows < n_rows
    b = rows // K
    k = rows % K
    idx = tl.load(idx_ptr + b * sib + k * sik, mask=rmask, other=-1).to(tl.int64)
    valid = idx >= 0
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    cmask = cols < D
    take = valid[:, None] & cmask[None, :]
    if SCATTER:
        v = tl.load(x_ptr + (b * sxb + k * sxn)[:, None] + cols[None, :] * sxd, mask=take, other=0)
        tl.store(out_ptr + (b * N_OUT + idx)[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=take)
    else:
        if HAS_X:
            v = tl.load(x_ptr + (b * sxb + idx * sxn)[:, None] + cols[None, :] * sxd, mask=take, other=0)
            if HAS_SCALE:
                s = tl.load(scale_ptr + b * ssb + k * ssk, mask=rmask & valid, other=0.0)
                v = v.to(tl.float32) * s[:, None]
            v = v.to(out_ptr.dtype.element_ty)
        else:
            v = tl.full([ROWS, BLOCK_D], 0, dtype=out_ptr.dtype.element_ty)
        if HAS_Y:
            keep = (rmask & ~valid)[:, None] & cmask[None, :]
            u = tl.load(y_ptr + (b * syb + k * syk)[:, None] + cols[None, :] * syd, mask=keep, other=0)
            v = tl.where(valid[:, None], v, u.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], v, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _segment_step(acc, tot, i, end, b, N, keys_ptr, w_ptr, x_ptr, cols, cmask,
                  sxb, sxn, sxd, swb, swn, HAS_W: tl.constexpr, CHUNK: tl.constexpr):
    """Add group members ``keys[i : min(i + CHUNK, end)] % N`` (weighted) into ``acc`` and ``tot``."""
    offs = i + tl.arange(0, CHUNK)
    live = offs < end
    n = tl.load(keys_ptr + offs, mask=live, other=0).to(tl.int64) % N
    if HAS_W:
        w = tl.load(w_ptr + b * swb + n * swn, mask=live, other=0.0).to(tl.float32)
    else:
        w = live.to(tl.float32)
    v = tl.load(x_ptr + (b * sxb + n * sxn)[:, None] + cols[None, :] * sxd,
                mask=live[:, None] & cmask[None, :], other=0.0)
    return acc + v.to(tl.float32) * w[:, None], tot + w


@triton.jit
def segment_kernel(
    x_ptr, keys_ptr, starts_ptr, w_ptr, out_ptr, total_ptr,
    M, N, D,
    sxb, sxn, sxd, swb, swn,
    HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, WRITE_TOTAL: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Segmented (weighted) sum or mean of rows ``n`` of ``x [B, N, D]`` grouped into ``M`` groups.

    ``keys`` is the sorted flat array of ``(b * (M + 1) + assign + 1) * N + n``: group ``m`` of batch ``b``
    owns ``keys[starts[b * (M + 1) + m] : starts[b * (M + 1) + m + 1]]`` and ``n = key % N``. The host sorts
    ints once, so every output row is summed by one program in a fixed order (ascending n): deterministic,
    no atomics, and each output row written exactly once. Also the backward of gather (a scatter-add).
    Reference: ``merge_tokens_torch``.
    """
    pid_g = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid_g // M).to(tl.int64)
    m = pid_g % M
    start = tl.load(starts_ptr + b * (M + 1) + m)
    end = tl.load(starts_ptr + b * (M + 1) + m + 1)
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    cmask = cols < D
    acc = tl.full([CHUNK, BLOCK_D], 0.0, dtype=tl.float32)
    tot = tl.full([CHUNK], 0.0, dtype=tl.float32)
    if INTERPRET:
        # Triton 3.6's interpreter cannot take a loaded scalar as a range() bound with numpy 2 (its
        # __index__ calls int() on a 1-element array); a while loop only needs __bool__, which works.
        i = start
        while i < end:
            acc, tot = _segment_step(acc, tot, i, end, b, N, keys_ptr, w_ptr, x_ptr, cols, cmask,
                                     sxb, sxn, sxd, swb, swn, HAS_W, CHUNK)
            i += CHUNK
    else:
        for i in range(start, end, CHUNK):
            acc, tot = _segment_step(acc, tot, i, end, b, N, keys_ptr, w_ptr, x_ptr, cols, cmask,
                                     sxb, sxn, sxd, swb, swn, HAS_W, CHUNK)
    s = tl.reduce(acc, 0, _add)
    total = tl.reduce(tot, 0, _add)
    if NORMALIZE:
        s = s / tl.maximum(total, 1.1754943508222875e-38)  # torch.finfo(float32).tiny, as the reference
    tl.store(out_ptr + pid_g.to(tl.int64) * D + cols, s.to(out_ptr.dtype.element_ty), mask=cmask)
    if WRITE_TOTAL:
        if pid_d == 0:
            tl.store(total_ptr + pid_g, total)


@triton.jit
def _nd_tile(
    tile, idx_ptr, sib, sik, K, Bn,
    x_ptr, out_ptr, C, R, n_rows, sa, sb, sc, sn, sr,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Copy one tile of ``out[a, b, c, k, :] = x[a, b, c, index[b, k], :]`` (zeros for -1)."""
    n_cb = (R + BLOCK_R - 1) // BLOCK_R
    rt = tile // n_cb
    ct = tile % n_cb
    rows = (rt * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    rmask = rows < n_rows
    k = rows % K
    q = rows // K
    c = q % C
    q = q // C
    b = q % Bn
    a = q // Bn
    idx = tl.load(idx_ptr + b * sib + k * sik, mask=rmask, other=-1).to(tl.int64)
    valid = idx >= 0
    cols = (ct * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cmask = cols < R
    src = x_ptr + (a * sa + b * sb + c * sc + idx * sn)[:, None] + cols[None, :] * sr
    v = tl.load(src, mask=valid[:, None] & cmask[None, :], other=0)
    tl.store(out_ptr + rows[:, None] * R + cols[None, :], v, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def multi_kernel(
    idx_ptr, sib, sik, K, Bn,
    x0, o0, C0, R0, n0, sa0, sb0, sc0, sn0, sr0, e0,
    x1, o1, C1, R1, n1, sa1, sb1, sc1, sn1, sr1, e1,
    x2, o2, C2, R2, n2, sa2, sb2, sc2, sn2, sr2, e2,
    x3, o3, C3, R3, n3, sa3, sb3, sc3, sn3, sr3,
    NUM: tl.constexpr,
    ROWS0: tl.constexpr, BLOCK0: tl.constexpr, ROWS1: tl.constexpr, BLOCK1: tl.constexpr,
    ROWS2: tl.constexpr, BLOCK2: tl.constexpr, ROWS3: tl.constexpr, BLOCK3: tl.constexpr,
):
    """Up to four tensors (any dtypes and layouts) gathered with one index in one launch.

    Tensor ``i`` owns programs ``[e_{i-1}, e_i)`` and its own tile shape, so hidden states (rows of 8 KB)
    and position ids (rows of 8 bytes) each get a tile that fills a program. Reference:
    ``gather_tokens_multi_torch``.
    """
    pid = tl.program_id(0)
    if pid < e0:
        _nd_tile(pid, idx_ptr, sib, sik, K, Bn, x0, o0, C0, R0, n0, sa0, sb0, sc0, sn0, sr0, ROWS0, BLOCK0)
    if NUM > 1:
        if (pid >= e0) & (pid < e1):
            _nd_tile(pid - e0, idx_ptr, sib, sik, K, Bn, x1, o1, C1, R1, n1, sa1, sb1, sc1, sn1, sr1,
                     ROWS1, BLOCK1)
    if NUM > 2:
        if (pid >= e1) & (pid < e2):
            _nd_tile(pid - e1, idx_ptr, sib, sik, K, Bn, x2, o2, C2, R2, n2, sa2, sb2, sc2, sn2, sr2,
                     ROWS2, BLOCK2)
    if NUM > 3:
        if pid >= e2:
            _nd_tile(pid - e2, idx_ptr, sib, sik, K, Bn, x3, o3, C3, R3, n3, sa3, sb3, sc3, sn3, sr3,
                     ROWS3, BLOCK3)


@triton.jit
def table_kernel(
    base_ptr, delta_ptr, out_ptr, out_numel,
    idx_ptr, sib, sik, K, Bn, C, R, n_rows, sa, sb, sc, sn, sr,
    ALIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Many same-layout tensors (a model's K and V caches) gathered with one index in one launch.

    Tensor ``t`` lives at ``base_ptr + delta[t]`` elements; the host checks every delta is a multiple of
    ``ALIGN`` elements (16 bytes) so the compiler keeps 16-byte vector loads. Output ``t`` is the
    ``t``-th slice of one ``[T, ...]`` buffer. Reference: ``compact_kv_torch``.
    """
    t = tl.program_id(1)
    delta = tl.load(delta_ptr + t)
    if ALIGN > 1:
        delta = tl.multiple_of(delta, ALIGN)
    _nd_tile(tl.program_id(0), idx_ptr, sib, sik, K, Bn, base_ptr + delta, out_ptr + t.to(tl.int64) * out_numel,
             C, R, n_rows, sa, sb, sc, sn, sr, ROWS, BLOCK_R)


@triton.jit
def invert_kernel(idx_ptr, inv_ptr, n_idx, K, N, sib, sik, BLOCK: tl.constexpr):
    """``inv[b, index[b, k]] = k`` for valid slots (atomic max: the last of duplicate slots wins).

    ``inv`` is ``[B, N]`` int32, filled with -1 by the host. Used by scatter (one read of each output row).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n_idx
    b = offs // K
    k = offs % K
    idx = tl.load(idx_ptr + b * sib + k * sik, mask=live, other=-1).to(tl.int64)
    ok = live & (idx >= 0)
    tl.atomic_max(inv_ptr + b.to(tl.int64) * N + idx, k, mask=ok)
