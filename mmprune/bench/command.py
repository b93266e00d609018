"""``mmprune bench``: measured speed of a pruned vs unpruned published architecture, next to its FLOPs ideal.

Argument parsing imports only argparse (``mmprune --help`` stays instant); torch loads in ``run``.

Example:
    $ mmprune bench --arch llava-1.5-7b --shrink 8 --policy uniform --budget 0.25 --json
    $ mmprune bench --arch qwen2-vl-7b --policy fastv --budget 0.25 --layer 2 --baseline eager-fastv \\
          --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

HELP = ("time a pruned vs unpruned published VLM architecture (random weights) on identical inputs: prefill "
        "(TTFT), decode tokens/s, peak memory, analytic FLOPs, and speedup vs the FLOPs ideal")

# Kept here (not imported from .archs) so that parsing arguments never imports transformers.
ARCH_NAMES = ("llava-1.5-7b", "llava-next-7b", "llava-onevision-7b", "qwen2-vl-2b", "qwen2-vl-7b",
              "qwen2.5-vl-7b", "qwen3-vl-8b")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, metavar="A",
                   help=f"published architecture, built from its config with random weights: {', '.join(ARCH_NAMES)}")
    p.add_argument("--shrink", type=int, default=1, metavar="S",
                   help="divide widths and depths by S (token counts unchanged) so the shapes run on a CPU; "
                        "1 = published size (a 7B model needs ~15 GB in bf16 / 30 GB in fp32)")
    p.add_argument("--policy", default="fastv", metavar="P", help="registered policy (see `mmprune policies`); default fastv")
    p.add_argument("--budget", default="0.25", metavar="B",
                   help="float in (0, 1] = fraction of visual tokens kept, int >= 1 = tokens per image; default 0.25")
    p.add_argument("--layer", type=int, default=None, metavar="K",
                   help="decoder layer where tokens are dropped (default: the policy's own stage)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="square image side in pixels, sized as the arch's processor would (default per arch)")
    g.add_argument("--frames", type=int, default=None, metavar="F", help="one video of F frames instead of an image")
    p.add_argument("--prompt-tokens", type=int, default=64, metavar="T", help="text tokens around the image (default 64)")
    p.add_argument("--new-tokens", type=int, default=16, metavar="N", help="decoded tokens for decode tokens/s (default 16)")
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", default="auto", metavar="T",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--repeats", type=int, default=5, metavar="R", help="timed rounds after one warm-up round (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed warm-up rounds (default 1)")
    p.add_argument("--baseline", default=None, metavar="B",
                   help="also time a reference implementation at the same budget: eager-fastv (FastV reading "
                        "eager attention weights at layer K-1, as its reference code does)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice); 1 gives stable ratios on a shared machine")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--oracle", action="store_true",
                   help="also time the unwrapped model cut to the pruned run's per-layer token counts "
                        "(oracle_efficiency = oracle / pruned prefill time)")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile'd copies instead: unpruned vs pruned vs the oracle, prefill and "
                        "static-cache decode (compile time reported, not timed)")
    p.add_argument("--compile-backend", default="inductor", metavar="B",
                   help="with --compile: inductor (default), aot_eager or eager")
    p.add_argument("--compile-mode", default="default", metavar="M",
                   help="with --compile: default, reduce-overhead (CUDA graphs on a GPU) or max-autotune")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _number(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            raise ValueError(f"budget must be a float in (0, 1] (fraction kept) or an int >= 1 (tokens per image); "
                             f"got {text!r}") from None


def validate(args) -> None:
    """Raise ValueError (one line, naming what is accepted) for bad input; imports no torch."""
    if args.arch not in ARCH_NAMES:
        raise ValueError(f"unknown arch {args.arch!r}; accepted: {', '.join(ARCH_NAMES)}")
    if getattr(args, "image_size", None) is not None and getattr(args, "frames", None) is not None:
        raise ValueError("give --image-size or --frames, not both (an image or a video per sample)")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be an int >= 1; got {args.threads}")
    for name, lo in (("shrink", 1), ("batch_size", 1), ("prompt_tokens", 0), ("new_tokens", 1), ("repeats", 1),
                     ("warmup", 0)):
        v = getattr(args, name)
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= {lo}; got {v!r}")
    if args.image_size is not None and args.image_size < 28:
        raise ValueError(f"--image-size must be an int >= 28 pixels; got {args.image_size}")
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be an int >= 1; got {args.frames}")
    if args.frames is not None and not (args.arch.startswith("qwen") or args.arch.startswith("llava-onevision")):
        raise ValueError(f"--frames is accepted for video architectures only (llava-onevision-7b, qwen*); "
                         f"{args.arch} takes images (use --image-size)")
    if args.baseline not in (None, "eager-fastv"):
        raise ValueError(f"unknown baseline {args.baseline!r}; accepted: eager-fastv")
    if getattr(args, "compile", False):
        from .compiled import BACKENDS, MODES

        if args.baseline is not None:
            raise ValueError("--baseline is not timed with --compile (the compiled run compares full, pruned and oracle)")
        if args.compile_backend not in BACKENDS:
            raise ValueError(f"unknown --compile-backend {args.compile_backend!r}; accepted: {', '.join(BACKENDS)}")
        if args.compile_mode not in MODES:
            raise ValueError(f"unknown --compile-mode {args.compile_mode!r}; accepted: {', '.join(MODES)}")
    from ..config import validate_budget
    from ..policies import policies

    args.budget = validate_budget(_number(args.budget)) if isinstance(args.budget, str) else validate_budget(args.budget)
    if args.policy not in policies():
        raise ValueError(f"unknown policy {args.policy!r}; known policies: {', '.join(policies())}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"unknown device {args.device!r}; accepted: cpu, cuda, cuda:<index>")
    from ..eval.runner import DTYPES, resolve_device

    if args.device.startswith("cuda"):  # fail here, with one line, when CUDA is absent
        resolve_device(args.device)
    if args.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {args.dtype!r}; accepted: auto, float32, bfloat16, float16")


def bench(args) -> dict:
    """Run the measurement and return the JSON object ``--json`` prints."""
    from .runner import Variant, run_bench

    validate(args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "compile", False):
        from .compiled import run_compiled

        res = run_compiled(
            args.arch, policy=args.policy, budget=args.budget, layer=args.layer, shrink=args.shrink,
            batch_size=args.batch_size, image_size=args.image_size, frames=args.frames or 0,
            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, device=args.device, dtype=args.dtype,
            repeats=args.repeats, warmup=args.warmup, backend=args.compile_backend, mode=args.compile_mode,
            log=None if args.json else (lambda m: print(m, file=sys.stderr)),
        )
        return {"arch": args.arch, "shrink": args.shrink, "policy": args.policy, "budget": args.budget, **res}
    pruned = Variant(args.policy, args.budget, args.layer)
    variants = [pruned]
    base = None
    if args.baseline == "eager-fastv":
        base = Variant(None, args.budget, args.layer, baseline="eager-fastv")
        variants.append(base)
    res = run_bench(
        args.arch, variants=variants, shrink=args.shrink, batch_size=args.batch_size, image_size=args.image_size,
        frames=args.frames or 0, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
        memory=not getattr(args, "no_memory", False), oracle=bool(getattr(args, "oracle", False)),
        log=None if args.json else (lambda m: print(m, file=sys.stderr)),
    )
    p = res["variants"][pruned.name]
    out = {
        "arch": args.arch, "shrink": args.shrink, "policy": args.policy, "budget": args.budget, "layer": p["layer"],
        "setup": res["setup"], "full": res["full"], "pruned": p,
        "speedup": p["speedup"], "ideal_speedup": p["ideal_speedup"], "efficiency": p["efficiency"],
        "scoring_overhead": p["scoring_overhead"], "selection_overhead": p["selection_overhead"],
    }
    if getattr(args, "oracle", False):
        out["oracle_ms"], out["oracle_efficiency"] = p["oracle_ms"], p["oracle_efficiency"]
    if base is not None:
        b = res["variants"][base.name]
        out["eager_fastv"] = b
        out["speedup_vs_eager_fastv"] = b["prefill_ms"] / p["prefill_ms"] if p["prefill_ms"] else float("nan")
    return out


def _fmt(x, spec=".2f"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return format(x, spec)


def render(out: dict) -> str:
    """Plain-text table of a ``bench`` result."""
    s = out["setup"]
    rows = [("", "prefill ms", "decode tok/s", "peak MB (+delta)", "TFLOPs", "visual tok")]
    cols = [("full", out["full"]), (f"{out['policy']}@{out['budget']}", out["pruned"])]
    if "eager_fastv" in out:
        cols.append((f"eager-fastv@{out['budget']}", out["eager_fastv"]))
    for name, d in cols:
        rows.append((name, _fmt(d["prefill_ms"], ".1f"), _fmt(d["decode_tokens_per_s"], ".1f"),
                     f"{_fmt(d['peak_mem_mb'], '.0f')} (+{_fmt(d['peak_mem_delta_mb'], '.0f')})",
                     _fmt(d["prefill_tflops"], ".4f"), str(d["visual_tokens"])))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{out['arch']} (shrink {out['shrink']}) on {s['device']} {s['dtype']}, batch {s['batch_size']}, "
             f"{s['inputs']['seq_len']} tokens ({s['inputs']['visual_tokens']} visual), median of {s['repeats']}, "
             f"load {s['load_avg']}"]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.append(f"speedup {_fmt(out['speedup'])}x  ideal {_fmt(out['ideal_speedup'])}x  "
                 f"efficiency {_fmt(out['efficiency'])}  scoring overhead {_fmt(100 * out['scoring_overhead'], '.2f')}% "
                 f"(+ selection {_fmt(100 * out['selection_overhead'], '.2f')}%)")
    if "oracle_efficiency" in out:
        lines.append(f"oracle (unwrapped model at the same per-layer token counts) {_fmt(out['oracle_ms'], '.1f')} ms: "
                     f"oracle_efficiency {_fmt(out['oracle_efficiency'])}")
    if "speedup_vs_eager_fastv" in out:
        lines.append(f"vs eager-fastv at the same budget: {_fmt(out['speedup_vs_eager_fastv'])}x faster prefill")
    return "\n".join(lines)


def run(args) -> int:
    out = bench(args)
    if args.json:
        print(json.dumps(_finite(out), default=_json_default))
    elif "compiled" in out:
        from .compiled import render_compiled

        print(render_compiled(out))
    else:
        print(render(out))
    return 0


def _finite(o):
    """NaN / inf -> None, so the output is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)
