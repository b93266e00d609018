"""The output directory of ``mmprune eval``: per-sample log, results, report; resume and shard merging.

Layout of ``DIR``:

* ``samples.jsonl``: one JSON record per sample, appended (flush + fsync) as it is produced, so an
  interrupted run loses at most the sample in flight. Each record has at least ``run`` (the run key)
  and ``id``; the runner adds ``prompt``, ``prediction``, ``answer``, ``score``, ``detail`` (what the
  task's ``aggregate`` needs) and, for a failed sample, ``error``.
* ``samples.rank{i}.jsonl``: the same, written by process ``i`` of a sharded run, merged into
  ``samples.jsonl`` by :func:`merge_shards`.
* ``results.json``: ``{"runs": [...]}``; writing a run replaces the earlier run with the same key.
* ``report.md``: the table of all runs (:func:`write_report`).

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> key = run_key("llava-1.5-7b", "pope", "fastv", 0.25, 2)
    >>> with SampleLog(d) as log:
    ...     log.append(make_record(key, "q1", prediction="yes", answer="yes", score=1.0))
    True
    >>> SampleLog(d).done_ids(key)
    {'q1'}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SAMPLES_FILE",
    "RESULTS_FILE",
    "REPORT_FILE",
    "StoreError",
    "run_key",
    "make_record",
    "read_jsonl",
    "SampleLog",
    "out_folder",
    "shard",
    "shard_path",
    "merge_shards",
    "split_records",
    "load_results",
    "write_results",
    "write_report",
    "format_report",
    "is_baseline",
]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
_RANK_RE = re.compile(r"^samples\.rank(\d+)\.jsonl$")
BASELINE_POLICIES = (None, "", "none", "full", "baseline", "unpruned")


class StoreError(ValueError):
    """The output directory holds something that cannot be used; the message says what and where."""


# --------------------------------------------------------------------------------------------------
# Run keys and records
# --------------------------------------------------------------------------------------------------


def _canon(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str):
        return v
    # json keeps 1 (one token per image) and 1.0 (the whole budget) apart, and sorts dict keys.
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


def run_key(
    model: str,
    task: str,
    policy: Any = None,
    budget: Any = None,
    layer: Any = None,
    options: dict | None = None,
    settings: dict | None = None,
) -> str:
    """A stable, readable key for one evaluation run: ``model|task|policy|budget|layer[|hash]``.

    ``options`` (the policy's settings) and ``settings`` (the run's other inputs that change a sample's
    result: data, dtype, seed, max new tokens, video frames) enter as a short hash of their sorted JSON,
    so equal values give the same key in any order; empty or None values add nothing. A run resumed with
    a different setting gets a new key and so never reuses the old run's samples.

    Example:
        >>> run_key("qwen2-vl-2b", "mme", "visionzip", 64, None)
        'qwen2-vl-2b|mme|visionzip|64|none'
        >>> run_key("m", "t", "tome", 0.5, options={"b": 1, "a": 2}) == run_key("m", "t", "tome", 0.5, options={"a": 2, "b": 1})
        True
    """
    key = "|".join(_canon(v) for v in (model, task, policy, budget, layer))
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    sets = {k: v for k, v in (settings or {}).items() if v is not None}
    if sets:  # options and settings apart, so an option never collides with a setting of the same name
        opts = {"options": opts, "settings": sets}
    if opts:
        blob = json.dumps(opts, sort_keys=True, separators=(",", ":"), default=str)
        key += "|" + hashlib.sha1(blob.encode()).hexdigest()[:10]
    return key


def make_record(
    run: str,
    sample_id: str,
    *,
    prompt: str | None = None,
    prediction: str | None = None,
    answer: Any = None,
    score: float | None = None,
    detail: dict | None = None,
    error: str | None = None,
    **extra: Any,
) -> dict:
    """One ``samples.jsonl`` record. A failed sample has ``error`` (one line) and ``score`` None.

    Example:
        >>> make_record("k", "v1", error="video not found: a.mp4")["score"] is None
        True
    """
    rec = {"run": run, "id": str(sample_id), "prompt": prompt, "prediction": prediction, "answer": answer}
    rec["score"] = None if error is not None else score
    rec["detail"] = detail
    if error is not None:
        rec["error"] = " ".join(str(error).split())
    rec.update(extra)
    return rec


# --------------------------------------------------------------------------------------------------
# samples.jsonl
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of a JSON-lines file; a missing file gives [].

    A last line cut short (no newline, or not valid JSON: the process died while writing it) is
    ignored, and with ``repair`` cut off the file, so the next append starts on a fresh line. A bad
    line elsewhere is skipped with a warning.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "s.jsonl")
        >>> _ = open(p, "w").write('{"id": "a"}\\n{"id": "b", "sc')
        >>> [r["id"] for r in read_jsonl(p, repair=True)], open(p).read()
        (['a'], '{"id": "a"}\\n')
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return []
    _regular_or_absent(p)
    data = p.read_bytes()
    parts = data.split(b"\n")  # the last part is what follows the final newline ("" normally)
    records: list[dict] = []
    good_end = 0  # byte offset just past the last line worth keeping
    offset = 0
    bad = 0
    tail_without_newline = False
    for i, line in enumerate(parts):
        is_tail = i == len(parts) - 1
        end = offset + len(line) + (0 if is_tail else 1)
        text = line.strip()
        if text:
            try:
                rec = json.loads(text)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                if is_tail:
                    break  # cut short while being written: dropped, and cut off below with repair
                bad += 1
            else:
                # A JSON object cannot be a prefix of a longer one: a valid tail is a whole record
                # whose newline never made it to disk.
                records.append(rec)
                tail_without_newline = is_tail
        good_end = end
        offset = end
    if bad:
        warnings.warn(f"{p}: skipped {bad} unreadable line(s)", stacklevel=2)
    if repair and (good_end < len(data) or tail_without_newline):
        with open(p, "r+b") as f:
            f.truncate(good_end)
            if tail_without_newline:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return records


def shard_path(out_dir: str | os.PathLike, rank: int | None = None) -> Path:
    """``DIR/samples.jsonl``, or ``DIR/samples.rank{rank}.jsonl`` for one process of a sharded run."""
    name = SAMPLES_FILE if rank is None else f"samples.rank{int(rank)}.jsonl"
    return Path(out_dir) / name


def _sample_files(out_dir: Path) -> list[Path]:
    ranks = sorted(
        (int(m.group(1)), out_dir / f) for f in os.listdir(out_dir) if (m := _RANK_RE.match(f))
    ) if out_dir.is_dir() else []
    main = out_dir / SAMPLES_FILE
    return ([main] if main.exists() else []) + [p for _, p in ranks]


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def out_folder(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a writable folder (created if missing), or a one-line ``StoreError`` saying why not:
    the path is a file, lies under a file, or cannot be written."""
    out = Path(out_dir)
    for parent in [out, *out.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                where = "is" if parent == out else f"lies under {parent}, which is"
                raise StoreError(f"output folder {out} {where} not a folder; pass --out a folder path")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise StoreError(f"output folder {out} is not writable; pass --out a folder you can write to")
    return out


def _regular_or_absent(path: Path) -> None:
    """Refuse a results or samples file that is a symlink, a folder, a FIFO...: writing through a symlink
    truncates or appends to its target, opening a FIFO blocks."""
    if path.is_symlink():
        raise StoreError(f"{path} is a symbolic link; mmprune only writes its own regular files there (remove it)")
    if path.exists() and not path.is_file():
        raise StoreError(f"{path} exists and is not a regular file; move it away to start afresh")


@contextlib.contextmanager
def _results_lock(out: Path):
    """An exclusive ``flock`` on ``DIR/.results.lock`` around a read-modify-write of ``results.json``: runs of
    a sweep in parallel processes (or shards) otherwise lose each other's rows (122 of 300 in a test)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: unlocked, as before
        yield
        return
    fd = os.open(out / ".results.lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SampleLog:
    """Append-only per-sample log of an output directory, aware of what is already done.

    On opening it reads ``samples.jsonl`` and every ``samples.rank*.jsonl`` (so a resumed run skips
    samples finished by any process, whatever the number of processes was), repairing a cut-short
    last line of the file it writes. :meth:`append` writes one line with a single ``write`` call,
    then flushes and fsyncs, and refuses a ``(run, id)`` pair that is already there.

    ``rank``: None for a single process (writes ``samples.jsonl``), else this process's shard file.

    Example:
        >>> import tempfile
        >>> log = SampleLog(tempfile.mkdtemp())
        >>> log.append({"run": "k", "id": "1", "score": 1.0}), log.append({"run": "k", "id": "1", "score": 0.0})
        (True, False)
        >>> [r["score"] for r in log.records("k")]
        [1.0]
        >>> log.close()
    """

    def __init__(self, out_dir: str | os.PathLike, rank: int | None = None):
        self.out_dir = out_folder(out_dir)
        self.path = shard_path(self.out_dir, rank)
        _regular_or_absent(self.path)  # before any work; the files read below are checked by read_jsonl
        self._records: dict[tuple[str, str], dict] = {}
        for f in _sample_files(self.out_dir):
            for rec in read_jsonl(f, repair=(f == self.path)):
                if "run" in rec and "id" in rec:
                    key = (str(rec["run"]), str(rec["id"]))
                    if _supersedes(rec, self._records.get(key)):
                        self._records[key] = rec
        self._fd: int | None = None

    # -- queries -----------------------------------------------------------------------------------
    def records(self, run: str) -> list[dict]:
        """This run's records, one per sample id, in the order first written.

        The first record of an id wins, except that a scored record replaces a failed one (a retry).
        """
        return [r for (k, _), r in self._records.items() if k == run]

    def done_ids(self, run: str, include_failed: bool = True) -> set[str]:
        """Ids of samples of ``run`` already recorded (with ``include_failed=False``: only scored ones)."""
        return {
            i for (k, i), r in self._records.items() if k == run and (include_failed or r.get("error") is None)
        }

    def is_done(self, run: str, sample_id: str) -> bool:
        return (run, str(sample_id)) in self._records

    def __len__(self) -> int:
        return len(self._records)

    # -- writing -----------------------------------------------------------------------------------
    def append(self, record: dict) -> bool:
        """Write one record (needs ``run`` and ``id``); False, writing nothing, if it is already there.

        A sample recorded as failed (``error`` set) may be appended again with a score: a retry.
        """
        if "run" not in record or "id" not in record:
            raise StoreError("a sample record needs 'run' and 'id' fields")
        key = (str(record["run"]), str(record["id"]))
        if not _supersedes(record, self._records.get(key)):
            return False
        data = (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        if self._fd is None:  # O_NOFOLLOW: a symlink planted there must not get its target appended to
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
            except OSError as e:
                raise StoreError(f"cannot write {self.path}: {e.strerror}") from None
        view = memoryview(data)
        while view:  # one write() for a line in practice; loop only on a short write
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self._records[key] = record
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _failed(rec: dict | None) -> bool:
    return rec is not None and rec.get("error") is not None


def _supersedes(new: dict, old: dict | None) -> bool:
    """A record is kept if there is none yet for its (run, id), or if it scores one that had failed."""
    return old is None or (_failed(old) and not _failed(new))


def split_records(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """``(details, failed)``: the ``detail`` dicts of scored records (what ``Task.aggregate`` takes) and
    the failed records.

    Example:
        >>> split_records([{"id": "1", "score": 1.0, "detail": {"score": 1.0}}, {"id": "2", "error": "x"}])
        ([{'score': 1.0}], [{'id': '2', 'error': 'x'}])
    """
    details, failed = [], []
    for r in records:
        if _failed(r):
            failed.append(r)
        else:
            details.append(r.get("detail") if r.get("detail") is not None else {"score": r.get("score")})
    return details, failed


def _json_default(o: Any) -> Any:
    # numpy scalars / arrays and paths from the runner
    if hasattr(o, "item") and callable(o.item) and getattr(o, "ndim", 1) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Process ``rank`` of ``world_size`` takes items ``rank::world_size`` (the order is kept).

    Example:
        >>> shard(list(range(7)), 1, 3)
        [1, 4]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size]


def merge_shards(out_dir: str | os.PathLike) -> int:
    """Fold every ``samples.rank*.jsonl`` into ``samples.jsonl``; returns the number of records added.

    Records already in ``samples.jsonl`` (same run and id) are not added again (unless they retry a
    failed one), so merging twice, or
    after a crash half-way, is safe; shard files are deleted only after the merged file is fsynced.
    Call it in one process, after all ranks have finished writing.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> for r in (0, 1):
        ...     with SampleLog(d, rank=r) as log:
        ...         _ = log.append({"run": "k", "id": str(r)})
        >>> merge_shards(d), sorted(r["id"] for r in read_jsonl(f"{d}/samples.jsonl"))
        (2, ['0', '1'])
    """
    out = Path(out_dir)
    if not out.is_dir():
        return 0
    main = out / SAMPLES_FILE
    existing: dict[tuple[str, str], dict] = {}
    for rec in read_jsonl(main, repair=True):
        key = (str(rec.get("run")), str(rec.get("id")))
        if _supersedes(rec, existing.get(key)):
            existing[key] = rec
    shards = [p for p in _sample_files(out) if p != main]
    lines: list[bytes] = []
    for p in shards:
        for rec in read_jsonl(p):
            key = (str(rec.get("run")), str(rec.get("id")))
            if "run" in rec and "id" in rec and _supersedes(rec, existing.get(key)):
                existing[key] = rec
                lines.append((json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8"))
    if lines:
        fd = os.open(main, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            data = memoryview(b"".join(lines))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    for p in shards:
        p.unlink()
    _fsync_dir(out)
    return len(lines)


# --------------------------------------------------------------------------------------------------
# results.json
# --------------------------------------------------------------------------------------------------

RUN_FIELDS = (
    "model", "task", "policy", "budget", "layer", "n", "score", "metric", "visual_tokens_in",
    "visual_tokens_kept", "prefill_tflops", "prefill_ms", "decode_tokens_per_s", "peak_mem_mb",
)  # fmt: skip


def load_results(out_dir: str | os.PathLike) -> dict:
    """``DIR/results.json`` as ``{"runs": [...]}`` (empty when the file does not exist yet).

    Example:
        >>> import tempfile
        >>> load_results(tempfile.mkdtemp())
        {'runs': []}
    """
    p = Path(out_dir) / RESULTS_FILE
    if not p.exists() and not p.is_symlink():
        return {"runs": []}
    _regular_or_absent(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StoreError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); move it away to start afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise StoreError(f'{p} does not hold {{"runs": [...]}}; move it away to start afresh')
    return data


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _key_of(run: dict) -> str:
    if run.get("key"):
        return str(run["key"])
    return run_key(run.get("model"), run.get("task"), run.get("policy"), run.get("budget"), run.get("layer"), run.get("options"))


def write_results(out_dir: str | os.PathLike, run: dict, report: bool = False) -> dict:
    """Merge one run into ``DIR/results.json`` (atomically, under a lock other processes honour) and return
    the whole file's content; ``report=True`` also rewrites ``report.md`` from it under the same lock.

    The run's key is ``run["key"]``, or :func:`run_key` of its model, task, policy, budget, layer and
    ``options``; an earlier run with the same key is replaced where it stood, any other run is kept.
    The fields a run should carry are listed in ``RUN_FIELDS``; missing ones are written as null.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = write_results(d, {"model": "m", "task": "pope", "policy": "fastv", "budget": 64, "score": 80.0})
        >>> res = write_results(d, {"model": "m", "task": "pope", "policy": "fastv", "budget": 64, "score": 81.0})
        >>> [r["score"] for r in res["runs"]]
        [81.0]
    """
    out = out_folder(out_dir)
    with _results_lock(out):
        data = load_results(out)
        run = {**{f: None for f in RUN_FIELDS}, **run}
        run["key"] = _key_of(run)
        runs = data["runs"]
        for i, old in enumerate(runs):
            if isinstance(old, dict) and _key_of(old) == run["key"]:
                runs[i] = run
                break
        else:
            runs.append(run)
        _atomic_write(out / RESULTS_FILE, json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")
        if report:
            write_report(out, data["runs"])
    return data


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def is_baseline(run: dict) -> bool:
    """True for an unpruned run (policy None, "none", "full", "baseline" or "unpruned")."""
    p = run.get("policy")
    return p is None or (isinstance(p, str) and p.lower() in BASELINE_POLICIES)


def _sig(v: Any, digits: int = 3) -> str:
    """Significant digits: TFLOPs span 1e-6 (test-bed models) to 10 (7B models at full size)."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _num(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return str(v)


def _budget_sort(b: Any) -> tuple:
    if b is None:
        return (0, 0.0)
    if isinstance(b, (int, float)):
        return (1, float(b))
    return (2, str(b))


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s.replace("|", "\\|")


def format_report(runs: Iterable[dict], title: str = "mmprune eval") -> str:
    """The markdown report for ``runs`` (the ``runs`` list of results.json).

    One row per run, grouped by model and task with the unpruned run first; "vs full" is the score as a
    percentage of that model and task's unpruned score (same options). Accuracy (score), visual tokens,
    analytic prefill FLOPs and measured time / memory stay in separate columns.

    Example:
        >>> print(format_report([{"model": "m", "task": "pope", "policy": None, "n": 10, "score": 85.0, "metric": "f1"}]).splitlines()[4])
        | m | pope | none | – | – | 10 | f1 | 85.00 | 100.0% | – | – | – | – | – | – |
    """
    runs = [r for r in runs if isinstance(r, dict)]

    def opts_of(r: dict) -> str:
        return json.dumps(r.get("options") or {}, sort_keys=True, default=str)

    base: dict[tuple, float] = {}
    for r in runs:
        if is_baseline(r) and isinstance(r.get("score"), (int, float)):
            base.setdefault((r.get("model"), r.get("task"), opts_of(r)), float(r["score"]))
    ordered = sorted(
        runs,
        key=lambda r: (
            str(r.get("model")), str(r.get("task")), opts_of(r), not is_baseline(r), str(r.get("policy")),
            _budget_sort(r.get("budget")), _budget_sort(r.get("layer")),
        ),
    )
    head = ["model", "task", "policy", "budget", "layer", "n", "metric", "score", "vs full",
            "visual tokens in", "visual tokens kept", "prefill TFLOPs", "prefill ms", "decode tok/s", "peak MB"]  # fmt: skip
    any_failed = any(r.get("failed") for r in ordered)
    if any_failed:
        head.append("failed")
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in ordered:
        score = r.get("score")
        b = base.get((r.get("model"), r.get("task"), opts_of(r)))
        vs = f"{100.0 * score / b:.1f}%" if isinstance(score, (int, float)) and b else "–"
        row = [
            _cell(r.get("model")), _cell(r.get("task")), _cell(r.get("policy") or "none"), _cell(r.get("budget")),
            _cell(r.get("layer")), _num(r.get("n"), 0), _cell(r.get("metric")), _num(score, 2), vs,
            _num(r.get("visual_tokens_in"), 1), _num(r.get("visual_tokens_kept"), 1),
            _sig(r.get("prefill_tflops")), _num(r.get("prefill_ms"), 1), _num(r.get("decode_tokens_per_s"), 1),
            _num(r.get("peak_mem_mb"), 0),
        ]  # fmt: skip
        if any_failed:
            row.append(_num(r.get("failed") or 0, 0))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "score: the task's metric (percent; MME on its 0-2800 scale). vs full: score / the unpruned run's score. "
        "visual tokens: mean per sample entering / kept. prefill TFLOPs: analytic, from the config and the "
        "per-layer sequence lengths. prefill ms, decode tok/s, peak MB: measured.",
    ]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, runs: Iterable[dict] | None = None, title: str = "mmprune eval") -> Path:
    """Write ``DIR/report.md`` from ``runs`` (default: the runs in ``DIR/results.json``); returns its path.

    Example:
        >>> import tempfile
        >>> write_report(tempfile.mkdtemp(), []).name
        'report.md'
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if runs is None:
        runs = load_results(out)["runs"]
    path = out / REPORT_FILE
    _atomic_write(path, format_report(runs, title))
    return path
