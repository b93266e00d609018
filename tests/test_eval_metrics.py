"""Metrics checked against worked examples computed by hand (numbers written out, not recomputed)."""

from __future__ import annotations

import pytest

from mmprune.eval import metrics as M

# ---------------------------------------------------------------- VQA accuracy (official EvalAI rules)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two", "2"),
        ("The two dogs.", "2 dogs"),  # article dropped, number word mapped, final period removed
        ("an apple", "apple"),
        ("dont", "don't"),  # contraction restored
        ("yes!", "yes"),  # "!" inside a word becomes a space, then split/joined away
        ("red-white", "red white"),  # hyphen inside a word -> space
        ("1,000", "1000"),  # commas dropped before anything else
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("what's", "what 's"),  # "'s" split off, as the official tokeniser does
        ("  Coca Cola\n", "coca cola"),
        ("none", "0"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_worked_examples():
    # 10 answers; after normalisation nine read "2" and one reads "3".
    answers = ["two", "2", "2", "two", "2 ", "Two", "three", "2", "2", "two"]
    # Prediction "2": every leave-one-out subset still has >= 8 matches -> min(1, 8/3) = 1 each.
    assert M.vqa_accuracy("2", answers) == 1.0
    # Prediction "3": the subset without the "3" has 0 matches; the other nine have 1 -> 1/3 each.
    # mean = 9 * (1/3) / 10 = 0.3
    assert M.vqa_accuracy("Three.", answers) == pytest.approx(0.3)
    # Two matching answers: the 2 subsets that drop one see 1 match (1/3), the 8 others see 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 6/10
    two = ["cat", "cat"] + ["dog"] * 8
    assert M.vqa_accuracy("a cat", two) == pytest.approx(0.6)
    # Three matching: 3 subsets see 2 (2/3), 7 see 3 (1): (2 + 7) / 10 = 0.9
    three = ["cat"] * 3 + ["dog"] * 7
    assert M.vqa_accuracy("cat", three) == pytest.approx(0.9)
    assert M.vqa_accuracy("bird", three) == 0.0
    assert M.vqa_accuracy("x", []) == 0.0


# ------------------------------------------------------------------------------------------ POPE


def test_pope_metrics_worked_example():
    gts = ["yes"] * 5 + ["no"] * 5
    preds = ["Yes", "yes", " YES ", "no", "yes.", "yes", "no", "No", "no", "maybe"]
    # lmms-eval reads only exact yes/no: "yes." and "maybe" are neither.
    # TP = 3 (items 0-2), FN = 1 (item 3), FP = 1 (item 5); correct = 3 + 3 (items 6-8) = 6.
    m = M.pope_metrics(preds, gts)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    assert m["yes_ratio"] == pytest.approx(0.4)  # 4 of 10 predictions are exactly "yes"
    assert m["gt_yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_degenerate():
    m = M.pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    with pytest.raises(ValueError):
        M.pope_metrics(["yes"], [])


# ------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    "pred, label",
    [("Yes", "yes"), ("no.", "no"), ("Y", "yes"), ("n", "no"), ("x", "other"), ("Nope", "no"),
     ("Yes, it is.", "yes"), ("I think yes", "other"), ("", "other")],
)  # fmt: skip
def test_mme_parse(pred, label):
    assert M.mme_parse_yes_no(pred) == label


def test_mme_scores_worked_example():
    recs = [
        # existence (perception): image a both right -> 100 + 100; image b one right -> 50 + 0
        {"question_id": "existence/a.png", "category": "existence", "score": 1},
        {"question_id": "existence/a.png", "category": "existence", "score": 1},
        {"question_id": "existence/b.png", "category": "existence", "score": 1},
        {"question_id": "existence/b.png", "category": "existence", "score": 0},
        # count (perception): one image, both wrong -> 0
        {"question_id": "count/c.png", "category": "count", "score": 0},
        {"question_id": "count/c.png", "category": "count", "score": 0},
        # code_reasoning (cognition): d both wrong -> 0; e both right -> 200; mean 100
        {"question_id": "code_reasoning/d.png", "category": "code_reasoning", "score": 0},
        {"question_id": "code_reasoning/d.png", "category": "code_reasoning", "score": 0},
        {"question_id": "code_reasoning/e.png", "category": "code_reasoning", "score": 1},
        {"question_id": "code_reasoning/e.png", "category": "code_reasoning", "score": 1},
    ]
    s = M.mme_scores(recs)
    assert s["per_category"] == {"code_reasoning": 100.0, "count": 0.0, "existence": 125.0}
    assert s["perception"] == 125.0
    assert s["cognition"] == 100.0
    assert s["total"] == 225.0


def test_mme_category_lists_match_lmms_eval():
    assert len(M.MME_PERCEPTION) == 10 and len(M.MME_COGNITION) == 4
    assert "OCR" in M.MME_PERCEPTION and "text_translation" in M.MME_COGNITION


# ------------------------------------------------------------------------------------------- GQA


def test_gqa_exact_match():
    assert M.gqa_exact_match("Yes.", "yes") == 1.0
    assert M.gqa_exact_match(" Left ", "left") == 1.0
    assert M.gqa_exact_match("t-shirt", "tshirt") == 1.0  # punctuation deleted, not spaced
    assert M.gqa_exact_match("the table", "table") == 0.0  # no article removal in GQA
    assert M.gqa_exact_match("2", "two") == 0.0


# ------------------------------------------------------------------------------- multiple choice

OPTS = ["a cat", "a dog", "a red car", "a car"]


@pytest.mark.parametrize(
    "pred, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) a dog", "B"),
        ("C. a red car", "C"),
        ("The answer is D", "D"),
        ("The answer is (D).", "D"),
        ("Answer: A", "A"),
        ("I think the correct option is **B**.", "B"),
        ("It is a red car.", "C"),  # text match; "a car" is inside "a red car" and drops out
        ("a dog", "B"),
        ("The answer is a dog", "B"),  # lower-case "a" is the article, not option A
        ("E", None),  # not one of the four options
        ("I am not sure", None),
        ("", None),
    ],
)
def test_extract_choice(pred, letter):
    assert M.extract_choice(pred, OPTS) == letter


def test_extract_choice_with_dict_and_accuracy():
    assert M.extract_choice("(C)", {"A": "x", "C": "z"}) == "C"
    preds = ["B", "The answer is A", "dog", "(B) dog"]
    # hits: yes, no, yes (text), yes -> 3/4
    assert M.multiple_choice_accuracy(preds, ["B"] * 4, [["cat", "dog"]] * 4) == pytest.approx(0.75)


def test_mmbench_matchers():
    assert M.mmbench_can_infer_option("B") == "B"
    assert M.mmbench_can_infer_option("(C) a red car") == "C"
    assert M.mmbench_can_infer_option("A dog is on the sofa") is None  # "A" as a quantifier
    assert M.mmbench_can_infer_option("A or B") is None  # two letters
    assert M.mmbench_can_infer_text("there is a dog", {"A": "cat", "B": "dog"}) == "B"
    assert M.mmbench_can_infer_text("cat and dog", {"A": "cat", "B": "dog"}) is None
    assert M.mmbench_can_infer("dog", ["cat", "dog"]) == "B"


def test_task_specific_extractors():
    # ScienceQA (lmms-eval 0.7.3 sqa_process_results): the letter in any case, or a "<Capital>." prefix
    assert [M.sqa_match(p, "B") for p in ["B", "B. iron", "(B)", "b", "A. iron", "b. iron"]] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    # SEED-Bench: first character only, compared case-insensitively
    assert [M.seed_extract(p) for p in [" B", "B. dog", "The answer is B", ""]] == ["B", "B", "T", ""]
    assert [M.seed_match(p, "B") for p in ["b", "B. dog", "c) Horse", ""]] == [1.0, 1.0, 0.0, 0.0]
    # Video-MME / MLVU since 0.7.2: extract_mcq_answer over A-D
    assert M.videomme_extract("The best answer is C.") == "C"
    assert M.videomme_extract("(B) Red") == "B"
    assert M.videomme_extract("Answer: B") == "B"
    assert M.videomme_extract("xyz") == ""
    # MVBench mcq_acc: "X. text" -> X, else first standalone letter (any case), else the text
    assert M.mvbench_match("(B) moving left", "B") == 1.0
    assert M.mvbench_match("B. left", "B") == 1.0
    assert M.mvbench_match("a cat", "A") == 1.0  # lmms-eval quirk: the article reads as A
    assert M.mvbench_match("left", "B") == 0.0
    assert M.mvbench_match("B", None) == 0.0
    assert [M.mlvu_extract(p) for p in ["B) a cat", "(C) dog", " D ", "x"]] == ["B", "C", "D", ""]
