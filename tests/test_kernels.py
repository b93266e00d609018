"""mmprune.kernels: the torch reference path and the dispatcher (no Triton needed).

The reference functions are checked against plain Python loops (the spec written out longhand), the
dispatcher against its contract (impl choice, errors, lazy Triton import). The Triton kernels are tested
against these references in ``test_kernels_triton.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmprune.kernels import (
    compact_kv,
    gather_tokens,
    gather_tokens_multi,
    index_checks,
    merge_tokens,
    scatter_tokens,
)
from mmprune.kernels.reference import token_layout
from mmprune.kernels.testing import SHAPES, loop_gather, loop_merge, loop_scatter, rand_index


@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_reference_matches_loops(b, n, d, k):
    torch.manual_seed(0)
    x = torch.randn(b, n, d)
    idx = rand_index(b, n, k)
    assert torch.equal(gather_tokens(x, idx, impl="torch"), loop_gather(x, idx))
    src = torch.randn(b, k, d)
    assert torch.equal(scatter_tokens(x, idx, src, impl="torch"), loop_scatter(x, idx, src))
    assign = torch.randint(-1, 3, (b, n))
    w = torch.rand(b, n) + 0.1
    out, total = merge_tokens(x, assign, 3, w, impl="torch")
    ref, ref_total = loop_merge(x, assign, 3, w)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total.double(), ref_total, atol=1e-5, rtol=1e-5)


def test_reference_empty_slots_do_not_leak_nan():
    x = torch.randn(1, 4, 3)
    x[0, 0] = float("nan")
    out = gather_tokens(x, torch.tensor([[2, -1]]), impl="torch")
    assert torch.equal(out[0, 1], torch.zeros(3))


def test_multi_and_kv_reference():
    torch.manual_seed(1)
    h, pos = torch.randn(2, 7, 5), torch.randint(0, 99, (3, 2, 7))
    idx = rand_index(2, 7, 4)
    oh, op = gather_tokens_multi([h, pos], idx, dim=[1, 2], batch_dim=[0, 1], impl="torch")
    assert torch.equal(oh, loop_gather(h, idx))
    for a in range(3):
        assert torch.equal(op[a], loop_gather(pos[a].unsqueeze(-1), idx).squeeze(-1))
    kv = torch.randn(2, 3, 7, 4)
    (ok,) = compact_kv([kv], idx, impl="torch")
    for hh in range(3):
        assert torch.equal(ok[:, hh], loop_gather(kv[:, hh], idx))
    assert token_layout(kv, 2, 0, 2) == (1, 2, 3, 7, 4)


@pytest.mark.parametrize("op", ["gather", "scatter", "merge", "multi", "kv"])
def test_out_of_range_raises(op):
    x = torch.randn(2, 5, 3)
    bad = torch.tensor([[0, 5], [1, 2]])
    with pytest.raises(ValueError, match=r"\[-1, 5\)"):
        if op == "gather":
            gather_tokens(x, bad, impl="torch")
        elif op == "scatter":
            scatter_tokens(x, bad, torch.randn(2, 2, 3), impl="torch")
        elif op == "merge":
            merge_tokens(x, torch.tensor([[0, 5, 1, 1, -1], [0, 0, 0, 0, 0]]), 5, impl="torch")
        elif op == "multi":
            gather_tokens_multi([x], bad, impl="torch")
        else:
            compact_kv([x.view(2, 1, 5, 3)], bad, impl="torch")
    with pytest.raises(ValueError, match="min -2"):
        gather_tokens(x, torch.tensor([[0, -2], [1, 2]]), impl="torch")


def test_dispatcher_errors(monkeypatch):
    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[0, 1], [2, -1]])
    with pytest.raises(ValueError, match="impl must be"):
        gather_tokens(x, idx, impl="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gather_tokens(x, idx, impl="triton")
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        gather_tokens(x, idx[:1], impl="torch")
    with pytest.raises(ValueError, match="integer"):
        gather_tokens(x, idx.float(), impl="torch")
    with pytest.raises(ValueError, match="src must be"):
        scatter_tokens(x, idx, torch.randn(2, 3, 3), impl="torch")
    # auto on CPU is the torch path
    assert torch.equal(gather_tokens(x, idx), gather_tokens(x, idx, impl="torch"))


def test_reference_autograd():
    torch.manual_seed(2)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, 6, dtype=torch.float64) + 0.5).requires_grad_()
    src = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[5, 0, 2], [1, -1, 4]])
    assign = torch.tensor([[0, 1, 1, -1, 0, 2], [2, 2, 2, 0, -1, 1]])
    assert torch.autograd.gradcheck(lambda a: gather_tokens(a, idx, impl="torch"), (x,))
    assert torch.autograd.gradcheck(lambda a, s: scatter_tokens(a, idx, s, impl="torch"), (x, src))
    assert torch.autograd.gradcheck(lambda a, ww: merge_tokens(a, assign, 3, ww, impl="torch"), (x, w))


def test_import_is_light():
    code = ("import sys, torch, mmprune.kernels as k; "
            "k.gather_tokens(torch.ones(1, 2, 2), torch.tensor([[1]])); "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unchecked_indices_act_as_empty():
    x = torch.randn(2, 5, 3)
    bad = torch.tensor([[0, 5], [-3, 2]])
    clean = torch.tensor([[0, -1], [-1, 2]])
    with index_checks(False):
        assert torch.equal(gather_tokens(x, bad, impl="torch"), gather_tokens(x, clean, impl="torch"))
        src = torch.randn(2, 2, 3)
        assert torch.equal(scatter_tokens(x, bad, src, impl="torch"), scatter_tokens(x, clean, src, impl="torch"))
        a = torch.tensor([[0, 9, 1, 1, -1], [0, 0, 0, -2, 0]])
        out, total = merge_tokens(x, a, 2, impl="torch")
        ref, ref_total = merge_tokens(x, a.where((a >= 0) & (a < 2), -1), 2, impl="torch")
        assert torch.equal(out, ref) and torch.equal(total, ref_total)
    with pytest.raises(ValueError):  # back on after the block
        gather_tokens(x, bad, impl="torch")
