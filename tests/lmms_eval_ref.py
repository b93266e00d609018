"""Scoring and prompt code of lmms-eval 0.7.3 (the newest release on PyPI, 2026-12; MIT licence,
Copyright (c) 2024 LMMs-Lab), extracted from its wheel ``lmms_eval-0.7.3-py3-none-any.whl`` so that the
differential tests in ``test_lmms_eval_alignment.py`` run without the package (which needs torch-free but
heavy dependencies: pandas, datasets, loguru, pytz, sacrebleu...). Each function names its file; bodies are
as there, except ``pd.notna`` (pandas) replaced by ``_notna`` and loggers dropped. When the package is
installed, ``test_lmms_eval_alignment.py`` also checks these extracts against it where it can be imported.
"""

from __future__ import annotations

import math
import re
import string

import numpy as np


def _notna(v) -> bool:  # pandas.notna on the scalars these rows hold
    return v is not None and not (isinstance(v, float) and math.isnan(v))


# lmms_eval/api/metrics.py exact_match_hf_evaluate (GQA: ignore_case, ignore_punctuation)
def exact_match_hf_evaluate(predictions, references, regexes_to_ignore=None, ignore_case=False,
                            ignore_punctuation=False, ignore_numbers=False):
    if regexes_to_ignore is not None:
        for s in regexes_to_ignore:
            predictions = np.array([re.sub(s, "", x) for x in predictions])
            references = np.array([re.sub(s, "", x) for x in references])
    else:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
    if ignore_case:
        predictions = np.char.lower(predictions)
        references = np.char.lower(references)
    if ignore_punctuation:
        repl_table = string.punctuation.maketrans("", "", string.punctuation)
        predictions = np.char.translate(predictions, table=repl_table)
        references = np.char.translate(references, table=repl_table)
    if ignore_numbers:
        repl_table = string.digits.maketrans("", "", string.digits)
        predictions = np.char.translate(predictions, table=repl_table)
        references = np.char.translate(references, table=repl_table)
    score_list = predictions == references
    return {"exact_match": np.mean(score_list)}


# lmms_eval/tasks/gqa/utils.py gqa_doc_to_text (gqa.yaml default kwargs)
GQA_KW = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}


def gqa_doc_to_text(doc, kw=None):
    kw = kw or GQA_KW
    question = doc["question"]
    return f"{kw['pre_prompt']}{question}{kw['post_prompt']}"


# lmms_eval/tasks/scienceqa/utils.py (scienceqa_img.yaml default kwargs)
SQA_KW = {"format": "default", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}


def sqa_doc_to_text(doc, lmms_eval_specific_kwargs=SQA_KW):
    context, question, choices = doc["hint"], doc["question"], doc["choices"]
    len_choices = len(choices)
    options = [chr(ord("A") + i) for i in range(len_choices)]
    choices_str = "\n".join([f"{option}. {choice}" for option, choice in zip(options, choices)])
    if context:
        context = f"Context: {context}\n"
    post_prompt = lmms_eval_specific_kwargs["post_prompt"]
    pre_prompt = lmms_eval_specific_kwargs["pre_prompt"]
    return f"{pre_prompt}{context}{question}\n{choices_str}{post_prompt}"


def sqa_doc_to_target(doc):
    len_choices = len(doc["choices"])
    options = [chr(ord("A") + i) for i in range(len_choices)]
    return options[doc["answer"]]


def sqa_process_results(doc, results):
    target = sqa_doc_to_target(doc).strip().lower()
    pred = results[0].strip()
    if pred.lower() == target:
        return {"exact_match": 1.0}
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        result = 1.0 if pred[0].lower() == target else 0.0
        return {"exact_match": result}
    return {"exact_match": 0.0}


# lmms_eval/tasks/seedbench/utils.py
def seed_doc_to_text(doc):
    question = doc["question"]
    question += "\n" + f"A. {doc['choice_a']}\n"
    question += f"B. {doc['choice_b']}\n"
    question += f"C. {doc['choice_c']}\n"
    question += f"D. {doc['choice_d']}"
    return f"{question}\nAnswer with the option's letter from the given choices directly."


def seed_process_result(doc, result):
    pred = result[0].strip()
    if len(pred) > 1:
        pred = pred[0]
    answer = doc["answer"]
    return {"pred": pred, "answer": answer, "question_id": doc["question_id"]}


def seed_aggregation_result(results):
    total_count = 0
    total_correct = 0
    for result in results:
        if result["pred"].lower().strip() == result["answer"].lower().strip():
            total_correct += 1
        total_count += 1
    return total_correct / total_count


# lmms_eval/tasks/_task_utils/mcq_extract.py
_DEFAULT_CHOICES = ["A", "B", "C", "D", "E", "F", "G", "H"]
_ANSWER_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
]  # fmt: skip
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                    "space": 2, "fallback": 0}  # fmt: skip


def extract_mcq_answer(response, choices=None):
    if not response or not response.strip():
        return ""
    all_choices = choices or _DEFAULT_CHOICES
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    candidates = []
    for ch in all_choices:
        if f"({ch})" in text:
            candidates.append((ch, text.rfind(f"({ch})"), "parentheses"))
    for ch in all_choices:
        if f"{ch}." in text:
            candidates.append((ch, text.rfind(f"{ch}."), "period"))
    for ch in all_choices:
        if f"{ch}:" in text:
            candidates.append((ch, text.rfind(f"{ch}:"), "colon"))
    for ch in all_choices:
        if f"{ch})" in text:
            candidates.append((ch, text.rfind(f"{ch})"), "right_paren"))
    for ch in all_choices:
        if f"{ch} " in text:
            candidates.append((ch, text.rfind(f"{ch} "), "space"))
    text_lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = text_lower.find(phrase)
        if idx != -1:
            after = idx + len(phrase)
            for ch in all_choices:
                ch_pos = text.find(ch, after)
                if ch_pos != -1:
                    candidates.append((ch, ch_pos, "phrase"))
    stripped = text.strip()
    for ch in all_choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
    for ch in all_choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        for ch in all_choices:
            if ch in text:
                candidates.append((ch, text.rfind(ch), "fallback"))
    if not candidates:
        return ""
    candidates.sort(key=lambda x: (_FORMAT_PRIORITY.get(x[2], 0), x[1]), reverse=True)
    return candidates[0][0]


# lmms_eval/tasks/mmbench/mmbench_evals.py (MMBench_Evaluator) and en_utils.py, mmbench_en_dev_static
def create_options_prompt(row_data, option_candidate, sys_prompt="There are several options:"):
    available_keys = set(row_data.keys()) & set(option_candidate)
    options = {cand: row_data[cand] for cand in available_keys if row_data[cand]}
    sorted_options = dict(sorted(options.items()))
    options_prompt = f"{sys_prompt}\n"
    for key, item in sorted_options.items():
        if _notna(item) and item != "nan":
            options_prompt += f"{key}. {item}\n"
    return options_prompt.rstrip("\n"), sorted_options


def mmbench_doc_to_text(doc, post_prompt="\nAnswer with the option's letter from the given choices directly."):
    options_prompt, _ = create_options_prompt(doc, ["A", "B", "C", "D", "E"])
    hint, question = doc["hint"], doc["question"]
    query_prompt = f"{hint} {question} {options_prompt}" if _notna(hint) and hint != "nan" else f"{question} {options_prompt}"
    return f"{query_prompt}\n{post_prompt}"


def build_choices(item):
    ret = {}
    for ch in "ABCD":
        if _notna(item[ch]):
            ret[ch] = item[ch]
    return ret


def can_infer_option(answer, num_choice=5):
    choices = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return False

    def count(splits, choices="ABCD", prefix="", suffix=""):
        cnt = 0
        for c in choices:
            if prefix + c + suffix in splits:
                cnt += 1
        return cnt

    splits = [x.strip() for x in answer.split()]
    if count(splits, choices) == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:
                break
            if ch in splits:
                return ch
    tups = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
            (":", "."), (":", ")"), (":", ").")]  # fmt: skip
    for tup in tups:
        if count(splits, choices, prefix=tup[0], suffix=tup[1]) == 1:
            for ch in choices:
                if tup[0] + ch + tup[1] in splits:
                    return ch
    return False


def can_infer_text(answer, choices):
    answer = answer.lower()
    for k in choices:
        choices[k] = str(choices[k]).lower()
    cands = []
    for k in choices:
        if choices[k] in answer:
            cands.append(k)
    if len(cands) == 1:
        return cands[0]
    return False


def can_infer(answer, choices):
    copt = can_infer_option(answer)
    return copt if copt else can_infer_text(answer, choices)


def eval_sub_data_static(sub_data, answer_map):
    """``eval_sub_data(..., static_only=True)`` on a list of records (the DataFrame rows)."""
    GT, PRED = [], []
    for item in sub_data:
        GT.append(answer_map[item["index"]])
        PRED.append(can_infer(item["prediction"], build_choices(item)))
        if PRED[-1] and (GT[-1] != PRED[-1]):
            return 0
    for i in range(len(sub_data)):
        if PRED[i]:
            continue
        choices = build_choices(sub_data[i])
        PRED[i] = extract_mcq_answer(sub_data[i]["prediction"], choices=sorted(choices.keys()))
        if not PRED[i] or PRED[i] != GT[i]:
            return 0
    return 1


def mmbench_static_overall(records):
    """``eval_result(results, "static")``'s overall hit rate (records: process_results' dicts, the
    prediction already stripped): questions with a main record (index < 1e6), all rotations right."""
    data = sorted(records, key=lambda r: r["index"])
    answer_map = {r["index"]: r["answer"] for r in data}
    hits = []
    for item in [r for r in data if r["index"] < int(1e6)]:
        sub = [r for r in data if r["index"] % int(1e6) == item["index"]]
        hits.append(eval_sub_data_static(sub, answer_map))
    return sum(hits) / len(hits)


# lmms_eval/tasks/videomme/utils.py (default kwargs of videomme.yaml)
def videomme_doc_to_text(doc, post_prompt="\nAnswer with the option's letter from the given choices directly."):
    option_prompt = ("Select the best answer to the following multiple-choice question based on the video and the "
                     "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
    question = doc["question"]
    option = "\n".join([f"{opt}" for i, opt in enumerate(doc["options"])])
    question = question + "\n" + option
    return option_prompt + "\n" + question + "\n" + post_prompt


def videomme_overall(docs, preds):
    """videomme_process_results + videomme_aggregate_results' overall figure."""
    correct = sum(extract_mcq_answer(p, choices=["A", "B", "C", "D"]) == d["answer"] for d, p in zip(docs, preds))
    return 100 * correct / len(docs) if docs else 0


# lmms_eval/tasks/mlvu/utils.py (mlvu_dev.yaml default kwargs)
def mlvu_doc_to_text(doc, pre_prompt="", post_prompt="\nOnly give the best option.\nBest option: ("):
    return pre_prompt + doc["question"] + post_prompt


def mlvu_aggregate_dev(docs, preds):
    task_types = {"anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning"}
    category2score = {t: {"correct": 0, "answered": 0} for t in task_types}
    for d, p in zip(docs, preds):
        category2score[d["task_type"]]["answered"] += 1
        category2score[d["task_type"]]["correct"] += extract_mcq_answer(p, choices=["A", "B", "C", "D"]) == d["answer"]
    scores = {}
    for task_cate in task_types:
        total_correct = total_answered = 0
        for k, v in category2score.items():
            if task_cate in k:
                total_correct += v["correct"]
                total_answered += v["answered"]
        scores[task_cate] = 100 * total_correct / total_answered if total_answered > 0 else 0
    return sum(scores.values()) / len(task_types)


# lmms_eval/tasks/mvbench/utils.py (sub-task yamls: post_prompt "Only give the best option.\n")
def mvbench_doc_to_text(doc, post_prompt="Only give the best option.\n"):
    option_prompt = ""
    for char_index, option in enumerate(doc["candidates"]):
        option_prompt += f"({string.ascii_uppercase[char_index]}) {option}\n"
    return "Question:" + doc["question"] + "\nOption:\n" + option_prompt + post_prompt


# lmms_eval/tasks/pope/utils.py, mme/utils.py, textvqa/utils.py (default kwargs)
SHORT = "\nAnswer the question using a single word or phrase."


def pope_doc_to_text(doc):
    return f"{doc['question'].strip()}{SHORT}"


def pope_process_results(doc, results):
    return 1.0 if results[0].lower().strip() == doc["answer"].lower().strip() else 0.0


def mme_doc_to_text(doc):
    question = doc["question"].strip()
    question = question.replace(" Please answer yes or no.", "")
    return f"{question}{SHORT}"


def parse_pred_ans(pred_ans):
    pred_ans = pred_ans.lower().strip().replace(".", "")
    if pred_ans in ["yes", "no"]:
        pred_label = pred_ans
    elif len(pred_ans) == 1:
        pred_label = {"y": "yes", "n": "no"}.get(pred_ans, "other")
    else:
        prefix_pred_ans = pred_ans[:4]
        pred_label = "yes" if "yes" in prefix_pred_ans else "no" if "no" in prefix_pred_ans else "other"
    return pred_label


def textvqa_doc_to_text(doc):
    return f"{doc['question'].capitalize()}{SHORT}"


# lmms_eval/tasks/chartqa/utils.py (chartqa.yaml default kwargs)
def chartqa_doc_to_text(doc):
    return f"{doc['question']}\nAnswer the question with a single word."


def relaxed_correctness(prediction, target, max_relative_change: float = 0.05) -> bool:
    def _to_float(text: str):
        try:
            if text.endswith("%"):
                return float(text.rstrip("%")) / 100.0
            else:
                return float(text)
        except ValueError:
            return None

    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        relative_change = abs(prediction_float - target_float) / abs(target_float)
        return relative_change <= max_relative_change
    else:
        return prediction.lower() == target.lower()


def chartqa_process_results(doc, results):
    score = 1.0 if relaxed_correctness(results[0], doc["answer"]) else 0.0
    out = {"relaxed_overall": score}
    out["relaxed_human_split" if doc["type"] == "human_test" else "relaxed_augmented_split"] = score
    return out


# lmms_eval/api/metrics.py levenshtein_distance, anls; docvqa/utils.py docvqa_doc_to_text (default kwargs)
def docvqa_doc_to_text(doc):
    return f"{doc['question']}{SHORT}"


def levenshtein_distance(s1, s2):
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = range(len(s1) + 1)
    for i2, c2 in enumerate(s2):
        distances_ = [i2 + 1]
        for i1, c1 in enumerate(s1):
            if c1 == c2:
                distances_.append(distances[i1])
            else:
                distances_.append(1 + min((distances[i1], distances[i1 + 1], distances_[-1])))
        distances = distances_
    return distances[-1]


def anls(references, predictions, thresh_hold=0.5):
    values = []
    pred = predictions[0] if isinstance(predictions[0], str) else predictions[0][0]
    for answer in references:
        gt_answer = " ".join(answer.strip().lower().split())
        det_answer = " ".join(pred.strip().lower().split())
        dist = levenshtein_distance(gt_answer, det_answer)
        length = max(len(answer.upper()), len(pred.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    question_result = 1 - min(values)
    if question_result < thresh_hold:
        question_result = 0
    return {"anls": question_result}


# lmms_eval/tasks/ai2d/utils.py (ai2d.yaml: prompt_format mcq, flexible-extract filter, exact_match)
def ai2d_doc_to_text(doc):
    question, choices = doc["question"], doc["options"]
    options = [chr(ord("A") + i) for i in range(len(choices))]
    choices_str = "\n".join([f"{option}. {choice}" for option, choice in zip(options, choices)])
    return f"{question}\n{choices_str}\nAnswer with the option's letter from the given choices directly."


def ai2d_doc_to_target(doc):
    options = [chr(ord("A") + i) for i in range(len(doc["options"]))]
    return options[int(doc["answer"])]


def ai2d_filter(resp):
    match = re.compile(r"^\s*([A-Z])\.").match(resp)
    return match.group(1) if match else resp


# lmms_eval/tasks/realworldqa/utils.py (default kwargs: empty pre / post prompt)
def realworldqa_doc_to_text(doc):
    return doc["question"].strip()


def realworldqa_process_results(doc, results):
    pred = results[0]
    gt_ans = doc["answer"].strip()
    if gt_ans.upper() in ("A", "B", "C", "D"):
        pred_ans = extract_mcq_answer(pred, choices=["A", "B", "C", "D"])
        score = 1.0 if pred_ans == gt_ans.upper() else 0.0
    else:
        pred_clean = pred.lower().strip().rstrip(".")
        score = 1.0 if pred_clean == gt_ans.lower() else 0.0
    return {"exact_match": score}


# lmms_eval/tasks/mmstar/utils.py (default kwargs)
def mmstar_doc_to_text(doc, post_prompt="\nAnswer with the option's letter from the given choices directly"):
    question = doc["question"].strip()
    question = question.replace(" Please answer yes or no.", "")
    return f"{question}{post_prompt}"


def mmstar_process_results(doc, results):
    gt_letter = doc["answer"].strip().upper()
    score = 1.0 if extract_mcq_answer(results[0], choices=["A", "B", "C", "D"]) == gt_letter else 0.0
    return {"question_id": doc["index"], "l2_category": doc["l2_category"], "score": score}


def mmstar_aggregate_results(results):
    from collections import defaultdict

    l2_category_scores = defaultdict(list)
    for result in results:
        l2_category_scores[result["l2_category"]].append(result["score"])
    l2_category_avg_score = {k: sum(v) / len(v) for k, v in l2_category_scores.items()}
    return sum(l2_category_avg_score.values()) / len(l2_category_avg_score)


# lmms_eval/tasks/_task_utils/vqa_eval_metric.py EvalAIAnswerProcessor (its CONTRACTIONS / NUMBER_MAP tables are
# mmprune's copies, checked for TextVQA before; the processing steps are as there)
class EvalAIAnswerProcessor:
    from mmprune.eval.metrics import _CONTRACTIONS as CONTRACTIONS  # noqa: N811
    from mmprune.eval.metrics import _NUMBER_MAP as NUMBER_MAP

    ARTICLES = ["a", "an", "the"]
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def word_tokenize(self, word):
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in self.PUNCTUATIONS:
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.COMMA_STRIP, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        out_text = self.PERIOD_STRIP.sub("", out_text, re.UNICODE)
        return out_text

    def process_digit_article(self, in_text):
        out_text = []
        for word in in_text.lower().split():
            word = dict(self.NUMBER_MAP).setdefault(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in self.CONTRACTIONS:
                out_text[word_id] = self.CONTRACTIONS[word]
        return " ".join(out_text)

    def __call__(self, item):
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        item = self.process_digit_article(item)
        return item


# lmms_eval/tasks/vqav2/utils.py vqav2_process_results (answers: list of {"answer", "answer_id"} dicts)
def vqav2_process_results(doc, result):
    import statistics

    proc = EvalAIAnswerProcessor()
    answers = [dict(a) for a in doc["answers"]]
    res_ans = result[0]
    for ans in answers:
        ans["answer"] = ans["answer"].replace("\n", " ").replace("\t", " ").strip()
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    gt_acc = []
    for ans in answers:
        ans["answer"] = proc.process_punctuation(ans["answer"])
        ans["answer"] = proc.process_digit_article(ans["answer"])
    res_ans = proc.process_punctuation(res_ans)
    res_ans = proc.process_digit_article(res_ans)
    for gt in answers:
        other = [item for item in answers if item != gt]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return statistics.mean(gt_acc)


def vqav2_doc_to_text(doc):
    return f"{doc['question']}{SHORT}"


# lmms_eval/tasks/vizwiz_vqa/utils.py (default kwargs)
def vizwiz_vqa_doc_to_text(doc):
    post = "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."
    return f"{doc['question'].capitalize()}{post}"


def vizwiz_vqa_process_results(doc, result):
    import statistics

    proc = EvalAIAnswerProcessor()
    res_ans = proc(result[0])
    answers = [proc(a) for a in doc["answers"]]
    gt_acc = []
    for i in range(len(answers)):
        other = [answers[j] for j in range(len(answers)) if i != j]
        gt_acc.append(min(1, float(len([a for a in other if a == res_ans])) / 3))
    return statistics.mean(gt_acc) if gt_acc else 0


# lmms_eval/tasks/ocrbench/utils.py (default kwargs: empty pre / post prompt)
def ocrbench_doc_to_text(doc):
    return doc["question"].strip()


def _fold_fullwidth_ascii(text: str) -> str:
    folded = []
    for char in text:
        codepoint = ord(char)
        if 0xFF01 <= codepoint <= 0xFF5E:
            folded.append(chr(codepoint - 0xFEE0))
        elif codepoint == 0x3000:
            folded.append(" ")
        else:
            folded.append(char)
    return "".join(folded)


def ocrbench_process_results(doc, results):
    pred = results[0].strip()
    gt_ans = doc["answer"]
    score = 0
    if doc["dataset"] == "HME100k":
        for a in gt_ans if type(gt_ans) is list else [gt_ans]:
            if a.strip().replace("\n", " ").replace(" ", "") in pred.strip().replace("\n", " ").replace(" ", ""):
                score = 1
    else:
        for a in gt_ans if type(gt_ans) is list else [gt_ans]:
            answer = _fold_fullwidth_ascii(a).lower().strip().replace("\n", " ")
            predict = _fold_fullwidth_ascii(pred).lower().strip().replace("\n", " ")
            if answer in predict:
                score = 1
    return {"question_type": doc["question_type"], "score": score}


def ocrbench_aggregate_accuracy(results):
    return sum(r["score"] for r in results) / 1000


# lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py and lmms_eval/tasks/mmmu/utils.py (default kwargs, prompt_type
# "format", interleaved_format false)
def mmmu_doc_to_text(doc):
    import ast

    question = doc["question"]
    if doc["question_type"] == "multiple-choice":
        options = ast.literal_eval(doc["options"])
        letters = [chr(ord("A") + i) for i in range(len(options))]
        parsed = "\n".join([f"{o}. {opt}" for o, opt in zip(letters, options)])
        return f"{question}\n{parsed}\n\nAnswer with the option's letter from the given choices directly."
    return f"{question}\n\nAnswer the question using a single word or phrase."


def parse_mmmu_multi_choice_response(response, all_choices, index2ans):
    import random

    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans = True
    ans_with_brack = False
    candidates = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if len(candidates) == 0:
        for choice in all_choices:
            if f"{choice} " in response:
                candidates.append(choice)
    if len(candidates) == 0:
        for choice in all_choices:
            if f"{choice}." in response:
                candidates.append(choice)
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if len(candidates) == 0:
        pred_index = random.choice(all_choices)
    elif len(candidates) > 1:
        start_indexes = []
        if index_ans:
            if ans_with_brack:
                for can in candidates:
                    start_indexes.append(response.rfind(f"({can})"))
            else:
                for can in candidates:
                    start_indexes.append(response.rfind(f" {can} "))
        else:
            for can in candidates:
                start_indexes.append(response.lower().rfind(index2ans[can].lower()))
        pred_index = candidates[np.argmax(start_indexes)]
    else:
        pred_index = candidates[0]
    return pred_index


def mmmu_extract_numbers(string):
    pattern_commas = r"-?\b\d{1,3}(?:,\d{3})+\b"
    pattern_scientific = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
    pattern_simple = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"
    return re.findall(pattern_commas, string) + re.findall(pattern_scientific, string) + re.findall(pattern_simple, string)


def mmmu_normalize_str(string):
    string = string.strip()
    try:
        float(string.replace(",", ""))
        is_number = True
    except ValueError:
        is_number = False
    if is_number:
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def mmmu_parse_open_response(response):
    def get_key_subresponses(response):
        response = response.strip().strip(".").lower()
        sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
        indicators_of_keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        key_responses = []
        for index, resp in enumerate(sub_responses):
            if index == len(sub_responses) - 1:
                indicators_of_keys.extend(["="])
            shortest_key_response = None
            for indicator in indicators_of_keys:
                if indicator in resp:
                    if not shortest_key_response:
                        shortest_key_response = resp.split(indicator)[-1].strip()
                    elif len(resp.split(indicator)[-1].strip()) < len(shortest_key_response):
                        shortest_key_response = resp.split(indicator)[-1].strip()
            if shortest_key_response:
                if shortest_key_response.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
                    key_responses.append(shortest_key_response)
        if len(key_responses) == 0:
            return [response]
        return key_responses

    key_responses = get_key_subresponses(response)
    pred_list = key_responses.copy()
    for resp in key_responses:
        pred_list.extend(mmmu_extract_numbers(resp))
    tmp_pred_list = []
    for i in range(len(pred_list)):
        tmp_pred_list.extend(mmmu_normalize_str(pred_list[i]))
    return list(set(tmp_pred_list))


def mmmu_eval_open(gold_i, pred_i):
    correct = False
    if isinstance(gold_i, list):
        norm_answers = []
        for answer in gold_i:
            norm_answers.extend(mmmu_normalize_str(answer))
    else:
        norm_answers = mmmu_normalize_str(gold_i)
    for pred in pred_i:
        if isinstance(pred, str):
            for norm_ans in norm_answers:
                if isinstance(norm_ans, str) and norm_ans in pred:
                    if not correct:
                        correct = True
                    break
        else:
            if pred in norm_answers:
                if not correct:
                    correct = True
                break
    return correct


def mmmu_score(doc, prediction):
    """mmmu_process_results + evaluate_mmmu for one sample (global random seeded 0 just before, as the first
    draw of an lmms-eval run seeded 0)."""
    import ast
    import random

    if doc["question_type"] == "multiple-choice":
        options = ast.literal_eval(doc["options"])
        letters = [chr(ord("A") + i) for i in range(len(options))]
        random.seed(0)
        pred = parse_mmmu_multi_choice_response(prediction, letters, dict(zip(letters, options)))
        return float(pred == doc["answer"])
    return float(mmmu_eval_open(doc["answer"], mmmu_parse_open_response(prediction)))


# lmms_eval/tasks/egoschema/utils.py (egoschema_subset.yaml default kwargs)
def egoschema_doc_to_text(doc):
    question = doc["question"]
    for op in doc["option"]:
        question += "\n" + op
    return f"{question}\nAnswer with the option's letter from the given choices directly."


def egoschema_parse_multi_choice_response(response, all_choices, index2ans):
    import random

    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans = True
    candidates = []
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(f"({choice})")
    for choice in all_choices:
        if f"{choice} " in response:
            candidates.append(f"{choice} ")
    for choice in all_choices:
        if f"{choice}." in response:
            candidates.append(f"{choice}.")
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if len(candidates) == 0:
        pred_index = random.choice(all_choices)
    elif len(candidates) > 1:
        start_indexes = []
        if index_ans:
            for can in candidates:
                start_indexes.append(response.rfind(can))
        else:
            for can in candidates:
                start_indexes.append(response.lower().rfind(index2ans[can].lower()))
        pred_index = candidates[np.argmin(start_indexes)]
        pred_index = pred_index.replace("(", "").replace(")", "").replace(".", "").strip()
    else:
        pred_index = candidates[0]
        pred_index = pred_index.replace("(", "").replace(")", "").replace(".", "").strip()
    return pred_index, len(candidates) > 0


def egoschema_score(doc, prediction):
    import random

    options = ["A", "B", "C", "D", "E"]
    index2ans = {options[i]: doc["option"][i].strip() for i in range(5)}
    random.seed(0)
    parsed, _ = egoschema_parse_multi_choice_response(prediction, options, index2ans)
    index = {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4}.get(parsed, -1)
    return float(str(doc["answer"]) == str(index))


# lmms_eval/tasks/nextqa/utils.py (nextqa_mc_test: no pre / post prompt; the parser is MMMU's)
def nextqa_doc_to_text_mc(doc):
    question = [doc["question"].strip()]
    for i in range(5):
        question.append(f"{'ABCDE'[i]}. {doc[f'a{i}'].strip()}")
    return "\n".join(question)


def nextqa_score(doc, prediction):
    import random

    index2ans = {"ABCDE"[i]: doc[f"a{i}"].strip() for i in range(5)}
    random.seed(0)
    return float(parse_mmmu_multi_choice_response(prediction, list("ABCDE"), index2ans) == "ABCDE"[doc["answer"]])


# lmms_eval/tasks/longvideobench/utils.py (longvideobench_val_v.yaml default kwargs)
def longvideobench_doc_to_text(doc):
    candidates = []
    for i in range(5):
        candidate = doc.get(f"option{i}")
        if candidate != "N/A":
            candidates.append(candidate)
    question = doc["question"] + "\n" + "\n".join([". ".join([chr(ord("A") + i), c]) for i, c in enumerate(candidates)])
    return f"{question}\nAnswer with the option's letter from the given choices directly.\n"


def longvideobench_parse(response, all_choices):
    import random

    s = response.strip()
    for answer_prefix in ["The best answer is", "The correct answer is", "The answer is", "The answer",
                          "The best option is", "The correct option is", "Best answer:", "Best option:"]:
        s = s.replace(answer_prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return random.choice(all_choices)
    matches = re.search(r"[ABCDE]", s)
    if matches is None:
        return random.choice(all_choices)
    return matches[0]


def longvideobench_score(doc, prediction):
    import random

    all_choices = []
    for i in range(5):
        if doc.get(f"option{i}") == "N/A":
            break
        all_choices.append(chr(ord("A") + i))
    random.seed(0)
    return float(longvideobench_parse(prediction, all_choices) == chr(ord("A") + doc["correct_choice"]))
