"""Triton kernels of mmprune.kernels under Triton's CPU interpreter, against the torch reference.

CI has no GPU, so every kernel runs here with ``TRITON_INTERPRET=1`` (set by a module fixture and
restored afterwards; the backend keeps interpreted and compiled kernels apart, so nothing leaks into
other tests). Gathers and scatters must match exactly; weighted means within the dtype table below.
The interpreter is slow: shapes stay small but odd (N not a power of two, D = 257, K = 1, B = 3).
The same checks at model shapes on a real GPU live in ``test_kernels_gpu.py`` (``-m gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmprune.kernels import (  # noqa: E402
    compact_kv,
    gather_tokens,
    gather_tokens_multi,
    index_checks,
    merge_tokens,
    scatter_tokens,
)
from mmprune.kernels import triton_backend as tb  # noqa: E402
from mmprune.kernels.testing import SHAPES, loop_gather, loop_merge, loop_scatter, rand_index  # noqa: E402

# Liger-Kernel style tolerance table for the weighted means (both paths accumulate in fp32 and round
# once, so the gap is at most about one unit in the last place of the output dtype; Triton's interpreter
# rounds fp32 -> bf16 by truncation, not to nearest, which also stays within one unit).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}
# Gradients pass through one more rounding (grad * w / total in fp32, cast to the dtype).
GRAD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = list(TOL)


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture
def small_tiles(monkeypatch):
    """64-byte tiles: several row and column tiles per tensor, so tile-edge masks are exercised."""
    monkeypatch.setattr(tb, "TILE_BYTES", 64)
    monkeypatch.setattr(tb, "SCATTER_CLONE_BELOW", tb.SCATTER_CLONE_BELOW)  # restored after the test


def rand(shape, dtype, gen=None):
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_gather_scatter_exact(b, n, d, k, dtype):
    torch.manual_seed(b * 100 + n)
    x = rand((b, n, d), dtype)
    idx = rand_index(b, n, k)
    out = gather_tokens(x, idx, impl="triton")
    assert torch.equal(out, gather_tokens(x, idx, impl="torch"))
    assert torch.equal(out, loop_gather(x, idx))
    src = rand((b, k, d), dtype)
    out = scatter_tokens(x, idx, src, impl="triton")
    assert torch.equal(out, scatter_tokens(x, idx, src, impl="torch"))
    assert torch.equal(out, loop_scatter(x, idx, src))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,m", [(3, 13, 257, 4), (1, 7, 33, 1), (2, 9, 1, 9), (3, 6, 40, 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_close(b, n, d, m, dtype, weighted):
    torch.manual_seed(n + m)
    x = rand((b, n, d), dtype)
    assign = torch.randint(-1, m, (b, n))
    w = torch.rand(b, n) + 0.1 if weighted else None
    out, total = merge_tokens(x, assign, m, w, impl="triton")
    ref, ref_total = merge_tokens(x, assign, m, w, impl="torch")
    assert out.dtype == dtype and total.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(total, ref_total, atol=1e-6, rtol=1e-6)
    loop, loop_total = loop_merge(x, assign, m, w)
    torch.testing.assert_close(out.double(), loop, **TOL[dtype])
    torch.testing.assert_close(total.double(), loop_total, atol=1e-5, rtol=1e-5)


def test_small_tiles_and_noncontiguous(small_tiles):
    torch.manual_seed(3)
    b, n, d, k = 3, 11, 257, 5
    x = torch.randn(b, d, n).transpose(1, 2)  # stride along D is N, not 1
    idx = rand_index(b, n, 2 * k).t().contiguous().t()[:, ::2]  # column-major and strided
    assert not x.is_contiguous() and not idx.is_contiguous()
    assert torch.equal(gather_tokens(x, idx, impl="triton"), loop_gather(x, idx))
    src = torch.randn(b, d, 2 * k)[:, :, ::2].transpose(1, 2)
    for clone_below in (0, 1 << 30):  # both scatter strategies: inverse index, and copy + write
        tb.SCATTER_CLONE_BELOW = clone_below
        assert torch.equal(scatter_tokens(x, idx, src, impl="triton"), loop_scatter(x, idx, src))
    assign = torch.randint(-1, 4, (b, 2 * n))[:, ::2]
    w = torch.rand(b, 2 * n)[:, 1::2] + 0.1
    out, total = merge_tokens(x, assign, 4, w, impl="triton")
    ref, ref_total = merge_tokens(x, assign, 4, w, impl="torch")
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(total, ref_total)


def test_scatter_mixed_dtype_and_empty_groups():
    x = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    idx = torch.tensor([[4, -1], [-1, -1]])
    src = torch.randn(2, 2, 3)  # fp32 src into bf16 dst
    assert torch.equal(scatter_tokens(x, idx, src, impl="triton"), scatter_tokens(x, idx, src, impl="torch"))
    out, total = merge_tokens(torch.randn(2, 5, 3), torch.full((2, 5), -1), 3, impl="triton")
    assert torch.equal(out, torch.zeros(2, 3, 3)) and torch.equal(total, torch.zeros(2, 3))


def test_empty_and_nan_rows():
    x = torch.randn(2, 5, 4)
    x[:, 0] = float("nan")
    out = gather_tokens(x, torch.tensor([[-1, 3], [2, -1]]), impl="triton")
    assert not out.isnan().any()
    assert gather_tokens(x, torch.empty(2, 0, dtype=torch.long), impl="triton").shape == (2, 0, 4)
    assert merge_tokens(x, torch.zeros(2, 5, dtype=torch.long), 0 + 1, impl="triton")[0].shape == (2, 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_gather_one_launch(dtype, small_tiles, monkeypatch):
    torch.manual_seed(4)
    b, n, k = 3, 13, 6
    h = rand((b, n, 33), dtype)
    cos = rand((b, 2 * n, 8), dtype)[:, ::2]  # non-contiguous
    sin = rand((b, n, 8), dtype)
    pos = torch.randint(0, 1000, (3, b, n))  # Qwen2-VL mrope ids [3, B, N]
    mask = torch.rand(b, n) > 0.5
    idx = rand_index(b, n, k)
    ts, dims, bdims = [h, cos, sin, pos, mask], [1, 1, 1, 2, 1], [0, 0, 0, 1, 0]
    launches = []
    mod = tb.kernels(True)
    real = mod.multi_kernel

    class Counting:
        def __getitem__(self, grid):
            return lambda *a, **kw: (launches.append(kw["NUM"]), real[grid](*a, **kw))

    monkeypatch.setattr(mod, "multi_kernel", Counting())
    outs = gather_tokens_multi(ts, idx, dim=dims, batch_dim=bdims, impl="triton")
    refs = gather_tokens_multi(ts, idx, dim=dims, batch_dim=bdims, impl="torch")
    assert launches == [4, 1]  # five tensors: one launch of four, one of one
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape and torch.equal(o, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_kv(dtype, small_tiles):
    torch.manual_seed(5)
    b, h, length, hd, k = 3, 2, 11, 12, 5
    caches = [rand((b, h, length, hd), dtype) for _ in range(6)]
    caches.append(rand((b, length, h, hd), dtype).transpose(1, 2))  # another layout: its own launch
    idx = rand_index(b, length, k)
    outs = compact_kv(caches, idx, impl="triton")
    refs = compact_kv(caches, idx, impl="torch")
    for o, r in zip(outs, refs):
        assert o.shape == (b, h, k, hd) and torch.equal(o, r)


def test_unchecked_out_of_range_is_empty_slot():
    torch.manual_seed(9)
    x = torch.randn(2, 7, 5)
    bad = torch.tensor([[6, 7, -5], [100, 0, 3]])
    clean = torch.tensor([[6, -1, -1], [-1, 0, 3]])
    with index_checks(False):
        assert torch.equal(gather_tokens(x, bad, impl="triton"), loop_gather(x, clean))
        src = torch.randn(2, 3, 5)
        assert torch.equal(scatter_tokens(x, bad, src, impl="triton"), loop_scatter(x, clean, src))
        assign = torch.tensor([[0, 3, 1, -9, 2, 2, 0], [1, 1, 1, 1, 1, 1, 7]])
        out, total = merge_tokens(x, assign, 3, impl="triton")
        ref, ref_total = loop_merge(x, assign.where((assign >= 0) & (assign < 3), -1), 3)
        torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
        (kv,) = compact_kv([x.view(2, 1, 7, 5)], bad, impl="triton")
        assert torch.equal(kv[:, 0], loop_gather(x, clean))


# ----------------------------------------------------------------------------------------- autograd
def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None and t.requires_grad])


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_torch(dtype):
    torch.manual_seed(6)
    b, n, d, k, m = 3, 9, 17, 4, 3
    x, src = rand((b, n, d), dtype), rand((b, k, d), dtype)
    w = torch.rand(b, n) + 0.2
    idx = torch.stack([torch.tensor([8, 0, 0, -1]), torch.tensor([1, 2, 3, 4]), torch.tensor([-1, 5, 8, 8])])
    uniq = rand_index(b, n, k)
    assign = torch.randint(-1, m, (b, n))
    cases = {
        "gather (duplicates: scatter-add)": (lambda i: lambda a: gather_tokens(a, idx, impl=i), [x]),
        "scatter": (lambda i: lambda a, s: scatter_tokens(a, uniq, s, impl=i), [x, src]),
        "merge": (lambda i: lambda a: merge_tokens(a, assign, m, impl=i), [x]),
        "merge weighted": (lambda i: lambda a, ww: merge_tokens(a, assign, m, ww, impl=i), [x, w]),
    }
    for name, (make, inputs) in cases.items():
        got = _grads(make("triton"), inputs)
        ref = _grads(make("torch"), inputs)
        for g, r in zip(got, ref):
            tol = GRAD_TOL[g.dtype] if name.startswith("merge") else dict(atol=0, rtol=0)
            if name.startswith("gather"):  # duplicate slots: fp32 sums in another order
                tol = TOL[g.dtype]
            torch.testing.assert_close(g, r, **tol, msg=lambda s, name=name: f"{name}: {s}")


def test_autograd_multi_and_kv():
    torch.manual_seed(8)
    h, pos_f = torch.randn(2, 7, 5), torch.randn(3, 2, 7)
    kv = [torch.randn(2, 3, 7, 4) for _ in range(3)]
    idx = rand_index(2, 7, 4)
    for fn, inputs in [
        (lambda i: lambda a, p: gather_tokens_multi([a, p], idx, dim=[1, 2], batch_dim=[0, 1], impl=i), [h, pos_f]),
        (lambda i: lambda *c: compact_kv(list(c), idx, impl=i), kv),
    ]:
        for g, r in zip(_grads(fn("triton"), inputs), _grads(fn("torch"), inputs)):
            assert torch.equal(g, r)


# ----------------------------------------------------------------------------------- property tests
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(
    b=st.integers(1, 3), n=st.integers(1, 12), d=st.integers(1, 40), k=st.integers(1, 14),
    dtype=st.sampled_from(DTYPES), holes=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_gather(b, n, d, k, dtype, holes, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b, n, d), generator=gen).to(dtype)
    idx = torch.randint(-1 if holes else 0, n, (b, k), generator=gen)  # duplicates allowed
    assert torch.equal(gather_tokens(x, idx, impl="triton"), loop_gather(x, idx))


@PROPS
@given(
    b=st.integers(1, 3), n=st.integers(1, 12), d=st.integers(1, 40), data=st.data(),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
def test_property_scatter(b, n, d, data, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, n))
    x = torch.randn((b, n, d), generator=gen).to(dtype)
    src = torch.randn((b, k, d), generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])
    idx[torch.rand((b, k), generator=gen) < 0.3] = -1
    saved = tb.SCATTER_CLONE_BELOW
    try:
        tb.SCATTER_CLONE_BELOW = data.draw(st.sampled_from([0, 1 << 30]))  # inverse index / copy + write
        assert torch.equal(scatter_tokens(x, idx, src, impl="triton"), loop_scatter(x, idx, src))
    finally:
        tb.SCATTER_CLONE_BELOW = saved


@PROPS
@given(
    b=st.integers(1, 3), n=st.integers(1, 12), d=st.integers(1, 40), m=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES), weighted=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_merge(b, n, d, m, dtype, weighted, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b, n, d), generator=gen).to(dtype)
    assign = torch.randint(-1, m, (b, n), generator=gen)
    w = torch.rand((b, n), generator=gen) + 0.05 if weighted else None
    out, total = merge_tokens(x, assign, m, w, impl="triton")
    ref, ref_total = loop_merge(x, assign, m, w)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(total.double(), ref_total, atol=1e-5, rtol=1e-5)
