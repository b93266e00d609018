"""Image benchmarks added for issue 25 under lmms-eval's task names: ``chartqa``, ``docvqa_val``, ``ai2d``,
``realworldqa``, ``mmstar``, ``vqav2_val``, ``vizwiz_vqa_val``, ``ocrbench``, ``mmmu_val``. Prompts, per-sample scores and aggregates are lmms-eval 0.7.3's (each method
names the file it follows); ``tests/test_lmms_eval_alignment.py`` checks them against code extracted from
that release. Data: the datasets' Hugging Face layout on local disk (parquet shards or ``save_to_disk``).

Example:
    >>> from mmprune.eval.tasks import get_task
    >>> t = get_task("chartqa")
    >>> t.build_prompt({"question": "What is the max?"})
    'What is the max?\\nAnswer the question with a single word.'
    >>> t.score_text("12.4", "12"), t.score_text("Twelve", "twelve")
    (1.0, 1.0)
"""

from __future__ import annotations

import ast
import random
import re
import string
from collections import defaultdict
from pathlib import Path

from . import metrics as M
from .tasks import POST_LETTER, POST_SHORT, Sample, Task, _by, _details, _image_ref, _pct, register_task

_PUNCT = str.maketrans("", "", string.punctuation)


def _image(row: dict, f: Path) -> list:
    ref = _image_ref(row.get("image"), f.parent)
    return [ref] if ref is not None else []


# ----------------------------------------------------------------------------------------------- ChartQA
def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy (lmms_eval/tasks/chartqa/utils.py, from Qwen-VL's evaluate_vqa.py):
    numbers (a trailing % divides by 100) within 5% of a non-zero target, else case-insensitive equality.

    Example:
        >>> relaxed_correctness("10.4", "10"), relaxed_correctness("50%", "0.5"), relaxed_correctness("0", "0")
        (True, True, True)
    """

    def to_float(text: str):
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


class ChartQaTask(Task):
    """ChartQA test (lmms-lab/ChartQA): relaxed accuracy; human and augmented splits in extra."""

    name = "chartqa"
    metric = "relaxed_overall"
    split = "test"
    layout = "parquet or save_to_disk (lmms-lab/ChartQA, test): type (human_test / augmented_test), question, answer, image"
    columns = ("question", "answer", "image")

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]), answer=str(row["answer"]),
                      image_refs=_image(row, f), meta={"type": row.get("type")})

    @staticmethod
    def build_prompt(row: dict) -> str:
        return f"{row['question']}\nAnswer the question with a single word."  # chartqa_doc_to_text, default

    @staticmethod
    def score_text(prediction: str, answer: str) -> float:
        return 1.0 if relaxed_correctness(str(prediction), str(answer)) else 0.0

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": self.score_text(prediction, sample.answer), "type": sample.meta.get("type")}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        human = [d["score"] for d in ds if d.get("type") == "human_test"]
        augmented = [d["score"] for d in ds if d.get("type") != "human_test"]
        extra = {"n": len(ds), "relaxed_human_split": _pct(human) if human else None,
                 "relaxed_augmented_split": _pct(augmented) if augmented else None}
        return _pct([d["score"] for d in ds]), self.metric, extra


# ------------------------------------------------------------------------------------------------ DocVQA
def levenshtein(s1: str, s2: str) -> int:
    """Edit distance (lmms_eval/api/metrics.py ``levenshtein_distance``)."""
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = list(range(len(s1) + 1))
    for i2, c2 in enumerate(s2):
        row = [i2 + 1]
        for i1, c1 in enumerate(s1):
            row.append(distances[i1] if c1 == c2 else 1 + min(distances[i1], distances[i1 + 1], row[-1]))
        distances = row
    return distances[-1]


def anls(references: list[str], prediction: str, threshold: float = 0.5) -> float:
    """ANLS of one prediction (lmms_eval/api/metrics.py ``anls``): 1 - the smallest normalised edit distance to
    a reference (whitespace-collapsed, lower-cased; normalised by the longer *raw* length), 0 below 0.5.

    Example:
        >>> anls(["Lincoln"], "lincoln"), anls(["1990"], "1991"), anls(["abc"], "xyz")
        (1.0, 0.75, 0)
    """
    values = []
    for answer in references:
        gt = " ".join(answer.strip().lower().split())
        det = " ".join(prediction.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(levenshtein(gt, det)) / float(length))
    result = 1 - min(values)
    return 0 if result < threshold else result


class DocVqaValTask(Task):
    """DocVQA validation (lmms-lab/DocVQA, config DocVQA): ANLS over the reference answers."""

    name = "docvqa_val"
    metric = "anls"
    split = "validation"
    config = "DocVQA"
    layout = "parquet or save_to_disk (lmms-lab/DocVQA, DocVQA/validation): questionId, question, answers (list), image"
    columns = ("question", "answers", "image")
    id_columns = ("questionId",)
    max_new_tokens = 32

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=[str(a) for a in row["answers"]], image_refs=_image(row, f))

    @staticmethod
    def build_prompt(row: dict) -> str:
        return f"{row['question']}{POST_SHORT}"  # docvqa_doc_to_text, default

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": float(anls(list(sample.answer), str(prediction)))}


# -------------------------------------------------------------------------------------------------- AI2D
class Ai2dTask(Task):
    """AI2D test (lmms-lab/ai2d): lettered options; lmms-eval's "flexible-extract" filter, then exact match
    ignoring case and punctuation."""

    name = "ai2d"
    metric = "exact_match"
    split = "test"
    layout = "parquet or save_to_disk (lmms-lab/ai2d, test): question, options (list), answer (index), image"
    columns = ("question", "options", "answer", "image")

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        choices = [str(c) for c in row["options"]]
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=string.ascii_uppercase[int(row["answer"])], choices=choices, image_refs=_image(row, f))

    @staticmethod
    def build_prompt(row: dict) -> str:  # ai2d_doc_to_text, prompt_format "mcq"
        opts = "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(row["options"]))
        return f"{row['question']}\n{opts}{POST_LETTER}"

    def score(self, sample: Sample, prediction: str) -> dict:
        m = re.match(r"^\s*([A-Z])\.", str(prediction))  # MultiChoiceRegexFilter.apply
        pred = m.group(1) if m else str(prediction)
        return {"score": float(pred.lower().translate(_PUNCT) == sample.answer.lower().translate(_PUNCT))}


# ------------------------------------------------------------------------------------------- RealWorldQA
class RealWorldQaTask(Task):
    """RealWorldQA test (lmms-lab/RealWorldQA): letter answers by ``extract_mcq_answer``, other answers by
    lower-cased text with a trailing period removed."""

    name = "realworldqa"
    metric = "exact_match"
    split = "test"
    layout = "parquet or save_to_disk (lmms-lab/RealWorldQA, test): question (its options and instruction inside), answer, image"
    columns = ("question", "answer", "image")

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=str(row["answer"]), image_refs=_image(row, f))

    @staticmethod
    def build_prompt(row: dict) -> str:
        return str(row["question"]).strip()  # realworldqa_doc_to_text: the default kwargs are empty

    def score(self, sample: Sample, prediction: str) -> dict:
        gt = sample.answer.strip()
        if gt.upper() in ("A", "B", "C", "D"):  # realworldqa_process_results
            return {"score": float(M.extract_mcq_answer(str(prediction), ["A", "B", "C", "D"]) == gt.upper())}
        return {"score": float(str(prediction).lower().strip().rstrip(".") == gt.lower())}


# ------------------------------------------------------------------------------------------------ MMStar
class MmstarTask(Task):
    """MMStar val (Lin-Chen/MMStar): ``extract_mcq_answer`` over A-D; the score is the mean over the
    l2 categories present (``mmstar_aggregate_results`` on the "average" key); per category in extra."""

    name = "mmstar"
    metric = "average"
    split = "val"
    layout = "parquet or save_to_disk (Lin-Chen/MMStar, val): index, question (options inside), answer, category, l2_category, image"
    columns = ("question", "answer", "category", "l2_category", "image")
    id_columns = ("index",)
    max_new_tokens = 128  # lmms-eval leaves it to the model wrapper

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]), answer=str(row["answer"]),
                      image_refs=_image(row, f), meta={"category": row["category"], "l2_category": row["l2_category"]})

    @staticmethod
    def build_prompt(row: dict) -> str:  # mmstar_doc_to_text, default kwargs
        q = str(row["question"]).strip().replace(" Please answer yes or no.", "")
        return f"{q}\nAnswer with the option's letter from the given choices directly"

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = M.extract_mcq_answer(str(prediction), ["A", "B", "C", "D"])
        return {"score": float(pred == sample.answer.strip().upper()), **sample.meta}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        per_l2 = _by(ds, "l2_category")
        cats: dict[str, dict] = defaultdict(list)
        for d in ds:
            cats[str(d["category"])].append(d)
        per_cat = {c: _by(v, "l2_category") for c, v in cats.items()}
        extra = {"n": len(ds), "per_l2_category": per_l2,
                 "per_category": {c: sum(p.values()) / len(p) for c, p in per_cat.items()}}
        return (sum(per_l2.values()) / len(per_l2) if per_l2 else 0.0), self.metric, extra


# ---------------------------------------------------------------------------------------- VQAv2, VizWiz
class Vqav2ValTask(Task):
    """VQAv2 validation (lmms-lab/VQAv2): VQA accuracy over the ten answers, lmms-eval's VQAv2 normaliser."""

    name = "vqav2_val"
    metric = "vqa_accuracy"
    split = "validation"
    layout = "parquet or save_to_disk (lmms-lab/VQAv2, validation): question_id, question, answers (list of {answer, ...}), image"
    columns = ("question_id", "question", "answers", "image")
    id_columns = ("question_id",)

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row["answers"] or []]
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]), answer=answers,
                      image_refs=_image(row, f), meta={"answer_type": row.get("answer_type")})

    @staticmethod
    def build_prompt(row: dict) -> str:
        return f"{row['question']}{POST_SHORT}"  # vqav2_doc_to_text, vqav2_val.yaml default kwargs

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": M.vqav2_accuracy(prediction, sample.answer), "answer_type": sample.meta.get("answer_type")}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        return _pct([d["score"] for d in ds]), self.metric, {"n": len(ds), "per_answer_type": _by(ds, "answer_type")}


class VizwizVqaValTask(Task):
    """VizWiz-VQA val (lmms-lab/VizWiz-VQA): VQA accuracy with the full EvalAI normaliser (as TextVQA)."""

    name = "vizwiz_vqa_val"
    metric = "vqa_accuracy"
    split = "val"
    layout = "parquet or save_to_disk (lmms-lab/VizWiz-VQA, val): question_id, question, answers (list of 10), image"
    columns = ("question", "answers", "image")
    id_columns = ("question_id",)
    max_new_tokens = 128  # lmms-eval sets only a stop string

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=[str(a) for a in row["answers"] or []], image_refs=_image(row, f))

    @staticmethod
    def build_prompt(row: dict) -> str:  # vizwiz_vqa_doc_to_text, default kwargs
        return (f"{str(row['question']).capitalize()}\nWhen the provided information is insufficient, respond with "
                f"'Unanswerable'.{POST_SHORT}")

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": M.vqa_accuracy(prediction, sample.answer)}


# ---------------------------------------------------------------------------------------------- OCRBench
def _fold_fullwidth_ascii(text: str) -> str:
    """Fullwidth ASCII and the ideographic space to ASCII, nothing else (lmms_eval/tasks/ocrbench/utils.py)."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if ord(c) == 0x3000 else c for c in text)


def ocrbench_hit(prediction: str, answers, dataset: str) -> int:
    """``ocrbench_process_results``: an answer contained in the stripped prediction; HME100k (handwritten
    maths) compares with all spaces removed, the others lower-cased after folding fullwidth characters.

    Example:
        >>> ocrbench_hit("The sign says STOP.", ["stop"], "IIIT5K"), ocrbench_hit("x ^ 2", ["x^2"], "HME100k")
        (1, 1)
    """
    pred = str(prediction).strip()
    score = 0
    for ans in answers if isinstance(answers, list) else [answers]:
        if dataset == "HME100k":
            hit = ans.strip().replace("\n", " ").replace(" ", "") in pred.strip().replace("\n", " ").replace(" ", "")
        else:
            hit = (_fold_fullwidth_ascii(ans).lower().strip().replace("\n", " ")
                   in _fold_fullwidth_ascii(pred).lower().strip().replace("\n", " "))
        score = 1 if hit else score
    return score


class OcrbenchTask(Task):
    """OCRBench (echo840/OCRBench): the final score is correct answers out of the benchmark's 1000 (so a
    subset scores low, as in lmms-eval), in percent; per question type in extra."""

    name = "ocrbench"
    metric = "ocrbench_accuracy"
    split = "test"
    layout = "parquet or save_to_disk (echo840/OCRBench, test): dataset, question, question_type, answer (list), image"
    columns = ("dataset", "question", "question_type", "answer", "image")
    max_new_tokens = 128

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        ans = row["answer"]
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=[str(a) for a in ans] if isinstance(ans, (list, tuple)) else str(ans),
                      image_refs=_image(row, f), meta={"dataset": row["dataset"], "question_type": row["question_type"]})

    @staticmethod
    def build_prompt(row: dict) -> str:
        return str(row["question"]).strip()  # ocrbench_doc_to_text, default kwargs empty

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": float(ocrbench_hit(prediction, sample.answer, sample.meta["dataset"])),
                "question_type": sample.meta["question_type"]}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        per_type: dict[str, float] = defaultdict(float)
        for d in ds:
            per_type[str(d["question_type"])] += d["score"]
        extra = {"n": len(ds), "correct": sum(per_type.values()), "per_question_type_correct": dict(per_type)}
        return 100.0 * sum(per_type.values()) / 1000, self.metric, extra


# ------------------------------------------------------------------------------------------------- MMMU
# The official MMMU parsers (MMMU-Benchmark/MMMU eval/eval_utils.py, commit 51ce7f3) as lmms-eval 0.7.3 carries
# them: lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py and lmms_eval/tasks/mmmu/utils.py.
def mmmu_parse_choice(response: str, all_choices: list[str], index2ans: dict[str, str], rng: random.Random) -> str:
    """``parse_mmmu_multi_choice_response``: "(B)", then "B ", then "B.", then (long answers) an option's
    text; several candidates: the last one mentioned; none: a random letter from ``rng`` (lmms-eval draws
    from its global generator, seeded 0 at start, so there the letter depends on what drew before).

    Example:
        >>> mmmu_parse_choice("The answer is (C).", ["A", "B", "C"], {"A": "x", "B": "y", "C": "z"}, random.Random(0))
        'C'
    """
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans, with_brackets, cands = True, False, []
    for choice in all_choices:
        if f"({choice})" in response:
            cands.append(choice)
            with_brackets = True
    if not cands:
        cands = [c for c in all_choices if f"{c} " in response]
    if not cands:
        cands = [c for c in all_choices if f"{c}." in response]
    if not cands and len(response.split()) > 5:
        cands = [k for k, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = False
    if not cands:
        return rng.choice(all_choices)
    if len(cands) == 1:
        return cands[0]
    if index_ans:
        starts = [response.rfind(f"({c})") if with_brackets else response.rfind(f" {c} ") for c in cands]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    return cands[starts.index(max(starts))]  # np.argmax: the first of equal maxima


def _mmmu_numbers(text: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def _mmmu_normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_parse_open(response: str) -> list:
    """``parse_open_response``: the tails of the sentences after key words ("is ", "so ", "answer ",
    "=" in the last one...), plus every number in them, normalised (numbers to floats rounded to 2)."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    key_responses = []
    for i, part in enumerate(parts):
        if i == len(parts) - 1:
            keys = keys + ["="]
        shortest = None
        for key in keys:
            if key in part:
                tail = part.split(key)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            key_responses.append(shortest)
    key_responses = key_responses or [response]
    preds = list(key_responses)
    for r in key_responses:
        preds.extend(_mmmu_numbers(r))
    return list({v for p in preds for v in _mmmu_normalize(p)})


def mmmu_open_correct(answer, preds: list) -> bool:
    """``eval_open``: a string answer contained in a string prediction, or a number equal to one."""
    norm = [v for a in (answer if isinstance(answer, list) else [answer]) for v in _mmmu_normalize(a)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in norm):
                return True
        elif pred in norm:
            return True
    return False


class MmmuValTask(Task):
    """MMMU validation (lmms-lab/MMMU): multiple choice by MMMU's parser (a seeded random letter when none is
    found) and open questions by its number / string matcher; the score is the accuracy over all questions
    (lmms-eval's instance-level figure, rounded to 5 decimals as a fraction); per subject in extra."""

    name = "mmmu_val"
    metric = "mmmu_acc"
    split = "validation"
    layout = ("parquet or save_to_disk (lmms-lab/MMMU, validation): id, question, options (a list's repr), answer, "
              "question_type, image_1..image_7")
    columns = ("id", "question", "options", "answer", "question_type")
    id_columns = ("id",)
    max_new_tokens = 128

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        names = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", self.build_prompt(row))})
        refs = [_image_ref(row.get(n), f.parent) for n in names]
        mc = row["question_type"] == "multiple-choice"
        options = [str(o) for o in ast.literal_eval(row["options"])] if mc else []
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]), answer=row["answer"],
                      choices=options or None, image_refs=[r for r in refs if r is not None],
                      meta={"question_type": row["question_type"], "subject": _mmmu_subject(str(row["id"]))})

    @staticmethod
    def build_prompt(row: dict) -> str:  # construct_prompt, prompt_type "format"; interleaved_format false
        if row["question_type"] == "multiple-choice":
            opts = ast.literal_eval(row["options"])
            listed = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(opts))
            return f"{row['question']}\n{listed}\n\nAnswer with the option's letter from the given choices directly."
        return f"{row['question']}\n\nAnswer the question using a single word or phrase."

    def score(self, sample: Sample, prediction: str) -> dict:
        if sample.meta["question_type"] == "multiple-choice":
            letters = [chr(ord("A") + i) for i in range(len(sample.choices))]
            pred = mmmu_parse_choice(str(prediction), letters, dict(zip(letters, sample.choices)), random.Random(0))
            gold = sample.answer
            ok = pred in gold if isinstance(gold, list) else pred == gold
            return {"score": float(ok), "pred": pred, "subject": sample.meta["subject"]}
        return {"score": float(mmmu_open_correct(sample.answer, mmmu_parse_open(str(prediction)))),
                "subject": sample.meta["subject"]}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        acc = round(sum(d["score"] for d in ds) / len(ds), 5) if ds else 0.0
        return 100.0 * acc, self.metric, {"n": len(ds), "per_subject": _by(ds, "subject")}


def _mmmu_subject(sample_id: str) -> str:
    """``extract_subset_name``: "validation_Art_Theory_12" -> "Art_Theory"."""
    m = re.search(rf"^{re.escape(sample_id.split('_')[0])}_(.+?)_\d+$", sample_id)
    return m.group(1) if m else sample_id


TASK_CLASSES = (ChartQaTask, DocVqaValTask, Ai2dTask, RealWorldQaTask, MmstarTask, Vqav2ValTask, VizwizVqaValTask,
                OcrbenchTask, MmmuValTask)
for _cls in TASK_CLASSES:
    register_task(_cls)
del _cls
