"""Scoring functions for the real benchmarks, following lmms-eval (and the official scripts it ports).

Everything here is pure Python (``re`` / ``string`` only) and deterministic: no API matcher, no model.
Where lmms-eval has a quirk that changes numbers (for example SEED-Bench scoring only the first
character of the answer) it is kept, because accuracy is only comparable inside one harness; where a
task's official scorer would call an API (MMBench), :func:`extract_choice` stands in for it.

Example:
    >>> vqa_accuracy("Two", ["2"] * 9 + ["3"])
    1.0
    >>> mme_parse_yes_no("Yes, there is.")
    'yes'
    >>> extract_choice("The answer is (B).", ["cat", "dog"])
    'B'
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "vqav2_accuracy",
    "pope_normalize",
    "pope_metrics",
    "MME_PERCEPTION",
    "MME_COGNITION",
    "mme_parse_yes_no",
    "mme_scores",
    "gqa_normalize",
    "gqa_exact_match",
    "mmbench_can_infer_option",
    "mmbench_can_infer_text",
    "mmbench_can_infer",
    "extract_choice",
    "multiple_choice_accuracy",
    "sqa_match",
    "seed_extract",
    "videomme_extract",
    "mvbench_match",
    "mlvu_extract",
    "extract_mcq_answer",
    "seed_match",
]

LETTERS = string.ascii_uppercase

# --------------------------------------------------------------------------------------------------
# VQA accuracy (TextVQA, VQAv2): lmms-eval's EvalAIAnswerProcessor (lmms_eval/tasks/_task_utils/
# vqa_eval_metric.py, itself copied from MMF), which reproduces the official VQA evaluation script.
# --------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The official script's lookbehind is mistyped as ``(?!<=\d)``, a lookahead that never matches: a
# period is removed unless a digit follows it. Kept as is so that numbers match the official scorer.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(in_text: str, comma: re.Pattern = _COMMA_STRIP) -> str:
    out_text = in_text
    for p in _PUNCTUATIONS:
        # A mark touching a space (or any text with a digit-comma-digit) is deleted; one inside a word
        # ("red-white") becomes a space. Both tests look at the *input* text, as the official script does.
        if (p + " " in in_text or " " + p in in_text) or (comma.search(in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # The official script passes re.UNICODE (== 32) as the positional *count*: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out_text, count=32)


def _process_digit_article(in_text: str) -> str:
    words = []
    for word in in_text.lower().split():
        word = _NUMBER_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the official VQA / EvalAI scorer does.

    Lower-case, drop commas and question marks, split "'s", strip punctuation, map number words to
    digits, drop articles, restore contractions.

    Example:
        >>> normalize_vqa_answer("The two dogs.")
        '2 dogs'
        >>> normalize_vqa_answer("dont know")
        "don't know"
    """
    item = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    item = item.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(item))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10).

    For each of the ``len(answers)`` leave-one-out subsets, ``min(1, matches / 3)``; the mean over the
    subsets (official VQA script; lmms-eval ``textvqa_process_results``). Both sides are normalised
    with :func:`normalize_vqa_answer`. No answers gives 0.

    Example:
        >>> vqa_accuracy("3", ["3"] + ["2"] * 9)  # 9 subsets see one match, one sees none: 9 * (1/3) / 10
        0.3
    """
    return _leave_one_out(normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers])


def _leave_one_out(pred: str, gts: list[str]) -> float:
    """The official VQA accuracy on normalised answers: over the leave-one-out subsets, ``min(1, matches / 3)``."""
    if not gts:
        return 0.0
    accs = [min(1.0, sum(1 for j, g in enumerate(gts) if j != i and g == pred) / 3.0) for i in range(len(gts))]
    return round(sum(accs) / len(accs), 12)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 as lmms-eval scores it (``vqav2_process_results``): the same leave-one-out ``min(1, matches / 3)``
    as :func:`vqa_accuracy`, but both sides only get newlines / tabs turned to spaces, a strip, the
    punctuation step and the digit / article step (no up-front lower-casing, no "'s" split, commas and
    question marks left to the punctuation step).

    Example:
        >>> vqav2_accuracy("Two", ["2"] * 10), vqav2_accuracy("yes?", ["yes"] * 10)
        (1.0, 1.0)
    """

    def norm(text: str) -> str:
        text = str(text).replace("\n", " ").replace("\t", " ").strip()
        return _process_digit_article(_process_punctuation(text))

    return _leave_one_out(norm(prediction), [norm(a) for a in answers])


# --------------------------------------------------------------------------------------------------
# POPE (lmms_eval/tasks/pope/utils.py)
# --------------------------------------------------------------------------------------------------


def pope_normalize(prediction: str) -> str:
    """lmms-eval's POPE reading of an answer: ``lower().strip()``, no further extraction.

    Anything but exactly "yes" or "no" (e.g. "yes." or "There is a dog.") is wrong, counts neither as a
    positive nor as a negative in precision / recall.

    Example:
        >>> pope_normalize("  Yes ")
        'yes'
    """
    return str(prediction).lower().strip()


def pope_metrics(predictions: Iterable[str], answers: Iterable[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio over POPE predictions (fractions in [0, 1]).

    Follows lmms-eval's aggregations: a prediction is "yes" only if it *is* "yes" after
    :func:`pope_normalize`; precision = TP / (TP + FP), recall = TP / (TP + FN) where FN needs an
    explicit "no". ``yes_ratio`` is the share of *predictions* that are "yes", as the POPE paper defines
    it (lmms-eval's ``pope_yes_ratio`` counts the ground truth instead, always 0.5 on POPE; it is
    returned as ``gt_yes_ratio``).

    Example:
        >>> m = pope_metrics(["yes", "no", "yes", "yes"], ["yes", "no", "no", "yes"])
        >>> m["accuracy"], m["precision"], m["recall"]
        (0.75, 0.6666666666666666, 1.0)
    """
    preds = [pope_normalize(p) for p in predictions]
    gts = [pope_normalize(a) for a in answers]
    n = len(preds)
    if n != len(gts):
        raise ValueError(f"pope_metrics: {n} predictions but {len(gts)} answers")
    tp = sum(1 for p, g in zip(preds, gts) if p == "yes" and g == "yes")
    fp = sum(1 for p, g in zip(preds, gts) if p == "yes" and g == "no")
    fn = sum(1 for p, g in zip(preds, gts) if p == "no" and g == "yes")
    correct = sum(1 for p, g in zip(preds, gts) if p == g)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(1 for p in preds if p == "yes") / n if n else 0.0,
        "gt_yes_ratio": sum(1 for g in gts if g == "yes") / n if n else 0.0,
    }


# --------------------------------------------------------------------------------------------------
# MME (lmms_eval/tasks/mme/utils.py)
# --------------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse_yes_no(prediction: str) -> str:
    """MME's answer parser (lmms-eval ``parse_pred_ans``, "brought from Otter Eval").

    Returns "yes", "no" or "other": exact yes/no; "y"/"n"; else "yes"/"no" found in the first four
    characters (so "Nope" reads as "no").

    Example:
        >>> [mme_parse_yes_no(s) for s in ["Yes.", "n", "No, it is not.", "I think so"]]
        ['yes', 'no', 'no', 'other']
    """
    ans = str(prediction).lower().strip().replace(".", "")
    if ans in ("yes", "no"):
        return ans
    if len(ans) == 1:
        return {"y": "yes", "n": "no"}.get(ans, "other")
    prefix = ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores from per-question records ``{"question_id", "category", "score"}`` (score 0 or 1).

    Per category: for each image (``question_id``; MME asks two questions per image) ``acc`` (percent of
    its questions right) plus ``acc+`` (100 if both are right), averaged over images; perception is the
    sum over the perception categories, cognition over the cognition ones (max 2000 and 800).
    lmms-eval asserts exactly two questions per image; here an image with another count is scored the
    same way (acc+ needs all of its questions right), so a ``--limit`` run still gives a number.

    Example:
        >>> recs = [{"question_id": "a.png", "category": "color", "score": s} for s in (1, 1)]
        >>> mme_scores(recs)["perception"]
        200.0
    """
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_cat[r["category"]][r["question_id"]].append(float(r["score"]))
    per_category: dict[str, float] = {}
    for cat, per_image in by_cat.items():
        total = 0.0
        for scores in per_image.values():
            acc = sum(scores) / len(scores) * 100.0
            acc_plus = 100.0 if all(s == 1.0 for s in scores) else 0.0
            total += acc + acc_plus
        per_category[cat] = total / len(per_image)
    perception = sum(v for k, v in per_category.items() if k in MME_PERCEPTION)
    cognition = sum(v for k, v in per_category.items() if k in MME_COGNITION)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "per_category": dict(sorted(per_category.items())),
    }


# --------------------------------------------------------------------------------------------------
# GQA: lmms-eval's metric is ``exact_match`` with ignore_case and ignore_punctuation (HF evaluate).
# --------------------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def gqa_normalize(text: str) -> str:
    """HF ``exact_match`` with ignore_case and ignore_punctuation: lower-case, delete ASCII punctuation, and
    nothing else (no strip: a space left before deleted punctuation stays).

    Example:
        >>> gqa_normalize("Left."), gqa_normalize("left .")
        ('left', 'left ')
    """
    return str(text).lower().translate(_PUNCT_TABLE)


def gqa_exact_match(prediction: str, answer: str) -> float:
    """GQA as lmms-eval scores it: the generation stripped (its model wrappers do), then
    :func:`gqa_normalize` on both sides, compared exactly.

    Example:
        >>> gqa_exact_match(" Yes. ", "yes"), gqa_exact_match("left .", "left"), gqa_exact_match("the table", "table")
        (1.0, 0.0, 0.0)
    """
    return float(gqa_normalize(str(prediction).strip()) == gqa_normalize(answer))


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------


def _choices_dict(choices: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    if choices is None:
        return {}
    if isinstance(choices, Mapping):
        return {str(k): str(v) for k, v in choices.items()}
    return {LETTERS[i]: str(c) for i, c in enumerate(choices)}


def mmbench_can_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """MMBench's letter matcher (lmms-eval ``MMBench_Evaluator.can_infer_option``).

    A letter counts if it is the only one among the first ``num_choice`` letters standing alone as a
    whitespace token, or, failing that, the only one in one of the forms ``B.``, ``B,``, ``B:``,
    ``B)``, ``B).``, ``(B)``, ``(B).``, ``:B``, ``:B,``, ``:B.``, ``:B)``, ``:B).``. A lone "A" in a
    sentence longer than three words may be the article, so it does not count there. (lmms-eval 0.7.3
    counts the standalone letters over all ``num_choice`` letters, A–E.)

    Example:
        >>> mmbench_can_infer_option("(C) a red car")
        'C'
        >>> mmbench_can_infer_option("A dog is on the sofa") is None
        True
    """
    choices = LETTERS[:num_choice]
    splits = [x.strip() for x in str(answer).split()]

    def count(prefix: str = "", suffix: str = "", letters: str = choices) -> int:
        return sum(1 for c in letters if prefix + c + suffix in splits)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    forms = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
             (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]  # fmt: skip
    for pre, suf in forms:
        if count(pre, suf) == 1:
            for ch in choices:
                if pre + ch + suf in splits:
                    return ch
    return None


def mmbench_can_infer_text(answer: str, choices: Mapping[str, str] | Sequence[str]) -> str | None:
    """MMBench's option-text matcher: the one option among A–D (``build_choices`` never offers E) whose
    lower-cased text occurs in the lower-cased answer.

    Example:
        >>> mmbench_can_infer_text("I see a dog", {"A": "cat", "B": "dog"})
        'B'
    """
    ans = str(answer).lower()
    cands = [k for k, v in _choices_dict(choices).items() if k in "ABCD" and v.lower() in ans]
    return cands[0] if len(cands) == 1 else None


def mmbench_can_infer(answer: str, choices: Mapping[str, str] | Sequence[str]) -> str | None:
    """MMBench's deterministic pre-matcher: letter first, then option text (no API call).

    Example:
        >>> mmbench_can_infer("B", ["cat", "dog"])
        'B'
    """
    return mmbench_can_infer_option(answer) or mmbench_can_infer_text(answer, choices)


_ANSWER_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:best\s+|correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is|would be|:)?\s*[:\-]?\s*",
    re.IGNORECASE,
)
# Keywords match in any case, the letter only in upper case: "the answer is a cat" names no option.
_CUE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|would be|should be|:)?\s*:?\s*\(?\*{0,2}([A-Z])\*{0,2}\)?(?![A-Za-z])")


def _norm_text(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def extract_choice(prediction: str, choices: Mapping[str, str] | Sequence[str]) -> str | None:
    """Deterministic multiple-choice extraction: the chosen letter, or None when it cannot be told.

    Tried in order, the first rule that gives exactly one valid letter wins:

    1. the whole answer is a letter, optionally in brackets / followed by ``.``, ``:`` or ``)``;
    2. it starts with such a letter followed by a delimiter ("B. dog", "(B) dog", "B) dog");
    3. a cue: "answer is B", "Answer: (B)", "option B", "correct choice is **B**";
    4. MMBench's own matcher (:func:`mmbench_can_infer_option`) restricted to the valid letters;
    5. option text: the one option whose normalised text occurs in the normalised answer (options
       contained in another matching option are dropped first, so "red car" beats "car").

    ``choices`` is the list of option texts (letters A, B, … in order) or a ``{letter: text}`` dict.

    Example:
        >>> opts = ["a cat", "a dog", "a red car", "a car"]
        >>> [extract_choice(s, opts) for s in ["(B)", "C. a red car", "The answer is D", "It is a red car"]]
        ['B', 'C', 'D', 'C']
        >>> extract_choice("I am not sure", opts) is None
        True
    """
    cd = _choices_dict(choices)
    valid = set(cd) if cd else set("ABCDE")
    text = str(prediction).strip()
    if not text:
        return None
    body = _ANSWER_PREFIX.sub("", text, count=1).strip().strip("*").strip()

    m = re.fullmatch(r"\(?\s*([A-Z])\s*\)?\s*[.:)]?", body)
    if m and m.group(1) in valid:
        return m.group(1)
    m = re.match(r"\(?([A-Z])\s*(?:[.:)]|\)\.?)(?:\s|$)", body)
    if m and m.group(1) in valid:
        return m.group(1)
    cues = set(_CUE.findall(text)) & valid
    if len(cues) == 1:
        return cues.pop()
    opt = mmbench_can_infer_option(text, num_choice=max(len(valid), 1) if cd else 5)
    if opt and opt in valid:
        return opt
    if cd:
        ans = f" {_norm_text(text)} "
        hits = {k: _norm_text(v) for k, v in cd.items() if _norm_text(v) and f" {_norm_text(v)} " in ans}
        hits = {k: v for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}
        if len(hits) == 1:
            return next(iter(hits))
    return None


def multiple_choice_accuracy(predictions: Iterable[str], answers: Iterable[str], choices: Iterable) -> float:
    """Fraction of predictions whose :func:`extract_choice` letter equals the answer letter.

    Example:
        >>> multiple_choice_accuracy(["B", "The answer is A", "dog"], ["B", "B", "B"], [["cat", "dog"]] * 3)
        0.6666666666666666
    """
    hits = [float(extract_choice(p, c) == str(a).strip().upper()) for p, a, c in zip(predictions, answers, choices)]
    return sum(hits) / len(hits) if hits else 0.0


def sqa_match(prediction: str, target: str) -> float:
    """ScienceQA as lmms-eval (and LLaVA) score it (``sqa_process_results``): the answer is the letter in
    any case, or starts with "<Capital>.".

    Example:
        >>> sqa_match("B", "B"), sqa_match("b", "B"), sqa_match("B. iron", "B"), sqa_match("(B)", "B")
        (1.0, 1.0, 1.0, 0.0)
    """
    target = str(target).strip().lower()
    pred = str(prediction).strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    return 0.0


def seed_match(prediction: str, answer: str) -> float:
    """SEED-Bench as lmms-eval scores it (``seed_process_result`` + ``seed_aggregation_result``): the first
    character of the stripped answer, compared case-insensitively.

    Example:
        >>> seed_match("b", "B"), seed_match("C) Horse", "C"), seed_match("The answer is B", "B")
        (1.0, 1.0, 0.0)
    """
    return float(seed_extract(prediction).lower().strip() == str(answer).lower().strip())


def seed_extract(prediction: str) -> str:
    """SEED-Bench as lmms-eval scores it: the first character of the stripped answer.

    Example:
        >>> seed_extract(" B. a dog"), seed_extract("The answer is B")
        ('B', 'T')
    """
    pred = str(prediction).strip()
    return pred[:1]


# lmms-eval 0.7.3, lmms_eval/tasks/_task_utils/mcq_extract.py (extract_mcq_answer): Video-MME, MLVU and the
# offline MMBench matcher use it since v0.7.2.
_MCQ_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
]  # fmt: skip
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                 "space": 2, "fallback": 0}  # fmt: skip


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """lmms-eval's multiple-choice letter extraction, rule for rule: every letter found in a known form
    ("(B)", "B.", "B:", "B)", "B ", after an answer phrase, at the start or the end) is a candidate; the
    highest-priority form wins, the last occurrence within a form; "" when no letter is found.

    Example:
        >>> extract_mcq_answer("The correct answer is (B)."), extract_mcq_answer("Answer: B", ["A", "B", "C", "D"])
        ('B', 'B')
        >>> extract_mcq_answer("no idea", ["A", "B", "C", "D"])
        ''
    """
    if not response or not response.strip():
        return ""
    letters = list(choices or "ABCDEFGH")
    text = response.strip()
    for ch in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(ch)
    text = " " + text + " "
    cands: list[tuple[str, int, str]] = []
    for form, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):
        for ch in letters:
            if pattern.format(ch) in text:
                cands.append((ch, text.rfind(pattern.format(ch)), form))
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        idx = lower.find(phrase)
        if idx != -1:
            for ch in letters:
                pos = text.find(ch, idx + len(phrase))
                if pos != -1:
                    cands.append((ch, pos, "phrase"))
    stripped = text.strip()
    for ch in letters:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            cands.append((ch, 0, "start"))
    for ch in letters:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            cands.append((ch, len(text) - 1, "end"))
    if not cands:
        cands = [(ch, text.rfind(ch), "fallback") for ch in letters if ch in text]
    if not cands:
        return ""
    cands.sort(key=lambda c: (_MCQ_PRIORITY.get(c[2], 0), c[1]), reverse=True)
    return cands[0][0]


def videomme_extract(prediction: str) -> str:
    """Video-MME's (and MLVU's) letter extraction since lmms-eval 0.7.2: ``extract_characters_regex`` is
    :func:`extract_mcq_answer` over A–D; "" when none.

    Example:
        >>> videomme_extract("The best answer is C."), videomme_extract("Answer: B"), videomme_extract("no idea")
        ('C', 'B', '')
    """
    return extract_mcq_answer(str(prediction), ["A", "B", "C", "D"])


# MVBench's copy of the VQA punctuation step differs only in its digit-comma-digit pattern.
_MVB_COMMA = re.compile(r"(\d)(\,)(\d)")


def _mvbench_process(answer: str) -> str:
    m = re.match(r"^([A-E])\.\s*(.+)$", answer.strip(), re.IGNORECASE)
    if m:
        return m.group(1).upper()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    out = _process_punctuation(answer, comma=_MVB_COMMA)
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = re.search(r"\b([A-E])\b", out, re.IGNORECASE)
    return m.group(1).upper() if m else out


def mvbench_match(prediction: str, gt_letter: str) -> float:
    """MVBench as lmms-eval scores it (``mcq_acc``): both sides reduced to a letter, then compared.

    The reduction takes "X. text" as X, else the first standalone letter A–E in the lower-cased,
    punctuation-stripped text (case-insensitive, so the article "a" reads as A), else the text itself.

    Example:
        >>> mvbench_match("(B) moving left", "B"), mvbench_match("B. left", "B"), mvbench_match("left", "B")
        (1.0, 1.0, 0.0)
    """
    if gt_letter is None:
        return 0.0
    return float(_mvbench_process(str(prediction)) == _mvbench_process(str(gt_letter)))


def mlvu_extract(prediction: str) -> str:
    """MLVU (dev) as lmms-eval 0.7.3 reads it: :func:`extract_mcq_answer` over A–D (the prompt ends with
    "Best option: (", so a reply like "A) the dog" gives "A").

    Example:
        >>> mlvu_extract("B) a cat"), mlvu_extract(" C "), mlvu_extract("Answer: B")
        ('B', 'C', 'B')
    """
    return extract_mcq_answer(str(prediction), ["A", "B", "C", "D"])
