"""Issue 25, part 1: every task's prompt, per-sample score and aggregate equal lmms-eval 0.7.3's on crafted
rows and predictions (case, punctuation, whitespace, "(A)", "Answer: B", rambling answers, empty strings,
numbers). The reference code is ``lmms_eval_ref.py`` (extracted from the 0.7.3 wheel); with the package
installed, the extracts are checked against it too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lmms_eval_ref as R
import pytest

from mmprune.eval import tasks as T

PREDICTIONS = [
    "B", "b", "(B)", "B.", "B. dog", "B) dog", "Answer: B", "answer: b", "The answer is B", "The correct answer is (C).",
    "left .", "left", " Left. ", "Left", "", "   ", "A dog is on the sofa", "A", "a", "I think it's B because the dog",
    "C) Horse", "c) horse", "c", "1", "2.5", "yes", "Yes.", "none of these", "E", "B, C", "(A) or (B)",
    "Best option: (D", "D) the end", "the answer is a cat", "答案是C", "A cat. B dog. Final: D", "dog", "red, white",
]  # fmt: skip
MODULES = Path(__file__).parent


def _task(name):
    return T.get_task(name)


def _samples(task, rows, tmp_path):
    ctx = task._context(tmp_path)
    return [task._sample(r, tmp_path / "x.parquet", ctx) for r in rows]


# ----------------------------------------------------------------------------- GQA
def test_gqa(tmp_path):
    task = _task("gqa")
    rows = [{"question": "Which side is the cup on?", "answer": a, "imageId": "1", "image": {"bytes": b"x"}}
            for a in ("left", "yes", "table", "2.5")]
    for row in rows:
        assert task.build_prompt(row) == R.gqa_doc_to_text(row)
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        for p in PREDICTIONS:
            want = R.exact_match_hf_evaluate([p.strip()], [row["answer"]], ignore_case=True, ignore_punctuation=True)
            assert task.score(s, p)["score"] == want["exact_match"], p


# ----------------------------------------------------------------------------- ScienceQA-IMG
def test_scienceqa_img(tmp_path):
    task = _task("scienceqa_img")
    rows = [{"question": "Which is a metal?", "choices": ["wood", "iron", "glass"], "answer": 1, "hint": h,
             "image": {"bytes": b"x"}} for h in ("", "Look at the table.")]
    # (a None hint would print "None" there; the dataset's hint column holds "" instead)
    rows.append({"question": "Pick one.", "choices": ["x", "y"], "answer": 0, "hint": "", "image": {"bytes": b"x"}})
    for row in rows:
        assert task.build_prompt(row) == R.sqa_doc_to_text(row)
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        for p in PREDICTIONS:
            assert task.score(s, p)["score"] == R.sqa_process_results(row, [p])["exact_match"], p


# ----------------------------------------------------------------------------- SEED-Bench
def test_seedbench(tmp_path):
    task = _task("seedbench")
    rows = [{"question_id": str(i), "question": "What animal?", "choice_a": "cat", "choice_b": "dog", "choice_c": "horse",
             "choice_d": "cow", "answer": a, "data_type": "image", "image": [{"bytes": b"x"}]}
            for i, a in enumerate("BCA")]
    for row in rows:
        assert task.build_prompt(row) == R.seed_doc_to_text(row)
    samples = _samples(task, rows, tmp_path)
    for s, row in zip(samples, rows):
        for p in PREDICTIONS:
            assert task.score(s, p)["score"] == R.seed_aggregation_result([R.seed_process_result(row, [p])]), p
    preds = PREDICTIONS[: len(rows) * 10 : 10]
    ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
    assert ours == pytest.approx(100 * R.seed_aggregation_result([R.seed_process_result(r, [p]) for r, p in zip(rows, preds)]))


# ----------------------------------------------------------------------------- MMBench (dev, static matcher)
def _mmbench_rows():
    base = [("What is it?", "cat", "dog", "horse", "cow", "B", 0, None), ("Colour?", "red", "blue", "nan", None, "A", 1, "Look."),
            ("Count?", "1", "2", "3", "4", "D", 2, "nan"), ("Where?", "left", "right", "up", "down", "C", 3, "")]
    rows = []
    for q, a, b, c, d, ans, idx, hint in base:
        rows.append({"index": idx, "question": q, "hint": hint, "A": a, "B": b, "C": c, "D": d, "answer": ans,
                     "category": "cat" + str(idx % 2), "L2-category": "l2", "image": {"bytes": b"x"}})
    # circular rotations of question 0 (index 1e6 + 0): options rotated, the answer follows
    rows.append({**rows[0], "index": 1_000_000, "A": "dog", "B": "horse", "C": "cow", "D": "cat", "answer": "A"})
    rows.append({**rows[0], "index": 2_000_000, "A": "horse", "B": "cow", "C": "cat", "D": "dog", "answer": "D"})
    return rows


def test_mmbench_prompt_score_and_circular_aggregate(tmp_path):
    task = _task("mmbench")
    rows = _mmbench_rows()
    for row in rows:
        assert task.build_prompt(row) == R.mmbench_doc_to_text(row)
    samples = _samples(task, rows, tmp_path)
    for s, row in zip(samples, rows):
        for p in PREDICTIONS:
            rec = {**row, "prediction": p.strip()}
            want = R.eval_sub_data_static([rec], {row["index"]: row["answer"]})
            assert task.score(s, p)["score"] == want, (row["index"], p)
    for shift in range(5):
        preds = [PREDICTIONS[(i * 7 + shift) % len(PREDICTIONS)] for i in range(len(rows))]
        preds[0], preds[4], preds[5] = ["B", "A", "D"] if shift % 2 else ["dog", "A", "(D)"]
        ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
        want = R.mmbench_static_overall([{**r, "prediction": p.strip()} for r, p in zip(rows, preds)])
        assert ours == pytest.approx(100 * want), shift
    # rotations whose main record is missing are not counted
    ours = task.aggregate([task.score(s, "B") for s in samples[4:]])
    assert ours[2]["questions"] == 0


# ----------------------------------------------------------------------------- Video-MME
def test_videomme(tmp_path):
    task = _task("videomme")
    rows = [{"videoID": f"v{i}", "question_id": f"q{i}", "question": "What happens?", "answer": a, "duration": "short",
             "domain": "d", "sub_category": "s", "task_type": "t",
             "options": ["A. run", "B. jump", "C. sit", "D. swim"]} for i, a in enumerate("ABCD")]
    for row in rows:
        assert task.build_prompt(row) == R.videomme_doc_to_text(row)
    samples = _samples(task, rows, tmp_path)
    for k in range(len(PREDICTIONS)):
        preds = [PREDICTIONS[(k + i) % len(PREDICTIONS)] for i in range(len(rows))]
        ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
        assert ours == pytest.approx(R.videomme_overall(rows, preds)), preds


# ----------------------------------------------------------------------------- MLVU
def test_mlvu(tmp_path):
    task = _task("mlvu")
    q = "What happens?\n(A) run\n(B) jump\n(C) sit\n(D) swim"
    rows = [{"video_name": f"v{i}.mp4", "question": q, "answer": a, "task_type": t}
            for i, (a, t) in enumerate(zip("ABCDB", ["plotQA", "plotQA", "count", "ego", "needle"]))]
    for row in rows:
        assert task.build_prompt(row) == R.mlvu_doc_to_text(row)
    samples = _samples(task, rows, tmp_path)
    for k in range(len(PREDICTIONS)):
        preds = [PREDICTIONS[(k + 3 * i) % len(PREDICTIONS)] for i in range(len(rows))]
        ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
        assert ours == pytest.approx(R.mlvu_aggregate_dev(rows, preds)), preds


# ----------------------------------------------------------------------------- MVBench
def test_mvbench_prompt():
    task = _task("mvbench")
    row = {"video": "a.mp4", "question": "How many times?", "candidates": ["3", "4", "5"], "answer": "4"}
    assert task.build_prompt(row) == R.mvbench_doc_to_text(row)


def test_task_versions_are_named():
    assert T.LMMS_EVAL_VERSION == "0.7.3"
    import argparse

    from mmprune.eval.command import add_common

    p = argparse.ArgumentParser()
    add_common(p)
    assert "0.7.3" in p.format_help()


# ----------------------------------------------------------------------------- the extracts vs the package
def _load(rel: str):
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed (pip install lmms-eval==0.7.3 to check the extracts against it)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    mod_spec = importlib.util.spec_from_file_location("_lmms_" + path.stem, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_extracts_equal_the_installed_package():
    """The dependency-free files of the installed lmms-eval, loaded by path (its package __init__ imports far
    more than these need)."""
    mcq = _load("tasks/_task_utils/mcq_extract.py")
    for p in PREDICTIONS:
        for choices in (None, ["A", "B", "C", "D"], ["A", "B"]):
            assert mcq.extract_mcq_answer(p, choices) == R.extract_mcq_answer(p, choices), (p, choices)


# ----------------------------------------------------------------------------- POPE, MME, TextVQA
def test_pope_mme_textvqa(tmp_path):
    pope, mme, textvqa = _task("pope"), _task("mme"), _task("textvqa")
    rows = [{"question_id": "1", "question": "  Is there a dog in the image? ", "answer": a, "category": "adversarial",
             "image": {"bytes": b"x"}} for a in ("yes", "no")]
    for s, row in zip(_samples(pope, rows, tmp_path), rows):
        assert pope.build_prompt(row) == R.pope_doc_to_text(row)
        for p in PREDICTIONS + ["Yes", " no ", "No."]:
            assert pope.score(s, p)["score"] == R.pope_process_results(row, [p]), p
    rows = [{"question_id": "a.jpg", "question": "Is this red? Please answer yes or no.", "answer": a, "category": "color",
             "image": {"bytes": b"x"}} for a in ("Yes", "No")]
    for s, row in zip(_samples(mme, rows, tmp_path), rows):
        assert mme.build_prompt(row) == R.mme_doc_to_text(row)
        for p in PREDICTIONS + ["Nope", "y", "N", "yes, it is"]:
            want = float(R.parse_pred_ans(p) == row["answer"].lower().strip().replace(".", ""))
            assert mme.score(s, p)["score"] == want, p
    for q in ("what is written ON the sign?", "WHO made it"):
        assert textvqa.build_prompt({"question": q}) == R.textvqa_doc_to_text({"question": q})


# ----------------------------------------------------------------------------- issue 25, part 2: added tasks
NUMERIC = ["12", "12.4", "12.7", "11.5", "50%", "0.5", "0", "-3", "1e3", "1000", "twelve", "Twelve", " 12 ", "12%", "nan", "inf"]


def test_chartqa(tmp_path):
    task = _task("chartqa")
    rows = [{"question": "What is the peak?", "answer": a, "type": t, "image": {"bytes": b"x"}}
            for a, t in [("12", "human_test"), ("0.5", "augmented_test"), ("twelve", "human_test"), ("0", "augmented_test"),
                         ("1000", "augmented_test")]]
    samples = _samples(task, rows, tmp_path)
    for s, row in zip(samples, rows):
        assert task.build_prompt(row) == R.chartqa_doc_to_text(row)
        for p in NUMERIC + PREDICTIONS:
            assert task.score(s, p)["score"] == R.chartqa_process_results(row, [p])["relaxed_overall"], (row["answer"], p)
    preds = ["12.4", "50%", "Twelve", "0", "999"]
    ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])
    refs = [R.chartqa_process_results(r, [p]) for r, p in zip(rows, preds)]
    assert ours[0] == pytest.approx(100 * sum(r["relaxed_overall"] for r in refs) / len(refs))
    human = [r["relaxed_human_split"] for r in refs if "relaxed_human_split" in r]
    assert ours[2]["relaxed_human_split"] == pytest.approx(100 * sum(human) / len(human))


def test_docvqa_val(tmp_path):
    task = _task("docvqa_val")
    rows = [{"questionId": str(i), "question": "What is the date?", "answers": a, "image": {"bytes": b"x"}}
            for i, a in enumerate([["March 3, 1990", "3/3/1990"], ["Lincoln"], [""], ["ITC"]])]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.docvqa_doc_to_text(row)
        for p in PREDICTIONS + ["march 3 , 1990", "March  3, 1990", "Lincon", "itc.", "3/3/90"]:
            assert task.score(s, p)["score"] == pytest.approx(R.anls(row["answers"], [p])["anls"]), (row["answers"], p)


def test_ai2d(tmp_path):
    task = _task("ai2d")
    rows = [{"question": "Which stage comes next?", "options": ["egg", "larva", "pupa", "adult"], "answer": str(i),
             "image": {"bytes": b"x"}} for i in range(4)]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.ai2d_doc_to_text(row)
        for p in PREDICTIONS + ["  C. pupa", "c.", "D", "d"]:
            want = R.exact_match_hf_evaluate([R.ai2d_filter(p)], [R.ai2d_doc_to_target(row)], ignore_case=True,
                                             ignore_punctuation=True)["exact_match"]
            assert task.score(s, p)["score"] == want, (row["answer"], p)


def test_realworldqa(tmp_path):
    task = _task("realworldqa")
    q = "  How many cars are there?\nA. 1\nB. 2\nC. 3\nPlease answer directly with only the letter of the correct option and nothing else."
    rows = [{"question": q, "answer": a, "image": {"bytes": b"x"}} for a in ("B", "c", "3", "Yes", "left")]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.realworldqa_doc_to_text(row)
        for p in PREDICTIONS + ["3.", "Yes.", "LEFT", "3 cars"]:
            assert task.score(s, p)["score"] == R.realworldqa_process_results(row, [p])["exact_match"], (row["answer"], p)


def test_mmstar(tmp_path):
    task = _task("mmstar")
    rows = [{"index": i, "question": "Which is larger?\nOptions: A: 1, B: 2, C: 3, D: 4", "answer": a, "category": c,
             "l2_category": l2, "image": {"bytes": b"x"}}
            for i, (a, c, l2) in enumerate([("A", "math", "geometry"), ("B", "math", "geometry"),
                                            ("C", "math", "statistical reasoning"), ("D", "coarse perception", "image emotion")])]
    samples = _samples(task, rows, tmp_path)
    for row in rows:
        assert task.build_prompt(row) == R.mmstar_doc_to_text(row)
    for k in range(len(PREDICTIONS)):
        preds = [PREDICTIONS[(k + 5 * i) % len(PREDICTIONS)] for i in range(len(rows))]
        ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
        want = R.mmstar_aggregate_results([R.mmstar_process_results(r, [p]) for r, p in zip(rows, preds)])
        assert ours == pytest.approx(100 * want), preds


VQA_ANSWERS = [["2"] * 6 + ["two"] * 2 + ["3", "2 "], ["yes"] * 10, ["red and white", "red, white", "Red"] + ["white"] * 7,
               ["the dog"] * 4 + ["dog"] * 3 + ["a dog's toy"] * 3, ["unanswerable"] * 5 + ["Unanswerable."] * 5]
VQA_PREDICTIONS = PREDICTIONS + ["Two", "2.", "two dogs", "Dog", "the dog", "a dog's toy", "dog's toy", "red-white",
                                 "red white", "Unanswerable", "unanswerable.", "yes?", "dont", "10,000", "10000"]


def test_vqav2_val(tmp_path):
    task = _task("vqav2_val")
    rows = [{"question_id": i, "question": "What color is it?", "image": {"bytes": b"x"}, "answer_type": "other",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(ans)]}
            for i, ans in enumerate(VQA_ANSWERS)]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.vqav2_doc_to_text(row)
        for p in VQA_PREDICTIONS:
            assert task.score(s, p)["score"] == pytest.approx(R.vqav2_process_results(row, [p]), abs=1e-12), p


def test_vizwiz_vqa_val(tmp_path):
    task = _task("vizwiz_vqa_val")
    rows = [{"question_id": f"v{i}", "question": "what is this?", "answers": ans, "image": {"bytes": b"x"}}
            for i, ans in enumerate(VQA_ANSWERS)]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.vizwiz_vqa_doc_to_text(row)
        for p in VQA_PREDICTIONS:
            assert task.score(s, p)["score"] == pytest.approx(R.vizwiz_vqa_process_results(row, [p]), abs=1e-12), p


def test_ocrbench(tmp_path):
    task = _task("ocrbench")
    rows = [{"dataset": d, "question": " what is written in the image? ", "question_type": t, "answer": a, "image": {"bytes": b"x"}}
            for d, t, a in [("IIIT5K", "Regular Text Recognition", ["STOP"]), ("HME100k", "Handwritten Mathematical Expression Recognition",
                            ["x ^ { 2 }"]), ("docVQA", "Doc-oriented VQA", ["1990", "March 1990"]), ("FUNSD", "Key Information Extraction", "Ｎａｍｅ")]]
    samples = _samples(task, rows, tmp_path)
    for s, row in zip(samples, rows):
        assert task.build_prompt(row) == R.ocrbench_doc_to_text(row)
        for p in PREDICTIONS + ["stop sign", "x^{2}", "in march 1990", "NAME:", "Name", "ＳＴＯＰ"]:
            assert task.score(s, p)["score"] == R.ocrbench_process_results(row, [p])["score"], (row["answer"], p)
    preds = ["stop sign", "x^{2}", "no", "name"]
    ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
    assert ours == pytest.approx(100 * R.ocrbench_aggregate_accuracy([R.ocrbench_process_results(r, [p]) for r, p in zip(rows, preds)]))


MMMU_PREDICTIONS = PREDICTIONS + [
    "The answer is 24.", "so the total is 1,200 dollars", "x = 3.14159", "It is 5e3 meters. So the result is 5000",
    "Paris", "the capital is paris.", "I would pick option (B) over (D)", "B and C are both wrong; the answer is C.",
    "Looking at the image carefully, the painting shows a cubist style", "none", "0.5", ".5", "-2",
]


def test_mmmu_val(tmp_path):
    task = _task("mmmu_val")
    rows = [
        {"id": "validation_Art_Theory_1", "question": "<image 1> Which style is shown?", "question_type": "multiple-choice",
         "options": "['impressionist', 'cubist style', 'baroque', 'pop art']", "answer": "B", "image_1": {"bytes": b"x"}},
        {"id": "validation_Math_2", "question": "What is x? <image 1> <image 2>", "question_type": "open",
         "options": "[]", "answer": "3.14", "image_1": {"bytes": b"x"}, "image_2": {"bytes": b"y"}},
        {"id": "validation_Geography_3", "question": "Capital of France?", "question_type": "open", "options": "[]",
         "answer": "Paris"},
        {"id": "validation_Accounting_4", "question": "Total cost?", "question_type": "open", "options": "[]", "answer": "1,200"},
        {"id": "validation_Physics_5", "question": "Pick one.", "question_type": "multiple-choice",
         "options": "['5 m', '24', 'C', 'D']", "answer": "C"},
    ]
    samples = _samples(task, rows, tmp_path)
    assert [len(s.image_refs or []) for s in samples] == [1, 2, 0, 0, 0]
    assert [s.meta["subject"] for s in samples] == ["Art_Theory", "Math", "Geography", "Accounting", "Physics"]
    for s, row in zip(samples, rows):
        assert task.build_prompt(row) == R.mmmu_doc_to_text(row)
        for p in MMMU_PREDICTIONS:
            assert task.score(s, p)["score"] == R.mmmu_score(row, p), (row["id"], p)


# ----------------------------------------------------------------------------- video tasks added by issue 25
VIDEO_PREDICTIONS = PREDICTIONS + MMMU_PREDICTIONS[len(PREDICTIONS):] + [
    "(B) and (D)", "B. then C.", "The best answer is E.", "the person is cooking dinner in the kitchen today",
    "D. A book", "I think it is option E (E)", "c.", "E",
]


def test_egoschema_subset(tmp_path):
    task = _task("egoschema_subset")
    opts = ["A. cooking dinner", "B. washing dishes", "C. reading a book", "D. cleaning the floor", "E. watching tv"]
    rows = [{"video_idx": f"v{i}", "question": "What is the person doing?", "option": opts, "answer": str(a)}
            for i, a in enumerate([0, 2, 4])]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.egoschema_doc_to_text(row)
        for p in VIDEO_PREDICTIONS:
            assert task.score(s, p)["score"] == R.egoschema_score(row, p), (row["answer"], p)


def test_nextqa_mc_test(tmp_path):
    task = _task("nextqa_mc_test")
    rows = [{"video": 1000 + i, "qid": i, "question": " why did the boy run? ", "a0": "to catch the ball ", "a1": "he was late",
             "a2": "to play", "a3": "cooking dinner", "a4": "none", "answer": a, "type": "CW"} for i, a in enumerate([0, 3, 4])]
    for s, row in zip(_samples(task, rows, tmp_path), rows):
        assert task.build_prompt(row) == R.nextqa_doc_to_text_mc(row)
        for p in VIDEO_PREDICTIONS:
            assert task.score(s, p)["score"] == R.nextqa_score(row, p), (row["answer"], p)


def test_longvideobench_val_v(tmp_path):
    task = _task("longvideobench_val_v")
    rows = [{"id": f"q{i}", "video_path": f"v{i}.mp4", "question": "What is on the table?", "option0": "A book", "option1": "a cup",
             "option2": "keys", "option3": o3, "option4": "N/A", "correct_choice": c, "duration_group": 15,
             "question_category": "S2E"} for i, (o3, c) in enumerate([("a phone", 0), ("N/A", 2), ("a pen", 3)])]
    samples = _samples(task, rows, tmp_path)
    for s, row in zip(samples, rows):
        assert task.build_prompt(row) == R.longvideobench_doc_to_text(row)
        for p in VIDEO_PREDICTIONS:
            assert task.score(s, p)["score"] == R.longvideobench_score(row, p), (row["correct_choice"], p)
    preds = ["A", "C", "the answer is a pen"]
    ours = task.aggregate([task.score(s, p) for s, p in zip(samples, preds)])[0]
    assert ours == pytest.approx(100 * round(sum(R.longvideobench_score(r, p) for r, p in zip(rows, preds)) / 3, 5))
