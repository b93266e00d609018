"""Output directory: append-only sample log, resume after interruption, shard merging, results, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmprune.eval import store as S
from mmprune.eval.tasks import Sample, get_task

# ------------------------------------------------------------------------------------------ keys


def test_run_key():
    assert S.run_key("llava", "pope", "fastv", 64, 2) == "llava|pope|fastv|64|2"
    assert S.run_key("llava", "pope") == "llava|pope|none|none|none"
    # 1 (one token) and 1.0 (the whole budget) are different runs
    assert S.run_key("m", "t", "p", 1) != S.run_key("m", "t", "p", 1.0)
    a = S.run_key("m", "t", "p", 0.5, options={"frames": 8, "seed": 0})
    assert a == S.run_key("m", "t", "p", 0.5, options={"seed": 0, "frames": 8})
    assert a != S.run_key("m", "t", "p", 0.5, options={"seed": 1, "frames": 8})
    assert S.run_key("m", "t", options={}) == S.run_key("m", "t", options=None) == S.run_key("m", "t")
    stacked = S.run_key("m", "t", ["tome", "fastv"], [0.5, 0.5], [None, 2])
    assert stacked == 'm|t|["tome","fastv"]|[0.5,0.5]|[null,2]'


# ----------------------------------------------------------------------------------- sample log


def test_append_skips_duplicates_and_survives_reopen(tmp_path):
    with S.SampleLog(tmp_path) as log:
        assert log.append(S.make_record("k", "a", prediction="yes", answer="yes", score=1.0))
        assert not log.append(S.make_record("k", "a", prediction="no", answer="yes", score=0.0))
        assert log.append(S.make_record("k2", "a", prediction="no", answer="yes", score=0.0))
        assert log.append(S.make_record("k", "b", error="video not found: b.mp4\n(extra)"))
    log = S.SampleLog(tmp_path)
    assert log.done_ids("k") == {"a", "b"}
    assert log.done_ids("k", include_failed=False) == {"a"}
    assert [r["score"] for r in log.records("k")] == [1.0, None]
    assert log.records("k")[1]["error"] == "video not found: b.mp4 (extra)"
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 - 1  # the duplicate was never written
    with pytest.raises(S.StoreError):
        log.append({"id": "x"})
    log.close()


def test_failed_sample_can_be_retried(tmp_path):
    with S.SampleLog(tmp_path) as log:
        log.append(S.make_record("k", "v1", error="video not found: v1.mp4"))
        log.append(S.make_record("k", "v2", prediction="A", score=1.0, detail={"score": 1.0}))
        assert not log.append(S.make_record("k", "v1", error="still missing"))  # same failure: not twice
    with S.SampleLog(tmp_path) as log:
        assert log.done_ids("k", include_failed=False) == {"v2"}
        assert log.append(S.make_record("k", "v1", prediction="B", score=0.0, detail={"score": 0.0}))
        assert not log.append(S.make_record("k", "v1", prediction="C", score=1.0))
    log = S.SampleLog(tmp_path)
    recs = log.records("k")
    assert [(r["id"], r["prediction"]) for r in recs] == [("v1", "B"), ("v2", "A")]
    details, failed = S.split_records(recs)
    assert details == [{"score": 0.0}, {"score": 1.0}] and failed == []
    log.close()


def test_truncated_last_line_is_cut_off_and_recomputed(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text('{"run": "k", "id": "1", "score": 1.0}\n{"run": "k", "id": "2", "sco')
    log = S.SampleLog(tmp_path)
    assert log.done_ids("k") == {"1"}
    assert p.read_text() == '{"run": "k", "id": "1", "score": 1.0}\n'
    assert log.append({"run": "k", "id": "2", "score": 0.0})
    log.close()
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["1", "2"]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text('{"run": "k", "id": "1"}\n{"run": "k", "id": "2"}')
    with S.SampleLog(tmp_path) as log:
        assert log.done_ids("k") == {"1", "2"}
        log.append({"run": "k", "id": "3"})
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["1", "2", "3"]


def test_bad_middle_line_is_skipped_with_a_warning(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text('{"run": "k", "id": "1"}\ngarbage\n{"run": "k", "id": "2"}\n')
    with pytest.warns(UserWarning, match="skipped 1"):
        recs = S.read_jsonl(p)
    assert [r["id"] for r in recs] == ["1", "2"]


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(S.StoreError, match="not a folder"):
        S.SampleLog(f)


# ------------------------------------------------------- resume gives the uninterrupted result

PREDS = ["yes", "no", "yes", "yes", "no", "no", "yes", "no", "yes", "no"]
GTS = ["yes", "yes", "yes", "no", "no", "no", "yes", "yes", "no", "no"]


def _samples():
    return [Sample(id=f"q{i}", prompt=f"Q{i}?", answer=g, meta={"category": "random"}) for i, g in enumerate(GTS)]


def _run(out, key, stop_after=None, world=(0, 1)):
    """A minimal runner loop: skip done samples, append each result, aggregate from the log."""
    task = get_task("pope")
    rank, size = world
    log = S.SampleLog(out, rank=None if size == 1 else rank)
    done = log.done_ids(key)
    computed = 0
    try:
        for s in S.shard(_samples(), rank, size):
            if s.id in done:
                continue
            if stop_after is not None and computed >= stop_after:
                raise KeyboardInterrupt
            pred = PREDS[int(s.id[1:])]
            detail = task.score(s, pred)
            log.append(S.make_record(key, s.id, prompt=s.prompt, prediction=pred, answer=s.answer,
                                     score=detail["score"], detail=detail))  # fmt: skip
            computed += 1
    finally:
        log.close()
    return computed


def _final(out, key):
    task = get_task("pope")
    log = S.SampleLog(out)
    recs = log.records(key)
    log.close()
    return len(recs), task.aggregate([r["detail"] for r in recs])


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path):
    key = S.run_key("m", "pope", "fastv", 64, 2)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run(full, key) == 10
    with pytest.raises(KeyboardInterrupt):
        _run(part, key, stop_after=4)
    # simulate dying in the middle of a write as well
    with open(part / "samples.jsonl", "a") as f:
        f.write('{"run": "' + key + '", "id": "q4", "predic')
    assert _run(part, key) == 6  # q4..q9: nothing finished is recomputed
    assert _run(part, key) == 0  # a third run has nothing left to do
    n_full, agg_full = _final(full, key)
    n_part, agg_part = _final(part, key)
    assert n_full == n_part == 10
    assert agg_full == agg_part
    # hand count: TP = q0, q2, q6 (3); FP = q3, q8 (2); FN = q1, q7 (2) -> P = R = F1 = 3/5
    assert agg_full[0] == pytest.approx(60.0) and agg_full[1] == "f1"
    ids = [json.loads(x)["id"] for x in (part / "samples.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(10))  # none lost, none duplicated


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from mmprune.eval.store import SampleLog, make_record
    # a shell's background job (nohup pytest &) inherits SIGINT ignored; Ctrl-C must reach this child
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, n = sys.argv[1], int(sys.argv[2])
    log = SampleLog(out)
    done = log.done_ids("k")
    try:
        for i in range(n):
            if str(i) in done:
                continue
            log.append(make_record("k", str(i), prediction="x" * 200, score=1.0))
            if i == 3:
                print("ready", flush=True)
            time.sleep(0.002)
    except KeyboardInterrupt:
        log.close()
        sys.exit(130)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_process_loses_nothing(tmp_path, sig):
    n = 400
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    repo = str(Path(__file__).resolve().parents[1])  # the child imports mmprune from this checkout
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(n)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=20)
    first = S.read_jsonl(tmp_path / "out" / "samples.jsonl")
    k = len(first)
    assert 4 <= k < n
    assert [r["id"] for r in first] == [str(i) for i in range(k)]  # a prefix, in order, none damaged
    # resume in-process
    subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(n)], check=True, env=env, stdout=subprocess.DEVNULL)
    ids = [r["id"] for r in S.read_jsonl(tmp_path / "out" / "samples.jsonl")]
    assert sorted(ids, key=int) == [str(i) for i in range(n)] and len(ids) == n


# --------------------------------------------------------------------------------------- shards


def test_sharded_run_merge_and_resume_with_another_world_size(tmp_path):
    key = S.run_key("m", "pope", "tome", 0.5, None)
    # two processes, each stopped after 2 samples of its shard
    for rank in (0, 1):
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, key, stop_after=2, world=(rank, 2))
    assert sorted(os.listdir(tmp_path)) == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    # resumed with three processes: every rank sees what ranks 0 and 1 finished
    computed = sum(_run(tmp_path, key, world=(r, 3)) for r in range(3))
    assert computed == 6
    assert S.merge_shards(tmp_path) == 10
    assert sorted(os.listdir(tmp_path)) == ["samples.jsonl"]
    assert S.merge_shards(tmp_path) == 0
    n, agg = _final(tmp_path, key)
    assert n == 10 and agg[0] == pytest.approx(60.0)


def test_merge_skips_records_already_merged(tmp_path):
    with S.SampleLog(tmp_path) as log:
        log.append({"run": "k", "id": "0"})
    with S.SampleLog(tmp_path, rank=0) as log:  # sees "0" as done: a fresh log would not write it
        assert not log.append({"run": "k", "id": "0"})
        log.append({"run": "k", "id": "2"})
    with open(tmp_path / "samples.rank1.jsonl", "w") as f:  # a duplicate written by hand, plus a cut line
        f.write('{"run": "k", "id": "0"}\n{"run": "k", "id": "1"}\n{"run": "k", "id": "3"')
    assert S.merge_shards(tmp_path) == 2
    assert [r["id"] for r in S.read_jsonl(tmp_path / "samples.jsonl")] == ["0", "2", "1"]
    assert S.shard(list(range(7)), 2, 3) == [2, 5]
    with pytest.raises(ValueError):
        S.shard([1], 3, 3)


# ---------------------------------------------------------------------------- results + report


def _run_row(policy, budget, score, **kw):
    return {"model": "llava", "task": "pope", "policy": policy, "budget": budget, "layer": 2 if policy == "fastv" else None,
            "n": 10, "score": score, "metric": "f1", "visual_tokens_in": 576.0, "visual_tokens_kept": budget or 576.0,
            "prefill_tflops": 3.2, "prefill_ms": 120.5, "decode_tokens_per_s": 30.25, "peak_mem_mb": 14000.0, **kw}  # fmt: skip


def test_results_merge_replaces_same_run(tmp_path):
    S.write_results(tmp_path, _run_row(None, None, 80.0))
    S.write_results(tmp_path, _run_row("fastv", 64, 50.0))
    res = S.write_results(tmp_path, _run_row("fastv", 64, 60.0))
    assert [(r["policy"], r["score"]) for r in res["runs"]] == [(None, 80.0), ("fastv", 60.0)]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == res
    assert on_disk["runs"][1]["key"] == "llava|pope|fastv|64|2"
    # an explicit key wins; other fields of the contract are present (null when missing)
    res = S.write_results(tmp_path, {"key": "custom", "model": "x", "task": "mme", "score": 1.0})
    assert res["runs"][-1]["prefill_ms"] is None and len(res["runs"]) == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_corrupt_results_file(tmp_path):
    (tmp_path / "results.json").write_text("{nope")
    with pytest.raises(S.StoreError, match="not valid JSON") as e:
        S.write_results(tmp_path, _run_row(None, None, 1.0))
    assert "\n" not in str(e.value)


def test_report_table(tmp_path):
    S.write_results(tmp_path, _run_row("fastv", 64, 60.0))
    S.write_results(tmp_path, _run_row(None, None, 80.0))
    S.write_results(tmp_path, _run_row("visionzip", 0.25, 84.0, failed=1))
    text = S.write_report(tmp_path).read_text()
    lines = text.splitlines()
    assert lines[0] == "# mmprune eval"
    assert lines[2].startswith("| model | task | policy | budget | layer | n | metric | score | vs full |")
    assert lines[2].endswith("| failed |")
    # the unpruned run comes first; "vs full" = score / 80
    assert lines[4] == "| llava | pope | none | – | – | 10 | f1 | 80.00 | 100.0% | 576.0 | 576.0 | 3.2 | 120.5 | 30.2 | 14000 | 0 |"
    assert lines[5].startswith("| llava | pope | fastv | 64 | 2 | 10 | f1 | 60.00 | 75.0% | 576.0 | 64.0 |")
    assert lines[6].startswith("| llava | pope | visionzip | 0.25 | – | 10 | f1 | 84.00 | 105.0% |")
    assert lines[6].endswith("| 1 |")
