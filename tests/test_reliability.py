"""Issue 22: wrapped models stay right under generate's expansion (beams, several returns), threads and copies."""

from __future__ import annotations

import pytest
import torch

import mmprune
from mmprune.testing import FAMILIES, make_inputs, tiny_model

# multi-image samples where the family takes them, so generate's per-sample image groups are exercised
LAYOUT = {"llava": [[1], [1, 1]], "llava_next": [[1], [1]], "llava_onevision": [[1], [2]], "qwen2_vl": [[1], [2, 1]],
          "qwen2_5_vl": [[2], [1]], "qwen3_vl": [[1], [2, 1]]}
TOWER = ["visionzip", "cls_tail", "tome", "prumerge+"]  # policies reading vision-tower signals


def _tower(model):
    inner = model.model
    return getattr(inner, "vision_tower", None) or inner.visual


def _kept(model):
    return [k.tolist() for k in mmprune.trace(model).stages[0].kept]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", TOWER + ["fastv"])
@torch.no_grad()
def test_several_returns_equal_greedy_repeated(family, policy):
    """``do_sample=True, top_k=1, num_return_sequences=3`` is greedy three times: every copy of a sample keeps
    the tokens the sample keeps alone (generate repeats the encoder outputs; the signals follow)."""
    m = tiny_model(family)
    batch = make_inputs(m, LAYOUT[family], prompt_lens=[5, 3])
    mmprune.wrap(m, policy, budget=0.3)
    greedy = m.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    kept, notes = _kept(m), mmprune.trace(m).notes
    three = m.generate(**batch, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=3, pad_token_id=0)
    kept3, notes3 = _kept(m), mmprune.trace(m).notes
    mmprune.unwrap(m)
    assert kept3 == [k for k in kept for _ in range(3)]
    assert torch.equal(three, greedy.repeat_interleave(3, 0))
    assert notes3 == notes  # no signal fell back because of the expansion


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("policy", TOWER)
@torch.no_grad()
def test_beam_search_keeps_one_token_set_per_sample(family, policy):
    m = tiny_model(family)
    batch = make_inputs(m, LAYOUT[family], prompt_lens=[5, 3])
    mmprune.wrap(m, policy, budget=0.3)
    m(**batch)
    kept = _kept(m)
    m.generate(**batch, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    beams = _kept(m)
    mmprune.unwrap(m)
    assert beams == [k for k in kept for _ in range(3)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("policy", ["visionzip", "fastv", "tome"])
@torch.no_grad()
def test_one_wrapped_model_called_from_threads_gives_each_caller_its_own_result(family, policy):
    """Forwards from several threads are serialised on the engine (its per-call state is not shared
    between them); each thread's trace is its own last prefill."""
    import threading

    m = tiny_model(family)
    inputs = [make_inputs(m, [[1]] * b, prompt_lens=[4 + b] * b, seed=b) for b in (1, 2, 3)]
    mmprune.wrap(m, policy, budget=0.3)
    want, want_kept = [], []
    for x in inputs:
        want.append(m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0))
        want_kept.append(_kept(m))
    errors, results = [], {}

    def worker(t):
        try:
            for r in range(4):
                i = (t + r) % 3
                got = m.generate(**inputs[i], max_new_tokens=3, do_sample=False, pad_token_id=0)
                results[(t, r)] = (i, got, _kept(m))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    mmprune.unwrap(m)
    assert not errors, errors
    assert len(results) == 12
    for i, got, kept in results.values():
        assert torch.equal(got, want[i]) and kept == want_kept[i]


@torch.no_grad()
def test_a_forward_that_raises_releases_the_engine_for_other_threads():
    import threading

    m = tiny_model("llava")
    x = make_inputs(m, [[1]], prompt_lens=[5])
    mmprune.wrap(m, "fastv", budget=0.3)
    with pytest.raises(RuntimeError, match="channels"):
        m(**{**x, "pixel_values": x["pixel_values"][:, :1]})  # a broken input: the forward raises
    done = []
    t = threading.Thread(target=lambda: done.append(m(**x).logits.shape))
    t.start()
    t.join(60)
    mmprune.unwrap(m)
    assert done, "the engine stayed locked after a failed forward"


@pytest.mark.parametrize("family, policy", [("llava", "visionzip"), ("llava", "tome"), ("qwen2_vl", "fastv"),
                                            ("qwen3_vl", "uniform"), ("llava_onevision", "cls_tail")])
@torch.no_grad()
def test_a_deep_copy_is_wrapped_on_its_own_modules(family, policy):
    """``copy.deepcopy`` gives a wrapped copy that prunes like the original, runs its *own* vision tower and
    layers (a change to the copy's tower shows in the copy only), and unwraps on its own."""
    import copy

    m = tiny_model(family)
    x = make_inputs(m, LAYOUT[family], prompt_lens=[5, 3])
    mmprune.wrap(m, policy, budget=0.3)
    want, kept = m(**x).logits, _kept(m)
    twin = copy.deepcopy(m)
    assert mmprune.is_wrapped(twin) and twin.__dict__["_mmprune"] is not m.__dict__["_mmprune"]
    assert torch.equal(twin(**x).logits, want) and _kept(twin) == kept
    for p in _tower(twin).parameters():  # e.g. a quantised or fine-tuned copy's tower
        p.mul_(0.5)
    changed = twin(**x).logits
    assert torch.equal(m(**x).logits, want)  # the original is untouched
    ref = copy.deepcopy(m)  # the same change on a model wrapped from scratch
    mmprune.unwrap(ref)
    for p in _tower(ref).parameters():
        p.mul_(0.5)
    mmprune.wrap(ref, policy, budget=0.3)
    assert torch.equal(ref(**x).logits, changed)
    mmprune.unwrap(twin)
    assert mmprune.is_wrapped(m) and torch.equal(m(**x).logits, want)
    mmprune.unwrap(m)


def test_pickling_a_wrapped_model_says_what_to_do():
    import io

    m = tiny_model("llava")
    mmprune.wrap(m, "fastv", budget=0.3)
    with pytest.raises(TypeError, match=r"cannot be pickled .*state_dict"):
        torch.save(m, io.BytesIO())
    sd = m.state_dict()  # the supported way
    mmprune.unwrap(m)
    assert sd.keys() == m.state_dict().keys()


# ----------------------------------------------------------------------------- issue 24: transformers' contracts
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_caches_and_encoder_outputs_gain_no_attributes(family):
    """mmprune's per-call state lives beside the caller's objects: a pruned generate leaves the user's cache
    with the attributes an unwrapped one has, and ``get_image_features`` outputs (``return_dict`` True or
    False) come back as transformers makes them."""
    from transformers import DynamicCache

    m = tiny_model(family)
    x = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    plain = DynamicCache(config=m.config.get_text_config())
    m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0, cache=plain)
    mmprune.wrap(m, "uniform", budget=0.5)
    cache = DynamicCache(config=m.config.get_text_config())
    m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0, cache=cache)
    assert set(vars(cache)) == set(vars(plain))
    pv = {k: v for k, v in x.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    out = m.model.get_image_features(**pv, return_dict=True)
    assert not [k for k in vars(out) if "mmprune" in k]
    tup = m.model.get_image_features(**pv, return_dict=False)
    mmprune.unwrap(m)
    assert isinstance(tup, tuple)
    assert torch.equal(tup[1][0] if isinstance(tup[1], (list, tuple)) else tup[1], out.pooler_output[0])


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])  # Qwen-VL's rope index needs a 2-D mask itself
@torch.no_grad()
def test_custom_4d_masks_pass_through_identity_wraps_and_are_refused_by_pruning(family):
    m = tiny_model(family)
    x = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    length = x["input_ids"].shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask4d = (causal[None, None] & x["attention_mask"].bool()[:, None, None, :]) | torch.eye(length, dtype=torch.bool)
    want = m(**{**x, "attention_mask": mask4d}).logits
    for policy, budget in (("none", 1.0), ("fastv", 1.0), ("tome", 1.0)):
        mmprune.wrap(m, policy, budget=budget)
        for mask in (mask4d, mask4d.float().log()):  # bool, additive float
            assert torch.allclose(m(**{**x, "attention_mask": mask}).logits, want, atol=1e-5)
            assert "unpruned" in mmprune.trace(m).notes[0]
    mmprune.wrap(m, "fastv", budget=0.5)
    with pytest.raises(ValueError, match=r"cannot prune with a custom attention mask \(a 4-D mask\)"):
        m(**{**x, "attention_mask": mask4d})
    mmprune.unwrap(m)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("policy, budget", [("none", 1.0), ("uniform", 1.0)])
@torch.no_grad()
def test_batch_one_without_a_mask_hands_the_language_model_none(family, policy, budget):
    """No mask at batch 1: the LM gets None as it would unwrapped (SDPA's causal path; packed sequences
    marked by position_ids stay apart), so the identity wraps give the unwrapped logits bit for bit."""
    m = tiny_model(family)
    x = make_inputs(m, [[1]], prompt_lens=[5])
    x.pop("attention_mask")
    seen = []
    h = m.model.language_model.register_forward_pre_hook(lambda mod, a, k: seen.append(k.get("attention_mask")),
                                                         with_kwargs=True)
    want = m(**x).logits
    mmprune.wrap(m, policy, budget=budget)
    got = m(**x).logits
    mmprune.unwrap(m)
    h.remove()
    assert seen[0] is None and seen[1] is None
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["uniform", "fastv", "visionzip"])
@torch.no_grad()
def test_bare_base_models_wrap_like_the_generation_classes(family, policy):
    """``LlavaModel``, ``Qwen2VLModel``, ...: the same tower and decoder, so the same pruning; the base
    model's last hidden state equals the generation model's final hidden state row for row."""
    m = tiny_model(family)
    base = m.model
    x = make_inputs(m, LAYOUT[family], prompt_lens=[5, 3])
    mmprune.wrap(m, policy, budget=0.4)
    full = m(**x, output_hidden_states=True)
    kept = _kept(m)
    mmprune.unwrap(m)
    mmprune.wrap(base, policy, budget=0.4)
    out = base(**x)
    assert _kept(base) == kept
    mmprune.unwrap(base)
    assert not mmprune.is_wrapped(base)
    assert torch.allclose(m.lm_head(out.last_hidden_state), full.logits, atol=1e-5)


def _two_turns(m, x, cached: bool):
    """Turn 1 with the image; turn 2 = turn 1's tokens + a follow-up question, from turn 1's cache (no pixels:
    the cache holds the image) or from scratch (pixels again). Returns turn 2's greedy tokens and logits."""
    out = m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    ids = torch.cat([out.sequences, torch.tensor([[5, 6, 7, 8]] * out.sequences.shape[0])], 1)
    media = ("pixel_values", "image_grid_thw", "image_sizes")
    turn2 = {k: v for k, v in x.items() if k != "mm_token_type_ids" and (not cached or k not in media)}
    turn2.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    extra = {"cache": out.past_key_values} if cached else {}
    g = m.generate(**turn2, **extra, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                   output_logits=True)
    return g.sequences[:, ids.shape[1]:], torch.stack(g.logits, 1)


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("policy", ["none", "uniform", "visionzip"])
@torch.no_grad()
def test_a_chat_continues_from_the_pruned_cache(family, policy):
    """The next turn from turn 1's returned (pruned) cache equals the uncached run of the whole conversation on
    the same kept tokens (``uniform``, ``visionzip``: selections that do not depend on the question). Qwen3-VL
    differs cached vs uncached already unwrapped (transformers' own behaviour), so there the wrapped run
    must equal the unwrapped one under ``none``."""
    m = tiny_model(family)
    x = make_inputs(m, [[1]], prompt_lens=[5])
    if family == "qwen3_vl":
        if policy != "none":
            pytest.skip("Qwen3-VL: cached and uncached turns differ unwrapped")
        want, gap = _two_turns(m, x, cached=True), 1e-6
        mmprune.wrap(m, policy, budget=0.5)
        got = _two_turns(m, x, cached=True)
    else:
        # the unwrapped model's own cached-vs-uncached gap (Qwen2/2.5-VL: 1.6e-3 in fp32 here, LLaVA: 1e-7)
        cached, fresh = _two_turns(m, x, cached=True), _two_turns(m, x, cached=False)
        gap = (cached[1] - fresh[1]).abs().max().item()
        mmprune.wrap(m, policy, budget=0.5)
        got, want = _two_turns(m, x, cached=True), _two_turns(m, x, cached=False)
    mmprune.unwrap(m)
    assert torch.equal(got[0], want[0])
    assert (got[1] - want[1]).abs().max().item() <= 2 * gap + 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_save_pretrained_of_a_wrapped_model_writes_the_unwrapped_files_and_mmprune_json(family, tmp_path):
    m = tiny_model(family)
    m.save_pretrained(tmp_path / "plain")
    mmprune.wrap(m, "visionzip", budget=0.3)
    m.save_pretrained(tmp_path / "wrapped")
    mmprune.unwrap(m)
    plain = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(plain + ["mmprune.json"]) == sorted(p.name for p in (tmp_path / "wrapped").iterdir())
    for name in plain:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "wrapped" / name).read_bytes(), name


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@torch.no_grad()
def test_save_pretrained_writes_mmprune_json_and_wrap_restores_it(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    m = tiny_model(family)
    x = make_inputs(m, LAYOUT[family], prompt_lens=[5, 3])
    stages = [mmprune.PruneConfig("uniform", 0.5), mmprune.PruneConfig("fastv", 0.5, layer=2)]
    mmprune.wrap(m, stages)
    want, kept = m(**x).logits, [[k.tolist() for k in st.kept] for st in mmprune.trace(m).stages]
    m.save_pretrained(tmp_path)
    mmprune.unwrap(m)
    assert (tmp_path / "mmprune.json").is_file()
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    mmprune.wrap(back)  # no policy: the saved one
    assert torch.allclose(back(**x).logits, want, atol=1e-5)
    assert [[k.tolist() for k in st.kept] for st in mmprune.trace(back).stages] == kept
    mmprune.unwrap(back)
    with pytest.raises(ValueError, match="budget / layer / options need a policy"):
        mmprune.wrap(back, budget=0.5)
    with pytest.raises(ValueError, match="wrap needs a policy"):
        mmprune.wrap(tiny_model(family))
