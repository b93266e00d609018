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
