"""The ``mmprune`` console script. Argument parsing imports nothing heavy, so ``--help`` is instant.

Example:
    $ mmprune policies
"""

from __future__ import annotations

import argparse
import sys


def _policies_table() -> str:
    from .policies import get_policy, policies

    rows = [("name", "stages", "signal", "count", "paper")]
    for name in policies():
        cls = get_policy(name)
        stage = ",".join({"pre": "pre-LLM", "llm": "in-LLM"}[s] for s in cls.stages)
        if cls.default_layer is not None:
            stage += f" (default layer {cls.default_layer})"
        rows.append((name, stage, ",".join(cls.signals) or "-", "adaptive" if cls.adaptive else "fixed",
                     cls.paper or cls.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _code_ref(url: str) -> tuple[str, str]:
    """``https://github.com/OWNER/NAME/tree/SHA`` -> ``("OWNER/NAME", short sha)``."""
    parts = url.split("/")
    return f"{parts[3]}/{parts[4]}", parts[-1][:7]


def _policies_markdown(docs: str | None = None) -> str:
    """The README's policy table: one row per registered policy, links to its paper and to the official code
    its default is proven against (``tests/test_faithful.py``); with ``docs`` (a page), each name links to its
    section there."""
    from .policies import get_policy, policies

    def link(text, url):
        return f"[{text}]({url})" if url else text

    lines = ["| policy | method | default stage | count | paper | official code |", "|---|---|---|---|---|---|"]
    for name in policies():
        cls = get_policy(name)
        anchor = "".join(c for c in name if c.isalnum() or c in "_-")  # GitHub's heading anchor of `name`
        label = link(f"`{name}`", docs and f"{docs}#{anchor}")
        if cls.code_url:
            repo, sha = _code_ref(cls.code_url)
            code = link(f"{repo.split('/')[1]}@{sha}", cls.code_url)
        else:
            code = "-"
        lines.append(f"| {label} | {cls.summary} | {cls.where} | {'adaptive' if cls.adaptive else 'fixed'} | "
                     f"{link(cls.paper, cls.paper_url) if cls.paper else '-'} | {code} |")
    return "\n".join(lines)


def _tasks_table() -> str:
    try:
        from .eval.tasks import list_tasks
    except ImportError:
        return "no tasks registered yet"
    rows = [("name", "modality", "metric", "data layout")] + [tuple(str(c) for c in r) for r in list_tasks()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]) for r in rows)


# Subcommands implemented in their own modules. Each exposes ``HELP``, ``add_arguments(parser)`` (argparse
# only: importing it must stay light, so ``mmprune --help`` never loads torch) and ``run(args) -> int``.
_COMMANDS = {
    "eval": "mmprune.eval.command",
    "sweep": "mmprune.eval.sweep_command",
    "show": "mmprune.eval.show_command",
    "bench": "mmprune.bench.command",
}


def _command_modules():
    import importlib

    out = {}
    for name, path in _COMMANDS.items():
        try:
            out[name] = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name is None or not path.startswith(e.name):
                raise  # a real missing dependency, not a command that is not built yet
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmprune",
        description="Token-efficiency plugin for vision-language models: wrap any supported Hugging Face VLM "
        "with a merging / pruning / pre-fusion policy and measure what it costs and gains.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _command_modules().items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    pol = sub.add_parser("policies", help="list the registered policies (name, stages, signal, count, paper)")
    pol.add_argument("--markdown", action="store_true",
                     help="print the README's table instead (method, default stage, paper and official code links)")
    sub.add_parser("tasks", help="list the evaluation tasks (name, modality, metric, data layout)")
    demo = sub.add_parser("demo", help="wrap a tiny random model of each family and print what the policy kept")
    demo.add_argument("--policy", default="fastv")
    demo.add_argument("--budget", default="0.25")
    demo.add_argument("--layer", type=int, default=None)
    return p


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "policies":
            print(_policies_markdown() if args.markdown else _policies_table())
        elif args.command == "tasks":
            print(_tasks_table())
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.policy, _number(args.budget), args.layer)
        elif args.command in _COMMANDS:
            return int(_command_modules()[args.command].run(args) or 0)
        else:
            parser.print_help()
        return 0
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"mmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmprune: interrupted; finished samples are saved (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
