"""``mmprune bench --compile``: compiled unpruned vs compiled pruned vs the compiled oracle (issue 20).

At batch 1 an eager 7B decoder on a GPU is launch-bound, so eager pruning gains little there; compiled (and,
with ``mode="reduce-overhead"``, CUDA-graphed) models are where fewer tokens must turn into time. Three
copies of one model are compiled with the same backend and mode: the unwrapped model, the wrapped one, and
the unwrapped one cut to the wrapped run's per-layer token counts (``OracleCut``, the floor for any engine).
Each is compiled by a warm-up call (its compile time is reported, not timed), then the three prefills are
timed in alternating rounds (medians). Decode tokens/s come from ``generate(cache_implementation="static")``
with a ``CompileConfig`` of the same backend (transformers compiles the decode step; forced on a CPU), as
``(new_tokens - 1) * batch / (t(new_tokens) - t(1))`` against the compiled unpruned model's.

Example:
    >>> # mmprune bench --arch llava-1.5-7b --shrink 8 --policy fastv --budget 0.25 --compile
"""

from __future__ import annotations

import copy
import time

import torch

from ..efficiency import full_lengths, median, prefill_flops, time_once

BACKENDS = ("inductor", "aot_eager", "eager")
MODES = ("default", "reduce-overhead", "max-autotune")


def run_compiled(arch: str, *, policy: str, budget, layer=None, shrink: int = 1, batch_size: int = 1,
                 image_size: int | None = None, frames: int = 0, prompt_tokens: int = 64, new_tokens: int = 16,
                 device: str = "cpu", dtype: str | None = None, repeats: int = 5, warmup: int = 1,
                 backend: str = "inductor", mode: str = "default", log=None) -> dict:
    """Time compiled unpruned / pruned / oracle prefills and compiled decode; see the module docstring."""
    from transformers import CompileConfig

    import mmprune

    from .archs import build_model
    from .inputs import make_bench_inputs
    from .oracle import OracleCut
    from .runner import _dtype, _placeholder_ids, _ratio, _versions

    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; accepted: {', '.join(MODES)}")
    say = log or (lambda *_: None)
    tdtype = _dtype(dtype, device)
    full = build_model(arch, shrink=shrink, dtype=tdtype, device=device)
    batch = make_bench_inputs(full, batch_size=batch_size, image_size=image_size, frames=frames,
                              prompt_tokens=prompt_tokens, seed=0)
    meta = batch.pop("_meta")
    seq_len = batch["input_ids"].shape[1]
    pruned = mmprune.wrap(copy.deepcopy(full), policy, budget=budget, layer=layer)
    with torch.inference_mode():  # the eager pruned run: its per-layer counts (oracle) and FLOPs
        eager_logits = pruned(**batch, use_cache=True, logits_to_keep=1).logits
    trace = mmprune.trace(pruned)
    counts = [list(c) for c in trace.layer_tokens]
    oracle = copy.deepcopy(full)
    OracleCut(oracle, counts, seq_len)  # installed for good on this copy

    compile_kw = {"backend": backend} if mode == "default" else {"backend": backend, "mode": mode}
    runs = {name: torch.compile(m, **compile_kw) for name, m in (("full", full), ("pruned", pruned), ("oracle", oracle))}
    models = {"full": full, "pruned": pruned, "oracle": oracle}
    rec = {name: {"prefill": [], "gen1": [], "genN": [], "compile_s": float("nan")} for name in runs}
    suppress = _placeholder_ids(full.config)
    cc = CompileConfig(fullgraph=False, **compile_kw)
    cc._compile_all_devices = True  # transformers compiles decode steps on CUDA only unless told
    gen_kw = dict(do_sample=False, suppress_tokens=suppress, pad_token_id=suppress[0] if suppress else 0,
                  cache_implementation="static", compile_config=cc)

    def prefill(name):
        return runs[name](**batch, use_cache=True, logits_to_keep=1)

    def generate(name, n):
        return models[name].generate(**batch, max_new_tokens=n, min_new_tokens=n, **gen_kw)

    with torch.inference_mode():
        for name in runs:  # compile: first calls, not timed
            t0 = time.perf_counter()
            out = prefill(name)
            if name != "oracle":
                generate(name, 2)
            rec[name]["compile_s"] = time.perf_counter() - t0
            if name == "pruned":  # the compiled pruned model computes what the eager one does
                rec[name]["max_abs_diff_vs_eager"] = float((out.logits.float() - eager_logits.float()).abs().max())
            say(f"compiled {name} ({backend}, {mode}) in {rec[name]['compile_s']:.1f}s")
        order = list(runs)
        for r in range(warmup + repeats):
            k = r % len(order)
            for name in order[k:] + order[:k]:
                _, ms = time_once(lambda name=name: prefill(name), device)
                g1 = gn = float("nan")
                if name != "oracle" and new_tokens > 1:
                    _, g1 = time_once(lambda name=name: generate(name, 1), device)
                    _, gn = time_once(lambda name=name: generate(name, new_tokens), device)
                if r >= warmup:
                    rec[name]["prefill"].append(ms)
                    rec[name]["gen1"].append(g1)
                    rec[name]["genN"].append(gn)
            say(f"round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else "") + ": "
                + ", ".join(f"{n}={d['prefill'][-1]:.1f}ms" for n, d in rec.items() if d["prefill"]))

    n_layers = full.config.get_text_config().num_hidden_layers
    fl_full = prefill_flops(full, full_lengths(batch["attention_mask"], n_layers), batch)
    fl_pruned = prefill_flops(full, trace.layer_tokens, {**batch, **(trace.tower_inputs or {})})
    res = {}
    for name, d in rec.items():
        dec_ms = median([b - a for a, b in zip(d["gen1"], d["genN"])]) if d["gen1"] else float("nan")
        res[name] = {
            "prefill_ms": median(d["prefill"]),
            "prefill_ms_samples": [round(x, 3) for x in d["prefill"]],
            "decode_tokens_per_s": (batch_size * (new_tokens - 1) / (dec_ms / 1e3)
                                    if new_tokens > 1 and dec_ms == dec_ms and dec_ms > 0 else float("nan")),
            "compile_s": round(d["compile_s"], 2),
            **({"max_abs_diff_vs_eager": d["max_abs_diff_vs_eager"]} if "max_abs_diff_vs_eager" in d else {}),
        }
    speedup = _ratio(res["full"]["prefill_ms"], res["pruned"]["prefill_ms"])
    ideal = _ratio(fl_full.tflops, fl_pruned.tflops)
    setup = dict(arch=arch, shrink=shrink, device=str(device), dtype=str(tdtype).replace("torch.", ""),
                 batch_size=batch_size, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
                 warmup=warmup, backend=backend, mode=mode, threads=torch.get_num_threads(), torch=torch.__version__,
                 **_versions(), inputs=meta,
                 gpu=torch.cuda.get_device_name() if str(device).startswith("cuda") else None)
    return {
        "setup": setup, "compiled": res, "speedup": speedup, "ideal_speedup": ideal,
        "efficiency": _ratio(speedup, ideal), "oracle_ms": res["oracle"]["prefill_ms"],
        "oracle_efficiency": _ratio(res["oracle"]["prefill_ms"], res["pruned"]["prefill_ms"]),
        "decode_speedup": _ratio(res["pruned"]["decode_tokens_per_s"], res["full"]["decode_tokens_per_s"]),
        "visual_tokens": sum(trace.visual_tokens_kept) // batch_size if trace.stages else meta["visual_tokens"],
    }


def render_compiled(out: dict) -> str:
    """Plain-text table of a ``bench --compile`` result."""
    s, c = out["setup"], out["compiled"]
    lines = [f"{out['arch']} (shrink {out['shrink']}) compiled ({s['backend']}, {s['mode']}) on {s['device']} {s['dtype']}, "
             f"batch {s['batch_size']}, {s['inputs']['seq_len']} tokens ({s['inputs']['visual_tokens']} visual), "
             f"median of {s['repeats']}",
             "             prefill ms  decode tok/s  compile s"]
    for name, label in (("full", "full"), ("pruned", f"{out['policy']}@{out['budget']}"), ("oracle", "oracle")):
        d = c[name]
        dec = "-" if d["decode_tokens_per_s"] != d["decode_tokens_per_s"] else f"{d['decode_tokens_per_s']:.1f}"
        lines.append(f"{label:<12} {d['prefill_ms']:>10.1f}  {dec:>12}  {d['compile_s']:>9.1f}")
    lines.append(f"speedup {out['speedup']:.2f}x  ideal {out['ideal_speedup']:.2f}x  efficiency {out['efficiency']:.2f}  "
                 f"oracle_efficiency {out['oracle_efficiency']:.2f}  decode {out['decode_speedup']:.2f}x")
    return "\n".join(lines)
