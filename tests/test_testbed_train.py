"""Test-bed training script, shipped models and eval tasks (issue: built-in test-bed).

Fast on 2 CPU cores: tiny models, a few dozen steps, a handful of test items.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmprune.testbed import tasks as tb_tasks
from mmprune.testbed import train as tb_train

TINY = ["--tiny", "--steps", "16", "--batch-size", "4", "--lr", "3e-3", "--warmup", "4", "--log-every", "4",
        "--train-images", "16", "--train-clips", "8", "--val-items", "3", "--test-items", "3",
        "--evals", "1", "--workers", "1", "--threads", "2", "--device", "cpu"]  # fmt: skip


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("model", ["llava", "qwen2vl"])
def test_tiny_training_is_deterministic_and_learns(model, tmp_path, cache):
    a = tb_train.main(["--model", model, "--out", str(tmp_path / "a"), "--data-cache", cache, *TINY])
    b = tb_train.main(["--model", model, "--out", str(tmp_path / "b"), "--data-cache", cache, *TINY])
    key = "loss_image"
    losses = [h[key] for h in a["history"] if key in h]
    assert losses == [h[key] for h in b["history"] if key in h]  # same seed, same run
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    # learns the answer vocabulary at least (4 turns, each with an early-answer label: ~30% down in 16 steps)
    assert losses[-1] < 0.75 * losses[0], losses
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["complete"] and log["steps"] == 16 and log["seed"] == 0
    assert log["command"].startswith("python -m mmprune.testbed.train --model " + model)
    assert set(log["test"]) == ({"shapes"} if model == "llava" else {"shapes", "motion"})
    assert all(
        v["input_ids_equal"] and v["max_abs_pixel_diff"] < 1e-4 for v in log["fast_path_check"].values()
    )
    # what the eval loads: the saved folder is a complete checkpoint + processor
    from transformers import AutoConfig

    from mmprune.testbed.vocab import load_processor

    assert AutoConfig.from_pretrained(tmp_path / "a").model_type == (
        "llava" if model == "llava" else "qwen2_vl"
    )
    assert load_processor(tmp_path / "a").tokenizer.eos_token in ("</s>", "<|im_end|>")


def test_stages_continue_and_stop_exactly(tmp_path, cache):
    """--stop-at N of an M-step schedule, then --init-from: how the shipped weights were trained in two
    stages. A stopped stage equals the first N steps of the full run; --init-from loads every weight."""
    base = ["--model", "llava", "--data-cache", cache, *TINY, "--test-items", "2"]
    full = tb_train.main([*base, "--out", str(tmp_path / "full"), "--steps", "8", "--evals", "1"])
    part = tb_train.main([*base, "--out", str(tmp_path / "part"), "--steps", "8", "--stop-at", "4"])
    assert part["steps"] == 4 and part["stopped_early"] and full["steps"] == 8
    mid = [h for h in full["history"] if h.get("step") == 4 and "loss_image" in h]
    assert mid and mid[0]["loss_image"] == next(h["loss_image"] for h in part["history"] if h.get("step") == 4)
    # lr 0: the continued run must save exactly the weights it started from (with every later stage's
    # extra losses and labels on, as the shipped S7/S8 stages ran)
    later = ["--kind-weights", "count=3,position=3", "--where-weight", "0.5", "--position-hints", "1",
             "--where-probe", "1", "--drop-background", "0.5"]  # fmt: skip
    cont = tb_train.main([*base, "--out", str(tmp_path / "cont"), "--init-from", str(tmp_path / "part"),
                          "--lr", "0", "--steps", "2", *later])  # fmt: skip
    assert cont["init_from"]["steps"] == 4
    assert (cont["where_weight"], cont["position_hints"], cont["where_probe"], cont["drop_background"]) == (
        0.5, True, 1.0, 0.5)
    wp, wc = _weights(tmp_path / "part"), _weights(tmp_path / "cont")
    assert wp.keys() == wc.keys() and all(np.array_equal(wp[k], wc[k]) for k in wp)
    with pytest.raises(ValueError, match="no model.safetensors"):
        tb_train.main([*base, "--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "nowhere")])


def test_another_seed_is_another_run(tmp_path, cache):
    args = ["--model", "llava", "--data-cache", cache, *TINY, "--steps", "3", "--test-items", "2"]
    tb_train.main([*args, "--out", str(tmp_path / "a")])
    tb_train.main([*args, "--out", str(tmp_path / "b"), "--seed", "1"])
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)


def test_token_labels_and_chroma():
    # an object covering a whole 16 px patch labels that patch; 30 px of overlap is the threshold
    labels = tb_train.token_labels([([16, 0, 32, 16], 5), ([0, 16, 5, 22], 7)], 32, 16)
    assert labels.tolist() == [tb_train.BACKGROUND, 5, 7, tb_train.BACKGROUND]
    item = tb_train._render_shape(("validation", 0, 0))
    assert item[5]["llava"].shape == (64,) and item[5]["qwen2vl"].shape == (64,)
    # objects sit one per 28 px cell: both models' tokens carry the same labels
    assert np.array_equal(item[5]["llava"], item[5]["qwen2vl"])
    n_things = len(item[6]["objects"]) + len(item[6]["texts"])
    assert int((item[5]["llava"] != tb_train.BACKGROUND).sum()) == n_things
    grey = np.full((2, 4, 4, 3), 128, np.uint8)
    assert np.array_equal(tb_train.chroma_subsample(grey), grey)  # no colour, nothing to subsample


# ---------------------------------------------------------------------------------------------------
# eval tasks


def test_follow_turns_ask_new_answerable_questions():
    from mmprune.testbed.shapes import scene_questions

    split = tb_train.generate_split("image", "validation", 10)
    rng = np.random.default_rng(0)
    answers = []
    for i, scene in enumerate(split.scenes):
        turns = tb_train.follow_turns(scene, split.questions[i], 3, rng)
        valid = {qa for qas in scene_questions(scene).values() for qa in qas}
        assert len(turns) == 3 and all((q, a) in valid for q, a, _ in turns)
        assert len({q for q, _, _ in turns} | {split.questions[i]}) == 4  # never the same question twice
        answers += [a for q, a, _ in turns if q.startswith("is there")]
    assert 0 < answers.count("yes") < len(answers)  # exists turns are not all "no"


def test_follow_turns_kind_weights():
    split = tb_train.generate_split("image", "validation", 10)
    kind = lambda q: q.split()[0] + " " + q.split()[1]  # noqa: E731 - "how many", "what colour", ...
    weights = {"count": 1.0, "colour": 0.0, "text": 0.0, "position": 0.0, "exists": 0.0}
    for i, scene in enumerate(split.scenes):  # weight 0 never asks a kind, so turns stop when none is left
        turns = tb_train.follow_turns(scene, split.questions[i], 5, np.random.default_rng(i), weights)
        assert turns and {kind(q) for q, _, _ in turns} == {"how many"}
    # all-ones weights draw from another stream than the default, but the default is the uniform one
    a = tb_train.follow_turns(split.scenes[0], "?", 3, np.random.default_rng(1))
    assert a == tb_train.follow_turns(split.scenes[0], "?", 3, np.random.default_rng(1), None)
    args = tb_train.parse_args(["--model", "llava", "--out", "x", "--kind-weights", "count=3,text=0.5"])
    assert args.kind_weights == {"count": 3.0, "text": 0.5}
    for bad in ("size=2", "count", "count=-1"):
        with pytest.raises(SystemExit):
            tb_train.parse_args(["--model", "llava", "--out", "x", "--kind-weights", bad])


def test_tasks_registered_and_scored():
    from mmprune.eval.tasks import TASKS, get_task

    for name, modality in (("shapes", "image"), ("motion", "video")):
        assert name in TASKS and TASKS[name].needs_data is False and TASKS[name].modality == modality
    task = get_task("shapes")
    samples = task.load(None, limit=5)
    assert [s.meta["kind"] for s in samples] == ["colour", "count", "position", "exists", "text"]
    assert samples[0].prompt.endswith(tb_tasks.PROMPT_SUFFIX) and samples[0].images[0].size == (224, 224)
    scores = [task.score(s, f" {s.answer.upper()}.") for s in samples[:3]] + [task.score(samples[3], "maybe")]
    total, metric, extra = task.aggregate(scores)
    assert (total, metric, extra["n"]) == (75.0, "accuracy", 4)
    assert extra["per_kind"]["exists"] == 0.0 and extra["per_kind"]["colour"] == 100.0


def test_motion_task_writes_and_reads_clips(tmp_path):
    pytest.importorskip("av")
    from mmprune.eval.video import read_frames

    samples = tb_tasks.MotionTask().load(tmp_path, limit=2)
    assert [s.meta["kind"] for s in samples] == ["direction", "order"]
    frames = read_frames(samples[0].video, samples[0].meta["num_frames"])
    assert frames.shape == (16, 112, 112, 3)


def test_model_path_aliases(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="testbed-llava, testbed-qwen2vl"):
        tb_tasks.testbed_model_path("testbed-nope")
    monkeypatch.setattr(tb_tasks, "MODELS_DIR", tmp_path)
    with pytest.raises(ValueError, match="missing"):
        tb_tasks.testbed_model_path("testbed-qwen2vl")


# ---------------------------------------------------------------------------------------------------
# shipped models


def _shipped(alias):
    try:
        return tb_tasks.testbed_model_path(alias)
    except ValueError as err:
        pytest.skip(str(err))


def _answer(path, kind, samples, modality):
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    from mmprune.testbed.vocab import load_processor

    cls = LlavaForConditionalGeneration if kind == "llava" else Qwen2VLForConditionalGeneration
    model, proc = cls.from_pretrained(path).eval(), load_processor(path)
    texts = [
        proc.apply_chat_template(
            tb_tasks.chat_messages(s.prompt, modality), add_generation_prompt=True, tokenize=False
        )
        for s in samples
    ]
    media = [s.images[0] for s in samples] if modality == "image" else [s.video for s in samples]
    inputs = proc(text=texts, padding=True, return_tensors="pt", **{f"{modality}s": media})
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("alias,kind", [("testbed-llava", "llava"), ("testbed-qwen2vl", "qwen2vl")])
def test_shipped_model_answers_test_items(alias, kind):
    path = _shipped(alias)
    task = tb_tasks.ShapesTask()
    samples = task.load(None, limit=20)
    preds = _answer(path, kind, samples, "image")
    from mmprune.testbed.shapes import ANSWERS

    vocab = {a for answers in ANSWERS.values() for a in answers}
    assert sum(tb_tasks.normalize_answer(p) in vocab for p in preds) >= 18  # answers in the closed vocabulary
    acc = np.mean([task.score(s, p)["score"] for s, p in zip(samples, preds)])
    chance = np.mean([1 / len(ANSWERS[s.meta["kind"]]) for s in samples])  # ~0.25 on this mix
    assert acc > chance, (acc, chance)
    log = json.loads((path / "train_log.json").read_text())
    assert abs(acc - log["test"]["shapes"]["accuracy"]) < 0.3  # the logged test accuracy is what loads


@pytest.mark.parametrize("alias", ["testbed-llava", "testbed-qwen2vl"])
def test_shipped_model_meets_issue_targets(alias):
    log = json.loads((_shipped(alias) / "train_log.json").read_text())
    assert log["test"]["shapes"]["accuracy"] >= 0.85
    if alias == "testbed-qwen2vl":
        assert log["test"]["motion"]["accuracy"] >= 0.70


@pytest.mark.parametrize("setup", ["testbed-llava:shapes", "testbed-qwen2vl:shapes", "testbed-qwen2vl:motion"])
def test_recorded_sweep_is_of_the_shipped_weights_and_discriminates(setup):
    """benchmarks/results/testbed_sweep.json (the README's table) was measured with the weights shipped now
    (its unpruned full-split score is the one train_log.json records), and meets the issue's two checks."""
    from pathlib import Path

    recorded = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/testbed_sweep.json").read_text())
    checks = recorded["checks"][setup]
    alias, task = setup.split(":")
    none = next(r for r in recorded["runs"][setup] if r["policy"] == "none")
    logged = json.loads((_shipped(alias) / "train_log.json").read_text())["test"][task]
    if none["n"] == logged["n"]:  # motion was swept on its first 200 clips; the log holds all 500
        assert checks["unpruned"] == pytest.approx(100 * logged["accuracy"])
    assert checks["random_drop_points"] >= 10 and checks["best_0.25_fraction_of_unpruned"] >= 0.97


def test_testbed_sweep_table_and_checks():
    """benchmarks/testbed_sweep.py's table and the issue's two discrimination checks, on made-up runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "testbed_sweep.py"
    spec = importlib.util.spec_from_file_location("testbed_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def run(policy, budget, score):
        return {"policy": policy, "budget": budget, "score": score, "n": 500, "visual_tokens_in": 64.0}

    runs = [run("none", 1.0, 80.0), run("random", 0.1, 60.0), run("random", 0.25, 70.0), run("fastv", 0.25, 79.0)]
    c = sweep.checks(runs)
    assert c["random_drop_points"] == 20.0 and c["best_at_0.25"] == {"policy": "fastv", "score": 79.0}
    assert c["best_0.25_fraction_of_unpruned"] == round(79 / 80, 4)
    md = sweep.table({("testbed-llava", "shapes"): runs}, [0.25, 0.1])
    lines = md.splitlines()
    assert lines[0] == "| policy | llava shapes @0.25 | llava shapes @0.1 |"
    assert "| fastv | 79.0 | – |" in lines and "| random | 70.0 | 60.0 |" in lines
    assert "**80.0**" in lines[2] and "64 visual tokens, 500 items" in md
    # per question kind: the unpruned run, the best at 25% and random at 10%
    for r, pk in zip(runs, ({"count": 90.0, "text": 100.0}, {"count": 20.0}, {}, {"count": 40.0, "text": 99.0})):
        r["extra"] = {"per_kind": pk}
    kinds = sweep.kinds_table({("testbed-llava", "shapes"): runs}).splitlines()
    assert kinds[:3] == ["**testbed-llava on shapes**", "", "| run | count | text |"]
    assert kinds[4:7] == ["| none @1 | 90 | 100 |", "| fastv @0.25 | 40 | 99 |", "| random @0.1 | 20 | – |"]


def test_grounding_loss_where_names_row_and_column():
    import torch

    torch.manual_seed(0)
    media, vocab = 7, 20
    input_ids = torch.tensor([[1, media, media, 2, media, media, 3]])
    logits = torch.randn(1, 7, vocab, requires_grad=True)
    table = torch.tensor([[4, 5], [6, 6], [-1, -1]])  # class 0: object (two words), 1: plate, 2: background
    targets = torch.tensor([[0, 1, 0, 2]])  # 2 x 2 cells: object, plate, object, background
    digits = torch.arange(10, 20)
    base = tb_train.grounding_loss(logits, input_ids, media, targets, table)
    with_where = tb_train.grounding_loss(logits, input_ids, media, targets, table, (2, digits, 0.5))
    logp = torch.log_softmax(logits[0, [1, 2, 4]], -1)
    assert torch.allclose(base, -(logp[0, [4, 5]].sum() + logp[1, [6, 6]].sum() + logp[2, [4, 5]].sum()) / 6)
    # objects only: cell 0 is row 0 / column 0, cell 2 is row 1 / column 0
    where = (logp[0, [10, 10]].sum() + logp[2, [11, 10]].sum()) / 4
    assert torch.allclose(with_where, base - 0.5 * where)



def test_where_probe_reads_row_and_column_of_object_tokens_only():
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    text = SimpleNamespace(num_hidden_layers=4, hidden_size=6)
    state = torch.random.get_rng_state()
    probe = tb_train.WhereProbe(SimpleNamespace(config=SimpleNamespace(text_config=text)), {"image": 2}, "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the model's RNG stream is untouched
    assert probe.layer == 2 and len(probe.parameters()) == 2
    media = 7
    input_ids = torch.tensor([[1, media, media, 2, media, media, 3]])
    table = torch.tensor([[4, 5], [6, 6], [-1, -1]])  # class 0: object (two words), 1: plate, 2: background
    targets = torch.tensor([[0, 1, 2, 0]])  # 2 x 2 cells: object, plate, background, object
    hidden = [torch.randn(1, 7, 6) for _ in range(5)]
    loss = probe.loss(hidden, input_ids, media, targets, table, "image")
    out = probe.heads["image"](hidden[2][0, [1, 5]])  # the objects: cell 0 (row 0, col 0), cell 3 (1, 1)
    want = (F.cross_entropy(out[:, :2], torch.tensor([0, 1])) + F.cross_entropy(out[:, 2:], torch.tensor([0, 1]))) / 2
    assert torch.allclose(loss, want)
    hidden[2][0, [0, 2, 3, 4, 6]] = 100.0  # plate, background and text positions do not count
    hidden[1][:] = hidden[3][:] = 100.0  # nor other layers
    assert torch.allclose(probe.loss(hidden, input_ids, media, targets, table, "image"), want)


def test_drop_background_hides_only_background_visual_tokens():
    import torch

    media, bg = 7, tb_train.BACKGROUND
    ids = torch.tensor([[0, 1] + [media] * 20 + [2, 3]] * 3)
    targets = torch.full((3, 20), bg)
    targets[:, ::4] = 0  # an object in every fourth token
    targets[1, 1] = 40  # and a plate
    fresh = lambda: {"input_ids": ids, "attention_mask": torch.ones_like(ids),  # noqa: E731
                     "position_ids": torch.arange(24).expand(3, -1)}  # fmt: skip
    batch, rng = fresh(), np.random.default_rng(0)
    hidden = tb_train.drop_background(batch, media, targets, 1.0, rng)
    gone = batch["attention_mask"] == 0
    assert hidden == int(gone.sum()) > 0
    assert (gone.nonzero()[:, 1] >= 2).all() and (gone.nonzero()[:, 1] < 22).all()  # visual tokens only
    assert (targets[gone[:, 2:22]] == bg).all()  # never an object or a plate
    assert (gone.sum(1) <= 0.9 * (targets == bg).sum(1)).all()
    again = fresh()
    assert tb_train.drop_background(again, media, targets, 1.0, np.random.default_rng(0)) == hidden
    assert torch.equal(again["attention_mask"], batch["attention_mask"])  # seeded
    rng = np.random.default_rng(0)
    off = fresh()
    assert tb_train.drop_background(off, media, targets, 0.0, rng) == 0 and bool(off["attention_mask"].all())
    assert rng.random() == np.random.default_rng(0).random()  # off: the run's random stream is untouched
    with pytest.raises(ValueError, match="position_ids"):
        tb_train.drop_background({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, media, targets, 1.0, rng)

@pytest.mark.parametrize("alias", ["testbed-llava", "testbed-qwen2vl"])
def test_position_hints_label_the_first_object_cell(alias):
    from mmprune.testbed.shapes import TEMPLATES
    from mmprune.testbed.vocab import load_processor

    enc = tb_train.Encoder(alias.split("-")[1], load_processor(_shipped(alias)), "cpu", early_answer=True)
    q = TEMPLATES["position"].format(colour="red", shape="star", colour2="blue", shape2="cross")
    ids, _, labels = enc.text_batch([q], ["left"], "image", [False], hints=[{q: (6, 3)}])
    ids, labels_t, labels = ids[0].tolist(), labels[0], labels[0].tolist()
    star, cross = (ids.index(enc.tok.convert_tokens_to_ids(w)) for w in ("star", "cross"))
    marked = {j: enc.tok.convert_ids_to_tokens(t) for j, t in enumerate(labels) if t != -100}
    # the output at "star" names its row, the next one its column, the one at "cross" the answer
    assert marked[star + 1] == "6" and marked[star + 2] == "3" and marked[cross + 1] == "left"
    _, _, plain = enc.text_batch([q], ["left"], "image", [False])
    assert (plain[0] != labels_t).nonzero().flatten().tolist() == [star + 1, star + 2]  # no hint: only those go
    s = tb_train.generate_split("image", "validation", 10)
    from mmprune.testbed.shapes import CELL, cell_of, relation, scene_questions

    for scene in s.scenes:  # the hint and the second object's cell give the answer
        hints = tb_train.position_hints(scene)
        for q, a in scene_questions(scene).get("position", ()):
            (b,) = [o for o in scene["objects"] if q.endswith(f" {o['colour']} {o['shape']}?")]
            assert relation(hints[q], cell_of(b["box"], CELL)) == a


def test_bf16_autocast_keeps_attention_in_fp32_and_restores_it():
    """--precision bf16: matmuls in bf16, attention in fp32 (see Bf16Autocast), the name put back."""
    import torch
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    q, k, v = (torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    lin = torch.nn.Linear(8, 8)
    with tb_train.Bf16Autocast("cpu"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert lin(q.float()).dtype == torch.bfloat16
    assert F.scaled_dot_product_attention is orig
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, orig(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16())
    with pytest.raises(KeyError), tb_train.Bf16Autocast("cpu"):
        raise KeyError("an error inside the step")
    assert F.scaled_dot_product_attention is orig
    with tb_train.Bf16Autocast("cpu", enabled=False):
        assert F.scaled_dot_product_attention is orig and lin(q.float()).dtype == torch.float32


def test_bf16_autocast_patch_conv3d_is_the_matmul_it_equals():
    """qwen2vl's patch embedding (a conv3d over exactly one kernel) runs as a matmul under --precision bf16."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 16, (2, 14, 14), stride=(2, 14, 14), bias=False)
    one, many = torch.randn(7, 3, 2, 14, 14), torch.randn(2, 3, 4, 28, 42)
    as_matmul = tb_train.Bf16Autocast._one_patch_conv3d(F.conv3d)
    assert torch.allclose(as_matmul(one, conv.weight, None, conv.stride), conv(one), atol=1e-5)
    assert torch.equal(as_matmul(many, conv.weight, None, conv.stride), conv(many))  # not one patch: the conv
    with tb_train.Bf16Autocast("cpu"):
        got = conv(one)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), conv(one), atol=0.05, rtol=0.02)
    assert F.conv3d is not as_matmul and F.conv3d.__name__ == "conv3d"  # restored


@pytest.mark.parametrize("model", ["llava", "qwen2vl"])
def test_bf16_training_tracks_fp32_and_saves_fp32_weights(model, tmp_path, cache):
    args = ["--model", model, "--data-cache", cache, *TINY, "--steps", "8", "--test-items", "2",
            "--where-weight", "0.5", "--where-probe", "1", "--drop-background", "0.5"]  # fmt: skip
    fp32 = tb_train.main([*args, "--out", str(tmp_path / "a")])
    bf16 = tb_train.main([*args, "--out", str(tmp_path / "b"), "--precision", "bf16"])
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    la = [h["loss_image"] for h in fp32["history"] if "loss_image" in h]
    lb = [h["loss_image"] for h in bf16["history"] if "loss_image" in h]
    assert len(la) == len(lb) and lb[-1] < lb[0]
    assert np.allclose(la, lb, rtol=0.05), (la, lb)  # bf16 rounding, not another run
    assert la != lb  # and bf16 did run
    assert all(w.dtype == np.float32 for w in _weights(tmp_path / "b").values())


def test_bf16_math_attention_matches_fp32_and_keeps_long_unmasked_keys_flash():
    """--bf16-attention 1: bf16 math attention (masked, causal or <= MATH_MAX_KEYS keys) equals fp32 SDPA
    to bf16 rounding, GQA and fully masked padding rows included; longer unmasked keys stay fp32 flash."""
    import torch
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    b, h, kv, length, d = 3, 4, 2, 37, 16  # odd length, 2 query heads per KV head
    q = torch.randn(b, h, length, d, generator=g)
    k, v = (torch.randn(b, kv, length, d, generator=g) for _ in range(2))
    pad = torch.ones(b, 1, length, length, dtype=torch.bool).tril()
    pad[0, ..., :5] = False  # item 0 left-padded by 5: its first 5 query rows see nothing
    additive = torch.zeros(b, 1, length, length).masked_fill(~pad, torch.finfo(torch.float32).min)
    cases = [
        ({"attn_mask": pad}, (slice(1, None), slice(None))),  # rows with no key are undefined in SDPA
        ({"attn_mask": additive}, (slice(None), slice(5, None))),
        ({"is_causal": True}, (slice(None), slice(None))),
        ({}, (slice(None), slice(None))),  # 37 keys: short enough for math attention
    ]
    bf = [t.bfloat16() for t in (q, k, v)]
    for kwargs, (items, rows) in cases:
        ref = orig(q, k, v, enable_gqa=True, **kwargs)
        with tb_train.Bf16Autocast("cpu", math_attention=True):
            got = F.scaled_dot_product_attention(*bf, enable_gqa=True, **kwargs)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all(), kwargs
        err = (got.float() - ref)[items][:, :, rows].abs().max().item()
        assert err < 0.03, (kwargs, err)
    assert F.scaled_dot_product_attention is orig
    long_q, long_k, long_v = (torch.randn(2, 2, tb_train.Bf16Autocast.MATH_MAX_KEYS + 3, 8).bfloat16() for _ in range(3))
    with tb_train.Bf16Autocast("cpu", math_attention=True):
        got = F.scaled_dot_product_attention(long_q, long_k, long_v)
    assert torch.equal(got, orig(long_q.float(), long_k.float(), long_v.float()).bfloat16())  # the fp32 kernel


def test_chroma_subsample_clip_by_clip_equals_the_whole_batch():
    import torch

    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 5, 6, 10, 3), dtype=np.uint8)  # odd clip and frame counts
    whole = tb_train._chroma_subsample(torch.from_numpy(clips))  # one pass over the batch
    assert torch.equal(tb_train.chroma_subsample(torch.from_numpy(clips)), whole)
    assert np.array_equal(tb_train.chroma_subsample(clips), whole.numpy())
    assert np.array_equal(tb_train.chroma_subsample(clips[1]), whole[1].numpy())  # one clip


@pytest.mark.parametrize("alias", ["testbed-llava", "testbed-qwen2vl"])
def test_encoder_pixels_equal_normalise_then_cut(alias):
    """Encoder.pixels cuts patches while uint8 and normalises in place: the same floats as normalising
    first, and as the processor's fast path (see fast_path_check)."""
    import torch

    from mmprune.testbed.vocab import load_processor

    enc = tb_train.Encoder(alias.split("-")[1], load_processor(_shipped(alias)), "cpu")
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    clips = torch.from_numpy(rng.integers(0, 256, (2, 4, 112, 112, 3), dtype=np.uint8))

    def normalised(x):
        return (x.float() - enc.mean * 255.0) / (enc.std * 255.0)

    if enc.kind == "llava":
        assert torch.equal(enc.pixels(images, "image")["pixel_values"], normalised(images).permute(0, 3, 1, 2))
        return
    for x, modality, key in ((images, "image", "pixel_values"), (clips, "video", "pixel_values_videos")):
        f = normalised(x)
        if modality == "image":
            f = f[:, None].expand(-1, enc.tp, -1, -1, -1)
        b, t, h, w, c = f.shape
        p, tp, m = enc.p, enc.tp, enc.m
        f = f.permute(0, 1, 4, 2, 3).reshape(b, t // tp, tp, c, h // p // m, m, p, w // p // m, m, p)
        f = f.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(-1, c * tp * p * p)
        assert torch.equal(enc.pixels(x, modality)[key], f), modality


def test_keep_freed_memory_is_on_under_glibc():
    """train.py asks glibc to keep freed memory (speed only); elsewhere it says it could not."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        assert tb_train.keep_freed_memory() is False
    else:
        assert tb_train.keep_freed_memory() is True


def test_time_budget_chooses_the_steps_and_its_replay_is_the_same_run(tmp_path, cache):
    """--time-budget measures the step time twice (after a few steps, then at the end of the warm-up,
    whose learning rates do not depend on the total) and records a --steps command that replays it."""
    base = ["--model", "llava", "--data-cache", cache, "--tiny", *TINY[TINY.index("--batch-size") :], "--warmup", "6"]
    timed = tb_train.main([*base, "--out", str(tmp_path / "a"), "--time-budget", "2", "--test-items", "2"])
    n = timed["steps"]
    assert n > 6 and timed["reproduce_command"].endswith(f"--steps {n}")
    assert "--time-budget" not in timed["reproduce_command"]
    replay = tb_train.main([*base, "--out", str(tmp_path / "b"), "--steps", str(n), "--test-items", "2"])
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert replay["steps"] == n and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_qwen2vl_without_training_clips_trains_images_and_still_tests_motion(tmp_path, cache):
    args = ["--model", "qwen2vl", "--data-cache", cache, *TINY, "--steps", "4", "--train-clips", "0"]
    log = tb_train.main([*args, "--out", str(tmp_path / "a"), "--test-items", "2"])
    assert log["train_items"] == {"shapes": 16} and set(log["test"]) == {"shapes", "motion"}
    assert not any("loss_video" in h for h in log["history"])
    assert set(log["ms_per_step_median_by_task"]) == {"shapes"}


def test_video_from_trains_images_first_then_alternates(tmp_path, cache):
    args = ["--model", "qwen2vl", "--data-cache", cache, *TINY, "--steps", "8", "--log-every", "2", "--test-items", "2"]
    log = tb_train.main([*args, "--out", str(tmp_path / "a"), "--video-from", "4"])
    seen = {h["step"]: ("loss_video" in h) for h in log["history"] if "loss_image" in h}
    assert seen == {2: False, 4: False, 6: True, 8: True} and log["video_from"] == 4
