"""``mmprune eval``: one (model, task, policy, budget, layer) run, resumable, sharded under accelerate.

Example:
    $ mmprune eval --model testbed-llava --task shapes --policy fastv --budget 0.25 --out runs/shapes
"""

from __future__ import annotations

import argparse

HELP = "evaluate a model on a task with a policy (pruned vs unpruned, side by side in one results file)"


def number(text: str):
    """A budget or count from the command line: int if it parses as one, else float."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local save_pretrained folder, hub id, or testbed-llava / testbed-qwen2vl")
    from .tasks import LMMS_EVAL_VERSION, task_names  # light: no torch, so --help stays instant

    p.add_argument("--task", required=True, help=f"one of {', '.join(task_names())} (`mmprune tasks`: metrics and "
                   f"data layouts); prompts and scores are lmms-eval {LMMS_EVAL_VERSION}'s")
    p.add_argument("--data", default=None, help="local benchmark files in their published layout")
    p.add_argument("--layer", type=int, default=None, help="decoder layer for in-LLM policies (default: the policy's)")
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    p.add_argument("--turns", type=int, default=1, help="2: ask a generic question first and the "
                   "task's question as the follow-up, answered from the first turn's (pruned) cache (--batch-size 1)")
    p.add_argument("--out", default="runs/eval", help="output folder (re-running the same command resumes; a "
                   "changed --data, --dtype, --seed, --max-new-tokens, --frames or --turns is a new run beside it; a larger "
                   "--limit extends the run)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--policy", default="none", help="policy name (see `mmprune policies`); none = unpruned")
    p.add_argument("--budget", type=number, default=1.0, help="float in (0, 1] = fraction kept; int = tokens per image")


def config_from(args, policy: str, budget) -> object:
    from .runner import EvalConfig

    return EvalConfig(
        model=args.model, task=args.task, data=args.data, policy=policy, budget=budget, layer=args.layer,
        limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed,
        out=args.out, max_new_tokens=args.max_new_tokens, num_frames=args.frames, turns=args.turns,
    )


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_run(run: dict) -> None:
    if not run:
        return
    print(f"{run['task']} {run['policy']}@{run['budget']}: {run['metric']} {_fmt(run.get('score'), '.2f')} on "
          f"{run['n']} samples ({run['failed']} failed); visual tokens {_fmt(run['visual_tokens_kept'], '.1f')} of "
          f"{_fmt(run['visual_tokens_in'], '.1f')}; prefill {_fmt(run['prefill_tflops'], '.3g')} TFLOPs, "
          f"{_fmt(run['prefill_ms'], '.1f')} ms")


def run(args) -> int:
    from .runner import run_eval

    result = run_eval(config_from(args, args.policy, args.budget))
    print_run(result)
    print(f"results: {args.out}/results.json, report: {args.out}/report.md")
    return 0
