"""README.md and docs/ stay true of the code: generated tables are current, every command's flags exist, the
quickstart runs (on the test-bed instead of the download), links resolve, and nothing speaks of the machine the
project was built on."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_readme_opens_with_the_two_commands():
    """The project's contract: the main job on the test-bed and the test suite, the first code block, verbatim;
    `.ci/run` runs exactly the second."""
    first = _blocks(README.read_text(), "bash")[0].strip().splitlines()
    assert first == [
        "pip install -e . && mmprune sweep --model testbed-llava --task shapes --policies uniform,random,fastv,"
        "visionzip --budgets 0.25 --limit 100 --out runs/testbed",
        'pip install -e ".[dev]" && python -m pytest -q',
    ]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith(first[1])


def test_policy_pages_are_generated_from_the_classes():
    gen = _load(ROOT / "docs" / "make_policies.py", "make_policies")
    assert (ROOT / "docs" / "policies.md").read_text() == gen.render(), "run python docs/make_policies.py"
    assert README.read_text() == gen.readme_with_table(), "run python docs/make_policies.py"


def test_policy_metadata_links():
    """Every policy says where it runs; paper links are arXiv abstracts; official code is a GitHub tree pinned to
    the full commit that tests/test_faithful.py cites for it."""
    from mmprune.policies import get_policy, policies

    faithful = (ROOT / "tests" / "test_faithful.py").read_text()
    for name in policies():
        cls = get_policy(name)
        assert cls.where and cls.summary, name
        assert not cls.paper_url or re.fullmatch(r"https://arxiv\.org/abs/\d{4}\.\d{5}", cls.paper_url), name
        if cls.code_url:
            m = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)/tree/([0-9a-f]{40})", cls.code_url)
            assert m, cls.code_url
            assert f"{m.group(1)}/{m.group(2)}" in faithful and m.group(3) in faithful, name


def test_testbed_tables_match_the_recorded_sweep():
    sweep = _load(ROOT / "benchmarks" / "testbed_sweep.py", "testbed_sweep")
    record = json.loads((ROOT / "benchmarks/results/testbed_sweep.json").read_text())
    runs = sweep.runs_from_record(record)

    def between(text, start, end):
        return text.split(start, 1)[1].split(end, 1)[0].strip()

    assert between(README.read_text(), sweep.SHORT_START, sweep.SHORT_END) == sweep.short_table(runs)
    full = between((ROOT / "docs" / "testbed.md").read_text(), sweep.MARK_START, sweep.MARK_END)
    assert full == sweep.table(runs, record["budgets"])


def _commands(text: str) -> list[str]:
    """Shell commands in a page: lines of ```bash blocks (continuations joined) and inline `mmprune ...` spans."""
    out = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            out += [part.strip() for part in line.split("&&")]
    out += re.findall(r"`(mmprune [a-z]+[^`]*)`", text.replace("\n", " "))
    return [c.split("  #")[0].strip() for c in out if c.strip()]


def _flags(cmd: str) -> list[str]:
    try:
        words = shlex.split(cmd)
    except ValueError:
        words = cmd.split()
    return [w.split("=")[0] for w in words if w.startswith("--")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_mmprune_command_uses_existing_flags(page):
    from mmprune.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    checked = 0
    for cmd in _commands(page.read_text()):
        words = cmd.split()
        if words[0] != "mmprune" or len(words) < 2 or words[1].startswith("-"):
            continue
        assert words[1] in subs, f"{page.name}: unknown command in {cmd!r}"
        known = {o for a in subs[words[1]]._actions for o in a.option_strings}
        missing = [f for f in _flags(cmd) if f not in known]
        assert not missing, f"{page.name}: {cmd!r} uses {missing}, not in `mmprune {words[1]} --help`"
        checked += 1
    if page == README:
        assert checked >= 8


SCRIPTS = {  # the scripts the pages tell readers to run, and how to ask each for its flags
    "benchmarks/bench_speed.py": [sys.executable, "benchmarks/bench_speed.py", "--help"],
    "benchmarks/testbed_sweep.py": [sys.executable, "benchmarks/testbed_sweep.py", "--help"],
    "benchmarks/sync_audit.py": [sys.executable, "benchmarks/sync_audit.py", "--help"],
    "mmprune.testbed.train": [sys.executable, "-m", "mmprune.testbed.train", "--help"],
    "docs/make_policies.py": None,  # --check only
    "examples/wrap_checkpoint.py": [sys.executable, "examples/wrap_checkpoint.py", "--help"],
}


def test_every_script_command_uses_existing_flags():
    helps: dict[str, str] = {}
    for page in PAGES:
        for cmd in _commands(page.read_text()):
            words = cmd.split()
            if words[0] != "python" or len(words) < 2:
                continue
            script = words[2] if words[1] == "-m" else words[1]
            if script in ("pytest", "lmms_eval"):  # lmms_eval's flags: tests/test_lmms_eval_plugin.py runs it
                continue
            assert script in SCRIPTS, f"{page.name}: {cmd!r} runs a script this test does not know"
            if SCRIPTS[script] is None:
                assert set(_flags(cmd)) <= {"--check"}, cmd
                continue
            if script not in helps:
                helps[script] = subprocess.run(SCRIPTS[script], cwd=ROOT, capture_output=True, text=True,
                                               timeout=120, check=True).stdout
            missing = [f for f in _flags(cmd) if f not in helps[script]]
            assert not missing, f"{page.name}: {cmd!r} uses {missing}, not in {script}'s --help"
    assert helps


def test_python_blocks_compile():
    for page in PAGES:
        for i, block in enumerate(_blocks(page.read_text(), "python")):
            compile(block, f"{page.name}[python block {i}]", "exec")


def test_readme_quickstart_runs_on_the_testbed(tmp_path, monkeypatch):
    """The quickstart verbatim, with the checkpoint id swapped for the shipped test-bed folder and cat.jpg drawn."""
    from PIL import Image

    from mmprune.testbed.tasks import testbed_model_path

    code = next(b for b in _blocks(README.read_text(), "python") if "from_pretrained" in b)
    assert '"llava-hf/llava-1.5-7b-hf"' in code and '"cat.jpg"' in code
    Image.new("RGB", (224, 224), "red").save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    code = code.replace('"llava-hf/llava-1.5-7b-hf"', repr(str(testbed_model_path("testbed-llava"))))
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    import mmprune

    assert scope["out"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert not mmprune.is_wrapped(scope["model"])  # unwrapped at the end


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_no_talk_of_the_build_machine():
    pattern = re.compile(r"this workplace|seen here|this machine|this session|the issue's|issue \d+", re.I)
    for f in [*PAGES, ROOT / ".ci" / "run", ROOT / "pyproject.toml", *sorted((ROOT / "examples").iterdir())]:
        hits = [line for line in f.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{f.name}: {hits}"
