"""Pareto plot of a sweep: score vs visual tokens kept, vs prefill TFLOPs and vs measured prefill time, one line
per policy (the time panel only when the runs carry ``prefill_ms``).

Example:
    >>> runs = [{"policy": "none", "budget": 1.0, "score": 90, "visual_tokens_kept": 196, "prefill_tflops": 0.2},
    ...         {"policy": "fastv", "budget": 0.25, "score": 85, "visual_tokens_kept": 49, "prefill_tflops": 0.08}]
    >>> # pareto_plot(runs, "pareto.png")
"""

from __future__ import annotations

from pathlib import Path


def pareto_plot(runs: list[dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    panels = [("visual_tokens_kept", "visual tokens kept (mean per sample)"),
              ("prefill_tflops", "prefill TFLOPs (analytic, mean per sample)")]
    if any(r.get("prefill_ms") is not None for r in runs):  # FLOPs are not time: the measured cost beside them
        panels.append(("prefill_ms", "prefill ms (measured, median per sample)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 0.1, 4.4))
    ref = [r for r in runs if r.get("policy") == "none" and r.get("score") is not None]
    by_policy: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("policy") != "none" and r.get("score") is not None:
            by_policy.setdefault(r["policy"], []).append(r)
    for ax, (key, label) in zip(axes, panels):
        for i, (name, rs) in enumerate(sorted(by_policy.items())):
            rs = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r[key])
            if rs:  # 10 colours, so the second ten policies get dashed lines and other markers
                style = {"marker": "os^Dv<>ph*"[i % 10], "linestyle": "-" if i < 10 else "--", "markersize": 5}
                ax.plot([r[key] for r in rs], [r["score"] for r in rs], label=name, **style)
        for r in ref:
            if r.get(key) is not None:
                ax.scatter([r[key]], [r["score"]], marker="*", s=160, color="black", zorder=5, label="none (unpruned)")
        ax.set_xlabel(label)
        ax.set_ylabel(f"score ({(ref or [{}])[0].get('metric') or (runs or [{}])[0].get('metric', '')})")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # the reference star appears once
    fig.legend(unique.values(), unique.keys(), loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.75 / fig.get_figwidth(), 1))  # room for the legend on the right
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
