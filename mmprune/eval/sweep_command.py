"""``mmprune sweep``: every policy x budget plus the unpruned reference once; one table, one Pareto plot.

Example:
    $ mmprune sweep --model testbed-llava --task shapes --policies uniform,random,fastv --budgets 0.5,0.25,0.1 --out runs/sweep
"""

from __future__ import annotations

import argparse

from .command import add_common, number

HELP = "run policies x budgets (+ the unpruned reference once) and write results, report and pareto.png"


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--policies", type=_list, required=True, help="comma-separated policy names")
    p.add_argument("--budgets", type=_list, required=True, help="comma-separated budgets, e.g. 0.5,0.25,0.1 or 64,32")


def sweep_plan(policies: list[str], budgets: list) -> list[tuple[str, float | int]]:
    """``(policy, budget)`` pairs of a sweep: the unpruned reference once, then every policy x budget.

    Example:
        >>> sweep_plan(["none", "fastv"], [0.5, 0.25])
        [('none', 1.0), ('fastv', 0.5), ('fastv', 0.25)]
    """
    return [("none", 1.0)] + [(p, b) for p in policies if p != "none" for b in budgets]


def run(args) -> int:
    from .command import config_from, print_run
    from .plots import pareto_plot
    from .runner import load_model, run_eval, validate
    from .store import load_results, out_folder, write_report

    try:
        budgets = [number(b) for b in args.budgets]
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--budgets: {e}; expected numbers such as 0.5,0.25 or 64,32") from None
    plan = sweep_plan(args.policies, budgets)
    for pol, b in plan:  # fail fast on any bad combination before loading the model
        validate(config_from(args, pol, b))
    out_folder(args.out)
    load_results(args.out)  # a corrupt results.json: said now, before any sample runs
    model, processor = load_model(args.model, args.device, args.dtype)
    for pol, b in plan:
        print_run(run_eval(config_from(args, pol, b), model=model, processor=processor))
    all_runs = load_results(args.out)["runs"]
    runs = [r for r in all_runs if r.get("model") == args.model and r.get("task") == args.task]
    write_report(args.out, all_runs)
    png = pareto_plot(runs, f"{args.out}/pareto.png", title=f"{args.model} on {args.task}")
    print(f"results: {args.out}/results.json, report: {args.out}/report.md, plot: {png}")
    return 0
