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


# ----------------------------------------------------------------------------- issue 22: reliability of the CLI
def _one_line(capsys, rc, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_a_changed_setting_never_reuses_old_samples(tiny_dir, pope_file, tmp_path):
    """--max-new-tokens, --seed, --dtype and --data enter the run key (a new run), --limit does not (it
    extends a run) but aggregation counts only the samples under the current limit."""
    out = tmp_path / "run"
    assert _eval(tiny_dir, pope_file, out, "--policy", "uniform", "--budget", "0.25", "--limit", "4") == 0
    assert _eval(tiny_dir, pope_file, out, "--policy", "uniform", "--budget", "0.25", "--limit", "2") == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["n"] == 2 and runs[0]["n_total"] == 2
    assert len(_records(out)) == 4  # nothing recomputed
    base = runs[0]["key"]
    for extra in (["--max-new-tokens", "2"], ["--seed", "1"], ["--dtype", "bfloat16"]):
        args = ["--policy", "uniform", "--budget", "0.25", "--limit", "2", *extra]
        if extra[0] == "--max-new-tokens":  # _eval passes 3; a later flag wins in argparse
            args = args[:-2] + ["--max-new-tokens", "2"]
        assert _eval(tiny_dir, pope_file, out, *args) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len({r["key"] for r in runs}) == 4 and base in {r["key"] for r in runs}
    assert len(_records(out)) == 4 + 3 * 2
    settings = {r["key"]: r["settings"] for r in runs}
    assert settings[base]["max_new_tokens"] == 3 and "frames" not in settings[base]  # image task: no frames
    copy = tmp_path / "copy"
    copy.symlink_to(pope_file)
    assert _eval(tiny_dir, copy, out, "--policy", "uniform", "--budget", "0.25", "--limit", "2") == 0
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4  # the same data, resolved


def test_samples_file_that_is_a_symlink_is_refused_and_its_target_untouched(tiny_dir, pope_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (out / "samples.jsonl").symlink_to(victim)
    _one_line(capsys, _eval(tiny_dir, pope_file, out, "--limit", "1"), "symbolic link")
    assert victim.read_text() == "keep me\n"


def _write_many(out, start):
    from mmprune.eval.store import write_results

    for i in range(start, start + 40):
        write_results(out, {"model": "m", "task": "pope", "policy": "p", "budget": i, "score": float(i)}, report=True)


def test_concurrent_write_results_lose_nothing(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(tmp_path, k * 100)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted(r["budget"] for r in runs) == sorted(k * 100 + i for k in range(3) for i in range(40))
    assert (tmp_path / "report.md").read_text().count("| m | pope | p |") == 120


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this platform")
def test_image_paths_must_be_regular_files(tmp_path):
    """A FIFO would block ``open`` forever; a folder or a corrupt file is a one-line error naming the sample."""
    import os

    from mmprune.eval.tasks import Sample

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for ref, needle in ((str(fifo), "is a FIFO"), (str(tmp_path), "is a folder"),
                        (str(tmp_path / "bad.png"), "not a known image format"), (b"\x00junk", "5 bytes")):
        s = Sample(id="q7", prompt="?", answer="yes", images=[ref])
        with pytest.raises(ValueError) as e:
            _ = s.images
        assert str(e.value).startswith("sample q7: ") and needle in str(e.value) and "BytesIO" not in str(e.value)


@pytest.mark.parametrize("case", ["out_file", "out_under_file", "device_tpu", "device_meta", "budgets_abc",
                                  "samples_dir", "max_new_0", "frames_0", "frames_neg", "unsupported_model",
                                  "corrupt_results", "show_corrupt", "show_dir", "bench_cuda"])
def test_misuse_is_one_line_and_exit_2(case, tiny_dir, pope_file, tmp_path, capsys):
    import torch

    f = tmp_path / "file.txt"
    f.write_text("x")
    out = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--task", "pope", "--data", str(pope_file)]
    if case == "bench_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "samples_dir":
        (out / "samples.jsonl").mkdir(parents=True)
    if case == "corrupt_results":
        out.mkdir()
        (out / "results.json").write_text("{not json")
    bad = tmp_path / "gpt2"
    if case == "unsupported_model":
        bad.mkdir()
        (bad / "config.json").write_text('{"model_type": "gpt2"}')
    img = tmp_path / "bad.png"
    img.write_bytes(b"junk")
    show = ["show", "--model", str(tiny_dir), "--prompt", "?", "--policy", "uniform", "--budget", "0.5"]
    argv, needle = {
        "out_file": (["eval", *common, "--out", str(f)], "is not a folder"),
        "out_under_file": (["eval", *common, "--out", str(f / "sub")], "lies under"),
        "device_tpu": (["eval", *common, "--out", str(out), "--device", "tpu"], "--device 'tpu' is not supported"),
        "device_meta": (["eval", *common, "--out", str(out), "--device", "meta"], "--device 'meta' is not supported"),
        "budgets_abc": (["sweep", *common, "--out", str(out), "--policies", "uniform", "--budgets", "0.5,abc"],
                        "not a number: 'abc'"),
        "samples_dir": (["eval", *common, "--out", str(out)], "not a regular file"),
        "max_new_0": (["eval", *common, "--out", str(out), "--max-new-tokens", "0"], "--max-new-tokens must be"),
        "frames_0": (["eval", *common, "--out", str(out), "--frames", "0"], "--frames must be"),
        "frames_neg": (["eval", *common, "--out", str(out), "--frames", "-2"], "--frames must be"),
        "unsupported_model": (["eval", "--model", str(bad), "--task", "pope", "--data", str(pope_file), "--out",
                               str(out)], "unsupported model_type 'gpt2'"),
        "corrupt_results": (["eval", *common, "--out", str(out)], "is not valid JSON"),
        "show_corrupt": ([*show, "--image", str(img), "--out", str(out / "k.png")], "not a known image format"),
        "show_dir": ([*show, "--image", str(tmp_path), "--out", str(out / "k.png")], "is a folder"),
        "bench_cuda": (["bench", "--arch", "llava-1.5-7b", "--shrink", "32", "--device", "cuda"],
                       "CUDA is not available"),
    }[case]
    _one_line(capsys, main(argv), needle)
    if case == "corrupt_results":
        assert not (out / "samples.jsonl").exists()  # reported before any sample ran


def test_unsupported_model_dir_raises_unsupported_model_error(tmp_path):
    import mmprune
    from mmprune.eval.runner import resolve_model_path

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(mmprune.UnsupportedModelError, match="gpt2"):
        resolve_model_path(str(tmp_path))


# ----------------------------------------------------------------------------- issue 25: --turns 2
def test_two_turns_answer_the_task_from_the_first_turns_pruned_cache(tiny_dir, pope_file, tmp_path, capsys):
    out = tmp_path / "turns"
    assert _eval(tiny_dir, pope_file, out, "--policy", "uniform", "--budget", "0.5", "--limit", "2", "--turns", "2",
                 "--batch-size", "1") == 0
    recs = _records(out)
    assert len(recs) == 2 and all("turn1" in r and r["turn2_ms"] > 0 and r["visual_tokens_kept"] == 8 for r in recs)
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["settings"]["turns"] == 2
    assert _eval(tiny_dir, pope_file, out, "--policy", "uniform", "--budget", "0.5", "--limit", "2") == 0
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2  # one turn: a run of its own
    capsys.readouterr()
    rc = _eval(tiny_dir, pope_file, out, "--turns", "2")  # _eval asks for --batch-size 2
    _one_line(capsys, rc, "--turns 2 answers each follow-up from its own conversation's cache")
    _one_line(capsys, _eval(tiny_dir, pope_file, out, "--turns", "3"), "--turns must be 1 or 2")


def test_follow_up_equals_the_uncached_conversation(tiny_dir, pope_file):
    """The follow-up generated from turn 1's pruned cache equals generating the same conversation from scratch
    with the image (same kept tokens: uniform is question-independent)."""
    import torch

    import mmprune
    from mmprune.eval.runner import FIRST_TURN, build_batch, follow_up, load_model
    from mmprune.eval.tasks import get_task

    model, processor = load_model(str(tiny_dir), "cpu", "float32")
    task = get_task("pope")
    sample = task.load(pope_file, limit=1)[0]
    inputs, ok, _ = build_batch(processor, task, [sample], 8, torch.device("cpu"), prompt=lambda s: FIRST_TURN["image"])
    mmprune.wrap(model, "uniform", budget=0.5)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        answer, new, _, ids2 = follow_up(model, processor, task, sample, inputs, first, 5)
        scratch = model.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), pixel_values=inputs["pixel_values"],
                                 max_new_tokens=5, do_sample=False)
    mmprune.unwrap(model)
    assert ids2.shape[1] > inputs["input_ids"].shape[1] and isinstance(answer, str)
    assert torch.equal(new, scratch[:, ids2.shape[1]:])
