"""Every registered policy x budget on the built-in test-bed: the accuracy-vs-budget tables of docs/testbed.md
and README.md.

    python benchmarks/testbed_sweep.py                     # both models, shapes (+ motion), 500 items each
    python benchmarks/testbed_sweep.py --docs              # ... and rewrite the tables in docs/testbed.md, README.md
    python benchmarks/testbed_sweep.py --limit 50 --out /tmp/quick   # a quick look
    # on 2 cores, as recorded in benchmarks/results/: setups in parallel, one thread each, then tabulate
    python benchmarks/testbed_sweep.py --threads 1 --setups testbed-llava:shapes &
    python benchmarks/testbed_sweep.py --threads 1 --setups testbed-qwen2vl:shapes && \
      python benchmarks/testbed_sweep.py --threads 1 --setups testbed-qwen2vl:motion --budgets 0.25,0.1 --limit 200 &
    wait; python benchmarks/testbed_sweep.py --collect --docs

For each setup (testbed-llava on ``shapes``, testbed-qwen2vl on ``shapes`` and ``motion``) this runs what
``mmprune sweep --policies <all> --budgets 0.5,0.25,0.1`` runs -- the unpruned reference once, then
every policy at every budget, each at the policy's default layer -- with one model load, resumable
(finished runs are read back from ``OUT/<model>-<task>/results.json``). It then writes

* ``benchmarks/results/testbed_sweep.md`` / ``.json``: accuracy per policy and budget, and the two
  checks the test-bed must pass (``random`` at 10% loses >= 10 points; the best policy at 25% keeps
  >= 97% of the unpruned accuracy);
* ``benchmarks/results/testbed_<model>_<task>.png``: the Pareto plots (accuracy vs visual tokens kept
  and vs prefill TFLOPs).

Accuracy is exact match on the task's fixed 500-item test split; greedy decoding, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETUPS = (("testbed-llava", "shapes"), ("testbed-qwen2vl", "shapes"), ("testbed-qwen2vl", "motion"))
MARK_START, MARK_END = "<!-- testbed-table:start -->", "<!-- testbed-table:end -->"
SHORT_START, SHORT_END = "<!-- testbed-short:start -->", "<!-- testbed-short:end -->"
# the README's short table: the reference, the strongest policy of each kind, and the baselines
SHORT_POLICIES = ("fastv", "pyramiddrop", "dart", "cdpruner", "visionzip", "divprune", "downsample", "uniform", "random")


def run_setup(model_name: str, task: str, policies: list[str], budgets: list[float], args) -> list[dict]:
    """Run (or resume) one model x task over the plan; with ``args.collect`` only read what is there."""
    from mmprune.eval.plots import pareto_plot
    from mmprune.eval.runner import EvalConfig, load_model, run_eval, validate
    from mmprune.eval.store import load_results, write_report
    from mmprune.eval.sweep_command import sweep_plan

    out = Path(args.out) / f"{model_name}-{task}"
    plan = sweep_plan(policies, budgets)

    def cfg(policy, budget):
        return EvalConfig(
            model=model_name, task=task, policy=policy, budget=budget, limit=args.limit,
            batch_size=args.batch_size, device="cpu", out=str(out), num_frames=16, progress=False,
        )  # fmt: skip

    if not args.collect:
        for pol, b in plan:
            validate(cfg(pol, b))
        model, processor = load_model(model_name, "cpu", "auto")
        for pol, b in plan:
            t = time.time()
            r = run_eval(cfg(pol, b), model=model, processor=processor)
            print(f"{model_name} {task} {pol}@{b}: {r.get('score')} ({time.time() - t:.0f}s)", flush=True)
    wanted = set(plan)
    runs = [
        r for r in load_results(out)["runs"]
        if r.get("model") == model_name and r.get("task") == task and (r["policy"], r["budget"]) in wanted
    ]  # fmt: skip
    # one run per (policy, budget): the newest (a changed run key, e.g. new settings, leaves the old run beside it)
    runs = list({(r["policy"], r["budget"]): r for r in runs}.values())
    if not any(r["policy"] == "none" for r in runs):
        raise SystemExit(f"{out}: no unpruned run of {model_name} on {task} (run without --collect first)")
    write_report(out, runs)
    png = RESULTS / f"testbed_{model_name.removeprefix('testbed-')}_{task}.png"
    pareto_plot(runs, str(png), title=f"{model_name} on {task} ({runs[0]['n']} items, CPU fp32)")
    return runs


def checks(runs: list[dict]) -> dict:
    """The issue's two discrimination checks on one setup's runs."""
    ref = next(r["score"] for r in runs if r["policy"] == "none")
    at = {(r["policy"], r["budget"]): r["score"] for r in runs if r.get("score") is not None}
    random10 = at.get(("random", 0.1))
    best25 = max(((s, p) for (p, b), s in at.items() if b == 0.25 and p != "none"), default=(None, None))
    return {
        "unpruned": ref,
        "random_at_0.1": random10,
        "random_drop_points": None if random10 is None else round(ref - random10, 2),
        "best_at_0.25": {"policy": best25[1], "score": best25[0]},
        "best_0.25_fraction_of_unpruned": None if best25[0] is None or not ref else round(best25[0] / ref, 4),
    }


def table(all_runs: dict[tuple[str, str], list[dict]], budgets: list[float]) -> str:
    setups = list(all_runs)
    head = "| policy | " + " | ".join(f"{m.removeprefix('testbed-')} {t} @{b:g}" for m, t in setups for b in budgets) + " |"
    lines = [head, "|" + "---|" * (1 + len(setups) * len(budgets))]
    refs = {s: next(r for r in runs if r["policy"] == "none") for s, runs in all_runs.items()}
    lines.append(
        "| **none (unpruned)** | "
        + " | ".join(f"**{refs[s]['score']:.1f}**" for s in setups for _ in budgets)
        + " |"
    )
    policies = sorted({r["policy"] for runs in all_runs.values() for r in runs} - {"none"})
    for p in policies:
        cells = []
        for s in setups:
            at = {r["budget"]: r for r in all_runs[s] if r["policy"] == p}
            for b in budgets:
                r = at.get(b)
                cells.append("–" if r is None or r.get("score") is None else f"{r['score']:.1f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    setup_notes = ", ".join(
        f"{m.removeprefix('testbed-')} {t}: {refs[(m, t)]['visual_tokens_in']:.0f} visual tokens, "
        f"{refs[(m, t)]['n']} items" for m, t in setups
    )
    lines.append("")
    lines.append(
        f"Accuracy (%), exact match, on the first N items of each task's fixed 500-item test split ({setup_notes}); "
        "budget = fraction of the visual tokens kept; each policy at its default layer; greedy decoding, "
        "fp32, CPU. – = not run."
    )
    return "\n".join(lines)


def short_table(all_runs: dict[tuple[str, str], list[dict]], budgets=(0.25, 0.1)) -> str:
    """The README's table: accuracy (%) of a few policies at 25% / 10% of the visual tokens, beside the unpruned."""
    setups = list(all_runs)
    refs = {s: next(r for r in runs if r["policy"] == "none")["score"] for s, runs in all_runs.items()}
    head = "| policy | " + " | ".join(f"{m.removeprefix('testbed-')} {t} @{b:g}" for m, t in setups for b in budgets)
    lines = [head + " |", "|" + "---|" * (1 + len(setups) * len(budgets)),
             "| none (unpruned) | " + " | ".join(f"{refs[s]:.1f}" for s in setups for _ in budgets) + " |"]
    for p in SHORT_POLICIES:
        cells = []
        for s in setups:
            at = {r["budget"]: r["score"] for r in all_runs[s] if r["policy"] == p and r.get("score") is not None}
            cells += [f"{at[b]:.1f}" if b in at else "–" for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_between(path: Path, start: str, end: str, body: str) -> bool:
    """Rewrite the block between two marker comments of a Markdown file; False when the markers are missing."""
    text = path.read_text()
    if start not in text or end not in text:
        print(f"{path.name} has no {start} ... {end} block; table not written", file=sys.stderr)
        return False
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])
    return True


def runs_from_record(record: dict) -> dict[tuple[str, str], list[dict]]:
    """``testbed_sweep.json``'s runs keyed as ``table`` takes them."""
    return {tuple(k.split(":")): v for k, v in record["runs"].items()}


def kinds_table(all_runs: dict[tuple[str, str], list[dict]]) -> str:
    """Accuracy per question kind of the unpruned run, the best policy at 25% and ``random`` at 10%:
    which kinds a budget costs (counting, for one, needs every object token)."""
    lines = []
    for (m, t), runs in all_runs.items():
        c = checks(runs)
        picks = [("none", 1.0), (c["best_at_0.25"]["policy"], 0.25), ("random", 0.1)]
        rows = [r for p, b in picks for r in runs if (r["policy"], r["budget"]) == (p, b) and r.get("extra")]
        kinds = sorted({k for r in rows for k in r["extra"].get("per_kind", {})})
        if not kinds:
            continue
        lines += [f"**{m} on {t}**", "", "| run | " + " | ".join(kinds) + " |", "|" + "---|" * (1 + len(kinds))]
        for r in rows:
            pk = r["extra"]["per_kind"]
            cells = [f"{pk[k]:.0f}" if k in pk else "–" for k in kinds]
            lines.append(f"| {r['policy']} @{r['budget']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/testbed-sweep", help="per-setup run folders (resumable)")
    ap.add_argument("--budgets", default="0.5,0.25,0.1")
    ap.add_argument("--policies", default="all", help="comma-separated names, or all registered")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all 500)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--setups", default=",".join(f"{m}:{t}" for m, t in SETUPS), help="model:task,...")
    ap.add_argument("--docs", action="store_true",
                    help="rewrite the tables between the markers of docs/testbed.md (all) and README.md (short)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--collect", action="store_true",
        help="run nothing new: tabulate the runs already in OUT (e.g. setups swept by parallel processes)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from mmprune.policies import policies as registered

    policies = sorted(registered()) if args.policies == "all" else args.policies.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    setups = [tuple(s.split(":")) for s in args.setups.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    all_runs = {s: run_setup(s[0], s[1], policies, budgets, args) for s in setups}
    md = table(all_runs, budgets)
    verdict = {f"{m}:{t}": checks(runs) for (m, t), runs in all_runs.items()}
    record = {"budgets": budgets, "limit": args.limit, "checks": verdict, "runs": {f"{m}:{t}": r for (m, t), r in all_runs.items()}}
    (RESULTS / "testbed_sweep.json").write_text(json.dumps(record, indent=1, default=str))
    (RESULTS / "testbed_sweep.md").write_text(
        "# Test-bed sweep\n\n`python benchmarks/testbed_sweep.py`\n\n" + md + "\n\nChecks:\n\n```\n"
        + json.dumps(verdict, indent=1) + "\n```\n\nAccuracy (%) per question kind:\n\n" + kinds_table(all_runs)
    )
    print(md)
    print(json.dumps(verdict, indent=1))
    if args.docs:
        ok = replace_between(ROOT / "docs" / "testbed.md", MARK_START, MARK_END, md)
        if not (replace_between(ROOT / "README.md", SHORT_START, SHORT_END, short_table(all_runs)) and ok):
            return 1
    shutil.rmtree(Path(args.out) / ".tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
