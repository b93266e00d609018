"""Evaluation tasks: a lazy registry, the :class:`Sample` record, and loaders for the real benchmarks.

Each task reads its benchmark from local files in the layout it is published in (a parquet file or a
folder of them as in the Hugging Face repo, or a ``datasets`` ``save_to_disk`` folder, read with
pyarrow directly: the ``datasets`` package is not needed), builds the prompt exactly as lmms-eval
does for its default model, and scores predictions with lmms-eval's rules (see :mod:`.metrics`).

A task has four methods:

* ``load(data_path, limit=None) -> list[Sample]``
* ``prompt(sample) -> str``
* ``score(sample, prediction) -> dict``: always holds ``"score"`` (a float for that sample) plus what
  ``aggregate`` needs; JSON-serialisable, so a resumed run can aggregate from ``samples.jsonl``.
* ``aggregate(per_sample: list[dict]) -> (score, metric_name, extra)``: scores are percentages
  (0–100) except MME, whose score is on its own scale (perception + cognition, max 2800).

Other modules add tasks with :func:`register_task` (an object, or a lazy ``"module:attr"`` factory).

Example:
    >>> task = get_task("pope")
    >>> task.modality, task.metric
    ('image', 'f1')
    >>> get_task("nope")
    Traceback (most recent call last):
    ...
    mmprune.eval.tasks.TaskError: unknown task 'nope'; choose one of: ai2d, chartqa, docvqa_val, ...
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import re
import stat
import string
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as M

__all__ = [
    "TaskError",
    "Sample",
    "Task",
    "TaskSpec",
    "TASKS",
    "register_task",
    "get_task",
    "list_tasks",
    "task_names",
    "iter_rows",
    "find_tables",
]

# The lmms-eval release whose prompts, per-sample scores and aggregates these tasks reproduce (differential
# tests: tests/test_lmms_eval_alignment.py against code extracted from its wheel).
LMMS_EVAL_VERSION = "0.7.3"
POST_SHORT = "\nAnswer the question using a single word or phrase."
POST_LETTER = "\nAnswer with the option's letter from the given choices directly."
VIDEO_EXTS = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")


class TaskError(ValueError):
    """A task or its data cannot be used; the message is one line naming what is accepted.

    Example:
        >>> try:
        ...     get_task("pope").load(None)
        ... except TaskError as e:
        ...     print(str(e).split(" (")[0])
        task 'pope' needs --data
    """


# --------------------------------------------------------------------------------------------------
# Sample
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One benchmark item.

    ``id`` is unique and stable within a task's data (resume keys on it); ``prompt`` is the full text
    the model gets (lmms-eval's); ``question`` the raw question; ``answer`` a string (a list of strings
    for VQA); ``choices`` the option texts in letter order for multiple choice; ``video`` a file path
    for video tasks; ``meta`` task fields such as the category.

    ``images`` is a list of RGB PIL images (or None), decoded from ``image_refs`` (PIL images, encoded
    bytes or file paths) afresh on each access, so a loaded benchmark holds compressed bytes only.

    Example:
        >>> from PIL import Image
        >>> s = Sample(id="1", prompt="Is there a dog?", answer="yes", images=[Image.new("RGB", (4, 4))])
        >>> s.images[0].size
        (4, 4)
    """

    id: str
    prompt: str = ""
    question: str = ""
    answer: Any = None
    choices: list[str] | None = None
    video: str | None = None
    meta: dict = field(default_factory=dict)
    image_refs: list | None = None
    images: InitVar[list | None] = None

    def __post_init__(self, images: list | None) -> None:
        if images is not None and self.image_refs is None:
            self.image_refs = list(images)


def regular_file(path: str | os.PathLike, what: str = "image") -> Path:
    """``path`` if it names a regular file, else a one-line ``ValueError`` (missing, a folder, a FIFO or
    device: opening a FIFO would block forever)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise ValueError(f"{what} not readable: {p} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{what} path is {kind}: {p}; expected an image file")
    return p


def _decode_image(ref: Any):
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    try:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(ref))).convert("RGB")
        if isinstance(ref, (str, os.PathLike)):
            with Image.open(regular_file(ref)) as im:
                return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:  # PIL names a BytesIO object: say what it was instead
        src = f"{len(bytes(ref))} bytes" if isinstance(ref, (bytes, bytearray, memoryview)) else str(ref)
        reason = "not a known image format" if isinstance(e, UnidentifiedImageError) else str(e).split(" <_io.")[0]
        raise ValueError(f"corrupt or unreadable image ({src}): {reason}") from None
    raise TypeError(f"cannot decode an image from {type(ref).__name__}")


def _sample_images(self: Sample):
    if self.image_refs is None:
        return None
    out = []
    for i, r in enumerate(self.image_refs):
        try:
            out.append(_decode_image(r))
        except ValueError as e:
            which = f" image {i + 1} of {len(self.image_refs)}" if len(self.image_refs) > 1 else ""
            raise ValueError(f"sample {self.id}{which}: {e}") from None
    return out


# Set after @dataclass so that ``images=`` stays an __init__ argument while reading decodes lazily.
Sample.images = property(_sample_images, doc="RGB PIL images decoded from ``image_refs`` (or None).")


# --------------------------------------------------------------------------------------------------
# Reading tables: parquet, datasets.save_to_disk folders (Arrow IPC streams), json / jsonl
# --------------------------------------------------------------------------------------------------

_TABLE_EXTS = (".parquet", ".arrow")
_JSON_EXTS = (".json", ".jsonl")


def _split_matches(p: Path, root: Path, split: str) -> bool:
    """True if a folder on the way to ``p`` is called ``split``, or its name has it as a word.

    ("test-00000-of-00001.parquet", "pope-test.arrow", a ``test/`` folder; not "testdev-….parquet")
    """
    try:
        rel = p.relative_to(root)
    except ValueError:
        rel = Path(p.name)
    if split in rel.parts[:-1]:
        return True
    name = rel.name.split(".")[0] if p.is_file() else rel.name
    return re.search(rf"(^|[-_.]){re.escape(split)}([-_.]|$)", name) is not None


def _saved_dataset_files(d: Path) -> list[Path]:
    state = json.loads((d / "state.json").read_text())
    files = [d / f["filename"] for f in state.get("_data_files", [])]
    return files or sorted(d.glob("*.arrow"))


def find_tables(
    data_path: str | os.PathLike,
    split: str | None = None,
    config: str | None = None,
    json_ok: bool = False,
    require_config: bool = False,
) -> list[Path]:
    """The data files to read for one split of one config under ``data_path``.

    ``data_path`` may be a file (parquet, arrow, json/jsonl), a ``save_to_disk`` folder (``state.json``
    + ``data-*.arrow``), a saved ``DatasetDict`` (``dataset_dict.json`` + one folder per split), or any
    folder holding such files, e.g. a Hugging Face snapshot (``data/test-00000-of-00002.parquet``,
    ``en/dev-00000-of-00001.parquet``). In a folder, files under a ``config`` folder are preferred
    (required with ``require_config``), then files named or foldered by ``split``.

    Example:
        >>> find_tables("MMBench", split="dev", config="en")  # doctest: +SKIP
        [PosixPath('MMBench/en/dev-00000-of-00001.parquet')]
    """
    root = Path(data_path)
    if root.is_file():
        return [root]
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if split in splits:
            return find_tables(root / split, None, None, json_ok)
        if len(splits) == 1:
            return find_tables(root / splits[0], None, None, json_ok)
        wanted = f" but not {split!r}" if split else ""
        raise TaskError(f"{root} holds splits {', '.join(splits)}{wanted}; pass one split's folder as the data path")
    if (root / "state.json").is_file():
        return _saved_dataset_files(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))  # .git, .cache of HF snapshots
        d = Path(dirpath)
        if (d / "state.json").is_file() and any(f.endswith(".arrow") for f in filenames):
            found.append(d)  # a save_to_disk Dataset: read as a unit
            dirnames.clear()
            continue
        if (d / "dataset_dict.json").is_file():
            found.append(d)
            dirnames.clear()
            continue
        for f in sorted(filenames):
            if f.endswith(_TABLE_EXTS) or (json_ok and f.endswith(_JSON_EXTS) and not f.startswith(".")):
                found.append(d / f)
    if config:
        in_config = [p for p in found if config in p.relative_to(root).parts[:-1] or p.name == config]
        if in_config or require_config:
            found = in_config
    if split:
        in_split = [p for p in found if _split_matches(p, root, split)]
        if in_split:
            found = in_split
    out: list[Path] = []
    for p in found:
        out.extend(find_tables(p, split, None, json_ok) if p.is_dir() else [p])
    return out


def _read_arrow_batches(path: Path, columns: Sequence[str] | None) -> Iterator:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as src:
        try:
            reader = pa.ipc.open_stream(src)  # what datasets writes
            batches = iter(reader)
        except pa.ArrowInvalid:
            src.seek(0)
            reader = pa.ipc.open_file(src)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for b in batches:
            if columns is not None:
                b = b.select([c for c in columns if c in b.schema.names])
            yield b


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        for key in ("data", "rows", "annotations", "questions"):
            if isinstance(data.get(key), list):
                return data[key]
        raise TaskError(f"{path}: expected a JSON list of records")
    return data


def iter_rows(
    files: Sequence[Path], columns: Sequence[str] | None = None, batch_size: int = 128
) -> Iterator[tuple[Path, dict]]:
    """Rows of the given tables as ``(file, dict)``, streamed batch by batch (a ``limit`` reads little).

    Image columns come out as ``{"bytes": ..., "path": ...}`` dicts (the ``datasets`` Image encoding).

    Example:
        >>> for path, row in iter_rows(find_tables("POPE", split="test")):  # doctest: +SKIP
        ...     print(row["question"]); break
    """
    for f in files:
        try:
            if f.suffix in _JSON_EXTS:
                for row in _read_json_rows(f):
                    yield f, row
                continue
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
                batches = pf.iter_batches(batch_size=batch_size, columns=cols)
            else:
                batches = _read_arrow_batches(f, columns)
            for b in batches:
                yield from ((f, r) for r in b.to_pylist())
        except TaskError:
            raise
        except (OSError, ValueError) as e:  # pyarrow errors are ValueError / OSError subclasses
            msg = " ".join(str(e).split())[:200]
            raise TaskError(f"cannot read {f}: {msg}") from None


def _is_nan(v: Any) -> bool:
    """pandas' notion of a missing cell as lmms-eval meets it: None, NaN, or the string "nan"."""
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == "nan"


def _image_ref(value: Any, base: Path) -> Any:
    """An image cell (``{bytes, path}`` struct, bytes, or a path) as something :func:`_decode_image` takes."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    p = Path(str(value))
    if not p.is_absolute() and not p.exists():
        for cand in (base / p, base.parent / p):
            if cand.exists():
                return str(cand)
    return str(p)


class _VideoFinder:
    """Finds ``name`` under a root: tried folders first, then any file of that name below the root."""

    def __init__(self, root: Path, subdirs: Sequence[str] = ("data", "videos", "video", "")):
        self.root = root
        self.subdirs = subdirs
        self._index: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for f in sorted(filenames):
                if f.endswith(VIDEO_EXTS):
                    index.setdefault(f, os.path.join(dirpath, f))
        return index

    def find(self, name: str, extra_dirs: Sequence[str] = (), try_exts: bool = False) -> str:
        names = [name]
        if try_exts:  # lmms-eval's Video-MME loader also accepts .MP4 and .mkv
            stem = name.rsplit(".", 1)[0] if name.endswith(VIDEO_EXTS) else name
            names += [stem + e for e in (".mp4", ".MP4", ".mkv") if stem + e != name]
        for d in (*extra_dirs, *self.subdirs):
            for n in names:
                p = self.root / d / n
                if p.is_file():
                    return str(p)
        if self._index is None:
            self._index = self._build()
        for n in names:
            if Path(n).name in self._index:
                return self._index[Path(n).name]
        # Not found: keep the expected path; the runner's read_frames reports "video not found".
        return str(self.root / (extra_dirs[0] if extra_dirs else self.subdirs[0]) / name)


# --------------------------------------------------------------------------------------------------
# Task base
# --------------------------------------------------------------------------------------------------


class Task:
    """Base class: subclasses set the class attributes and implement ``_sample`` / ``score`` / ``aggregate``.

    ``columns`` are the required columns of the published layout; ``id_columns`` the columns tried, in
    order, for a sample id (row numbers when none is there; a repeated id gets ``#1``, ``#2``, … in row
    order, so ids stay the same whatever ``limit`` is).

    Example:
        >>> t = get_task("gqa")
        >>> t.prompt(Sample(id="1", prompt=t.build_prompt({"question": "Is it red?"})))
        'Is it red?\\nAnswer the question using a single word or phrase.'
    """

    name: str = ""
    modality: str = "image"  # "image" | "video"
    metric: str = ""
    layout: str = ""
    needs_data: bool = True
    split: str | None = None
    config: str | None = None
    columns: tuple[str, ...] = ()
    id_columns: tuple[str, ...] = ()
    json_ok: bool = False
    max_new_tokens: int = 16  # lmms-eval's generation_kwargs for the task where it sets one

    # -- loading ------------------------------------------------------------------------------------
    def _root(self, data_path: str | os.PathLike | None) -> Path:
        if data_path is None or str(data_path) == "":
            raise TaskError(f"task {self.name!r} needs --data ({self.layout})")
        root = Path(data_path).expanduser()
        if not root.exists():
            raise TaskError(f"{self.name}: data path not found: {root} (expected {self.layout})")
        return root

    def _tables(self, root: Path) -> list[Path]:
        files = find_tables(root, self.split, self.config, self.json_ok)
        if not files:
            kinds = "parquet/arrow/json" if self.json_ok else "parquet/arrow"
            raise TaskError(f"{self.name}: no {kinds} files under {root} (expected {self.layout})")
        return files

    def _check_columns(self, f: Path, row: dict) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise TaskError(
                f"{self.name}: {f} lacks column(s) {', '.join(missing)}; expected {', '.join(self.columns)}"
            )

    def load(self, data_path: str | os.PathLike | None, limit: int | None = None) -> list[Sample]:
        """Read the benchmark; ``limit`` keeps the first ``limit`` items (in file order).

        Example:
            >>> samples = get_task("mme").load("MME", limit=8)  # doctest: +SKIP
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise TaskError(f"limit must be a positive integer or None; got {limit!r}")
        root = self._root(data_path)
        ctx = self._context(root)
        out: list[Sample] = []
        seen: dict[str, int] = {}
        checked: set[Path] = set()
        for f, row in self._rows(root):
            if f not in checked:
                self._check_columns(f, row)
                checked.add(f)
            raw = next((row[c] for c in self.id_columns if row.get(c) is not None), None)
            raw_id = str(raw) if raw is not None else f"{self._id_prefix(f, row)}{len(out)}"
            k = seen.get(raw_id, 0)
            seen[raw_id] = k + 1
            sample = self._sample(row, f, ctx)
            sample.id = raw_id if k == 0 else f"{raw_id}#{k}"
            out.append(sample)
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise TaskError(f"{self.name}: no rows found under {root} (expected {self.layout})")
        return out

    def _rows(self, root: Path) -> Iterator[tuple[Path, dict]]:
        return iter_rows(self._tables(root))

    def _context(self, root: Path) -> dict:
        return {"root": root}

    def _id_prefix(self, f: Path, row: dict) -> str:
        return ""

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        raise NotImplementedError

    # -- prompting and scoring ----------------------------------------------------------------------
    def prompt(self, sample: Sample) -> str:
        """The text given to the model (built at load time, lmms-eval's default prompt)."""
        return sample.prompt

    def score(self, sample: Sample, prediction: str) -> dict:
        raise NotImplementedError

    def aggregate(self, per_sample: Sequence[dict | float]) -> tuple[float, str, dict]:
        """Mean of the per-sample scores, in percent."""
        scores = _scores(per_sample)
        return (100.0 * sum(scores) / len(scores) if scores else 0.0), self.metric, {"n": len(scores)}

    def info(self) -> tuple[str, str, str, str]:
        return (self.name, self.modality, self.metric, self.layout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _details(per_sample: Sequence[dict | float | None]) -> list[dict]:
    out = []
    for d in per_sample:
        if d is None:
            continue
        if not isinstance(d, dict):
            d = {"score": float(d)}
        if d.get("error") is not None or d.get("score") is None:
            continue  # failed samples (e.g. unreadable video) are reported apart, not scored
        out.append(d)
    return out


def _scores(per_sample: Sequence[dict | float | None]) -> list[float]:
    return [float(d["score"]) for d in _details(per_sample)]


def _pct(xs: Sequence[float]) -> float:
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def _by(details: list[dict], key: str, value: str = "score") -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for d in details:
        if d.get(key) is not None:
            groups[str(d[key])].append(float(d[value]))
    return {k: _pct(v) for k, v in sorted(groups.items())}


def _robust_extra(details: list[dict]) -> dict:
    vals = [float(d["robust"]) for d in details if "robust" in d]
    return {"accuracy_robust_extract": _pct(vals)} if vals else {}


def _letter_options(choices: Sequence[str], fmt: str = "{letter}. {text}") -> str:
    return "\n".join(fmt.format(letter=string.ascii_uppercase[i], text=c) for i, c in enumerate(choices))


# --------------------------------------------------------------------------------------------------
# Image tasks
# --------------------------------------------------------------------------------------------------


class PopeTask(Task):
    """POPE (lmms-lab/POPE): yes/no object hallucination; F1 headline, accuracy/precision/recall extra."""

    name = "pope"
    metric = "f1"
    split = "test"
    layout = "parquet or save_to_disk (lmms-lab/POPE): question_id, question, answer (yes/no), category, image {bytes,path}"
    columns = ("question_id", "question", "answer", "image")
    id_columns = ("id", "question_id")
    max_new_tokens = 128

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        q = str(row["question"])
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=q,
            answer=str(row["answer"]).lower().strip(),
            image_refs=[_image_ref(row["image"], f.parent)],
            meta={"category": row.get("category"), "question_id": str(row["question_id"])},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/pope/utils.py pope_doc_to_text
        return f"{str(row['question']).strip()}{POST_SHORT}"

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = M.pope_normalize(prediction)
        return {"score": float(pred == sample.answer), "pred": pred, "gt": sample.answer, "category": sample.meta.get("category")}

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        m = M.pope_metrics([d["pred"] for d in ds], [d["gt"] for d in ds])
        extra = {k: 100.0 * v for k, v in m.items() if k != "f1"}
        cats: dict[str, list[dict]] = defaultdict(list)
        for d in ds:
            if d.get("category") is not None:
                cats[str(d["category"])].append(d)
        if cats:
            per = {
                c: {k: 100.0 * v for k, v in M.pope_metrics([d["pred"] for d in v], [d["gt"] for d in v]).items()}
                for c, v in sorted(cats.items())
            }
            extra["per_category"] = per
            extra["f1_mean_over_categories"] = sum(p["f1"] for p in per.values()) / len(per)
        extra["n"] = len(ds)
        return 100.0 * m["f1"], self.metric, extra


class MmeTask(Task):
    """MME (lmms-lab/MME): two yes/no questions per image; score = perception + cognition."""

    name = "mme"
    metric = "mme_total"
    split = "test"
    layout = "parquet or save_to_disk (lmms-lab/MME): question_id, image {bytes,path}, question, answer (Yes/No), category"
    columns = ("question_id", "question", "answer", "category", "image")
    id_columns = ("question_id",)

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=str(row["answer"]).lower().strip().replace(".", ""),
            image_refs=[_image_ref(row["image"], f.parent)],
            meta={"category": str(row["category"]), "question_id": str(row["question_id"])},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/mme/utils.py mme_doc_to_text with the default post_prompt: the dataset's own
        # " Please answer yes or no." is replaced by the post prompt.
        q = str(row["question"]).strip().replace(" Please answer yes or no.", "")
        return f"{q}{POST_SHORT}"

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = M.mme_parse_yes_no(prediction)
        return {
            "score": float(pred == sample.answer),
            "pred": pred,
            "question_id": sample.meta["question_id"],
            "category": sample.meta["category"],
        }

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        s = M.mme_scores(ds)
        extra = {"perception": s["perception"], "cognition": s["cognition"], "per_category": s["per_category"]}
        extra["accuracy"] = _pct([float(d["score"]) for d in ds])
        extra["n"] = len(ds)
        return s["total"], self.metric, extra


class GqaTask(Task):
    """GQA testdev-balanced (lmms-lab/GQA): instructions config joined to the images config by imageId."""

    name = "gqa"
    metric = "exact_match"
    split = "testdev"
    config = "testdev_balanced_instructions"
    images_config = "testdev_balanced_images"
    layout = (
        "folder (lmms-lab/GQA) with testdev_balanced_instructions/ (id, imageId, question, answer) "
        "and testdev_balanced_images/ (id, image {bytes,path}) as parquet or save_to_disk"
    )
    columns = ("question", "answer", "imageId")
    id_columns = ("id",)

    def _rows(self, root: Path) -> Iterator[tuple[Path, dict]]:
        if root.is_file():
            files = [root]
        else:
            files = find_tables(root, self.split, self.config, require_config=True)
        if not files:
            raise TaskError(f"{self.name}: no {self.config}/ parquet or arrow files under {root} (expected {self.layout})")
        return iter_rows(files)

    def _context(self, root: Path) -> dict:
        return {"root": root, "images": None}

    def _image_table(self, root: Path) -> dict[str, Any]:
        base = root if root.is_dir() else root.parent.parent
        files = find_tables(base, self.split, self.images_config, require_config=True) if base.is_dir() else []
        if not files:
            raise TaskError(f"{self.name}: no {self.images_config}/ folder next to the questions under {base} (expected {self.layout})")
        table: dict[str, Any] = {}
        for f, row in iter_rows(files, columns=("id", "image")):
            if "id" not in row or "image" not in row:
                raise TaskError(f"{self.name}: {f} lacks column(s) id, image; expected id, image")
            table[str(row["id"])] = _image_ref(row["image"], f.parent)
        return table

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        if "image" in row and row["image"] is not None:
            ref = _image_ref(row["image"], f.parent)
        else:
            if ctx["images"] is None:
                ctx["images"] = self._image_table(ctx["root"])
            ref = ctx["images"].get(str(row["imageId"]))
            if ref is None:
                raise TaskError(f"{self.name}: image {row['imageId']!r} is not in {self.images_config}/")
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=str(row["answer"]),
            image_refs=[ref],
            meta={"imageId": str(row["imageId"])},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        return f"{row['question']}{POST_SHORT}"  # lmms_eval/tasks/gqa/utils.py gqa_doc_to_text

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": M.gqa_exact_match(prediction, sample.answer)}


class TextVqaTask(Task):
    """TextVQA validation (lmms-lab/textvqa), VQA accuracy over the ten human answers."""

    name = "textvqa"
    metric = "vqa_accuracy"
    split = "validation"
    layout = "parquet or save_to_disk (lmms-lab/textvqa, validation split): question_id, question, image {bytes,path}, answers (list of 10)"
    columns = ("question_id", "question", "image", "answers")
    id_columns = ("question_id",)
    max_new_tokens = 128  # lmms-eval leaves it to the model wrapper; answers are a few words

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=[str(a) for a in (row["answers"] or [])],
            image_refs=[_image_ref(row["image"], f.parent)],
            meta={"ocr_tokens": list(row.get("ocr_tokens") or [])},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # textvqa_doc_to_text: str.capitalize() (which also lower-cases the rest), no OCR tokens.
        return f"{str(row['question']).capitalize()}{POST_SHORT}"

    def score(self, sample: Sample, prediction: str) -> dict:
        return {"score": M.vqa_accuracy(prediction, sample.answer)}


class ScienceQaImgTask(Task):
    """ScienceQA-IMG test (lmms-lab/ScienceQA, config ScienceQA-IMG), lmms-eval/LLaVA letter matching."""

    name = "scienceqa_img"
    metric = "accuracy"
    split = "test"
    config = "ScienceQA-IMG"
    layout = "parquet or save_to_disk (lmms-lab/ScienceQA, ScienceQA-IMG/test): image {bytes,path}, question, choices, answer (index), hint"
    columns = ("question", "choices", "answer", "hint", "image")

    def _id_prefix(self, f: Path, row: dict) -> str:
        return "sqa-"

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        choices = [str(c) for c in row["choices"]]
        idx = int(row["answer"])
        ref = _image_ref(row["image"], f.parent) if row.get("image") is not None else None
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=string.ascii_uppercase[idx],
            choices=choices,
            image_refs=[ref] if ref is not None else None,
            meta={k: row.get(k) for k in ("subject", "category", "grade", "topic") if row.get(k) is not None},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/scienceqa/utils.py sqa_doc_to_text, format "default"
        context = row.get("hint") or ""
        if context:
            context = f"Context: {context}\n"
        return f"{context}{row['question']}\n{_letter_options([str(c) for c in row['choices']])}{POST_LETTER}"

    def score(self, sample: Sample, prediction: str) -> dict:
        return {
            "score": M.sqa_match(prediction, sample.answer),
            "robust": float(M.extract_choice(prediction, sample.choices) == sample.answer),
            "subject": sample.meta.get("subject"),
        }

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        extra = {"n": len(ds), **_robust_extra(ds), "per_subject": _by(ds, "subject")}
        return _pct([d["score"] for d in ds]), self.metric, extra


class MmbenchTask(Task):
    """MMBench-EN dev (lmms-lab/MMBench, config en, split dev), circular evaluation, offline matcher."""

    name = "mmbench"
    metric = "accuracy"
    split = "dev"
    config = "en"
    layout = "parquet or save_to_disk (lmms-lab/MMBench, en/dev): index, question, hint, A, B, C, D, answer, category, image {bytes,path}"
    columns = ("index", "question", "hint", "A", "B", "answer", "image")
    id_columns = ("index",)
    max_new_tokens = 1024  # as lmms-eval's template; greedy decoding stops at the end token anyway

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        options = {c: str(row[c]) for c in "ABCDE" if c in row and row[c] and not _is_nan(row[c])}
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=str(row["answer"]).strip(),
            choices=list(options.values()),
            image_refs=[_image_ref(row["image"], f.parent)],
            meta={
                "index": int(row["index"]),
                "category": row.get("category"),
                "l2_category": row.get("L2-category", row.get("l2-category")),
                "options": options,
            },
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/mmbench/en_utils.py mmbench_doc_to_text + MMBench_Evaluator.create_options_prompt
        # (sys_prompt "There are several options:"); the post prompt is joined with one more "\n".
        opts = "There are several options:\n" + "".join(
            f"{c}. {row[c]}\n" for c in "ABCDE" if c in row and row[c] and not _is_nan(row[c])
        )
        opts = opts.rstrip("\n")
        hint = row.get("hint")
        query = f"{hint} {row['question']} {opts}" if not _is_nan(hint) else f"{row['question']} {opts}"
        return f"{query}\n{POST_LETTER}"

    def score(self, sample: Sample, prediction: str) -> dict:
        opts = sample.meta["options"]
        # mmbench_en_dev_static (MMBench_Evaluator.eval_sub_data, static_only): the deterministic
        # pre-matcher, else extract_mcq_answer over the A-D options present (no API judge)
        prediction = str(prediction).strip()
        letter = M.mmbench_can_infer(prediction, dict(opts)) or (
            M.extract_mcq_answer(prediction, sorted(k for k in opts if k in "ABCD")) or None)
        return {
            "score": float(letter == sample.answer),
            "pred": letter,
            "index": sample.meta["index"],
            "category": sample.meta.get("category"),
        }

    def aggregate(self, per_sample):
        # Circular evaluation (MMBench_Evaluator.eval_result): rows whose index agrees modulo 1e6 are the
        # same question with rotated options; the question counts only if every rotation is right.
        ds = _details(per_sample)
        groups: dict[int, list[dict]] = defaultdict(list)
        for d in ds:
            groups[int(d["index"]) % 1_000_000].append(d)
        # only questions whose main record (index < 1e6) is there are counted, as eval_result's data_main
        mains = {int(d["index"]) for d in ds if int(d["index"]) < 1_000_000}
        groups = {g: v for g, v in groups.items() if g in mains}
        hits = {g: float(all(d["score"] == 1.0 for d in v)) for g, v in groups.items()}
        cat_of = {}
        for g, v in groups.items():
            main = [d for d in v if int(d["index"]) == g] or v
            cat_of[g] = main[0].get("category")
        per_cat: dict[str, list[float]] = defaultdict(list)
        for g, h in hits.items():
            if cat_of[g] is not None:
                per_cat[str(cat_of[g])].append(h)
        extra = {
            "n": len(ds),
            "questions": len(groups),
            "per_category": {k: _pct(v) for k, v in sorted(per_cat.items())},
            "unmatched": sum(1 for d in ds if d.get("pred") is None),
        }
        return _pct(list(hits.values())), self.metric, extra


class SeedbenchTask(Task):
    """SEED-Bench (lmms-lab/SEED-Bench): four options; lmms-eval scores the answer's first character."""

    name = "seedbench"
    metric = "accuracy"
    split = "test"
    layout = "parquet or save_to_disk (lmms-lab/SEED-Bench): question_id, question, choice_a..choice_d, answer, data_type, image (list of {bytes,path})"
    columns = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "image")
    id_columns = ("question_id",)
    max_new_tokens = 128  # lmms-eval leaves it to the model wrapper

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        imgs = row["image"]
        imgs = imgs if isinstance(imgs, list) else [imgs]
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=str(row["answer"]).strip(),
            choices=[str(row[f"choice_{c}"]) for c in "abcd"],
            image_refs=[_image_ref(i, f.parent) for i in imgs if i is not None],
            meta={"data_type": row.get("data_type"), "question_type_id": row.get("question_type_id")},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/seedbench/utils.py seed_doc_to_text
        q = str(row["question"]) + "\n" + f"A. {row['choice_a']}\n" + f"B. {row['choice_b']}\n"
        q += f"C. {row['choice_c']}\n" + f"D. {row['choice_d']}"
        return f"{q}{POST_LETTER}"

    def score(self, sample: Sample, prediction: str) -> dict:
        return {
            "score": M.seed_match(prediction, sample.answer),
            "robust": float(M.extract_choice(prediction, sample.choices) == sample.answer),
            "data_type": sample.meta.get("data_type"),
        }

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        extra = {"n": len(ds), **_robust_extra(ds)}
        for k, v in _by(ds, "data_type").items():
            extra[f"seed_{k}"] = v
        return _pct([d["score"] for d in ds]), self.metric, extra


# --------------------------------------------------------------------------------------------------
# Video tasks
# --------------------------------------------------------------------------------------------------


class VideoMmeTask(Task):
    """Video-MME without subtitles (lmms-lab/Video-MME): annotation parquet + ``{videoID}.mp4`` files."""

    name = "videomme"
    modality = "video"
    metric = "accuracy"
    split = "test"
    layout = (
        "folder: Video-MME parquet (videoID, question_id, question, options, answer, duration, domain, "
        "sub_category, task_type) and videos as {videoID}.mp4 in data/, videos/ or anywhere below"
    )
    columns = ("videoID", "question", "options", "answer")
    id_columns = ("question_id",)

    def _context(self, root: Path) -> dict:
        return {"root": root, "videos": _VideoFinder(root if root.is_dir() else root.parent)}

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        vid = str(row["videoID"])
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=str(row["answer"]).strip(),
            choices=[re.sub(r"^[A-D]\.\s*", "", str(o)) for o in row["options"]],
            video=ctx["videos"].find(vid + ".mp4", try_exts=True),
            meta={k: row.get(k) for k in ("videoID", "duration", "domain", "sub_category", "task_type")},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/videomme/utils.py videomme_doc_to_text, default post_prompt of videomme.yaml
        option_prompt = (
            "Select the best answer to the following multiple-choice question based on the video and the "
            "subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
        )
        question = str(row["question"]) + "\n" + "\n".join(str(o) for o in row["options"])
        return option_prompt + "\n" + question + "\n" + POST_LETTER

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = M.videomme_extract(prediction)
        return {
            # videomme_aggregate_results counts pred_answer == answer (its per-sample "score" lower-cases;
            # the reported aggregate does not)
            "score": float(pred == sample.answer),
            "pred": pred,
            "robust": float(M.extract_choice(prediction, sample.choices) == sample.answer),
            "duration": sample.meta.get("duration"),
            "task_type": sample.meta.get("task_type"),
        }

    def aggregate(self, per_sample):
        ds = _details(per_sample)
        extra = {"n": len(ds), **_robust_extra(ds), "per_duration": _by(ds, "duration"), "per_task_type": _by(ds, "task_type")}
        return _pct([d["score"] for d in ds]), self.metric, extra


# lmms_eval/tasks/mvbench/utils.py: where each sub-task's videos live inside the MVBench video folder.
MVBENCH_VIDEO_DIRS = {
    "object_interaction": "star/Charades_segment",
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video",
    "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4",
    "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}


class MvbenchTask(Task):
    """MVBench (OpenGVLab/MVBench): one annotation file per sub-task, videos in per-source folders."""

    name = "mvbench"
    modality = "video"
    metric = "accuracy"
    layout = (
        "folder (OpenGVLab/MVBench): json/<sub_task>.json (or parquet) with video, question, candidates, "
        "answer; videos under video/<source folder>/ or anywhere below"
    )
    columns = ("video", "question", "candidates", "answer")
    json_ok = True

    def _tables(self, root: Path) -> list[Path]:
        if root.is_dir() and (root / "json").is_dir():
            root = root / "json"
        return super()._tables(root)

    def _context(self, root: Path) -> dict:
        return {"root": root, "videos": _VideoFinder(root if root.is_dir() else root.parent, ("video", "videos", ""))}

    def _id_prefix(self, f: Path, row: dict) -> str:
        return f"{f.stem}/"

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        sub = row.get("sub_task") or row.get("task_type") or f.stem
        cands = [str(c) for c in row["candidates"]]
        answer = str(row["answer"])
        gt = next((string.ascii_uppercase[i] for i, c in enumerate(cands) if c == answer), None)
        vdir = MVBENCH_VIDEO_DIRS.get(sub)
        extra_dirs = [f"video/{vdir}", vdir, f"video/data0613/{vdir}"] if vdir else []
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=str(row["question"]),
            answer=gt,
            choices=cands,
            video=ctx["videos"].find(str(row["video"]), extra_dirs=extra_dirs),
            meta={"sub_task": sub, "answer_text": answer},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/mvbench/utils.py mvbench_doc_to_text; the sub-task yamls' post_prompt.
        opts = "".join(f"({string.ascii_uppercase[i]}) {c}\n" for i, c in enumerate(row["candidates"]))
        return "Question:" + str(row["question"]) + "\nOption:\n" + opts + "Only give the best option.\n"

    def score(self, sample: Sample, prediction: str) -> dict:
        return {
            "score": M.mvbench_match(prediction, sample.answer),
            "answered": str(prediction).strip() != "",
            "robust": float(M.extract_choice(prediction, sample.choices) == sample.answer),
            "sub_task": sample.meta.get("sub_task"),
        }

    def aggregate(self, per_sample):
        # mvbench_aggregate_results: empty predictions are left out of the denominator.
        ds = _details(per_sample)
        answered = [d for d in ds if d.get("answered", True)]
        extra = {
            "n": len(ds),
            "unanswered": len(ds) - len(answered),
            **_robust_extra(ds),
            "per_sub_task": _by(answered, "sub_task"),
        }
        return _pct([d["score"] for d in answered]), self.metric, extra


MLVU_DEV_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


class MlvuTask(Task):
    """MLVU dev (sy1998/MLVU_dev): options inside the question; score is the mean over task types."""

    name = "mlvu"
    modality = "video"
    metric = "m_avg"
    layout = (
        "folder (MLVU dev): parquet/json with video_name, question (options inside), answer (letter), "
        "task_type; videos by video_name in the folder or anywhere below"
    )
    columns = ("video_name", "question", "answer", "task_type")
    json_ok = True

    def _context(self, root: Path) -> dict:
        return {"root": root, "videos": _VideoFinder(root if root.is_dir() else root.parent, ("", "video", "videos", "data"))}

    def _id_prefix(self, f: Path, row: dict) -> str:
        return "mlvu-"

    def _sample(self, row: dict, f: Path, ctx: dict) -> Sample:
        q = str(row["question"])
        opts = dict(re.findall(r"^\s*\(([A-H])\)\s*(.+?)\s*$", q, flags=re.MULTILINE))
        return Sample(
            id="",
            prompt=self.build_prompt(row),
            question=q,
            answer=str(row["answer"]).strip(),
            choices=list(opts.values()) or None,
            video=ctx["videos"].find(str(row["video_name"])),
            meta={"task_type": row.get("task_type"), "options": opts},
        )

    @staticmethod
    def build_prompt(row: dict) -> str:
        # lmms_eval/tasks/mlvu/utils.py mlvu_doc_to_text: pre_prompt + question + post_prompt (mlvu_dev.yaml)
        return str(row["question"]) + "\nOnly give the best option.\nBest option: ("

    def score(self, sample: Sample, prediction: str) -> dict:
        pred = M.mlvu_extract(prediction)
        opts = sample.meta.get("options") or None
        return {
            "score": float(pred == sample.answer),
            "pred": pred,
            "robust": float(M.extract_choice(prediction, opts) == sample.answer),
            "task_type": sample.meta.get("task_type"),
        }

    def aggregate(self, per_sample):
        # mlvu_aggregate_results_dev: the mean of the seven dev task types' accuracies, an absent type
        # counting 0 (so a subset scores low); the mean over the types present is in extra
        ds = _details(per_sample)
        per = _by(ds, "task_type")
        extra = {"n": len(ds), "accuracy_micro": _pct([d["score"] for d in ds]), **_robust_extra(ds), "per_task_type": per,
                 "m_avg_present": sum(per.values()) / len(per) if per else 0.0}
        return sum(per.get(t, 0.0) for t in MLVU_DEV_TYPES) / len(MLVU_DEV_TYPES), self.metric, extra


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: what ``mmprune tasks`` prints, and how to build it (lazily).

    ``factory`` is a zero-argument callable returning the task, or ``"package.module:attr"`` imported
    on first use (``attr`` a class or a function).
    """

    name: str
    modality: str
    metric: str
    layout: str
    factory: Callable[[], Any] | str
    needs_data: bool = True

    def build(self):
        fac = self.factory
        if isinstance(fac, str):
            mod, _, attr = fac.partition(":")
            try:
                fac = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise TaskError(f"task {self.name!r} could not be loaded from {self.factory!r}: {e}") from None
        task = fac()
        if getattr(task, "name", None) in (None, ""):
            task.name = self.name
        return task


TASKS: dict[str, TaskSpec] = {}


def register_task(
    task: Any = None,
    *,
    name: str | None = None,
    factory: Callable[[], Any] | str | None = None,
    modality: str | None = None,
    metric: str | None = None,
    layout: str | None = None,
    needs_data: bool | None = None,
    replace: bool = False,
) -> TaskSpec:
    """Add a task to the registry: a task object (or class), or a lazy factory with its listing fields.

    Example:
        >>> spec = register_task(name="my_shapes", factory="mmprune.testbed.tasks:ShapesTask",
        ...                      modality="image", metric="accuracy", layout="generated", needs_data=False)
        >>> "my_shapes" in TASKS
        True
        >>> _ = TASKS.pop("my_shapes")
    """
    if task is not None:
        obj = task
        name = name or getattr(obj, "name", None)
        modality = modality or getattr(obj, "modality", None)
        metric = metric or getattr(obj, "metric", None)
        layout = layout if layout is not None else getattr(obj, "layout", "")
        if needs_data is None:
            needs_data = bool(getattr(obj, "needs_data", True))
        factory = obj if isinstance(obj, type) else (lambda obj=obj: obj)
    if not name or factory is None:
        raise TaskError("register_task needs a task object, or name= and factory=")
    if modality not in ("image", "video"):
        raise TaskError(f"task {name!r}: modality must be 'image' or 'video'; got {modality!r}")
    if name in TASKS and not replace:
        raise TaskError(f"task {name!r} is already registered; pass replace=True to override it")
    spec = TaskSpec(name, modality, metric or "", layout or "", factory, True if needs_data is None else needs_data)
    TASKS[name] = spec
    return spec


def task_names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str):
    """Build the task called ``name``; an unknown name raises :class:`TaskError` listing the valid ones.

    Example:
        >>> get_task("mmbench").metric
        'accuracy'
    """
    spec = TASKS.get(name)
    if spec is None:
        raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    return spec.build()


def list_tasks() -> list[tuple[str, str, str, str]]:
    """``(name, modality, metric, layout)`` rows for ``mmprune tasks``, sorted by name.

    Example:
        >>> [r[:3] for r in list_tasks() if r[0] == "videomme"]
        [('videomme', 'video', 'accuracy')]
    """
    return [(s.name, s.modality, s.metric, s.layout) for s in (TASKS[n] for n in task_names())]


for _cls in (
    PopeTask, MmeTask, GqaTask, TextVqaTask, ScienceQaImgTask, MmbenchTask, SeedbenchTask,
    VideoMmeTask, MvbenchTask, MlvuTask,
):  # fmt: skip
    register_task(_cls)

del _cls

# more lmms-eval tasks in their own module, which registers them; imported last, as it builds on the names above
from . import more_tasks, more_video_tasks  # noqa: E402, F401

# The built-in test-bed's generated tasks (no --data): registered lazily so that `mmprune tasks` lists them
# without generating anything; importing mmprune.testbed.tasks re-registers the same classes.
register_task(name="shapes", factory="mmprune.testbed.tasks:ShapesTask", modality="image", metric="accuracy",
              layout="generated (built-in test-bed, test split, 500 items; no --data)", needs_data=False)
register_task(name="motion", factory="mmprune.testbed.tasks:MotionTask", modality="video", metric="accuracy",
              layout="generated (built-in test-bed, 500 mp4 clips written once to a cache; no --data)",
              needs_data=False)
