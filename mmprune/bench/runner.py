"""The speed harness behind ``mmprune bench`` and ``benchmarks/bench_speed.py``.

One model (published architecture, random init, optionally shrunk), one batch, several *variants*
measured in the same process on identical inputs, round-robin (the starting variant rotates every round,
so load drift on a shared machine hits all of them alike), after warm-up rounds; medians are reported:

- ``prefill_ms``: one forward over the prompt as ``generate`` runs it (``use_cache=True``,
  ``logits_to_keep=1``): vision tower, projector, all decoder layers, one row of logits = TTFT minus
  sampling. CPU: ``perf_counter``; GPU: CUDA events.
- ``decode_tokens_per_s``: ``batch * (N - 1) / (t(generate N) - t(generate 1))``, greedy, with
  ``min_new_tokens = N`` and the placeholder ids suppressed so every run decodes exactly N tokens.
- ``peak_mem_mb`` / ``peak_mem_delta_mb``: one extra prefill per variant in a separate pass (see
  ``mmprune.efficiency.peak_memory`` for what is measured on CPU and GPU).
- ``prefill_tflops``: analytic (``mmprune.efficiency.prefill_flops``) from the trace's per-layer token
  counts and the pixel inputs; ``visual_tokens``: visual tokens left after the last stage.
- ``scoring_overhead``: time inside mmprune's attention-signal hooks (the forward hook on layer K-1's
  ``self_attn`` that runs ``mmprune.attention.attention_probs``), bracketed by two extra hooks on that
  module (CUDA events on GPU), as a fraction of the *unpruned* prefill; signals tapped inside the vision
  tower are taken from the engine's own ``Trace.signal_seconds``. ``selection_overhead``: time in
  ``policy.select``.

On a shared CPU, wall-clock medians swing with other processes' load (measured: 10x slower rounds at
load 4-5 on 2 cores, from OpenMP threads waiting on each other); ``prefill_cpu_ms`` (process CPU time of
the same calls) and ``speedup_min`` (ratio of the fastest rounds) are recorded next to the medians as
load-robust cross-checks; with ``torch.set_num_threads(1)`` CPU time is the compute actually spent.

Ratios: ``speedup`` = full / pruned prefill time, ``ideal_speedup`` = full / pruned prefill FLOPs,
``efficiency`` = speedup / ideal_speedup; with ``oracle=True``, ``oracle_efficiency`` = oracle / pruned
prefill time, the oracle being the unwrapped model cut to the pruned run's per-layer token counts (the
floor for any engine, ``mmprune.bench.oracle``). The same three for the language model alone (``llm_*``: time
from the LM's input to its output, mmprune's hooks included, against decoder + lm_head FLOPs) separate
what pruning does inside the LLM from the fixed vision tower / projector / embedding cost around it.

Example:
    >>> r = run_bench("llava-1.5-7b", shrink=32, variants=[Variant("uniform", 0.25)], repeats=1, warmup=0,
    ...               new_tokens=2, prompt_tokens=8, memory=False)
    >>> v = r["variants"]["uniform@0.25"]
    >>> v["visual_tokens"], r["full"]["visual_tokens"], v["ideal_speedup"] > 2
    (144, 576, True)
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from ..efficiency import Stopwatch, full_lengths, median, peak_memory, prefill_flops, time_once

BASELINES = ("eager-fastv",)


@dataclass
class Variant:
    """One configuration to time: a policy at a budget (and layer), the unpruned model, or a baseline."""

    policy: str | None  # None = unpruned
    budget: float | int = 1.0
    layer: int | None = None
    baseline: str | None = None  # "eager-fastv"

    @property
    def name(self) -> str:
        if self.policy is None and self.baseline is None:
            return "full"
        head = self.baseline or self.policy
        return f"{head}@{self.budget}" + ("" if self.layer is None else f"/L{self.layer}")


# --------------------------------------------------------------------------------------------- install


class _SignalTimer:
    """Brackets mmprune's attention-signal hook (a forward hook on layer K-1's attention module) with two
    more forward hooks and times it."""

    def __init__(self, device):
        self.device = device
        self.watches: list[Stopwatch] = []
        self.handles = []

    def attach(self, module) -> None:
        def start(mod, args, output):
            sw = Stopwatch(self.device)
            sw.start()
            self.watches.append(sw)

        def stop(mod, args, output):
            if self.watches:
                self.watches[-1].stop()

        self.handles.append(module.register_forward_hook(start, prepend=True))
        self.handles.append(module.register_forward_hook(stop))

    def take_ms(self) -> float:
        ms = sum(w.elapsed_ms() for w in self.watches if w._t1 is not None)
        self.watches = []
        return ms

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _RegionTimer:
    """Times one module's forward from before every other pre-hook to after every other hook."""

    def __init__(self, module, device):
        self.watch = None
        self.device = device

        def start(mod, args, kwargs):
            self.watch = Stopwatch(device)
            self.watch.start()

        def stop(mod, args, kwargs, output):
            if self.watch is not None:
                self.watch.stop()

        self.handles = [module.register_forward_pre_hook(start, with_kwargs=True, prepend=True),
                        module.register_forward_hook(stop, with_kwargs=True, always_call=True)]

    def take_ms(self) -> float:
        ms = self.watch.elapsed_ms() if self.watch is not None and self.watch._t1 is not None else float("nan")
        self.watch = None
        return ms

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _SelectTimer:
    """Times ``policy.select`` and ``policy.select_batch`` of every stage (instance attributes, removed on
    uninstall). A data-free policy's plan is cached per layout, so after the first round it costs nothing."""

    def __init__(self, device):
        self.device = device
        self.ms = 0.0
        self.policies = []

    def attach(self, policy) -> None:
        timer = self

        def timed(inner):
            def run(tokens):
                out, ms = time_once(lambda: inner(tokens), timer.device)
                timer.ms += ms
                return out

            return run

        policy.__dict__["select"] = timed(policy.select)
        policy.__dict__["select_batch"] = timed(policy.select_batch)
        self.policies.append(policy)

    def take_ms(self) -> float:
        ms, self.ms = self.ms, 0.0
        return ms

    def remove(self) -> None:
        for p in self.policies:
            p.__dict__.pop("select", None)
            p.__dict__.pop("select_batch", None)
        self.policies = []


def _install(model, v: Variant, device):
    """Put ``v`` on ``model``; returns (signal timer, select timer) or (None, None) for the unpruned model."""
    import mmprune

    from . import eager_fastv

    mmprune.unwrap(model)
    if v.policy is None and v.baseline is None:
        return None, None
    if v.baseline == "eager-fastv":
        eager_fastv.install(model, v.budget, v.layer)
    else:
        mmprune.wrap(model, mmprune.PruneConfig(v.policy, v.budget, v.layer))
    engine = model.__dict__["_mmprune"]
    sig, sel = _SignalTimer(device), _SelectTimer(device)
    for stage in engine.llm_stages:
        if "attn" in stage.policy.signals or any(s in stage.policy.signals for s in ("text_attn", "llm_keys")):
            sig.attach(engine.adapter.attention_module(stage.layer - 1))
    for stage in engine.stages:
        sel.attach(stage.policy)
    return sig, sel


def _uninstall(model, v: Variant, timers) -> None:
    import mmprune

    from . import eager_fastv

    for t in timers:
        if t is not None:
            t.remove()
    if v.baseline == "eager-fastv":
        eager_fastv.uninstall(model)
    else:
        mmprune.unwrap(model)


# --------------------------------------------------------------------------------------------- run


def _placeholder_ids(cfg) -> list[int]:
    ids = []
    for k in ("image_token_index", "image_token_id", "video_token_index", "video_token_id",
              "vision_start_token_id", "vision_end_token_id"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def _dtype(name: str | None, device: str):
    if name in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; accepted: auto, {', '.join(table)}")
    return table[name]


def _ratio(a, b):
    return float(a) / float(b) if b and a == a and b == b else float("nan")


def run_bench(arch: str, *, variants: list[Variant], shrink: int = 1, batch_size: int = 1,
              image_size: int | None = None, frames: int = 0, prompt_tokens: int = 64, new_tokens: int = 16,
              device: str = "cpu", dtype: str | None = None, repeats: int = 5, warmup: int = 1,
              memory: bool = True, seed: int = 0, oracle: bool = False, log=None) -> dict:
    """Time the unpruned model and every variant on identical inputs, alternating; see the module docstring.

    Returns ``{"setup": ..., "full": {...}, "variants": {name: {...}}}``; every variant carries its
    ratios against the unpruned model measured in the same rounds. ``oracle=True`` also times, in the
    same rounds, the unwrapped model cut to each policy variant's per-layer token counts
    (``mmprune.bench.oracle``): ``oracle_ms`` and ``oracle_efficiency = oracle_ms / prefill_ms``.
    """
    import mmprune

    from .archs import build_model
    from .inputs import make_bench_inputs
    from .oracle import OracleCut

    if repeats < 1:
        raise ValueError(f"repeats must be an int >= 1; got {repeats}")
    if new_tokens < 1:
        raise ValueError(f"new tokens must be an int >= 1; got {new_tokens}")
    tdtype = _dtype(dtype, device)
    say = log or (lambda *_: None)
    t0 = time.perf_counter()
    model = build_model(arch, shrink=shrink, dtype=tdtype, device=device)
    batch = make_bench_inputs(model, batch_size=batch_size, image_size=image_size, frames=frames,
                              prompt_tokens=prompt_tokens, seed=seed)
    meta = batch.pop("_meta")
    say(f"built {arch} (shrink {shrink}) in {time.perf_counter() - t0:.1f}s: {meta['seq_len']} tokens, "
        f"{meta['visual_tokens']} visual per sample")
    n_layers = model.config.get_text_config().num_hidden_layers
    allv = [Variant(None)] + [v for v in variants if v.name != "full"]
    counts = {}  # policy variant -> its per-layer token counts, for the oracle
    for v in allv:  # fail fast on bad input, before any timing
        timers = _install(model, v, device)
        try:
            if oracle and v.policy is not None and v.baseline is None:
                with torch.inference_mode():
                    model(**batch, use_cache=True, logits_to_keep=1)
                counts[v.name] = [list(c) for c in mmprune.trace(model).layer_tokens]
        finally:
            _uninstall(model, v, timers)

    suppress = _placeholder_ids(model.config)
    gen_kw = dict(do_sample=False, suppress_tokens=suppress, pad_token_id=suppress[0] if suppress else 0)

    def prefill():
        return model(**batch, use_cache=True, logits_to_keep=1)

    def generate(n):
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, **gen_kw)

    rec = {v.name: {"prefill": [], "cpu": [], "gen1": [], "genN": [], "signal": [], "select": [], "llm": [],
                    "trace": None, "oracle": []} for v in allv}
    lm_timer = None
    seq_len = batch["input_ids"].shape[1]
    order = allv + [f"oracle:{name}" for name in counts]
    with torch.inference_mode():
        for r in range(warmup + repeats):
            k = r % len(order)
            for v in order[k:] + order[:k]:
                if isinstance(v, str):  # the oracle of a variant, in the same round-robin
                    name = v.split(":", 1)[1]
                    cut = OracleCut(model, counts[name], seq_len)
                    try:
                        _, ms = time_once(prefill, device)
                    finally:
                        cut.remove()
                    if r >= warmup:
                        rec[name]["oracle"].append(ms)
                    continue
                timers = _install(model, v, device)
                # installed after the wrap so that its hooks bracket mmprune's own hooks on the LM
                lm_timer = _RegionTimer(model.model.language_model, device)
                try:
                    c0 = time.process_time()
                    _, ms = time_once(prefill, device)
                    cpu_ms = (time.process_time() - c0) * 1e3
                    llm_ms = lm_timer.take_ms()
                    lm_timer.remove()
                    sig_ms = timers[0].take_ms() if timers[0] else 0.0
                    sel_ms = timers[1].take_ms() if timers[1] else 0.0
                    trace = mmprune.trace(model) if timers[0] is not None else None
                    # vision-tower taps (cls_attn, keys, ...) run inside the encoder, outside the bracketed
                    # layer-K-1 hook: take the engine's own perf_counter total when it is the larger one
                    # (on CPU the two agree for attention taps; on GPU the engine's is launch time only)
                    sig_ms = max(sig_ms, 1e3 * float(getattr(trace, "signal_seconds", 0.0) or 0.0))
                    g1 = gn = float("nan")
                    if new_tokens > 1:
                        _, g1 = time_once(lambda: generate(1), device)
                        _, gn = time_once(lambda: generate(new_tokens), device)
                finally:
                    lm_timer.remove()
                    _uninstall(model, v, timers)
                if r >= warmup:
                    d = rec[v.name]
                    d["prefill"].append(ms)
                    d["cpu"].append(cpu_ms)
                    d["gen1"].append(g1)
                    d["genN"].append(gn)
                    d["signal"].append(sig_ms)
                    d["select"].append(sel_ms)
                    d["llm"].append(llm_ms)
                    d["trace"] = trace
            say(f"round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else "") + ": "
                + ", ".join(f"{n}={d['prefill'][-1]:.1f}ms" for n, d in rec.items() if d["prefill"])
                + "".join(f", oracle:{n}={d['oracle'][-1]:.1f}ms" for n, d in rec.items() if d["oracle"]))
        mem = {}
        if memory:
            for v in allv:
                timers = _install(model, v, device)
                try:
                    mem[v.name] = peak_memory(prefill, device)
                finally:
                    _uninstall(model, v, timers)

    full_lt = full_lengths(batch["attention_mask"], n_layers)
    results = {}
    for v in allv:
        d = rec[v.name]
        tr = d["trace"]
        lengths = tr.layer_tokens if (tr is not None and tr.layer_tokens) else full_lt
        fl = prefill_flops(model, lengths, {**batch, **((tr.tower_inputs if tr is not None else None) or {})})
        n_vis = (sum(tr.visual_tokens_kept) if tr is not None and tr.stages else meta["visual_tokens"] * batch_size)
        pre = median(d["prefill"])
        dec = [b - a for a, b in zip(d["gen1"], d["genN"])]
        dec_ms = median(dec)
        out = {
            "policy": v.policy if v.baseline is None else "fastv",
            "baseline": v.baseline,
            "budget": None if v.policy is None and v.baseline is None else v.budget,
            "layer": _stage_layer(tr, v),
            "prefill_ms": pre,
            "prefill_ms_samples": [round(x, 3) for x in d["prefill"]],
            "prefill_ms_min": min(d["prefill"]),
            "prefill_cpu_ms": median(d["cpu"]),
            "decode_tokens_per_s": (batch_size * (new_tokens - 1) / (dec_ms / 1e3)
                                    if new_tokens > 1 and dec_ms > 0 else float("nan")),
            "peak_mem_mb": mem.get(v.name, {}).get("peak_mb", float("nan")),
            "peak_mem_delta_mb": mem.get(v.name, {}).get("delta_mb", float("nan")),
            "prefill_tflops": fl.tflops,
            "llm_tflops": fl.llm / 1e12,
            "vision_tflops": (fl.vision + fl.projector) / 1e12,
            "visual_tokens": n_vis // batch_size,
            "llm_tokens_last_layer": int(sum(lengths[-1])) // batch_size,
            "llm_ms": median(d["llm"]),
            "signal_ms": median(d["signal"]),
            "select_ms": median(d["select"]),
            "oracle_ms": median(d["oracle"]) if d["oracle"] else float("nan"),
        }
        results[v.name] = out
    full = results.pop("full")
    for out in results.values():
        out["speedup"] = _ratio(full["prefill_ms"], out["prefill_ms"])
        out["ideal_speedup"] = _ratio(full["prefill_tflops"], out["prefill_tflops"])
        out["efficiency"] = _ratio(out["speedup"], out["ideal_speedup"])
        out["speedup_min"] = _ratio(full["prefill_ms_min"], out["prefill_ms_min"])
        out["speedup_cpu_time"] = _ratio(full["prefill_cpu_ms"], out["prefill_cpu_ms"])
        out["efficiency_cpu_time"] = _ratio(out["speedup_cpu_time"], out["ideal_speedup"])
        out["llm_speedup"] = _ratio(full["llm_ms"], out["llm_ms"])
        out["llm_ideal_speedup"] = _ratio(full["llm_tflops"], out["llm_tflops"])
        out["llm_efficiency"] = _ratio(out["llm_speedup"], out["llm_ideal_speedup"])
        out["scoring_overhead"] = _ratio(out["signal_ms"], full["prefill_ms"])
        out["selection_overhead"] = _ratio(out["select_ms"], full["prefill_ms"])
        out["decode_speedup"] = _ratio(out["decode_tokens_per_s"], full["decode_tokens_per_s"])
        out["oracle_efficiency"] = _ratio(out["oracle_ms"], out["prefill_ms"])
    setup = dict(
        arch=arch, shrink=shrink, device=str(device), dtype=str(tdtype).replace("torch.", ""),
        batch_size=batch_size, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
        warmup=warmup, threads=torch.get_num_threads(), torch=torch.__version__, **_versions(),
        machine=platform.machine(), load_avg=_loadavg(), inputs=meta,
        text_layers=n_layers, text_hidden=model.config.get_text_config().hidden_size,
        gpu=torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
    )
    return {"setup": setup, "full": full, "variants": results}


def _stage_layer(trace, v: Variant):
    if trace is not None and trace.stages:
        layers = [s.layer for s in trace.stages]
        return layers[0] if len(layers) == 1 else layers
    return v.layer


def _versions() -> dict:
    try:
        import transformers

        return {"transformers": transformers.__version__}
    except ImportError:  # pragma: no cover
        return {}


def _loadavg():
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
