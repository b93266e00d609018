"""The test-bed's data generators, tokenizer, processors and tiny models (issue: built-in test-bed).

Fast on 2 CPU cores: a few dozen scenes and clips, one-layer models.
"""

from __future__ import annotations

import collections
import importlib.util

import numpy as np
import pytest

from mmprune.testbed import motion, shapes
from mmprune.testbed.shapes import ANSWERS, COLOURS, KINDS, image_hash, make_shapes

N = 60  # 12 of each kind


@pytest.fixture(scope="module")
def test_items():
    return make_shapes("test", N)


# ---------------------------------------------------------------------------------------------------
# shapes


def test_shapes_deterministic_and_addressable(test_items):
    again = make_shapes("test", 10)
    for a, b in zip(test_items[:10], again):
        assert image_hash(a.image) == image_hash(b.image)
        assert (a.id, a.question, a.answer, a.kind, a.metadata) == (
            b.id,
            b.question,
            b.answer,
            b.kind,
            b.metadata,
        )
    # item i alone equals item i of a batch, and another seed is another dataset
    alone = shapes.render_shapes_item("test", 7)
    assert image_hash(alone.image) == image_hash(test_items[7].image)
    assert image_hash(make_shapes("test", 1, start=7)[0].image) == image_hash(alone.image)
    assert image_hash(make_shapes("test", 1, seed=1)[0].image) != image_hash(test_items[0].image)


def test_splits_never_share_a_scene(test_items):
    offsets = sorted(shapes.SPLIT_OFFSET.values())
    assert all(b - a >= shapes.MAX_ITEMS for a, b in zip(offsets, offsets[1:]))  # disjoint seed ranges
    hashes = {"test": {image_hash(it.image) for it in test_items}}
    pairs = {"test": {(image_hash(it.image), it.question) for it in test_items}}
    for split in ("train", "validation"):
        items = make_shapes(split, N)
        hashes[split] = {image_hash(it.image) for it in items}
        pairs[split] = {(image_hash(it.image), it.question) for it in items}
    for split, hs in hashes.items():
        assert len(hs) == N, f"duplicate scenes inside {split}"
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not hashes[a] & hashes[b], (a, b)
        assert not pairs[a] & pairs[b], (a, b)
    with pytest.raises(ValueError):
        make_shapes("dev", 1)


def test_kinds_and_yes_no_balanced_answers_closed(test_items):
    kinds = collections.Counter(it.kind for it in test_items)
    assert kinds == {k: N // len(KINDS) for k in KINDS}
    yes_no = collections.Counter(it.answer for it in test_items if it.kind == "exists")
    assert yes_no["yes"] == yes_no["no"] == N // len(KINDS) // 2
    text = [it for it in test_items if it.kind == "text"]
    assert sum(it.answer.isdigit() for it in text) == len(text) // 2  # letters and numbers alternate
    for it in test_items:
        assert it.answer in ANSWERS[it.kind], (it.kind, it.answer)
        assert it.image.size == (224, 224) and it.image.mode == "RGB"
    # answers vary within a kind (no constant answer to learn)
    for kind in ("colour", "count", "position"):
        assert len({it.answer for it in test_items if it.kind == kind}) >= 3


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_answers_agree_with_the_scene(test_items):
    for it in test_items:
        objs, texts, q = it.metadata["objects"], it.metadata["texts"], it.metadata["query"]
        boxes = [o["box"] for o in objs] + [t["box"] for t in texts]
        for i, a in enumerate(boxes):  # inside the image, never overlapping
            assert 0 <= a[0] < a[2] <= 224 and 0 <= a[1] < a[3] <= 224
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], it.id
        if it.kind == "colour":
            named = [o for o in objs if o["shape"] == q["shape"]]
            assert len(named) == 1 and named[0]["colour"] == it.answer
        elif it.kind == "count":
            assert sum(o["shape"] == q["shape"] for o in objs) == int(it.answer)
        elif it.kind == "exists":
            present = any((o["shape"], o["colour"]) == (q["shape"], q["colour"]) for o in objs)
            assert present == (it.answer == "yes")
        elif it.kind == "position":
            (a,) = [o for o in objs if (o["shape"], o["colour"]) == (q["shape"], q["colour"])]
            (b,) = [o for o in objs if (o["shape"], o["colour"]) == (q["shape2"], q["colour2"])]
            (ax, ay), (bx, by) = _centre(a["box"]), _centre(b["box"])
            dx, dy = ax - bx, ay - by
            expected = (
                ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
            )
            # one axis dominates in pixels as well as in cells (twice the other, up to the jitter in a cell)
            assert expected == it.answer and max(abs(dx), abs(dy)) >= 1.5 * min(abs(dx), abs(dy))
        elif it.kind == "text":
            assert [t["char"] for t in texts if t["role"] == "target"] == [it.answer]
            assert len(texts) == 2 and {t["char"].isdigit() for t in texts} == {True, False}


def test_every_object_sits_inside_one_grid_cell(test_items):
    """One object or plate per 28 px cell: each lies inside exactly one merged Qwen2-VL token and one
    patch of testbed-llava's patch-28 tower, never split between two."""
    for it in test_items:
        cell = 224 // it.metadata["grid"]
        assert it.metadata["grid"] == 8 and cell == shapes.CELL
        cells = []
        for box in [o["box"] for o in it.metadata["objects"]] + [t["box"] for t in it.metadata["texts"]]:
            r, c = shapes.cell_of(box, cell)
            assert c * cell < box[0] and box[2] < (c + 1) * cell and r * cell < box[1] and box[3] < (r + 1) * cell
            cells.append((r, c))
        assert len(set(cells)) == len(cells)


def test_scene_questions_hold_the_item_question_and_agree_with_the_scene(test_items):
    for it in test_items:
        by_kind = shapes.scene_questions(it.metadata)
        assert (it.question, it.answer) in by_kind[it.kind]
        assert set(by_kind) == set(shapes.KINDS)
        for kind, qas in by_kind.items():
            assert len({q for q, _ in qas}) == len(qas)  # one answer per question
            assert all(a in shapes.ANSWERS[kind] for _, a in qas)
        yes = sum(a == "yes" for _, a in by_kind["exists"])
        assert yes == len({(o["shape"], o["colour"]) for o in it.metadata["objects"]})
    assert shapes.relation((0, 0), (0, 3)) == "left" and shapes.relation((4, 1), (1, 2)) == "below"
    assert shapes.relation((0, 0), (1, 1)) is None and shapes.relation((2, 2), (2, 2)) is None


def test_objects_are_small_and_drawn_where_the_metadata_says(test_items):
    fractions = []
    for it in test_items:
        px = np.asarray(it.image).astype(int)
        for o in it.metadata["objects"]:
            x0, y0, x1, y1 = o["box"]
            area = (x1 - x0) * (y1 - y0)
            assert area <= 25 * 25
            cx, cy = _centre(o["box"])
            if o["shape"] == "triangle":
                cy += (y1 - y0) * 0.1  # the centroid sits below the box centre
            centre = px[int(cy), int(cx)]
            assert np.abs(centre - np.array(COLOURS[o["colour"]])).max() <= 40, (it.id, o)
        relevant = sum((b[2] - b[0]) * (b[3] - b[1]) for b in it.metadata["relevant_boxes"])
        fractions.append(relevant / 224**2)
    # what the answer depends on is a few percent of the image: random token dropping must hurt
    assert np.mean(fractions) < 0.03 and max(fractions) < 0.08


def test_backgrounds_vary_and_are_not_flat(test_items):
    styles = collections.Counter(it.metadata["background"] for it in test_items)
    assert set(styles) == set(shapes.BACKGROUND_STYLES)
    for it in test_items[:10]:
        assert np.asarray(it.image).std() > 5


# ---------------------------------------------------------------------------------------------------
# motion


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion")
    return folder, motion.make_motion("test", 16, folder)


def test_motion_scene_questions_hold_the_item_question(clips):
    _, items = clips
    for it in items:
        by_kind = motion.scene_questions(it.metadata)
        assert (it.question, it.answer) in by_kind[it.kind]
        assert all(a in motion.ANSWERS[k] for k, qas in by_kind.items() for _, a in qas)
        assert by_kind["count"] == [("how many shapes appear in the video?", str(len(it.metadata["objects"])))]


def test_motion_items_balanced_consistent_and_cached(clips):
    folder, items = clips
    assert collections.Counter(it.kind for it in items) == {k: 4 for k in motion.MOTION_KINDS}
    for it in items:
        assert it.answer in motion.ANSWERS[it.kind]
        objs, frames = it.metadata["objects"], it.metadata["frames"]
        if it.kind == "direction":
            (t,) = [o for o in objs if o["role"] == "target"]
            x0, y0 = t["boxes"][0][:2]
            x1, y1 = t["boxes"][-1][:2]
            dx, dy = x1 - x0, y1 - y0
            expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert expected == it.answer and max(abs(dx), abs(dy)) >= 0.3 * 112
        elif it.kind == "order":
            starts = [o["start"] for o in objs]
            assert all(b - a >= 4 for a, b in zip(starts, starts[1:])) and all(s % 2 == 0 for s in starts)
            assert it.answer in (objs[0]["shape"], objs[-1]["shape"])
            assert len({o["shape"] for o in objs}) == 3
        elif it.kind == "colour_change":
            changed = [o for o in objs if o["change_frame"] is not None]
            assert len(changed) == 1 and changed[0]["shape"] == it.answer
            assert changed[0]["colour_after"] != changed[0]["colour"]
        elif it.kind == "count":
            assert len(objs) == int(it.answer)
            on_screen = [sum(o["boxes"][t] is not None for o in objs) for t in range(frames)]
            if len(objs) >= 2:
                assert max(on_screen) < len(objs)  # needs the whole clip, not one frame
    # same settings -> same file reused, not rewritten
    mtimes = {it.video: __import__("os").path.getmtime(it.video) for it in items}
    again = motion.make_motion("test", 16, folder)
    assert [it.video for it in again] == [it.video for it in items]
    assert all(__import__("os").path.getmtime(it.video) == mtimes[it.video] for it in again)


def test_motion_videos_read_back_with_decord_and_pyav(clips):
    from mmprune.eval.video import read_frames

    _, items = clips
    for it in items[:4]:
        truth, item = motion.render_motion_clip("test", it.metadata["index"])
        assert item.question == it.question
        backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])
        for backend in backends:
            frames = read_frames(it.video, 16, backend=backend)
            assert frames.shape == (16, 112, 112, 3) and frames.dtype == np.uint8
            err = np.abs(frames.astype(int) - truth.astype(int))
            assert err.mean() < 4, (backend, err.mean())
        # the colours of small objects survive H.264 4:2:0
        obj = item.metadata["objects"][0]
        t = next(i for i, b in enumerate(obj["boxes"]) if b is not None)
        x0, y0, x1, y1 = obj["boxes"][t]
        colour = COLOURS[
            obj["colour"] if obj["change_frame"] is None or t < obj["change_frame"] else obj["colour_after"]
        ]
        got = frames[t, (y0 + y1) // 2, (x0 + x1) // 2].astype(int)
        assert np.abs(got - np.array(colour)).max() <= 60


def test_motion_deterministic_and_splits_disjoint():
    a, _ = motion.render_motion_clip("train", 5, frames=8, size=64)
    b, _ = motion.render_motion_clip("train", 5, frames=8, size=64)
    assert np.array_equal(a, b)
    firsts = {s: motion.render_motion_clip(s, 0, frames=8, size=64)[0].tobytes() for s in shapes.SPLITS}
    assert len(set(firsts.values())) == 3


# ---------------------------------------------------------------------------------------------------
# tokenizer, processors, models

vocab = pytest.importorskip("mmprune.testbed.vocab")


def test_tokenizer_covers_every_question_and_round_trips(tmp_path, test_items, clips):
    from transformers import AutoTokenizer

    tok = vocab.build_tokenizer("qwen2vl", tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [it.question for it in test_items] + [it.question for it in clips[1]]
    texts += [a for answers in list(ANSWERS.values()) + list(motion.ANSWERS.values()) for a in answers]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert loaded(text)["input_ids"] == ids
    assert tok.decode(tok("What colour is the STAR?")["input_ids"]) == "what colour is the star ?"
    assert {"crosses", "circles", "<|video_pad|>"} <= set(tok.get_vocab())
    for special in vocab.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) == vocab.SPECIAL_TOKENS.index(special)
    assert loaded.chat_template == vocab.CHAT_TEMPLATES["qwen2vl"] and loaded.eos_token == "<|im_end|>"
    assert vocab.build_tokenizer("llava").get_vocab() == tok.get_vocab()  # one vocabulary, two styles


@pytest.fixture(scope="module")
def llava_processor(tmp_path_factory):
    return vocab.build_llava_processor(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def qwen_processor(tmp_path_factory):
    return vocab.build_qwen2vl_processor(tmp_path_factory.mktemp("qwen2vl"))


def _prompt(proc, question, media="image"):
    msgs = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_llava_processor_round_trip(llava_processor, test_items, tmp_path):
    from transformers import AutoProcessor

    assert type(llava_processor).__name__ == "LlavaProcessor"
    llava_processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    text = _prompt(again, test_items[0].question)
    assert text.startswith("<s>USER: <image>") and text.endswith("ASSISTANT:")
    out = again(images=[test_items[0].image], text=[text], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 224, 224)
    assert int((out["input_ids"] == again.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 196


def test_qwen2vl_processor_round_trip_and_video_path(qwen_processor, test_items, clips, tmp_path):
    import torch

    assert type(qwen_processor).__name__ == "Qwen2VLProcessor"
    qwen_processor.save_pretrained(tmp_path)
    again = vocab.load_processor(tmp_path)  # AutoProcessor, or the torchvision-free fallback
    assert again.video_processor.size["shortest_edge"] == 56 * 56
    out = again(
        images=[test_items[0].image], text=[_prompt(again, test_items[0].question)], return_tensors="pt"
    )
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((out["input_ids"] == again.image_token_id).sum()) == 64
    frames = motion.render_motion_clip("test", 0)[0]
    vid = again(videos=[frames], text=[_prompt(again, "which way?", "video")], return_tensors="pt")
    assert vid["video_grid_thw"].tolist() == [[8, 8, 8]]
    assert int((vid["input_ids"] == again.video_token_id).sum()) == 128
    assert int((vid["mm_token_type_ids"] == 2).sum()) == 128
    pv, thw = vocab.qwen2vl_video_inputs(frames, again)
    assert torch.equal(pv, vid["pixel_values_videos"]) and torch.equal(thw, vid["video_grid_thw"])


def test_qwen2vl_video_inputs_match_the_image_processor():
    """A static 2-frame video is an image to Qwen2-VL: its patches must equal the image processor's."""
    from PIL import Image

    ip = vocab._pil_image_processor("Qwen2VLImageProcessor", min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    img = make_shapes("validation", 1)[0].image
    level = 1 / 255 / min(vocab.OPENAI_CLIP_STD)  # one uint8 step, normalised
    for size in [(224, 224), (168, 252), (200, 300)]:  # the last one is resized to (196, 308)
        im = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        ref = ip(images=[im], return_tensors="pt")
        arr = np.asarray(im)
        pv, thw = vocab.qwen2vl_video_inputs(np.stack([arr, arr]), ip)
        assert thw.tolist() == ref["image_grid_thw"].tolist()
        diff = (pv - ref["pixel_values"]).abs().numpy()
        if size != (200, 300):  # no resize: identical up to float rounding
            assert diff.max() < 1e-5, size
        else:  # aten's uint8 bicubic (torchvision's) vs PIL's: off by one level at most, bar a few pixels
            assert np.quantile(diff, 0.999) <= level * 1.01 and diff.mean() < 0.25 * level
    # odd frame counts pad with the last frame; a list of videos concatenates
    video = np.random.default_rng(0).integers(0, 255, (3, 56, 56, 3), dtype=np.uint8)
    pv, thw = vocab.qwen2vl_video_inputs([video, video[:2]], {"min_pixels": 56 * 56})
    assert thw.tolist() == [[2, 4, 4], [1, 4, 4]] and tuple(pv.shape) == (48, 1176)
    padded = np.concatenate([video, video[-1:]])
    assert np.allclose(pv[:32], vocab.qwen2vl_video_inputs(padded, {"min_pixels": 56 * 56})[0])


@pytest.mark.skipif(not importlib.util.find_spec("torchvision"), reason="torchvision is not installed here")
def test_qwen2vl_video_inputs_match_transformers_video_processor():  # pragma: no cover - needs torchvision
    from transformers import Qwen2VLVideoProcessor

    real = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    rng = np.random.default_rng(1)
    for shape in [(4, 112, 112, 3), (5, 100, 150, 3)]:
        video = rng.integers(0, 255, shape, dtype=np.uint8)
        ref = real(videos=[video], return_tensors="pt")
        pv, thw = vocab.qwen2vl_video_inputs(video, real)
        assert thw.tolist() == ref["video_grid_thw"].tolist()
        assert float((pv - ref["pixel_values_videos"]).abs().max()) < 1e-5


def test_tiny_models_generate(llava_processor, qwen_processor, test_items):
    import torch

    for kind, proc in (("llava", llava_processor), ("qwen2vl", qwen_processor)):
        model = vocab.build_testbed_model(kind, proc.tokenizer, vision_layers=1, text_layers=1)
        items = test_items[:2]
        batch = proc(
            images=[it.image for it in items],
            text=[_prompt(proc, items[0].question), _prompt(proc, "is there a red star in the image?")],
            return_tensors="pt",
            padding=True,
        )
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape == (2, batch["input_ids"].shape[1] + 2)
        counts = vocab.count_parameters(model)
        assert counts["total"] == sum(p.numel() for p in model.parameters())
    frames = motion.render_motion_clip("test", 1)[0]
    batch = qwen_processor(
        videos=[frames],
        text=[_prompt(qwen_processor, "which shape appears first?", "video")],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


def test_default_models_fit_the_size_budget():
    """<= 20 MB of float32 safetensors per model at the default configuration."""
    for kind in ("llava", "qwen2vl"):
        model = vocab.build_testbed_model(kind, vocab.build_tokenizer(kind))
        n = vocab.count_parameters(model)["total"]
        assert 3_000_000 < n and n * 4 <= 20 * 1024 * 1024, (kind, n)
        assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, mmprune.testbed as t; t.make_shapes('test', 1); print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
