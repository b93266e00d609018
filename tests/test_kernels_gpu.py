"""mmprune.kernels compiled on a real GPU: the Triton path against the torch path at model shapes.

Deselected by default (``-m gpu`` runs them); skipped without CUDA. CPU CI covers the same kernels
through Triton's interpreter in ``test_kernels_triton.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mmprune.kernels import (  # noqa: E402
    compact_kv,
    gather_tokens,
    gather_tokens_multi,
    merge_tokens,
    scatter_tokens,
)
from mmprune.kernels.testing import loop_gather, rand_index  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}
# (B, N, D, K): LLaVA-1.5 (576 tokens), odd sizes, and a Qwen-sized long sequence.
SHAPES = [(2, 576, 4096, 144), (3, 577, 257, 1), (1, 2881, 4096, 1000), (4, 8192, 1024, 2048)]


def poison():
    """Leave NaNs in the caching allocator's free blocks, so an unwritten output element shows up."""
    torch.empty(1 << 28, dtype=torch.float32, device="cuda").fill_(float("nan"))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_ops_match_torch(b, n, d, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(b, n, d, device="cuda").to(dtype)
    idx = rand_index(b, n, k).cuda()
    poison()
    assert torch.equal(gather_tokens(x, idx), gather_tokens(x, idx, impl="torch"))  # auto = Triton on CUDA
    src = torch.randn(b, k, d, device="cuda").to(dtype)
    poison()
    assert torch.equal(scatter_tokens(x, idx, src, impl="triton"), scatter_tokens(x, idx, src, impl="torch"))
    m = max(1, n // 4)
    assign = torch.randint(-1, m, (b, n), device="cuda")
    w = torch.rand(b, n, device="cuda") + 0.1
    for weight in (None, w):
        poison()
        out, total = merge_tokens(x, assign, m, weight, impl="triton")
        ref, ref_total = merge_tokens(x, assign, m, weight, impl="torch")
        torch.testing.assert_close(out, ref, **TOL[dtype])
        torch.testing.assert_close(total, ref_total, atol=1e-4, rtol=1e-5)


def test_small_case_against_loops():
    x = torch.randn(3, 13, 257)
    idx = rand_index(3, 13, 5)
    assert torch.equal(gather_tokens(x.cuda(), idx.cuda()).cpu(), loop_gather(x, idx))


def test_multi_and_kv():
    torch.manual_seed(1)
    b, n, k = 2, 2880, 700
    h = torch.randn(b, n, 4096, device="cuda", dtype=torch.bfloat16)
    cos, sin = (torch.randn(3, b, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.randint(0, 9999, (3, b, n), device="cuda")
    idx = rand_index(b, n, k).cuda()
    ts, dims, bdims = [h, cos, sin, pos], [1, 2, 2, 2], [0, 1, 1, 1]
    poison()
    for o, r in zip(gather_tokens_multi(ts, idx, dims, bdims), gather_tokens_multi(ts, idx, dims, bdims, impl="torch")):
        assert torch.equal(o, r)
    caches = [torch.randn(b, 8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    poison()
    for o, r in zip(compact_kv(caches, idx), compact_kv(caches, idx, impl="torch")):
        assert torch.equal(o, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_torch(dtype):
    torch.manual_seed(2)
    b, n, d, k, m = 2, 300, 257, 77, 60
    x0 = torch.randn(b, n, d, device="cuda").to(dtype)
    s0 = torch.randn(b, k, d, device="cuda").to(dtype)
    w0 = torch.rand(b, n, device="cuda") + 0.2
    idx = torch.randint(-1, n, (b, k), device="cuda")  # duplicates: the backward must add
    uniq = rand_index(b, n, k).cuda()
    assign = torch.randint(-1, m, (b, n), device="cuda")
    grads = {}
    for impl in ("torch", "triton"):
        x, s, w = (t.clone().requires_grad_() for t in (x0, s0, w0))
        out = gather_tokens(x, idx, impl=impl).float().sum() * 0.5
        out = out + (scatter_tokens(x, uniq, s, impl=impl).float() ** 2).sum()
        mo, mt = merge_tokens(x, assign, m, w, impl=impl)
        out = out + (mo.float() * torch.linspace(-1, 1, d, device="cuda")).sum() + (mt**2).sum()
        grads[impl] = torch.autograd.grad(out, [x, s, w])
    for g, r in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)


def test_interpreted_and_compiled_coexist(monkeypatch):
    """A CPU call under the interpreter must not turn later CUDA calls into interpreted ones."""
    from mmprune.kernels import triton_backend as tb

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, idx = torch.randn(2, 5, 3), torch.tensor([[4, -1], [0, 1]])
    assert torch.equal(gather_tokens(x, idx, impl="triton"), gather_tokens(x, idx, impl="torch"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(gather_tokens(x.cuda(), idx.cuda()).cpu(), gather_tokens(x, idx, impl="torch"))
    assert type(tb.kernels(False).rows_kernel).__name__ == "JITFunction"
    assert type(tb.kernels(True).rows_kernel).__name__ == "InterpretedFunction"
