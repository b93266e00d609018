"""`mmprune eval / sweep / show` end to end on a tiny saved model and a POPE file in its published layout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random-weight test-bed-shaped LLaVA saved with save_pretrained (tokenizer + processor included)."""
    from mmprune.testbed.vocab import build_llava_processor, build_testbed_model

    d = tmp_path_factory.mktemp("tiny_llava")
    proc = build_llava_processor(d, image_size=64, patch_size=16)
    model = build_testbed_model("llava", proc.tokenizer, image_size=64, text_layers=2, vision_layers=2,
                                text_width=64, text_mlp=128, vision_width=32, text_heads=2, text_kv_heads=1,
                                vision_heads=2)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("pope")
    n = 6
    table = pa.table({
        "question_id": [str(i) for i in range(n)],
        "question": [f"is there a {c} in the image?" for c in ["star", "circle", "square"] * 2],
        "answer": ["yes", "no"] * 3,
        "category": ["adversarial"] * n,
        "image": [{"bytes": _png(i), "path": f"{i}.png"} for i in range(n)],
    })
    pq.write_table(table, d / "test-00000-of-00001.parquet")
    return d


def _eval(tiny_dir, pope_file, out, *extra):
    return main(["eval", "--model", str(tiny_dir), "--task", "pope", "--data", str(pope_file),
                 "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", *extra])


def _records(out):
    return [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines() if line.strip()]


def test_eval_writes_results_and_resumes(tiny_dir, pope_file, tmp_path):
    out = tmp_path / "run"
    assert _eval(tiny_dir, pope_file, out, "--policy", "uniform", "--budget", "0.25", "--limit", "3") == 0
    first = _records(out)
    assert len(first) == 3
    assert _eval(tiny_dir, pope_file, out, "--policy", "uniform", "--budget", "0.25") == 0
    recs = _records(out)
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    assert recs[:3] == first  # finished samples were not recomputed
    run = json.loads((out / "results.json").read_text())["runs"][0]
    for key in ("model", "task", "policy", "budget", "layer", "n", "score", "metric", "visual_tokens_in",
                "visual_tokens_kept", "prefill_tflops", "prefill_ms", "decode_tokens_per_s", "peak_mem_mb"):
        assert key in run, key
    assert run["n"] == 6 and run["visual_tokens_in"] == 16 and run["visual_tokens_kept"] == 4
    # a fresh uninterrupted run gives the same score
    out2 = tmp_path / "run2"
    assert _eval(tiny_dir, pope_file, out2, "--policy", "uniform", "--budget", "0.25") == 0
    run2 = json.loads((out2 / "results.json").read_text())["runs"][0]
    assert run2["score"] == run["score"]
    assert [r["prediction"] for r in _records(out2)] == [r["prediction"] for r in recs]
    assert (out / "report.md").read_text().count("uniform") >= 1


def test_sweep_table_and_plot(tiny_dir, pope_file, tmp_path):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--model", str(tiny_dir), "--task", "pope", "--data", str(pope_file), "--out", str(out),
               "--policies", "uniform,random", "--budgets", "0.5,0.25", "--limit", "4", "--batch-size", "4",
               "--max-new-tokens", "3"])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["policy"], r["budget"]) for r in runs) == [
        ("none", 1.0), ("random", 0.25), ("random", 0.5), ("uniform", 0.25), ("uniform", 0.5)]
    none = next(r for r in runs if r["policy"] == "none")
    quarter = next(r for r in runs if r["policy"] == "uniform" and r["budget"] == 0.25)
    assert quarter["prefill_tflops"] < none["prefill_tflops"]
    assert (out / "pareto.png").stat().st_size > 1000


def test_show_draws_kept_tokens(tiny_dir, tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(_png(3))
    out = tmp_path / "kept.png"
    rc = main(["show", "--model", str(tiny_dir), "--image", str(img), "--prompt", "is there a star ?",
               "--policy", "uniform", "--budget", "0.25", "--out", str(out)])
    assert rc == 0
    from PIL import Image

    assert Image.open(out).size[0] >= 64


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "--model", "M", "--task", "nope"], "unknown task 'nope'; choose one of:"),
        (["eval", "--model", "M", "--task", "pope"], "needs --data"),
        (["eval", "--model", "M", "--task", "pope", "--data", "/no/such/dir"], "--data path not found"),
        (["eval", "--model", "/no/such/model", "--task", "pope", "--data", "."], "directory not found"),
        (["eval", "--model", "M", "--task", "pope", "--data", ".", "--policy", "zap"], "unknown policy 'zap'"),
        (["eval", "--model", "M", "--task", "pope", "--data", ".", "--budget", "1.5"], "budget must be"),
        (["sweep", "--model", "M", "--task", "pope", "--data", ".", "--policies", "uniform", "--budgets", "0"],
         "budget must be"),
    ],
)
def test_bad_input_is_one_line_error(args, needle):
    p = subprocess.run([sys.executable, "-m", "mmprune.cli", *args], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_help_does_not_import_torch():
    code = "import sys; from mmprune.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert out == "False"


def test_two_process_sharding_merges_into_one_file(tiny_dir, pope_file, tmp_path):
    """`accelerate launch --num_processes 2 --cpu -m mmprune.cli eval ...`: two ranks, one results file."""
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "mmprune.cli", "eval",
           "--model", str(tiny_dir), "--task", "pope", "--data", str(pope_file), "--out", str(out),
           "--policy", "random", "--budget", "0.5", "--max-new-tokens", "3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = _records(out)
    assert sorted(r["id"] for r in recs) == [str(i) for i in range(6)]
    single = tmp_path / "single"
    assert main(["eval", "--model", str(tiny_dir), "--task", "pope", "--data", str(pope_file), "--out", str(single),
                 "--policy", "random", "--budget", "0.5", "--max-new-tokens", "3"]) == 0
    a = json.loads((out / "results.json").read_text())["runs"][0]
    b = json.loads((single / "results.json").read_text())["runs"][0]
    assert a["score"] == b["score"] and a["n"] == b["n"] == 6


def test_video_eval_records_corrupt_and_missing_files_and_goes_on(tmp_path):
    """Video-MME layout on a tiny Qwen2-VL: frames through the eval's video path; bad files become failed samples."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmprune.testbed.motion import write_mp4
    from mmprune.testbed.vocab import build_qwen2vl_processor, build_testbed_model

    mdir = tmp_path / "qwen"
    proc = build_qwen2vl_processor(mdir)
    model = build_testbed_model("qwen2vl", proc.tokenizer, text_layers=2, vision_layers=1, text_width=64,
                                text_mlp=128, vision_width=32, text_heads=2, text_kv_heads=1, vision_heads=2)
    model.save_pretrained(mdir)
    data = tmp_path / "videomme"
    (data / "videos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_mp4(rng.integers(0, 255, (8, 56, 56, 3), dtype=np.uint8), data / "videos" / f"v{i}.mp4")
    (data / "videos" / "v2.mp4").write_bytes(b"not a video at all")
    n = 4  # v3.mp4 is missing
    pq.write_table(pa.table({
        "videoID": [f"v{i}" for i in range(n)], "question_id": [f"q{i}" for i in range(n)],
        "question": ["how many shapes appear ?"] * n, "options": [["A. one", "B. two", "C. three", "D. four"]] * n,
        "answer": ["A", "B", "C", "D"], "duration": ["short"] * n, "domain": ["x"] * n, "sub_category": ["y"] * n,
        "task_type": ["counting"] * n,
    }), data / "test-00000-of-00001.parquet")
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(mdir), "--task", "videomme", "--data", str(data), "--out", str(out),
               "--policy", "uniform", "--budget", "0.5", "--frames", "4", "--max-new-tokens", "2", "--batch-size", "2"])
    assert rc == 0
    recs = {r["id"]: r for r in _records(out)}
    assert set(recs) == {"q0", "q1", "q2", "q3"}
    assert recs["q0"].get("error") is None and recs["q1"].get("error") is None
    assert recs["q2"]["error"] and recs["q3"]["error"] and "\n" not in recs["q2"]["error"]
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["n"] == 2 and run["failed"] == 2
    assert run["visual_tokens_kept"] == pytest.approx(run["visual_tokens_in"] / 2, abs=1)
