"""Every script in examples/ runs, as a user would run it, with the checkpoint swapped for the shipped test-bed
(and the benchmark folder for a small one written here), so the examples cannot rot."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args, tmp_path, **env):
    # the console script lives beside this interpreter; the scripts call `mmprune` and `python` by name
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", **env}
    r = subprocess.run(args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_every_example_is_tested():
    tested = {"quickstart.py", "wrap_checkpoint.py", "show_policies.sh", "eval_local_benchmark.sh", "bench_policy.sh"}
    assert {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")} == tested


def test_quickstart(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "quickstart.py")], tmp_path)
    assert "sample 1: kept visual tokens" in out


def test_wrap_checkpoint(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "wrap_checkpoint.py"), "--model", "testbed-llava", "--policy", "fastv"],
               tmp_path)
    assert "fastv kept 16 of 64 visual tokens" in out


def test_show_policies(tmp_path):
    out = _run(["bash", str(EXAMPLES / "show_policies.sh")], tmp_path, MODEL="testbed-llava", OUT=str(tmp_path / "s"))
    for policy in ("uniform", "fastv", "visionzip", "divprune"):
        assert (tmp_path / "s" / f"{policy}.png").stat().st_size > 1000, out


def test_eval_local_benchmark(tmp_path):
    """POPE in its Hugging Face layout (a parquet shard), unpruned and pruned runs side by side in one folder."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (224, 224), colour).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": f"{colour}.png"}

    data = tmp_path / "POPE" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({
        "question_id": ["1", "2", "3"],
        "question": ["Is there a star in the image?", "Is there a circle in the image?", "Is there a cat in the image?"],
        "answer": ["yes", "no", "no"],
        "category": ["adversarial"] * 3,
        "image": [png("red"), png("green"), png("blue")],
    }), data / "test-00000-of-00001.parquet")  # fmt: skip
    _run(["bash", str(EXAMPLES / "eval_local_benchmark.sh")], tmp_path, MODEL="testbed-llava",
         DATA=str(tmp_path / "POPE"), LIMIT="3", OUT=str(tmp_path / "runs"))
    runs = json.loads((tmp_path / "runs" / "results.json").read_text())["runs"]
    assert sorted(r["policy"] for r in runs) == ["none", "visionzip"]
    assert all(r["n"] == 3 for r in runs)


def test_bench_policy(tmp_path):
    out = _run(["bash", str(EXAMPLES / "bench_policy.sh")], tmp_path, SHRINK="16", REPEATS="1")
    assert "oracle_efficiency" in out and "visionzip@0.25" in out


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.sh")))
def test_shell_examples_are_strict(script):
    """A failing command must fail the script (and these tests), not scroll past."""
    assert "set -euo pipefail" in (EXAMPLES / script).read_text()
