"""Eval tasks of the built-in test-bed (``shapes``, ``motion``) and where its trained models live.

Both tasks generate their data (no ``--data`` needed): ``shapes`` is the first 500 items of the
``test`` split of :mod:`mmprune.testbed.shapes` (224 px images, five question kinds); ``motion`` is the
first 500 clips of the ``test`` split of :mod:`mmprune.testbed.motion` (16 frames of 112 px), written
once as mp4 to a cache folder and read back through :func:`mmprune.eval.video.read_frames`, the path
every real video benchmark takes.

The prompt is the question followed by lmms-eval's short-answer instruction (as for GQA or TextVQA),
and the score is exact match on the closed answer vocabulary after lower-casing and stripping
punctuation. :func:`testbed_prompt` and :func:`chat_messages` are what the training script
(:mod:`mmprune.testbed.train`) uses too, so training and evaluation see the same token sequence.

Importing this module registers both tasks in :mod:`mmprune.eval.tasks` (lazily: nothing is
generated until ``load``).

Example:
    >>> from mmprune.testbed.tasks import ShapesTask
    >>> task = ShapesTask()
    >>> s = task.load(None, limit=2)[1]
    >>> s.meta["kind"], task.score(s, s.answer.upper() + ".")["score"]
    ('count', 1.0)
"""

from __future__ import annotations

import functools
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mmprune.eval.tasks import Sample, Task, TaskError, register_task

__all__ = [
    "MODEL_ALIASES",
    "PROMPT_SUFFIX",
    "MotionTask",
    "ShapesTask",
    "chat_messages",
    "normalize_answer",
    "testbed_model_path",
    "testbed_prompt",
]

# lmms-eval's short-answer post-prompt (GQA, TextVQA): every word of it is in the test-bed vocabulary.
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_ALIASES = {"testbed-llava": "testbed-llava", "testbed-qwen2vl": "testbed-qwen2vl"}
DEFAULT_N = 500
MOTION_FRAMES = 16


def testbed_prompt(question: str) -> str:
    """The text a test-bed model gets for ``question`` (the question, then the short-answer instruction).

    Example:
        >>> testbed_prompt("what colour is the star?")
        'what colour is the star?\\nAnswer the question using a single word or phrase.'
    """
    return question + PROMPT_SUFFIX


def chat_messages(prompt: str, modality: str = "image") -> list[dict]:
    """One user turn, media first then text, as ``processor.apply_chat_template`` takes it.

    Example:
        >>> [c["type"] for c in chat_messages("q", "video")[0]["content"]]
        ['video', 'text']
    """
    if modality not in ("image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    return [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": prompt}]}]


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed: how predictions are compared.

    Example:
        >>> normalize_answer(" Red.")
        'red'
        >>> normalize_answer("Yes!")
        'yes'
    """
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def testbed_model_path(alias: str) -> Path:
    """The package folder holding the trained weights of ``testbed-llava`` or ``testbed-qwen2vl``.

    Raises a one-line ``ValueError`` for an unknown alias or when the weights are not installed.

    Example:
        >>> testbed_model_path("testbed-llava").name
        'testbed-llava'
    """
    if alias not in MODEL_ALIASES:
        raise ValueError(f"unknown test-bed model {alias!r}; choose one of: {', '.join(MODEL_ALIASES)}")
    path = MODELS_DIR / MODEL_ALIASES[alias]
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(
            f"test-bed weights for {alias!r} are missing at {path} "
            f"(test-bed models: {', '.join(MODEL_ALIASES)}; train with python -m mmprune.testbed.train)"
        )
    return path


def _check_limit(limit: int | None, n: int) -> int:
    if limit is None:
        return n
    if not isinstance(limit, int) or limit < 1:
        raise TaskError(f"limit must be a positive integer or None; got {limit!r}")
    return min(limit, n)


class _TestbedTask(Task):
    """Shared scoring: exact match per sample, accuracy overall and per question kind."""

    metric = "accuracy"
    needs_data = False
    split = "test"
    max_new_tokens = 4  # every answer is one word, then eos

    def __init__(self, n: int = DEFAULT_N, seed: int = 0):
        self.n, self.seed = n, seed

    @staticmethod
    def _sample(item, images=None, video=None, **meta) -> Sample:
        """The eval's sample for a generated item: the test-bed prompt, the item's kind in ``meta``."""
        return Sample(
            id=item.id, prompt=testbed_prompt(item.question), question=item.question, answer=item.answer,
            images=images, video=video, meta={"kind": item.kind, **meta},
        )  # fmt: skip

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = normalize_answer(prediction)
        return {"score": float(pred == sample.answer), "pred": pred, "kind": sample.meta.get("kind")}

    def aggregate(self, per_sample: Sequence[dict | float]) -> tuple[float, str, dict]:
        ds = [
            d
            for d in per_sample
            if isinstance(d, dict) and d.get("score") is not None and d.get("error") is None
        ]
        per_kind: dict[str, list[float]] = defaultdict(list)
        for d in ds:
            per_kind[str(d.get("kind"))].append(float(d["score"]))
        pct = {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_kind.items())}
        total = 100.0 * sum(float(d["score"]) for d in ds) / len(ds) if ds else 0.0
        return total, self.metric, {"n": len(ds), "per_kind": pct}


@functools.lru_cache(maxsize=2)
def _shapes_items(split: str, n: int, seed: int) -> tuple:
    """The generated items, kept for the next run in this process: a sweep loads the task once per
    policy x budget, and rendering 500 scenes costs ~10 s each time."""
    from .shapes import make_shapes

    return tuple(make_shapes(split, n, seed=seed))


class ShapesTask(_TestbedTask):
    """``shapes``: image QA on generated scenes (test split, 500 items, 100 per kind).

    ``data_path`` is ignored (the items are generated; about 10 ms each).

    Example:
        >>> s = ShapesTask().load(None, limit=1)[0]
        >>> s.prompt.startswith("what colour is the"), s.images[0].size
        (True, (224, 224))
    """

    name = "shapes"
    modality = "image"
    layout = "generated (mmprune.testbed.shapes): test split, first 500 items; no --data needed"

    def load(self, data_path: str | os.PathLike | None = None, limit: int | None = None) -> list[Sample]:
        items = _shapes_items(self.split, _check_limit(limit, self.n), self.seed)
        return [self._sample(it, images=[it.image]) for it in items]


class MotionTask(_TestbedTask):
    """``motion``: video QA on generated clips (test split, 500 clips of 16 frames, 125 per kind).

    Clips are written once as mp4 to ``data_path`` if given, else to ``$MMPRUNE_CACHE/motion`` or
    ``~/.cache/mmprune/motion`` (file names carry a hash of the settings, so a cache is never stale),
    and read back by the runner with ``read_frames(sample.video, 16)``. Writing needs PyAV.

    Example:
        >>> s = MotionTask().load("/tmp/mmprune-motion-doc", limit=1)[0]
        >>> s.video.endswith(".mp4"), s.meta["num_frames"]
        (True, 16)
    """

    name = "motion"
    modality = "video"
    layout = "generated (mmprune.testbed.motion): test split, first 500 clips as mp4 in a cache folder; no --data needed"
    num_frames = MOTION_FRAMES

    def load(self, data_path: str | os.PathLike | None = None, limit: int | None = None) -> list[Sample]:
        from .motion import make_motion

        if data_path is None or str(data_path) == "":
            base = os.environ.get("MMPRUNE_CACHE") or os.path.join(
                os.path.expanduser("~"), ".cache", "mmprune"
            )
            folder = Path(base) / "motion"
        else:
            folder = Path(data_path).expanduser()
        items = make_motion(
            self.split, _check_limit(limit, self.n), folder, frames=MOTION_FRAMES, seed=self.seed
        )
        return [self._sample(it, video=it.video, num_frames=MOTION_FRAMES) for it in items]


for _cls in (ShapesTask, MotionTask):
    register_task(
        name=_cls.name,
        factory=f"{__name__}:{_cls.__name__}",
        modality=_cls.modality,
        metric=_cls.metric,
        layout=_cls.layout,
        needs_data=False,
        replace=True,  # re-importing (e.g. importlib.reload) must not fail
    )
del _cls
