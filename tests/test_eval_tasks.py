"""Task loaders on small files in the published layouts, prompts as lmms-eval builds them, scores by hand.

Layouts written here: Hugging Face parquet snapshots (``data/test-00000-of-00001.parquet``, config
folders such as ``en/`` or ``ScienceQA-IMG/``), ``datasets.save_to_disk`` folders (``state.json`` +
Arrow stream files, and a ``DatasetDict`` with ``dataset_dict.json``), MVBench's ``json/`` folder, and
videos as ``{videoID}.mp4``. Image columns are ``{bytes, path}`` structs holding PNG bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from PIL import Image  # noqa: E402

from mmprune.eval import tasks as T  # noqa: E402
from mmprune.eval.video import VideoReadError, read_frames  # noqa: E402

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def png(color, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def img(color):
    return {"bytes": png(color), "path": None}


def table(columns: dict, types: dict | None = None):
    types = types or {}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()})


def write_parquet(path, columns, types=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(columns, types), path)
    return path


def write_saved_dataset(folder, columns, types=None):
    """What ``Dataset.save_to_disk`` writes: Arrow *stream* files listed in state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    t = table(columns, types)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_format_type": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def write_mp4(path, n=6):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=5)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def run(task, samples, preds):
    return task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])


# ------------------------------------------------------------------------------------------ POPE


@pytest.fixture
def pope_dir(tmp_path):
    root = tmp_path / "POPE"
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {
            "id": ["0", "1", "2", "3"],
            "question_id": ["1", "2", "1", "2"],
            "question": ["Is there a dog in the image?", "Is there a cat in the image?",
                         " Is there a car in the image? ", "Is there a bus in the image?"],
            "answer": ["yes", "no", "yes", "no"],
            "image_source": ["COCO_1", "COCO_1", "COCO_2", "COCO_2"],
            "image": [img(RED), img(RED), img(GREEN), img(GREEN)],
            "category": ["adversarial", "adversarial", "popular", "popular"],
        },
        {"image": IMG},
    )  # fmt: skip
    return root


def test_pope_load_prompt_images_and_score(pope_dir):
    task = T.get_task("pope")
    samples = task.load(pope_dir)
    assert [s.id for s in samples] == ["0", "1", "2", "3"]
    assert task.prompt(samples[2]) == "Is there a car in the image?" + SHORT
    im = samples[0].images[0]
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == RED
    assert samples[2].images[0].getpixel((3, 3)) == GREEN
    assert samples[0].answer == "yes" and samples[0].meta["category"] == "adversarial"
    # preds -> yes, no, no, yes against yes, no, yes, no: TP 1, FP 1, FN 1 -> P = R = F1 = 0.5
    score, metric, extra = run(task, samples, ["Yes", "no", "No", "yes"])
    assert metric == "f1" and score == pytest.approx(50.0)
    assert extra["accuracy"] == pytest.approx(50.0) and extra["yes_ratio"] == pytest.approx(50.0)
    assert extra["per_category"]["adversarial"]["f1"] == pytest.approx(100.0)
    assert extra["per_category"]["popular"]["f1"] == 0.0
    assert extra["f1_mean_over_categories"] == pytest.approx(50.0)
    assert task.load(pope_dir, limit=2)[-1].id == "1"


def test_single_parquet_file_path_works(pope_dir):
    samples = T.get_task("pope").load(pope_dir / "data" / "test-00000-of-00001.parquet")
    assert len(samples) == 4


# ------------------------------------------------------------------------------- MME (save_to_disk)


def test_mme_from_save_to_disk_folder(tmp_path):
    root = write_saved_dataset(
        tmp_path / "MME",
        {
            "question_id": ["existence/1.png", "existence/1.png", "code_reasoning/2.png", "code_reasoning/2.png"],
            "image": [img(RED), img(RED), img(BLUE), img(BLUE)],
            "question": ["Is there a dog in this image? Please answer yes or no.",
                         "Is there a cat in this image? Please answer yes or no.",
                         "Is the output 3? Please answer yes or no.", "Is the output 4? Please answer yes or no."],
            "answer": ["Yes", "No", "Yes", "No"],
            "category": ["existence", "existence", "code_reasoning", "code_reasoning"],
        },
        {"image": IMG},
    )  # fmt: skip
    task = T.get_task("mme")
    samples = task.load(root)
    # the two questions on one image share a question_id: the second gets "#1"
    assert [s.id for s in samples] == ["existence/1.png", "existence/1.png#1", "code_reasoning/2.png", "code_reasoning/2.png#1"]
    assert task.prompt(samples[0]) == "Is there a dog in this image?" + SHORT
    assert samples[3].images[0].getpixel((0, 0)) == BLUE
    # parsed: yes, no | yes, yes -> existence 100 + 100 = 200; code_reasoning acc 50 + acc+ 0 = 50
    score, metric, extra = run(task, samples, ["Yes.", "no", "Yes", "y"])
    assert metric == "mme_total" and score == pytest.approx(250.0)
    assert extra["perception"] == pytest.approx(200.0) and extra["cognition"] == pytest.approx(50.0)
    assert extra["per_category"] == {"code_reasoning": 50.0, "existence": 200.0}


# ---------------------------------------------------------------------------- TextVQA (DatasetDict)


def test_textvqa_from_saved_dataset_dict_picks_validation(tmp_path):
    root = tmp_path / "textvqa"
    cols = lambda qids, qs, answers: {  # noqa: E731
        "question_id": qids, "question": qs, "image": [img(RED)] * len(qids), "answers": answers,
        "ocr_tokens": [["stop"]] * len(qids),
    }  # fmt: skip
    write_saved_dataset(root / "train", cols([99], ["decoy?"], [["x"] * 10]), {"image": IMG})
    write_saved_dataset(
        root / "validation",
        cols([34602, 34603], ["what is written on the SIGN?", "what brand is this?"],
             [["stop"] * 3 + ["stop sign"] * 7, ["nike"] * 10]),
        {"image": IMG},
    )  # fmt: skip
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    task = T.get_task("textvqa")
    samples = task.load(root)
    assert [s.id for s in samples] == ["34602", "34603"]
    # str.capitalize(), as lmms-eval: first letter up, the rest lower-cased
    assert task.prompt(samples[0]) == "What is written on the sign?" + SHORT
    # "Stop." -> "stop": 3 of 10 answers; 3 subsets see 2 matches (2/3), 7 see 3 (1) -> 0.9; then 0
    score, metric, _ = run(task, samples, ["Stop.", "adidas"])
    assert metric == "vqa_accuracy" and score == pytest.approx(45.0)


# ------------------------------------------------------------------------------------------- GQA


def test_gqa_joins_images_config(tmp_path):
    root = tmp_path / "GQA"
    write_parquet(
        root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
        {"id": ["201", "202", "203"], "imageId": ["n1", "n2", "n1"],
         "question": ["Which side is the cup on?", "What is on the table?", "Is it red?"],
         "answer": ["left", "table", "yes"], "fullAnswer": ["", "", ""]},
    )  # fmt: skip
    write_parquet(
        root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        {"id": ["n1", "n2"], "image": [img(RED), img(BLUE)]},
        {"image": IMG},
    )
    write_parquet(root / "train_balanced_instructions" / "train-00000-of-00001.parquet",
                  {"id": ["x"], "imageId": ["n9"], "question": ["decoy"], "answer": ["no"]})  # fmt: skip
    task = T.get_task("gqa")
    samples = task.load(root)
    assert [s.id for s in samples] == ["201", "202", "203"]
    assert task.prompt(samples[0]) == "Which side is the cup on?" + SHORT
    assert [s.images[0].getpixel((0, 0)) for s in samples] == [RED, BLUE, RED]
    score, metric, _ = run(task, samples, ["Left.", "the table", "YES"])  # 1, 0, 1
    assert metric == "exact_match" and score == pytest.approx(200 / 3)


def test_gqa_without_images_config(tmp_path):
    root = tmp_path / "GQA"
    write_parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
                  {"id": ["1"], "imageId": ["n1"], "question": ["q"], "answer": ["a"]})  # fmt: skip
    with pytest.raises(T.TaskError, match="testdev_balanced_images"):
        T.get_task("gqa").load(root)


# ----------------------------------------------------------------------------------- ScienceQA-IMG


def test_scienceqa_img_config_and_prompt(tmp_path):
    root = tmp_path / "ScienceQA"
    cols = {
        "image": [img(GREEN), None],
        "question": ["Which pole is north?", "Which is a mammal?"],
        "choices": [["left", "right"], ["whale", "shark", "trout"]],
        "answer": [1, 0],
        "hint": ["The figure shows a magnet.", ""],
        "task": ["closed choice"] * 2, "grade": ["grade5"] * 2, "subject": ["natural science", "natural science"],
    }  # fmt: skip
    write_parquet(root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", cols, {"image": IMG})
    write_parquet(root / "ScienceQA-IMG" / "validation-00000-of-00001.parquet", {k: v[:1] for k, v in cols.items()}, {"image": IMG})
    write_parquet(root / "ScienceQA-FULL" / "test-00000-of-00001.parquet", {k: v * 2 for k, v in cols.items()}, {"image": IMG})
    task = T.get_task("scienceqa_img")
    samples = task.load(root)
    assert len(samples) == 2 and [s.id for s in samples] == ["sqa-0", "sqa-1"]
    assert task.prompt(samples[0]) == (
        "Context: The figure shows a magnet.\nWhich pole is north?\nA. left\nB. right" + LETTER
    )
    assert task.prompt(samples[1]) == "Which is a mammal?\nA. whale\nB. shark\nC. trout" + LETTER
    assert samples[0].answer == "B" and samples[1].images is None
    # "B" exact -> 1; "(A)" is not a LLaVA-style match -> 0, though the robust extractor reads A
    score, metric, extra = run(task, samples, ["B", "(A)"])
    assert metric == "accuracy" and score == pytest.approx(50.0)
    assert extra["accuracy_robust_extract"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------ MMBench


@pytest.fixture
def mmbench_dir(tmp_path):
    root = tmp_path / "MMBench"
    cols = {
        "index": [0, 1, 1000000],
        "question": ["What is shown?", "Which color?", "What is shown?"],
        "hint": [None, "A hint.", None],
        "A": ["cat", "red", "dog"],
        "B": ["dog", "blue", "bird"],
        "C": ["bird", None, "cat"],
        "D": [None, None, None],
        "answer": ["B", "A", "A"],
        "category": ["object", "color", "object"],
        "L2-category": ["perception"] * 3,
        "image": [img(RED), img(GREEN), img(RED)],
        "source": ["x"] * 3,
        "split": ["dev"] * 3,
    }
    write_parquet(root / "en" / "dev-00000-of-00001.parquet", cols, {"image": IMG, "D": pa.string()})
    write_parquet(root / "cn" / "dev-00000-of-00001.parquet", cols, {"image": IMG, "D": pa.string()})
    write_parquet(root / "en" / "test-00000-of-00001.parquet", cols, {"image": IMG, "D": pa.string()})
    return root


def test_mmbench_prompt_and_circular_eval(mmbench_dir):
    task = T.get_task("mmbench")
    samples = task.load(mmbench_dir)
    assert [s.id for s in samples] == ["0", "1", "1000000"]
    assert task.prompt(samples[0]) == (
        "What is shown? There are several options:\nA. cat\nB. dog\nC. bird\n" + LETTER
    )
    assert task.prompt(samples[1]) == "A hint. Which color? There are several options:\nA. red\nB. blue\n" + LETTER
    assert samples[1].choices == ["red", "blue"]
    # question 0 right in both rotations, question 1 wrong -> 1 of 2
    score, metric, extra = run(task, samples, ["B", "blue", "(A) dog"])
    assert metric == "accuracy" and score == pytest.approx(50.0)
    assert extra["questions"] == 2 and extra["per_category"] == {"color": 0.0, "object": 100.0}
    # one rotation wrong -> question 0 fails too
    score, _, _ = run(task, samples, ["The answer is B.", "red", "C"])
    assert score == pytest.approx(50.0)  # only question 1 ("red" -> A) is right
    score, _, _ = run(task, samples, ["B", "blue", "C"])
    assert score == 0.0


# ------------------------------------------------------------------------------------------ SEED


def test_seedbench_image_lists(tmp_path):
    root = tmp_path / "SEED-Bench"
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {"question_id": ["101", "102"], "question": ["What is it?", "What happens next?"],
         "choice_a": ["a", "run"], "choice_b": ["b", "jump"], "choice_c": ["c", "sit"], "choice_d": ["d", "fly"],
         "answer": ["A", "B"], "data_type": ["image", "video"], "question_type_id": [1, 10],
         "image": [[img(RED)], [img(RED), img(GREEN), img(BLUE)]]},
        {"image": pa.list_(IMG)},
    )  # fmt: skip
    task = T.get_task("seedbench")
    samples = task.load(root)
    assert task.prompt(samples[0]) == "What is it?\nA. a\nB. b\nC. c\nD. d" + LETTER
    assert [im.getpixel((0, 0)) for im in samples[1].images] == [RED, GREEN, BLUE]
    # lmms-eval compares only the first character: "The answer is B" reads "T"
    score, metric, extra = run(task, samples, ["A", "The answer is B"])
    assert metric == "accuracy" and score == pytest.approx(50.0)
    assert extra["seed_image"] == 100.0 and extra["seed_video"] == 0.0
    assert extra["accuracy_robust_extract"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------- Video-MME


def test_videomme_videos_by_id(tmp_path):
    root = tmp_path / "Video-MME"
    write_parquet(
        root / "videomme" / "test-00000-of-00001.parquet",
        {"video_id": ["001", "002", "003"], "duration": ["short", "short", "long"],
         "domain": ["Knowledge"] * 3, "sub_category": ["Astronomy"] * 3, "url": [""] * 3,
         "videoID": ["fFjv93ACGo8", "missing01", "nested02"], "question_id": ["001-1", "002-1", "003-1"],
         "task_type": ["Counting Problem", "OCR Problems", "Counting Problem"],
         "question": ["How many planets?", "What is written?", "How many cats?"],
         "options": [["A. 7", "B. 8", "C. 9", "D. 10"]] * 3, "answer": ["C", "B", "A"]},
    )  # fmt: skip
    write_mp4(root / "data" / "fFjv93ACGo8.mp4")
    write_mp4(root / "videos" / "chunk_3" / "nested02.mp4")
    task = T.get_task("videomme")
    samples = task.load(root)
    assert task.prompt(samples[0]) == (
        "Select the best answer to the following multiple-choice question based on the video and the "
        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "How many planets?\nA. 7\nB. 8\nC. 9\nD. 10\n" + LETTER
    )
    assert samples[0].video == str(root / "data" / "fFjv93ACGo8.mp4")
    assert samples[2].video == str(root / "videos" / "chunk_3" / "nested02.mp4")
    assert samples[0].images is None and samples[0].choices == ["7", "8", "9", "10"]
    assert read_frames(samples[0].video, 4).shape == (4, 32, 32, 3)
    with pytest.raises(VideoReadError, match="video not found: .*missing01.mp4"):
        read_frames(samples[1].video, 4)
    # sample 2 failed to read -> left out by the runner as an error record
    details = [task.score(samples[0], "The best answer is C."), {"score": None, "error": "video not found"},
               task.score(samples[2], "B")]  # fmt: skip
    score, metric, extra = task.aggregate(details)
    assert metric == "accuracy" and score == pytest.approx(50.0) and extra["n"] == 2
    assert extra["per_duration"] == {"long": 0.0, "short": 100.0}


# --------------------------------------------------------------------------------------- MVBench


def test_mvbench_json_layout(tmp_path):
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    (root / "json" / "action_count.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "How many times?", "candidates": ["3", "4", "5"], "answer": "4"},
        {"video": "b.mp4", "question": "Did it jump?", "candidates": ["yes", "no"], "answer": "yes"},
    ]))  # fmt: skip
    (root / "json" / "object_shuffle.json").write_text(json.dumps([
        {"video": "c.mp4", "question": "Where is the ball?", "candidates": ["left", "middle", "right"], "answer": "right"},
    ]))  # fmt: skip
    write_mp4(root / "video" / "perception" / "videos" / "a.mp4")
    task = T.get_task("mvbench")
    samples = task.load(root)
    assert [s.id for s in samples] == ["action_count/0", "action_count/1", "object_shuffle/2"]
    assert task.prompt(samples[0]) == (
        "Question:How many times?\nOption:\n(A) 3\n(B) 4\n(C) 5\nOnly give the best option.\n"
    )  # lmms-eval 0.7.3's sub-task post_prompt
    assert samples[0].answer == "B" and samples[2].answer == "C"
    assert samples[0].video == str(root / "video" / "perception" / "videos" / "a.mp4")
    assert samples[0].meta["sub_task"] == "action_count"
    # right; empty (left out of the denominator, as lmms-eval); "a cup" reads as A (lmms-eval quirk)
    score, metric, extra = run(task, samples, ["(B) 4", "", "a cup"])
    assert metric == "accuracy" and score == pytest.approx(50.0)
    assert extra["unanswered"] == 1 and extra["per_sub_task"] == {"action_count": 100.0, "object_shuffle": 0.0}


# ------------------------------------------------------------------------------------------ MLVU


def test_mlvu_mean_over_task_types(tmp_path):
    root = tmp_path / "MLVU"
    q = "What happens?\n(A) run\n(B) jump"
    write_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        {"video_name": ["v1.mp4", "v2.mp4", "v3.mp4"], "question": [q, q, "How many?\n(A) 1\n(B) 2\n(C) 3"],
         "answer": ["B", "B", "C"], "task_type": ["plotQA", "plotQA", "count"]},
    )  # fmt: skip
    write_mp4(root / "video" / "1_plotQA" / "v1.mp4")
    task = T.get_task("mlvu")
    samples = task.load(root)
    assert task.prompt(samples[0]) == "What happens?\n(A) run\n(B) jump\nOnly give the best option.\nBest option: ("
    assert samples[0].video == str(root / "video" / "1_plotQA" / "v1.mp4")
    assert samples[2].choices == ["1", "2", "3"]
    # plotQA: right, wrong -> 50; count: right -> 100; lmms-eval divides by all 7 dev types: 150 / 7;
    # over the types present 75, over samples 66.7
    score, metric, extra = run(task, samples, ["B) jump", "A", "C"])
    assert metric == "m_avg" and score == pytest.approx(150 / 7)
    assert extra["m_avg_present"] == pytest.approx(75.0) and extra["accuracy_micro"] == pytest.approx(200 / 3)


# -------------------------------------------------------------------------------- registry & errors


def test_registry_lists_all_benchmarks():
    rows = T.list_tasks()
    names = [r[0] for r in rows]
    assert names == sorted(names)
    for name in ("pope", "mme", "gqa", "textvqa", "scienceqa_img", "mmbench", "seedbench", "videomme", "mvbench", "mlvu"):
        assert name in names and name in T.TASKS
    modality = {r[0]: r[1] for r in rows}
    assert modality["videomme"] == modality["mvbench"] == modality["mlvu"] == "video"
    assert modality["pope"] == "image"
    assert all(len(r) == 4 and r[2] and r[3] for r in rows)


def test_unknown_task_error_lists_names():
    with pytest.raises(ValueError) as e:
        T.get_task("pope2")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown task 'pope2'; choose one of: ")
    assert "gqa" in msg and "videomme" in msg


def test_bad_data_paths(tmp_path):
    task = T.get_task("pope")
    with pytest.raises(T.TaskError, match="^task 'pope' needs --data") as e:
        task.load(None)
    assert "\n" not in str(e.value)
    with pytest.raises(T.TaskError, match="data path not found"):
        task.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TaskError, match="no parquet/arrow files under"):
        task.load(tmp_path / "empty")
    write_parquet(tmp_path / "bad" / "test-00000-of-00001.parquet", {"question_id": ["1"], "question": ["q"]})
    with pytest.raises(T.TaskError, match="lacks column\\(s\\) answer, image"):
        task.load(tmp_path / "bad")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(T.TaskError, match="cannot read"):
        task.load(tmp_path / "broken.parquet")
    with pytest.raises(T.TaskError, match="limit"):
        task.load(tmp_path / "bad", limit=0)


def test_find_tables_split_words(tmp_path):
    for name in ("test-00000-of-00002.parquet", "test-00001-of-00002.parquet", "testdev-00000-of-00001.parquet",
                 "train-00000-of-00001.parquet"):  # fmt: skip
        write_parquet(tmp_path / "data" / name, {"a": [1]})
    assert [p.name for p in T.find_tables(tmp_path, split="test")] == [
        "test-00000-of-00002.parquet", "test-00001-of-00002.parquet"
    ]
    assert [p.name for p in T.find_tables(tmp_path, split="testdev")] == ["testdev-00000-of-00001.parquet"]
    # no file names the split: everything is read
    assert len(T.find_tables(tmp_path, split="validation")) == 4


class _TinyTask(T.Task):
    name = "tiny_testbed"
    metric = "accuracy"
    layout = "generated in memory"
    needs_data = False

    def load(self, data_path=None, limit=None):
        return [T.Sample(id=str(i), prompt="?", answer="x", images=[Image.new("RGB", (2, 2))]) for i in range(limit or 3)]

    def score(self, sample, prediction):
        return {"score": float(prediction == sample.answer)}


def test_register_task_object_and_lazy_factory():
    try:
        T.register_task(_TinyTask())
        assert ("tiny_testbed", "image", "accuracy", "generated in memory") in T.list_tasks()
        task = T.get_task("tiny_testbed")
        assert task.aggregate([task.score(s, p) for s, p in zip(task.load(), ["x", "y", "x"])])[0] == pytest.approx(200 / 3)
        assert T.TASKS["tiny_testbed"].needs_data is False
        with pytest.raises(T.TaskError, match="already registered"):
            T.register_task(_TinyTask())
        T.register_task(_TinyTask(), replace=True)

        # lazy: nothing is imported until get_task
        T.register_task(name="lazy_thing", factory="mmprune_no_such_module:Task", modality="video",
                        metric="accuracy", layout="later")  # fmt: skip
        assert ("lazy_thing", "video", "accuracy", "later") in T.list_tasks()
        with pytest.raises(T.TaskError, match="could not be loaded"):
            T.get_task("lazy_thing")
        T.register_task(name="lazy_pope", factory="mmprune.eval.tasks:PopeTask", modality="image", metric="f1", layout="x")
        assert isinstance(T.get_task("lazy_pope"), T.PopeTask)
        with pytest.raises(T.TaskError, match="modality"):
            T.register_task(name="bad", factory=lambda: None, modality="audio")
    finally:
        for n in ("tiny_testbed", "lazy_thing", "lazy_pope", "bad"):
            T.TASKS.pop(n, None)


def test_sample_images_are_decoded_lazily(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(png(BLUE))
    s = T.Sample(id="1", image_refs=[png(RED), str(path), Image.new("L", (3, 3), 255)])
    ims = s.images
    assert [im.mode for im in ims] == ["RGB"] * 3
    assert [im.getpixel((0, 0)) for im in ims] == [RED, BLUE, (255, 255, 255)]
    assert s.images[0] is not ims[0]  # fresh objects on each access: nothing decoded is kept
    assert T.Sample(id="2").images is None
    s2 = dataclasses.replace(s, id="3")
    assert s2.id == "3" and len(s2.images) == 3


# ------------------------------------------------------------------- issue 25's added tasks: published layouts
def test_added_video_tasks_read_their_layouts(tmp_path):
    ego = tmp_path / "egoschema"
    write_parquet(ego / "Subset" / "test-00000-of-00001.parquet",
                  {"video_idx": ["v1"], "question_idx": ["q1"], "question": ["what?"], "option": [["A. a", "B. b", "C. c", "D. d", "E. e"]],
                   "answer": ["1"]})  # fmt: skip
    write_mp4(ego / "videos" / "v1.mp4")
    s = T.get_task("egoschema_subset").load(ego)[0]
    assert s.id == "q1" and s.video == str(ego / "videos" / "v1.mp4") and s.answer == "1"
    nq = tmp_path / "nextqa"
    write_parquet(nq / "MC" / "test-00000-of-00001.parquet",
                  {"video": [4010], "qid": [7], "question": ["why?"], **{f"a{i}": [f"o{i}"] for i in range(5)}, "answer": [2],
                   "type": ["CW"]})  # fmt: skip
    write_mp4(nq / "NExTVideo" / "4010.mp4")
    s = T.get_task("nextqa_mc_test").load(nq)[0]
    assert s.video == str(nq / "NExTVideo" / "4010.mp4") and s.answer == "C"
    lvb = tmp_path / "lvb"
    write_parquet(lvb / "validation-00000-of-00001.parquet",
                  {"id": ["x"], "video_path": ["abc.mp4"], "question": ["q?"], "option0": ["a"], "option1": ["b"], "option2": ["N/A"],
                   "option3": ["N/A"], "option4": ["N/A"], "correct_choice": [1], "duration_group": [15], "question_category": ["S2E"]})  # fmt: skip
    write_mp4(lvb / "videos" / "abc.mp4")
    s = T.get_task("longvideobench_val_v").load(lvb)[0]
    assert s.video == str(lvb / "videos" / "abc.mp4") and s.answer == "B" and s.choices == ["a", "b"]


def test_added_image_tasks_read_their_layouts(tmp_path):
    write_parquet(tmp_path / "MMMU" / "validation-00000-of-00001.parquet",
                  {"id": ["validation_Art_1"], "question": ["<image 1> which?"], "options": ["['x', 'y']"], "answer": ["A"],
                   "question_type": ["multiple-choice"], "image_1": [{"bytes": png("red"), "path": None}]})  # fmt: skip
    s = T.get_task("mmmu_val").load(tmp_path / "MMMU")[0]
    assert s.images[0].size == (8, 6) and s.prompt.endswith("directly.") and s.meta["subject"] == "Art"
    write_parquet(tmp_path / "ChartQA" / "test-00000-of-00001.parquet",
                  {"type": ["human_test"], "question": ["max?"], "answer": ["12"], "image": [{"bytes": png("blue"), "path": None}]})
    s = T.get_task("chartqa").load(tmp_path / "ChartQA")[0]
    assert s.images[0].size == (8, 6) and T.get_task("chartqa").score(s, "12.3")["score"] == 1.0
