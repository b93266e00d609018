"""Measured speed vs the FLOPs ideal: the README's performance table and plot.

For each architecture, one process builds the (shrunk) published config with random weights and times the
unpruned model and every policy x budget (plus FastV's eager-attention reference at each budget) round-robin
on identical inputs (``mmprune.bench.runner.run_bench``), so every ratio compares runs from the same rounds.

    python benchmarks/bench_speed.py --threads 1             # CPU: llava-1.5-7b and qwen2-vl-7b at --shrink 8
    python benchmarks/bench_speed.py --device cuda --shrink 1 --repeats 10    # GPU rows (published sizes, bf16)

On a shared machine pass ``--threads 1``: with 2 OpenMP threads on 2 busy cores, rounds here took up to 10x
longer at random (load 3-5 from other processes), so medians stopped meaning anything; one thread keeps the
ratios stable (CPU-time efficiency is recorded next to wall-clock as a cross-check).

Writes ``benchmarks/results/speed_<device>.json`` (everything, incl. per-round samples and machine load),
``speed_<device>.md`` (the table) and ``speed_<device>.png`` (measured vs ideal speedup).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

POLICIES = ("none", "uniform", "random", "fastv")
BUDGETS = (0.5, 0.25, 0.1)


def variants(policies, budgets, layer, eager: bool):
    from mmprune.bench.runner import Variant

    out = []
    for p in policies:
        if p == "none":  # the identity ignores the budget: one row, the pure wrap overhead
            out.append(Variant("none", 1.0))
            continue
        for b in budgets:
            out.append(Variant(p, b, layer if p == "fastv" else None))
    if eager:
        out += [Variant(None, b, layer, baseline="eager-fastv") for b in budgets]
    return out


def _f(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _oracle(v: dict) -> str:
    ms = v.get("oracle_ms")
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    return f"{ms:.1f} ({_f(v['oracle_efficiency'], '.2f')})"


def table(results: list[dict]) -> str:
    lines = []
    for res in results:
        s, full = res["setup"], res["full"]
        lines.append(f"**{s['arch']}** (shrink {s['shrink']}: {s['text_layers']} layers x {s['text_hidden']}), "
                     f"{s['device']} {s['dtype']}, {s['threads']} threads, batch {s['batch_size']}, "
                     f"{s['inputs']['seq_len']} tokens ({s['inputs']['visual_tokens']} visual), {s['new_tokens']} new "
                     f"tokens, median of {s['repeats']}; load avg before/after {s['load_before']} / {s['load_avg']}; "
                     f"unpruned prefill {full['prefill_ms']:.1f} ms, {full['decode_tokens_per_s']:.1f} tok/s, "
                     f"{full['prefill_tflops'] * 1e3:.2f} GFLOPs")
        lines.append("")
        lines.append("| policy | budget | stage | visual tok | prefill ms | speedup | ideal | efficiency | "
                     "LLM speedup / ideal (eff.) | CPU-time eff. | oracle ms (eff.) | scoring ovh | select ovh | decode tok/s | "
                     "peak MB (+delta) | vs eager-fastv |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        eager = {v["budget"]: v for v in res["variants"].values() if v["baseline"] == "eager-fastv"}
        for v in res["variants"].values():
            stage = "pre-LLM" if v["layer"] is None else f"layer {v['layer']}"
            label = "eager-fastv (ref.)" if v["baseline"] else v["policy"]
            vs = ""
            if v["policy"] == "fastv" and not v["baseline"] and v["budget"] in eager:
                vs = f"{eager[v['budget']]['prefill_ms'] / v['prefill_ms']:.2f}x faster"
            lines.append(
                f"| {label} | {v['budget']} | {stage} | {v['visual_tokens']} | {v['prefill_ms']:.1f} | "
                f"{v['speedup']:.2f}x | {v['ideal_speedup']:.2f}x | {_f(v['efficiency'], '.2f')} | "
                f"{v['llm_speedup']:.2f}x / {v['llm_ideal_speedup']:.2f}x ({_f(v['llm_efficiency'], '.2f')}) | "
                f"{_f(v['efficiency_cpu_time'], '.2f') if s['device'] == 'cpu' else '-'} | "
                f"{_oracle(v)} | "
                f"{100 * v['scoring_overhead']:.2f}% | {100 * v['selection_overhead']:.2f}% | "
                f"{_f(v['decode_tokens_per_s'], '.1f')} | {_f(v['peak_mem_mb'], '.0f')} "
                f"(+{_f(v['peak_mem_delta_mb'], '.0f')}) | {vs} |")
        lines.append("")
    lines.append("speedup = unpruned / pruned prefill time (same rounds); ideal = unpruned / pruned analytic prefill "
                 "FLOPs (vision tower + projector + decoder + 1 row of logits); efficiency = speedup / ideal; "
                 "LLM columns: the same for the language model alone (its input to its output, mmprune's hooks "
                 "included, vs decoder + lm_head FLOPs); CPU-time eff. = the same ratio from process CPU time "
                 "(load-robust at 1 thread); oracle = the unwrapped model cut to the row's per-layer token counts "
                 "(mmprune.bench.oracle), eff. = oracle / pruned prefill time (1.0: mmprune's own path is free); "
                 "scoring ovh = time in the attention-signal hook / unpruned prefill; select ovh = time in "
                 "policy.select / unpruned prefill. Peak memory: sampled RSS on CPU (see mmprune.efficiency).")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    markers = {"none": "o", "uniform": "s", "random": "^", "fastv": "D", "eager-fastv": "x"}
    for ax, res in zip(axes[0], results):
        top = 1.0
        for p in list(POLICIES) + ["eager-fastv"]:
            pts = [v for v in res["variants"].values() if (v["baseline"] or v["policy"]) == p]
            if not pts:
                continue
            xs = [v["ideal_speedup"] for v in pts]
            ys = [v["speedup"] for v in pts]
            top = max(top, *xs, *ys)
            ax.scatter(xs, ys, marker=markers.get(p, "o"), label=p, s=40)
            for v, x, y in zip(pts, xs, ys):
                ax.annotate(str(v["budget"]), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        lim = top * 1.1
        ax.plot([0, lim], [0, lim], "k--", lw=0.8, label="ideal (efficiency 1)")
        ax.plot([0, lim], [0, 0.9 * lim], "k:", lw=0.8, label="efficiency 0.9")
        s = res["setup"]
        ax.set(xlim=(0, lim), ylim=(0, lim), xlabel="ideal speedup (prefill FLOPs)", ylabel="measured prefill speedup",
               title=f"{s['arch']} /{s['shrink']} on {s['device']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="llava-1.5-7b,qwen2-vl-7b")
    ap.add_argument("--shrink", type=int, default=8)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    ap.add_argument("--layer", type=int, default=None, help="fastv layer (default: the policy's, 2)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager-fastv reference rows")
    ap.add_argument("--oracle", action="store_true",
                    help="also time each policy row's oracle (the unwrapped model cut to its per-layer token counts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default=None, help="file suffix (default: the device type)")
    ap.add_argument("--replot", action="store_true", help="only rebuild the .md and .png from the saved .json")
    ap.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    tag = args.tag or ("cuda" if args.device.startswith("cuda") else "cpu")
    if args.replot:
        results = json.loads((out / f"speed_{tag}.json").read_text())
        write_reports(results, out, tag)
        return

    import torch

    from mmprune.bench.runner import run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    archs = args.archs.split(",")
    if len(archs) > 1:
        # One process per architecture, so allocator state and cached kernels of one model never carry over
        # into the next one's timed rounds.
        import subprocess

        results = []
        for arch in archs:
            part = f"{tag}.{arch}"
            cmd = [sys.executable, __file__, *_forward(sys.argv[1:]), "--archs", arch, "--tag", part, "--no-report"]
            subprocess.run(cmd, check=True)
            results += json.loads((out / f"speed_{part}.json").read_text())
            (out / f"speed_{part}.json").unlink()
        (out / f"speed_{tag}.json").write_text(json.dumps(results, indent=1, default=str))
        write_reports(results, out, tag)
        return
    budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    vs = variants(args.policies.split(","), budgets, args.layer, not args.no_eager)
    arch = archs[0]
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    res = run_bench(arch, variants=vs, shrink=args.shrink, batch_size=args.batch_size,
                    prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, device=args.device,
                    dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, oracle=args.oracle,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    res["setup"]["load_before"] = load0
    res["setup"]["wall_s"] = round(time.perf_counter() - t0, 1)
    results = [res]
    (out / f"speed_{tag}.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.no_report:
        write_reports(results, out, tag)


def _forward(argv: list[str]) -> list[str]:
    """The command line minus --archs/--tag (the parent sets them per child)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--archs", "--tag"):
            skip = True
            continue
        if a.startswith(("--archs=", "--tag=")):
            continue
        out.append(a)
    return out


def write_reports(results: list[dict], out: Path, tag: str) -> None:
    md = table(results)
    (out / f"speed_{tag}.md").write_text(md + "\n")
    try:
        plot(results, out / f"speed_{tag}.png")
    except ImportError as e:  # matplotlib is optional ("plots" extra); the table and JSON are written anyway
        print(f"no plot ({e}); rerun with --replot where matplotlib is installed", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
