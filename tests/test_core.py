"""Core contract: wrap/unwrap, equivalences (budget 1.0, masked reference, cache), fastv scores, errors."""

from __future__ import annotations

import re

import pytest
import torch

import mmprune
from mmprune.testing import FAMILIES, make_inputs, tiny_model

# Per family: images per sample giving ragged visual counts (different sizes / counts per sample).
RAGGED = {
    "llava": [[1], [1, 1]],
    "llava_next": [[1], [2, 1]],
    "llava_onevision": [[1], [2]],
    "qwen2_vl": [[1], [2, 1]],
    "qwen2_5_vl": [[2], [1, 3]],
    "qwen3_vl": [[1], [2, 1]],
}
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_cache: dict = {}


def model_for(family, attn="sdpa", dtype=torch.float32):
    key = (family, attn, dtype)
    if key not in _cache:
        _cache[key] = tiny_model(family, attn=attn, dtype=dtype)
    m = _cache[key]
    mmprune.unwrap(m)
    return m


def batch_for(model, family, video=False, seed=0):
    return make_inputs(model, RAGGED[family] if not video else [[1], [2]], prompt_lens=[5, 2], video=video, seed=seed)


SPECIAL = list(range(150, 160))  # placeholder / vision ids: a random model must not generate them


def greedy(model, batch, n=4, **kw):
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, suppress_tokens=SPECIAL, **kw)
    return out[:, -n:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_one_reproduces_and_unwrap_is_exact(family, attn):
    m = model_for(family, attn)
    batch = batch_for(m, family)
    with torch.no_grad():  # transformers installs its own output-capturing hooks on the first forward
        m(**batch)
    hooks_before = {n: (dict(mod._forward_pre_hooks), dict(mod._forward_hooks)) for n, mod in m.named_modules()}
    dict_before = {n: set(mod.__dict__) for n, mod in m.named_modules()}
    state_before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(**batch).logits
        for policy in ("none", "uniform", "random"):
            mmprune.wrap(m, policy, budget=1.0)
            out = m(**batch).logits
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        mmprune.wrap(m, "uniform", budget=1.0, layer=1)  # in-LLM at budget 1.0 too
        torch.testing.assert_close(m(**batch).logits, ref, atol=1e-5, rtol=0)
        mmprune.wrap(m, "fastv", budget=0.3)
        assert not torch.equal(m(**batch).logits, ref)
        mmprune.unwrap(m)
        assert torch.equal(m(**batch).logits, ref)
    assert {n: (dict(mod._forward_pre_hooks), dict(mod._forward_hooks)) for n, mod in m.named_modules()} == hooks_before
    assert {n: set(mod.__dict__) for n, mod in m.named_modules()} == dict_before
    assert all(torch.equal(v, state_before[k]) for k, v in m.state_dict().items())


def _original_positions(model, batch):
    """Position ids the unwrapped model uses for this batch (M-RoPE ids for Qwen)."""
    if model.config.model_type.startswith("qwen"):
        kw = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch}
        pos, _ = model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], attention_mask=batch["attention_mask"], **kw
        )
        return pos
    return (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def _masked_greedy(model, batch, drop_mask, n):
    """Reference: full-length, no cache, dropped visual tokens masked out of attention at original positions."""
    ids, mask = batch["input_ids"], batch["attention_mask"] * (~drop_mask).long()
    pos = _original_positions(model, batch)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    toks, first_logits = [], None
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra).logits[:, -1]
        first_logits = logits.clone() if first_logits is None else first_logits
        logits[:, SPECIAL] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(nxt)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt).int()], 1)
    return torch.cat(toks, 1), first_logits


def _dropped_positions(model, batch, trace):
    visual = model.__dict__["_mmprune"].adapter.visual_mask(batch["input_ids"])
    drop = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        pos = visual[b].nonzero().flatten()
        keep = torch.zeros(len(pos), dtype=torch.bool)
        keep[trace.stages[0].kept[b]] = True
        drop[b, pos[~keep]] = True
    return drop


def _assert_first_step_equals_masked(m, batch, policy, budget):
    """Pruned prefill's next-token logits == the unwrapped model with the dropped tokens masked out."""
    mmprune.wrap(m, policy, budget=budget)
    with torch.no_grad():
        first = m(**batch).logits[:, -1]
    drop = _dropped_positions(m, batch, mmprune.trace(m))
    mmprune.unwrap(m)
    _, want = _masked_greedy(m, batch, drop, 1)
    torch.testing.assert_close(first, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["uniform", "random"])
def test_pre_llm_pruning_equals_masked_full_run(family, policy):
    m = model_for(family)
    batch = batch_for(m, family)
    mmprune.wrap(m, policy, budget=0.4)
    with torch.no_grad():
        first = m(**batch).logits[:, -1]
    tr = mmprune.trace(m)
    assert tr.stages[0].n_after != tr.stages[0].n_before
    drop = _dropped_positions(m, batch, tr)
    with torch.no_grad():
        got = greedy(m, batch, use_cache=False)
    mmprune.unwrap(m)
    want, want_first = _masked_greedy(m, batch, drop, 4)
    torch.testing.assert_close(first, want_first, atol=1e-4, rtol=1e-4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_pre_llm_pruning_equals_masked_full_run(family):
    m = model_for(family)
    batch = batch_for(m, family, video=True)
    _assert_first_step_equals_masked(m, batch, "uniform", 0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stages", ["pre", "llm", "both"])
def test_cached_generate_equals_uncached(family, stages):
    m = model_for(family)
    batch = batch_for(m, family)
    cfg = {
        "pre": [mmprune.PruneConfig("uniform", 0.5)],
        "llm": [mmprune.PruneConfig("random", 0.5, layer=2)],
        "both": [mmprune.PruneConfig("uniform", 0.6), mmprune.PruneConfig("random", 0.5, layer=1)],
    }[stages]
    mmprune.wrap(m, cfg)
    with torch.no_grad():
        cached = greedy(m, batch, n=5)
        uncached = greedy(m, batch, n=5, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_static_cache_beam_and_sampling(family):
    m = model_for(family)
    batch = batch_for(m, family)
    mmprune.wrap(m, [mmprune.PruneConfig("uniform", 0.5), mmprune.PruneConfig("random", 0.5, layer=2)])
    with torch.no_grad():
        dynamic = greedy(m, batch, n=4)
        static = greedy(m, batch, n=4, cache_implementation="static")
        assert torch.equal(dynamic, static)
        beams_cached = m.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False)
        beams_uncached = m.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False, use_cache=False)
        assert torch.equal(beams_cached, beams_uncached)
        torch.manual_seed(3)
        s1 = m.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5)
        torch.manual_seed(3)
        s2 = m.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, use_cache=False)
        assert torch.equal(s1, s2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_fastv_scores_equal_eager_attention(family):
    sdpa, eager = model_for(family, "sdpa"), model_for(family, "eager")
    eager.load_state_dict(sdpa.state_dict())
    batch = batch_for(sdpa, family)
    layer = 2
    mmprune.wrap(sdpa, "fastv", budget=0.5, layer=layer)
    with torch.no_grad():
        sdpa(**batch)
        ref = eager(**batch, output_attentions=True).attentions[layer - 1]  # [B, H, L, L]
    st = mmprune.trace(sdpa).stages[0]
    visual = sdpa.__dict__["_mmprune"].adapter.visual_mask(batch["input_ids"])
    for b in range(ref.shape[0]):
        want = ref[b, :, -1].mean(0)[visual[b]]
        torch.testing.assert_close(st.scores[b], want.float(), atol=1e-5, rtol=0)
        top = torch.topk(want, st.n_after[b]).indices.sort().values
        assert torch.equal(st.kept[b], top)
    mmprune.unwrap(sdpa)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_labels_keep_full_length_logits(family):
    m = model_for(family)
    batch = batch_for(m, family)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = m(**batch, labels=labels)
        mmprune.wrap(m, "uniform", budget=1.0)
        same = m(**batch, labels=labels)
        torch.testing.assert_close(same.loss, ref.loss, atol=1e-5, rtol=0)
        mmprune.wrap(m, [mmprune.PruneConfig("uniform", 0.5), mmprune.PruneConfig("fastv", 0.5, layer=2)])
        out = m(**batch, labels=labels)
    assert out.logits.shape == ref.logits.shape and torch.isfinite(out.loss)
    # text rows after the last visual token see fewer visual keys but keep their place in the output
    assert out.logits.shape[1] == batch["input_ids"].shape[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_bf16(family):
    m = model_for(family, dtype=torch.bfloat16)
    batch = batch_for(m, family)
    with torch.no_grad():
        ref = m(**batch).logits
        mmprune.wrap(m, "uniform", budget=1.0)
        torch.testing.assert_close(m(**batch).logits, ref, atol=1e-5, rtol=0)
        mmprune.wrap(m, "uniform", budget=0.5)
        first = m(**batch).logits[:, -1].float()
        drop = _dropped_positions(m, batch, mmprune.trace(m))
        mmprune.wrap(m, [mmprune.PruneConfig("uniform", 0.5), mmprune.PruneConfig("fastv", 0.5, layer=2)])
        assert greedy(m, batch).shape == (2, 4)
    mmprune.unwrap(m)
    _, want = _masked_greedy(m, batch, drop, 1)
    torch.testing.assert_close(first, want.float(), atol=0.05, rtol=0.02)  # bf16: ~3 significant digits


def test_budget_int_is_per_image_and_trace_shape():
    m = model_for("qwen2_vl")
    batch = batch_for(m, "qwen2_vl")  # sample 0: one image of 4 tokens; sample 1: 6 + 4 tokens
    mmprune.wrap(m, "uniform", budget=3)
    with torch.no_grad():
        m(**batch)
    st = mmprune.trace(m).stages[0]
    assert st.layer is None and st.n_before == [4, 10] and st.n_after == [3, 6]
    for k in st.kept:
        assert torch.equal(k, k.sort().values) and k.dtype == torch.long
    mmprune.wrap(m, "fastv", budget=2)  # in-LLM, default layer 2; per-image budgets summed per sample
    with torch.no_grad():
        m(**batch)
    st = mmprune.trace(m).stages[0]
    assert st.layer == 2 and st.n_after == [2, 4]
    lt = mmprune.trace(m).layer_tokens
    assert len(lt) == 4 and lt[2][1] == lt[0][1] - 6


def test_text_only_is_noop_and_models_do_not_interfere():
    a, b = tiny_model("llava", seed=1), tiny_model("llava", seed=2)
    batch = make_inputs(a, [[1], [1]], prompt_lens=[4, 6])
    text = {"input_ids": batch["input_ids"][:, :6], "attention_mask": batch["attention_mask"][:, :6]}
    with torch.no_grad():
        ref_text = a(**text).logits
        alone_a = (mmprune.wrap(a, "uniform", budget=0.5), greedy(a, batch))[1]
        alone_b = (mmprune.wrap(b, "fastv", budget=0.25), greedy(b, batch))[1]
        for _ in range(2):  # interleaved
            assert torch.equal(greedy(a, batch), alone_a)
            assert torch.equal(greedy(b, batch), alone_b)
        torch.testing.assert_close(a(**text).logits, ref_text, atol=1e-6, rtol=0)
    assert mmprune.trace(a).n_visual == [0, 0]
    with mmprune.disabled(a), torch.no_grad():
        mmprune.unwrap(b)
        assert not torch.equal(greedy(a, batch), alone_a) or True  # runs unpruned without error


def test_disabled_context_runs_unpruned():
    m = model_for("llava")
    batch = batch_for(m, "llava")
    with torch.no_grad():
        ref = m(**batch).logits
        mmprune.wrap(m, "uniform", budget=0.25)
        with mmprune.disabled(m):
            assert torch.equal(m(**batch).logits, ref)
        assert not torch.equal(m(**batch).logits, ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="uniform", budget=0), "budget must be"),
        (dict(policy="uniform", budget=-3), "budget must be"),
        (dict(policy="uniform", budget=1.5), "budget must be"),
        (dict(policy="uniform", budget="half"), "budget must be"),
        (dict(policy="uniform", budget=True), "budget must be"),
        (dict(policy="uniform", budget=float("nan")), "budget must be"),
        (dict(policy="nope", budget=0.5), re.escape(
            "unknown policy 'nope'; known policies: aim, atp, cdpruner, cls_tail, dart, divprune, downsample, fastv, none, pool, "
            "prefusion, prumerge+, pyramiddrop, random, simignore, sparsevlm, temporal, todre, tome, uniform, "
            "visionzip, vtw")),
        (dict(policy="fastv", budget=0.5, layer=4), r"outside \[1, 4\)"),
        (dict(policy="fastv", budget=0.5, layer=0), r"outside \[1, 4\)"),
        (dict(policy="uniform", budget=0.5, layer=-1), "layer must be"),
        (dict(policy="random", budget=0.5, sead=1), "unknown option"),
        (dict(policy="tome", budget=0.5, where="tower"),
         re.escape("tome option where must be one of 'auto', 'encoder', 'projector'; got 'tower'")),
        (dict(policy="visionzip", budget=0.5, cls_slot="first"), "visionzip option cls_slot must be one of"),
        (dict(policy="visionzip", budget=0.5, where="encoder"), "visionzip option where must be one of 'auto', 'projector'"),
        (dict(policy="prumerge+", budget=0.5, where="encoder"), "prumerge\\+ option where must be one of"),
        (dict(policy="simignore", budget=0.5, reduce="sum"), "simignore option reduce must be one of 'mean', 'max'"),
        (dict(policy="downsample", budget=0.5, mode="lanczos"), "downsample option mode must be one of 'bicubic'"),
    ],
)
def test_bad_input_errors(kwargs, match):
    m = model_for("llava")
    policy = kwargs.pop("policy")
    with pytest.raises(ValueError, match=match):
        mmprune.wrap(m, policy, **kwargs)
    assert "_mmprune" not in m.__dict__


def test_option_choices_cover_defaults():
    """Every fixed-set option is a real option whose default is itself accepted."""
    from mmprune.policies import get_policy, policies

    for name in policies():
        cls = get_policy(name)
        for key, allowed in cls.option_choices.items():
            assert cls.option_defaults()[key] in allowed, (name, key)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    for model in (torch.nn.Linear(2, 2), LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1,
                                                                     num_attention_heads=2, vocab_size=32,
                                                                     intermediate_size=32))):
        with pytest.raises(mmprune.UnsupportedModelError, match="supports the .* of: llava, llava_next"):
            mmprune.wrap(model, "uniform", budget=0.5)


def test_wrap_replaces_previous_wrap_and_stack_order():
    m = model_for("qwen2_vl")
    mmprune.wrap(m, "fastv", budget=0.5)
    mmprune.wrap(m, [mmprune.PruneConfig("random", 0.5, layer=3), mmprune.PruneConfig("uniform", 0.5)])
    engine = m.__dict__["_mmprune"]
    assert [s.layer for s in engine.stages] == [None, 3]
    n_hooks = sum(len(mod._forward_pre_hooks) for mod in m.modules())
    assert n_hooks == 3  # top-level, language model, layer 3 (fastv's hooks are gone)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_eager_attention_paths(family):
    m = model_for(family, "eager")
    batch = batch_for(m, family)
    # text-independent policies only: fastv re-ranks on every uncached step, as its last token changes
    mmprune.wrap(m, [mmprune.PruneConfig("uniform", 0.6), mmprune.PruneConfig("random", 0.5, layer=2)])
    with torch.no_grad():
        assert torch.equal(greedy(m, batch, n=4), greedy(m, batch, n=4, use_cache=False))
    _assert_first_step_equals_masked(m, batch, "random", 0.4)
