"""Issue 25, part 3: lmms-eval runs a pruned model through the ``mmprune`` plugin (``--model mmprune
--model_args base=<lmms-eval model>,...``), end to end with the real lmms-eval package on a tiny local model and
a local task (``--include_path``), single process and ``accelerate launch`` with two. Skipped without lmms-eval
(``pip install 'mmprune[lmms]'``)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (pip install 'mmprune[lmms]')")

UTILS = '''
import io
from PIL import Image

def doc_to_visual(doc):
    img = doc["image"]
    if isinstance(img, dict):
        img = Image.open(io.BytesIO(img["bytes"]))
    return [img.convert("RGB")]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."

def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from mmprune.testbed.vocab import build_llava_processor, build_testbed_model

    d = tmp_path_factory.mktemp("lmms")
    proc = build_llava_processor(d / "model", image_size=64, patch_size=16)
    build_testbed_model("llava", proc.tokenizer, image_size=64, text_layers=2, vision_layers=2, text_width=64,
                        text_mlp=128, vision_width=32, text_heads=2, text_kv_heads=1, vision_heads=2).save_pretrained(d / "model")
    images = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    pq.write_table(pa.table({"question_id": [str(i) for i in range(6)], "question": ["is there a star in the image?"] * 6,
                             "answer": ["yes", "no"] * 3, "image": images}), d / "data.parquet")
    (d / "tasks").mkdir()
    (d / "tasks" / "utils.py").write_text(UTILS)
    (d / "tasks" / "local_pope.yaml").write_text(
        f"task: local_pope\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.parquet'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\ngeneration_kwargs:\n  max_new_tokens: 3\n"
        "  do_sample: false\nprocess_results: !function utils.process_results\nmetric_list:\n  - metric: exact_match\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    return d


def _run(d: Path, out: str, model: str, model_args: str, procs: int = 1) -> list:
    env = {**os.environ, "HF_HOME": str(d / "hf"), "HF_DATASETS_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m"] if procs > 1 else [sys.executable, "-m"]
    cmd = [*launch, "lmms_eval", "--model", model, "--model_args", f"pretrained={d / 'model'},dtype=float32,device_map=cpu,{model_args}",
           "--tasks", "local_pope", "--include_path", str(d / "tasks"), "--batch_size", "1", "--device", "cpu",
           "--output_path", str(d / out), "--log_samples"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    samples = list((d / out).glob("*/*_samples_local_pope.jsonl"))
    assert p.returncode == 0 and samples, p.stderr[-3000:]
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def _answers(rows: list) -> list:
    return [r["filtered_resps"] for r in rows]


def test_policy_none_answers_as_lmms_evals_own_model(setup):
    plain = _answers(_run(setup, "plain", "llava_hf", ""))
    assert _answers(_run(setup, "none", "mmprune", "base=llava_hf,policy=none")) == plain


def test_pruned_run_logs_its_kept_tokens_and_two_processes_agree(setup):
    log = setup / "kept.jsonl"
    one = _run(setup, "one", "mmprune", f"base=llava_hf,policy=uniform,budget=0.5,log_path={log}")
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in lines) == list(range(6))
    assert all(r["task"] == "local_pope" and r["policy"] == "uniform" and r["budget"] == 0.5 for r in lines)
    assert all(r["visual_tokens_in"] == 16 and r["visual_tokens_kept"] == 8 for r in lines)
    # lmms-eval's own sample log carries them too (in each sample's token_counts), beside its output count
    want = {"policy": "uniform", "budget": 0.5, "visual_tokens_in": 16, "visual_tokens_kept": 8}
    assert all(r["token_counts"][0]["mmprune"] == want and r["token_counts"][0]["output_tokens"] >= 1 for r in one)
    two = _run(setup, "two", "mmprune", "base=llava_hf,policy=uniform,budget=0.5", procs=2)
    assert _answers(two) == _answers(one) and [r["token_counts"] for r in two] == [r["token_counts"] for r in one]
