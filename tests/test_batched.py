"""Issue 19: the batched policy interface and the sync-free engine.

- Each batched policy selects exactly what its per-sample reference selects (ties included) on ragged
  batches of several images / videos per sample.
- The engine's fast paths (``select_batch``, data-free plans) give the same logits, traces and generations
  as the per-sample slow path.
- A pruned prefill and each decode step add no host synchronisation (a ``TorchDispatchMode`` records
  ``nonzero``, ``item``, boolean indexing, copies to the host, ...) for the ported policies at batch 1 and 3.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import mmprune
from mmprune.policies import get_policy
from mmprune.policies.base import Plan, Policy, Tokens, per_segment, resolve_budget
from mmprune.policies.batch import BatchPlan, BatchTokens, topk_keep
from mmprune.syncs import added_syncs, count_syncs
from mmprune.testing import make_inputs, tiny_model


def _ragged(seed: int, layouts, budget=0.4, ties=True):
    """Per-sample Tokens with several segments (images, a video grid) and attention rows full of ties."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for segs in layouts:
        n = sum(segs)
        attn = torch.randint(0, 4, (n,), generator=g).float() / 4 if ties else torch.rand(n, generator=g)
        out.append(Tokens(torch.randn(n, 6, generator=g), list(segs), [resolve_budget(budget, c) for c in segs],
                          grids=[None] * len(segs), attn=attn, origin=[c + 3 for c in segs]))
    return out


LAYOUTS = [[[9]], [[5], [3, 4], [7, 2, 1]], [[1], [12], [2, 2]], [[6, 6], [11], [1, 1, 1]]]


def test_topk_keep_breaks_ties_by_position_and_pads_at_the_end():
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    score = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0], [0.0, 0.0, 0.0, 9.0, 9.0]])
    assert topk_keep(score, valid, [2, 2]).tolist() == [[1, 2], [0, 1]]
    assert topk_keep(score, valid, [3, 1]).tolist() == [[1, 2, 4], [0, -1, -1]]
    assert topk_keep(score, valid, [0, 0]).shape == (2, 0)


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("ties", [True, False])
def test_fastv_batched_equals_per_sample(layouts, ties):
    toks = _ragged(1, layouts, ties=ties)
    pol = get_policy("fastv")()
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        assert torch.equal(plan.sample(b).keep.cpu(), pol.select(t).keep.cpu())
        assert plan.totals[b] == len(pol.select(t).keep)


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("stage, budget", [(0, 0.125), (1, 0.125), (2, 0.125), (1, 16), (2, 3)])
def test_pyramiddrop_batched_equals_per_sample(layouts, stage, budget):
    toks = _ragged(2, layouts)
    pol = get_policy("pyramiddrop")()
    pol.stage_index, pol.num_stages, pol.final_budget = stage, 3, budget
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        assert torch.equal(plan.sample(b).keep.cpu(), pol.select(t).keep.cpu()), (b, t.segments)


def test_batch_plan_stack_round_trips_per_sample_plans():
    toks = _ragged(3, [[5], [3, 4], [2]])
    pol = get_policy("pool")()
    plans = [pol.select(Tokens(t.features, t.segments, t.budgets, grids=[None] * len(t.segments))) for t in toks]
    batch = BatchPlan.stack(plans + [None], [t.n for t in toks] + [0])
    assert batch.totals == [len(p.keep) for p in plans] + [0]
    for b, p in enumerate(plans):
        back = batch.sample(b, toks[b].n)
        assert torch.equal(back.keep, p.keep) and torch.equal(back.assign, p.assign)


# ----------------------------------------------------------------------------- engine: fast == slow
FAST = ["uniform", "random", "pool", "none", "vtw", "fastv", "pyramiddrop", "divprune", "visionzip", "tome", "temporal",
        "simignore", "cdpruner", "cls_tail", "prumerge+", "aim", "todre", "atp", "dart", "sparsevlm"]


def _slow(monkeypatch, name):
    cls = get_policy(name)
    monkeypatch.setattr(cls, "batched", False)
    monkeypatch.setattr(cls, "data_free", False)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fast_paths_equal_the_per_sample_path(monkeypatch, family, name, dtype):
    m = tiny_model(family).to(dtype)
    batch = make_inputs(m, [[1], [1, 1], [1]], prompt_lens=[5, 2, 3])
    budget = 1.0 if name == "none" else 0.3
    mmprune.wrap(m, name, budget=budget)
    fast = m(**batch).logits
    fast_kept = [[k.tolist() for k in s.kept] for s in mmprune.trace(m).stages]
    gen_fast = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with monkeypatch.context() as mp:
        _slow(mp, name)
        slow = m(**batch).logits
        slow_kept = [[k.tolist() for k in s.kept] for s in mmprune.trace(m).stages]
        gen_slow = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    mmprune.unwrap(m)
    assert fast_kept == slow_kept
    assert torch.equal(fast, slow)
    assert torch.equal(gen_fast, gen_slow)


# ----------------------------------------------------------------------------- zero host syncs
SYNC_FREE = ["uniform", "random", "vtw", "fastv", "pool", "pyramiddrop", "divprune", "visionzip", "tome", "temporal", "simignore", "cdpruner", "aim",
             "sparsevlm"]  # temporal on videos: test_temporal_on_videos_equals_per_sample_without_a_read
BATCHES = {1: ([[1]], [5]), 3: ([[1], [1], [1]], [5, 2, 3])}


def _added(model, batch, policy, budget=0.25):
    """Syncs the wrap adds to a prefill, and to the decode steps 2..4 of a greedy generation."""
    gen = dict(do_sample=False, pad_token_id=0)

    def measure():
        pre = count_syncs(lambda: model(**batch, use_cache=True)).counts
        g1 = count_syncs(lambda: model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **gen)).counts
        g4 = count_syncs(lambda: model.generate(**batch, max_new_tokens=4, min_new_tokens=4, **gen)).counts
        return pre, Counter({k: g4[k] - g1.get(k, 0) for k in g4})

    with torch.no_grad():
        base_pre, base_steps = measure()
        mmprune.wrap(model, policy, budget=budget)
        try:
            pre, steps = measure()
        finally:
            mmprune.unwrap(model)
    return added_syncs(pre, base_pre), added_syncs(steps, base_steps)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", SYNC_FREE)
@pytest.mark.parametrize("b", [1, 3])
def test_pruned_prefill_and_decode_add_no_host_sync(family, name, b):
    m = tiny_model(family)
    samples, prompts = BATCHES[b]
    batch = make_inputs(m, samples, prompt_lens=prompts)
    prefill, decode = _added(m, batch, name)
    assert not prefill, dict(prefill)
    assert not decode, dict(decode)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("name", ["cls_tail", "prumerge+", "todre", "atp", "dart"])
def test_adaptive_policies_read_once_per_stage(family, b, name):
    m = tiny_model(family)
    samples, prompts = BATCHES[b]
    prefill, decode = _added(m, make_inputs(m, samples, prompt_lens=prompts), name, budget=0.5)
    # one read per adaptive stage (atp: three stages); prumerge+ on LLaVA-1.5 selects in the tower and the
    # stage reads the merged groups' counts: two reads; dart reads its pivots (the official claim order is
    # a Python set's iteration order, taken from a real set on the host)
    want = {"atp": 3, "prumerge+": 2 if family == "llava" else 1}.get(name, 1)
    assert dict(prefill) == {"tolist": want}
    assert not decode, dict(decode)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("b", [1, 3])
def test_prumerge_plus_fixed_count_adds_no_sync(family, b):
    m = tiny_model(family)
    samples, prompts = BATCHES[b]
    cfg = mmprune.PruneConfig("prumerge+", 0.3, options={"adaptive": False})
    prefill, decode = _added(m, make_inputs(m, samples, prompt_lens=prompts), cfg, budget=None)
    assert not prefill, dict(prefill)
    assert not decode, dict(decode)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", ["uniform", "fastv", "visionzip", "tome"])
def test_other_families_add_no_host_sync(family, name):
    m = tiny_model(family)
    samples, prompts = BATCHES[3]
    prefill, decode = _added(m, make_inputs(m, samples, prompt_lens=prompts), name)
    assert not prefill, dict(prefill)
    assert not decode, dict(decode)


@torch.no_grad()
def test_only_batches_read_the_layout_on_the_host():
    """Batch 1 with one modality: the layout is host data (no read). Batch > 1: one host copy of input_ids,
    started at the top of the forward (before the vision tower), and the result is the same selection."""
    m = tiny_model("llava")
    mmprune.wrap(m, "uniform", budget=0.25)
    engine = m.__dict__["_mmprune"]
    one = make_inputs(m, [[1]], prompt_lens=[5])
    m(**one)
    assert engine.last_host_read is False
    kept_alone = mmprune.trace(m).stages[0].kept[0].tolist()
    two = make_inputs(m, [[1], [1]], prompt_lens=[5, 2])
    m(**two)
    assert engine.last_host_read is True
    assert mmprune.trace(m).stages[0].kept[0].tolist() == kept_alone
    mmprune.unwrap(m)


class _FirstHalf(Policy):
    """A custom policy written against the per-sample interface only (the slow path)."""

    name = "first_half"

    def select(self, tokens):
        return Plan(keep=per_segment(tokens, lambda n, k, _: torch.arange(k)))


@torch.no_grad()
def test_custom_per_sample_policies_work_and_the_recorder_names_their_syncs(monkeypatch):
    from mmprune.policies import _REGISTRY

    monkeypatch.setitem(_REGISTRY, "first_half", _FirstHalf)
    m = tiny_model("llava")
    batch = make_inputs(m, [[1], [1, 1]], prompt_lens=[5, 3])
    base = count_syncs(lambda: m(**batch)).counts
    mmprune.wrap(m, "first_half", budget=0.25)
    rec = count_syncs(lambda: m(**batch), stacks=True)
    kept = [k.tolist() for k in mmprune.trace(m).stages[0].kept]
    mmprune.unwrap(m)
    assert sum(added_syncs(rec.counts, base).values()) > 0  # the per-sample path reads the device
    assert any(line.startswith(("select.py:", "policies/")) for lines in rec.where.values() for line in lines)
    assert kept[0] == list(range(len(kept[0]))) and len(kept[1]) == 2 * len(kept[0])


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("budget", [0.4, 0.1, 1.0, 3])
def test_divprune_batched_equals_per_sample(layouts, budget):
    toks = _ragged(4, layouts, budget=budget)
    pol = get_policy("divprune")()
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t).keep.cpu()
        assert torch.equal(plan.sample(b).keep.cpu(), ref), (b, t.segments)
        assert plan.totals[b] == len(ref)


def _zip_tokens(seed, layouts, budget, cls=True, keys=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for segs in layouts:
        n = sum(segs)
        out.append(Tokens(torch.randn(n, 6, generator=g), list(segs), [resolve_budget(budget, c) for c in segs],
                          grids=[None] * len(segs), cls_attn=torch.rand(n, generator=g) if cls else None,
                          keys=torch.randn(n, 5, generator=g) if keys else None,
                          tower_cls=torch.ones(n) if cls else None))
    return out


def _same_plan(batch_plan, b, ref, n):
    got = batch_plan.sample(b, n)
    assert torch.equal(got.keep.cpu(), ref.keep.cpu())
    if ref.assign is None:  # keep only: a batched assign, if any, maps kept tokens to themselves, drops the rest
        if got.assign is not None:
            want = torch.full((n,), -1, dtype=torch.long)
            want[ref.keep.cpu()] = torch.arange(len(ref.keep))
            assert torch.equal(got.assign.cpu(), want)
    else:
        assert torch.equal(got.assign.cpu(), ref.assign.cpu())
        assert torch.allclose(got.weight.cpu().float(), ref.weight.cpu().float())


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("budget", [0.3, 0.1, 64, 1.0])
@pytest.mark.parametrize("cls, keys", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("options", [{}, {"cls_slot": "patch"}, {"dominant_ratio": 0.5}])
def test_visionzip_batched_equals_per_sample(layouts, budget, cls, keys, options):
    toks = _zip_tokens(5, layouts, budget, cls, keys)
    pol = get_policy("visionzip")(**options)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        _same_plan(plan, b, ref, t.n)
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("layouts", LAYOUTS + [[[16, 16], [16], [9, 16]]])
@pytest.mark.parametrize("budget", [0.3, 0.1, 5, 1.0])
@pytest.mark.parametrize("keys", [True, False])
def test_tome_batched_equals_per_sample(layouts, budget, keys):
    toks = _zip_tokens(6, layouts, budget, cls=False, keys=keys)
    pol = get_policy("tome")()
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        _same_plan(plan, b, ref, t.n)
        assert plan.totals[b] == len(ref.keep)


def test_documented_custom_policy_runs_batched_and_per_sample_alike(monkeypatch):
    """docs/policies.md's example policy, verbatim: registered, batched, equal to its per-sample path, no sync."""
    import re
    from pathlib import Path

    from mmprune.policies import _REGISTRY

    readme = Path(__file__).resolve().parents[1].joinpath("docs", "policies.md").read_text()
    code = re.search(r"```python\n(from mmprune.policies import register_policy\n.*?)```", readme, re.S).group(1)
    monkeypatch.setitem(_REGISTRY, "mine", "basic:NoPrune")
    exec(code, {})
    m = tiny_model("llava")
    batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    with torch.no_grad():
        base = count_syncs(lambda: m(**batch)).counts
        mmprune.wrap(m, "mine", budget=0.25)
        rec = count_syncs(lambda: m(**batch))
        fast = m(**batch).logits
        with monkeypatch.context() as mp:
            mp.setattr(get_policy("mine"), "batched", False)
            slow = m(**batch).logits
        mmprune.unwrap(m)
    assert not added_syncs(rec.counts, base)
    assert torch.equal(fast, slow)


def _video_tokens(seed, layouts, budget):
    """Segments as (count, grid): videos whose frames repeat with noise (some scene cuts), images, grid-less
    runs, a video with a trailing newline token (LLaVA-OneVision)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for segs in layouts:
        feats = []
        for cnt, grid in segs:
            if grid is not None and grid[0] > 1:
                t, h, w = grid
                base = torch.randn(h * w, 6, generator=g)
                frames = []
                for _ in range(t):
                    if torch.rand(1, generator=g).item() < 0.3:
                        base = torch.randn(h * w, 6, generator=g)  # a scene cut
                    frames.append(base + 0.3 * torch.randn(h * w, 6, generator=g))
                x = torch.cat(frames)
                feats.append(torch.cat([x, torch.randn(cnt - t * h * w, 6, generator=g)]))
            else:
                feats.append(torch.randn(cnt, 6, generator=g))
        counts = [c for c, _ in segs]
        out.append(Tokens(torch.cat(feats), counts, [resolve_budget(budget, c) for c in counts],
                          grids=[gr for _, gr in segs]))
    return out


VIDEO_LAYOUTS = [
    [[(24, (4, 2, 3))], [(9, (1, 3, 3)), (13, (3, 2, 2))], [(7, None), (24, (4, 2, 3))]],
    [[(40, (5, 2, 4))], [(40, (5, 2, 4))]],
    [[(9, (1, 3, 3))], [(5, None)]],
]


@pytest.mark.parametrize("layouts", VIDEO_LAYOUTS)
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.8, 0.0])
def test_temporal_batched_equals_per_sample(layouts, budget, seed, threshold):
    toks = _video_tokens(seed, layouts, budget)
    pol = get_policy("temporal")(threshold=threshold)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        _same_plan(plan, b, ref, t.n)
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
@torch.no_grad()
def test_temporal_on_videos_equals_per_sample_without_a_read(monkeypatch, family):
    """Videos: the batched temporal policy gives the per-sample path's logits and generations, and never
    reads the device (how many tokens found a predecessor in their scene stays a tensor)."""
    m = tiny_model(family)
    batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 3], video=True)
    base = count_syncs(lambda: m(**batch)).counts
    mmprune.wrap(m, "temporal", budget=0.3)
    rec = count_syncs(lambda: m(**batch))
    fast = m(**batch).logits
    gen_fast = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with monkeypatch.context() as mp:
        _slow(mp, "temporal")
        slow = m(**batch).logits
        gen_slow = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    mmprune.unwrap(m)
    assert not added_syncs(rec.counts, base)
    assert torch.equal(fast, slow)
    assert torch.equal(gen_fast, gen_slow)


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("budget", [0.3, 2, 1.0])
def test_simignore_batched_equals_per_sample(layouts, reduce, budget):
    toks = _ragged(7, layouts, budget=budget)
    g = torch.Generator().manual_seed(8)
    for i, t in enumerate(toks):  # questions of different lengths; one sample with no text at all
        if i != 1:
            t.question = torch.randn(2 + i, 6, generator=g)
            t.text = torch.cat([torch.randn(3, 6, generator=g), t.question])
    pol = get_policy("simignore")(reduce=reduce)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        assert torch.equal(plan.sample(b).keep.cpu(), ref.keep.cpu()), b


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("budget", [0.3, 3, 1.0])
@pytest.mark.parametrize("question", [True, False])
def test_cdpruner_batched_equals_per_sample(layouts, negate, budget, question):
    toks = _ragged(9, layouts, budget=budget)
    g = torch.Generator().manual_seed(10)
    if question:
        for i, t in enumerate(toks):
            t.question = torch.randn(2 + i, 6, generator=g)
    pol = get_policy("cdpruner")(negate=negate)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        assert torch.equal(plan.sample(b).keep.cpu(), ref.keep.cpu()), b


def test_dpp_rows_exhausted_kernel_takes_the_largest_diagonal_like_the_reference():
    from mmprune.policies._ops import dpp_greedy
    from mmprune.policies.batch import dpp_rows

    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # rank 2, 5 tokens
    kernel = (x @ x.T) * torch.tensor([1.0, 2.0, 3.0, 0.5, 1.5]).view(-1, 1)
    kernel = (kernel + kernel.T) / 2
    ref = dpp_greedy(kernel, 4)
    got = dpp_rows(kernel[None], torch.ones(1, 5, dtype=torch.bool), 4)[0]
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rank", [2, 8, 64])
def test_dpp_rows_equals_the_reference_row_by_row(seed, rank):
    """Ragged rows (valid prefixes), low-rank kernels exhausted part-way, rounded features with ties: each row's
    picks are the per-image reference's (the guard applied after the loop must reproduce it round for round)."""
    from mmprune.policies._ops import dpp_greedy
    from mmprune.policies.batch import dpp_rows

    g = torch.Generator().manual_seed(seed)
    n = [37, 64, 19]
    x = torch.randn(3, 64, rank, generator=g)
    x = (x.round() if seed % 2 else x) + 1e-3
    x = x / x.norm(dim=-1, keepdim=True)
    r = torch.rand(3, 64, generator=g)
    kernel = r.unsqueeze(-1) * (x @ x.transpose(1, 2)) * r.unsqueeze(1)
    valid = torch.arange(64) < torch.tensor(n).unsqueeze(1)
    ks = [min(c, 30) for c in n]
    got = dpp_rows(kernel, valid, max(ks))
    for i, (c, k) in enumerate(zip(n, ks)):
        assert got[i, :k].tolist() == dpp_greedy(kernel[i, :c, :c], k).tolist(), i


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("budget", [0.5, 1.0, 2])
@pytest.mark.parametrize("cls", [True, False])
def test_cls_tail_batched_equals_per_sample(layouts, budget, cls):
    toks = _ragged(11, layouts, budget=budget)
    g = torch.Generator().manual_seed(12)
    for t in toks:  # long-tailed similarities
        t.cls_sim = torch.rand(t.n, generator=g) ** 4 if cls else None
    pol = get_policy("cls_tail")()
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        assert torch.equal(plan.sample(b).keep.cpu(), ref.keep.cpu()), b
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("layouts", LAYOUTS + [[[40], [40, 9]]])
@pytest.mark.parametrize("budget", [0.3, 0.6, 5, 1.0])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("spiky", [True, False])
def test_prumerge_plus_batched_equals_per_sample(layouts, budget, adaptive, spiky):
    toks = _zip_tokens(13, layouts, budget)
    g = torch.Generator().manual_seed(14)
    for t in toks:  # a few outliers (or none) in the [CLS] attention
        a = torch.rand(t.n, generator=g) * 0.1
        if spiky:
            a[torch.randperm(t.n, generator=g)[: max(1, t.n // 9)]] += 1.0
        t.cls_attn = a
    pol = get_policy("prumerge+")(adaptive=adaptive)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        got = plan.sample(b, t.n)
        assert torch.equal(got.keep.cpu(), ref.keep.cpu()), (b, got.keep, ref.keep)
        assert torch.equal(got.assign.cpu(), ref.assign.cpu()), b
        assert torch.allclose(got.combine.cpu(), ref.combine.cpu(), atol=1e-6), b
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("layouts", LAYOUTS + [[[16, 16], [16], [9, 16]]])
@pytest.mark.parametrize("budget", [0.3, 0.1, 5])
def test_aim_merge_batched_equals_per_sample(layouts, budget):
    from mmprune.policies.multistage import AimMerge

    toks = _zip_tokens(15, layouts, budget, cls=False, keys=False)
    pol = AimMerge()
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        _same_plan(plan, b, pol.select(t), t.n)


def _with_text_attn(toks, seed, empty=1):
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(toks):  # question rows' attention; one sample without question rows
        t.text_attn = torch.rand(0 if i == empty else 2 + i, t.n, generator=g) * 0.1
    return toks


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("mass", [0.05, 10.0])
def test_todre_withdraw_batched_equals_per_sample(layouts, mass):
    from mmprune.policies.multistage import ToDREWithdraw

    toks = _with_text_attn(_ragged(16, layouts, ties=False), 17)
    pol = ToDREWithdraw(mass=mass)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        assert torch.equal(plan.sample(b).keep.cpu(), ref.keep.cpu()), b


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("stage, budget", [(0, 0.25), (1, 0.25), (2, 0.5), (1, 4)])
@pytest.mark.parametrize("attn", [True, False])
def test_atp_batched_equals_per_sample(layouts, stage, budget, attn):
    toks = _with_text_attn(_ragged(18, layouts, ties=False), 19)
    if not attn:
        for t in toks:
            t.attn = None
    pol = get_policy("atp")()
    pol.stage_index, pol.num_stages, pol.final_budget = stage, 3, budget
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        assert torch.equal(plan.sample(b).keep.cpu(), ref.keep.cpu()), (b, plan.sample(b).keep, ref.keep)
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("budget", [0.5, 0.25, 16, 1.0])
@pytest.mark.parametrize("options", [{}, {"pivots": 2, "text_pivots": 1}, {"text_pivots": 0}])
def test_dart_batched_equals_per_sample(layouts, budget, options):
    g = torch.Generator().manual_seed(20)
    toks = _ragged(21, layouts, budget=budget, ties=False)
    for i, t in enumerate(toks):  # in-LLM signals; sequence rows spread so the set order is non-trivial
        q = 2 + 3 * i
        t.layer = 2
        t.llm_keys, t.normed = torch.randn(t.n, 5, generator=g), torch.randn(t.n, 6, generator=g)
        t.question = torch.randn(q, 6, generator=g)
        t.question_keys, t.question_normed = torch.randn(q, 5, generator=g), torch.randn(q, 6, generator=g)
        t.rows = torch.randperm(40 + t.n, generator=g)[: t.n].sort().values + 7 * i
        t.question_rows = torch.arange(q) + 60 + t.n
    pol = get_policy("dart")(**options)
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        assert torch.equal(plan.sample(b).keep.cpu(), ref.keep.cpu()), (b, plan.sample(b).keep, ref.keep)
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("layouts", LAYOUTS + [[[40], [40], [30, 10]]])
@pytest.mark.parametrize("stage, budget", [(0, 0.25), (1, 0.25), (2, 0.1), (0, 16)])
@pytest.mark.parametrize("recycle", [True, False])
@pytest.mark.parametrize("embeds", [True, False])
def test_sparsevlm_batched_equals_per_sample(layouts, stage, budget, recycle, embeds):
    g = torch.Generator().manual_seed(22)
    toks = _with_text_attn(_ragged(23, layouts, budget=budget, ties=False), 24, empty=-1)
    for t in toks:
        t.origin = [c + 20 for c in t.segments]
        if embeds:
            t.visual_embeds = torch.randn(t.n + 5, 6, generator=g)
            t.question_embeds = torch.randn(t.text_attn.shape[0], 6, generator=g)
    pol = get_policy("sparsevlm")(recycle=recycle)
    pol.stage_index, pol.num_stages, pol.final_budget = stage, 3, budget
    plan = pol.select_batch(BatchTokens.from_tokens(toks))
    for b, t in enumerate(toks):
        ref = pol.select(t)
        got = plan.sample(b, t.n)
        assert torch.equal(got.keep.cpu(), ref.keep.cpu()), (b, got.keep, ref.keep)
        if ref.assign is not None:
            assert torch.equal(got.assign.cpu(), ref.assign.cpu()), b
            assert torch.allclose(got.weight.cpu(), ref.weight.cpu()), b
        assert plan.totals[b] == len(ref.keep)


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
@pytest.mark.parametrize("name", ["fastv", "dart", "sparsevlm"])
@torch.no_grad()
def test_layer_signals_tap_the_key_projection_instead_of_recomputing_it(family, name):
    """Layer K-1's keys come from its own ``k_proj`` call (one call per prefill, not two), and the
    selection equals the one made from recomputed keys (the tap removed)."""
    m = tiny_model(family)
    batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    mmprune.wrap(m, name, budget=0.3)
    engine = m.__dict__["_mmprune"]
    attn = engine.adapter.attention_module(engine.llm_stages[0].layer - 1)
    calls = []
    h = attn.k_proj.register_forward_hook(lambda mod, a, out: calls.append(out.shape))
    tapped = m(**batch).logits
    kept = [k.tolist() for k in mmprune.trace(m).stages[0].kept]
    assert len(calls) == 1
    h.remove()
    attn.k_proj._forward_hooks.clear()  # no tap: the engine projects the keys again
    again = m(**batch).logits
    assert [k.tolist() for k in mmprune.trace(m).stages[0].kept] == kept
    mmprune.unwrap(m)
    assert torch.equal(tapped, again)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@torch.no_grad()
def test_decode_masks_are_built_once_per_generation(family):
    """Every decode step hands the language model and the pruned layers views of the same buffers (built at
    the first step, the new columns copied in), whose values are the masks built from scratch."""
    m = tiny_model(family)
    batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 2])
    mmprune.wrap(m, "fastv", budget=0.3)
    engine = m.__dict__["_mmprune"]
    k = engine.llm_stages[0].layer
    seen = []

    def grab(mod, args, kwargs):
        mask = kwargs["attention_mask"]
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            seen.append((mask.untyped_storage().data_ptr(), mask.clone(), engine.decode_state.stage_masks[k]))

    h = m.model.language_model.layers[k].register_forward_pre_hook(grab, with_kwargs=True)
    m.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    h.remove()
    mmprune.unwrap(m)
    assert len(seen) == 5 and len({ptr for ptr, _, _ in seen}) == 1
    prompt = seen[0][2].bool()
    for step, (_, mask, _) in enumerate(seen, start=1):
        want = torch.cat([prompt, torch.ones(2, step, dtype=torch.bool)], 1)[:, None, None, :]
        assert torch.equal(mask, want)


@pytest.mark.parametrize("seed", range(6))
def test_bipartite_ragged_equals_bipartite_rows_row_by_row(seed):
    """Device-side counts: each row merges exactly as ``bipartite_rows`` on that row alone, rows already
    at their target pass through, extra rounds change nothing, padding stays -1."""
    from mmprune.policies.batch import bipartite_ragged, bipartite_rounds, bipartite_rows

    g = torch.Generator().manual_seed(seed)
    w = [1, 2, 7, 16, 33, 40][seed]
    t = torch.randint(0, w + 1, (5,), generator=g)
    k = torch.stack([torch.randint(1, int(c) + 3, (1,), generator=g)[0] for c in t])
    x, sizes = torch.randn(5, w, 6, generator=g), torch.rand(5, w, generator=g) + 0.5
    rounds = max(bipartite_rounds(int(c), int(kk)) for c, kk in zip(t, k))
    rep = bipartite_ragged(x, sizes, t, k, rounds + seed % 2)
    for i, (c, kk) in enumerate(zip(t.tolist(), k.tolist())):
        assert (rep[i, c:] == -1).all()
        if c <= kk:
            assert rep[i, :c].tolist() == list(range(c))
            continue
        keep, assign, _ = bipartite_rows(x[i : i + 1, :c], sizes[i : i + 1, :c], kk)
        assert rep[i, :c].tolist() == keep[0][assign[0]].tolist()
