"""Video benchmarks added for issue 25 under lmms-eval's task names: ``egoschema_subset``, ``nextqa_mc_test``,
``longvideobench_val_v``. Prompts, per-sample scores and aggregates are lmms-eval 0.7.3's; a multiple-choice
answer with no letter found gets a random letter, drawn here from ``random.Random(0)`` per sample (lmms-eval
draws from its global generator seeded 0 at start, so there it depends on evaluation order). Videos are
found by name under the data folder (``videos/``, ``NExTVideo/``, ... or anywhere below).

Example:
    >>> from mmprune.eval.tasks import get_task
    >>> get_task("nextqa_mc_test").build_prompt({"question": "why? ", **{f"a{i}": f"o{i}" for i in range(5)}})
    'why?\\nA. o0\\nB. o1\\nC. o2\\nD. o3\\nE. o4'
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from .more_tasks import mmmu_parse_choice
from .tasks import Sample, Task, _by, _details, _pct, _VideoFinder, register_task

LETTERS = "ABCDE"


def _finder(root: Path, *subdirs: str) -> _VideoFinder:
    return _VideoFinder(root if root.is_dir() else root.parent, (*subdirs, "videos", "video", "data", ""))


# ------------------------------------------------------------------------------------------ EgoSchema
def egoschema_parse(response: str, index2ans: dict[str, str], rng: random.Random) -> str:
    """EgoSchema's variant of MMMU's parser (lmms_eval/tasks/egoschema/utils.py ``parse_multi_choice_response``):
    every "(X)", "X " and "X." is a candidate, and of several the *first* mentioned wins.

    Example:
        >>> egoschema_parse("(B) then C.", {c: c.lower() for c in "ABCDE"}, random.Random(0))
        'B'
    """
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    index_ans, cands = True, []
    for form in ("({})", "{} ", "{}."):
        cands += [form.format(c) for c in LETTERS if form.format(c) in response]
    if not cands and len(response.split()) > 5:
        cands = [k for k, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = False
    if not cands:
        return rng.choice(list(LETTERS))
    if len(cands) > 1:
        starts = [response.rfind(c) if index_ans else response.lower().rfind(index2ans[c].lower()) for c in cands]
        pick = cands[starts.index(min(starts))]  # np.argmin: the first of equal minima
    else:
        pick = cands[0]
    return pick.replace("(", "").replace(")", "").replace(".", "").strip()


class EgoschemaSubsetTask(Task):
    """EgoSchema subset (lmms-eval/egoschema, config Subset, 500 questions with public answers): five options."""

    name = "egoschema_subset"
    modality = "video"
    metric = "score"
    split = "test"
    config = "Subset"
    layout = ("folder (lmms-eval/egoschema): Subset/ parquet with video_idx, question, option (5 strings), answer "
              "(index), videos as {video_idx}.mp4 under videos/ or anywhere below")
    columns = ("video_idx", "question", "option", "answer")
    id_columns = ("question_idx", "video_idx")

    def _context(self, root: Path) -> dict:
        return {"videos": _finder(root)}

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        opts = [str(o) for o in row["option"]]
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]), answer=str(row["answer"]),
                      choices=opts, video=ctx["videos"].find(str(row["video_idx"]) + ".mp4", try_exts=True))

    @staticmethod
    def build_prompt(row: dict) -> str:  # egoschema_doc_to_text: options present -> the letter post prompt
        return str(row["question"]) + "".join("\n" + str(o) for o in row["option"]) + (
            "\nAnswer with the option's letter from the given choices directly.")

    def score(self, sample: Sample, prediction: str) -> dict:
        index2ans = {LETTERS[i]: o.strip() for i, o in enumerate(sample.choices[:5])}
        letter = egoschema_parse(str(prediction), index2ans, random.Random(0))
        index = {c: i for i, c in enumerate(LETTERS)}.get(letter, -1)
        return {"score": float(str(sample.answer) == str(index)), "pred": index}  # egoschema_aggregate_score


# -------------------------------------------------------------------------------------------- NExT-QA
class NextqaMcTestTask(Task):
    """NExT-QA multiple choice test (lmms-eval/NExTQA, config MC): five options a0..a4, MMMU's parser."""

    name = "nextqa_mc_test"
    modality = "video"
    metric = "exact_match"
    split = "test"
    config = "MC"
    layout = ("folder (lmms-eval/NExTQA): MC/ parquet with video, question, a0..a4, answer (index), videos as "
              "{video}.mp4 under NExTVideo/ or anywhere below")
    columns = ("video", "question", "a0", "a1", "a2", "a3", "a4", "answer")
    id_columns = ("qid",)

    def _context(self, root: Path) -> dict:
        return {"videos": _finder(root, "NExTVideo")}

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=LETTERS[int(row["answer"])], choices=[str(row[f"a{i}"]).strip() for i in range(5)],
                      video=ctx["videos"].find(str(row["video"]) + ".mp4", try_exts=True), meta={"type": row.get("type")})

    @staticmethod
    def build_prompt(row: dict) -> str:  # nextqa_doc_to_text_mc; the task sets no pre / post prompt
        return "\n".join([str(row["question"]).strip()] + [f"{LETTERS[i]}. {str(row[f'a{i}']).strip()}" for i in range(5)])

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = mmmu_parse_choice(str(prediction), list(LETTERS), dict(zip(LETTERS, sample.choices)), random.Random(0))
        return {"score": float(pred == sample.answer), "type": sample.meta.get("type")}


# ------------------------------------------------------------------------------------- LongVideoBench
_LVB_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                 "The correct option is", "Best answer:", "Best option:"]


def lvb_parse(response: str, letters: list[str], rng: random.Random) -> str:
    """LongVideoBench's parser: known prefixes removed, then the first capital A-E anywhere; a random letter
    when there is none (or the answer is long and has none).

    Example:
        >>> lvb_parse("The best answer is D. A book", list("ABCD"), random.Random(0))
        'D'
    """
    s = response.strip()
    for prefix in _LVB_PREFIXES:
        s = s.replace(prefix, "")
    m = re.search("[ABCDE]", s)
    return m[0] if m is not None else rng.choice(letters)


class LongVideoBenchValVTask(Task):
    """LongVideoBench validation, video-only variant (longvideobench/LongVideoBench): up to five options
    (``option0``..``option4``, "N/A" when absent); accuracy, per duration group and category in extra."""

    name = "longvideobench_val_v"
    modality = "video"
    metric = "lvb_acc"
    split = "validation"
    layout = ("folder (longvideobench/LongVideoBench): validation parquet/json with id, video_path, question, "
              "option0..option4, correct_choice, duration_group, question_category; videos under videos/")
    columns = ("video_path", "question", "option0", "correct_choice")
    id_columns = ("id",)
    json_ok = True
    max_new_tokens = 32

    def _context(self, root: Path) -> dict:
        return {"videos": _finder(root)}

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        opts = []
        for i in range(5):  # longvideobench_process_results stops at the first N/A
            o = row.get(f"option{i}")
            if o == "N/A" or o is None:
                break
            opts.append(str(o))
        return Sample(id="", prompt=self.build_prompt(row), question=str(row["question"]),
                      answer=LETTERS[int(row["correct_choice"])], choices=opts,
                      video=ctx["videos"].find(Path(str(row["video_path"])).name),
                      meta={"duration_group": row.get("duration_group"), "question_category": row.get("question_category")})

    @staticmethod
    def build_prompt(row: dict) -> str:  # longvideobench_doc_to_text, default kwargs (no subtitles)
        cands = [row.get(f"option{i}") for i in range(5)]
        cands = [c for c in cands if c != "N/A"]
        question = str(row["question"]) + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(cands))
        return f"{question}\nAnswer with the option's letter from the given choices directly.\n"

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = lvb_parse(str(prediction), list(LETTERS[: len(sample.choices)]), random.Random(0))
        return {"score": float(pred == sample.answer), **sample.meta}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        acc = round(sum(d["score"] for d in ds) / len(ds), 5) if ds else 0.0
        extra = {"n": len(ds), "per_duration_group": _by(ds, "duration_group"),
                 "per_question_category": _by(ds, "question_category"), "accuracy": _pct([d["score"] for d in ds])}
        return 100.0 * acc, self.metric, extra


TASK_CLASSES = (EgoschemaSubsetTask, NextqaMcTestTask, LongVideoBenchValVTask)
for _cls in TASK_CLASSES:
    register_task(_cls)
del _cls
