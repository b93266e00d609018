"""The evaluation runner behind ``mmprune eval`` / ``sweep``: any task, any model, the same way.

One run = (model, task, policy, budget, layer, options). Samples are batched, prompted through the
model's chat template, generated greedily, scored by the task, and appended to ``samples.jsonl`` as they
are produced (so an interrupted run resumes where it stopped). Efficiency is reported three ways, never
mixed: visual tokens (from ``mmprune.trace``), analytic prefill FLOPs (``mmprune.efficiency``, from the
config and the per-layer token counts) and measured time / memory (time to first token per batch,
decode tokens/s, peak memory; CUDA events on GPU, perf_counter on CPU).

Example:
    >>> cfg = EvalConfig(model="testbed-llava", task="shapes", policy="fastv", budget=0.25, out="runs/x")
    >>> # run_eval(cfg)  -> the run dict written to runs/x/results.json
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import (
    SampleLog,
    load_results,
    make_record,
    merge_shards,
    out_folder,
    run_key,
    shard,
    split_records,
)
from .store import write_results as _write_results
from .tasks import LMMS_EVAL_VERSION

ALIASES = ("testbed-llava", "testbed-qwen2vl")


@dataclass
class EvalConfig:
    model: str
    task: str
    data: str | None = None
    policy: str = "none"
    budget: float | int = 1.0
    layer: int | None = None
    options: dict = field(default_factory=dict)
    limit: int | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    out: str = "runs/eval"
    max_new_tokens: int | None = None
    num_frames: int = 8
    turns: int = 1
    progress: bool = True


def validate(cfg: EvalConfig):
    """Check everything that can be checked before loading a model; return the task object."""
    from ..config import PruneConfig
    from ..policies import policies
    from .tasks import get_task

    task = get_task(cfg.task)
    if task.needs_data and not cfg.data:
        raise ValueError(f"task {cfg.task!r} needs --data PATH ({task.layout})")
    if cfg.data and not Path(cfg.data).expanduser().exists():
        raise ValueError(f"--data path not found: {cfg.data} (task {cfg.task!r} expects {task.layout})")
    if cfg.policy not in policies():  # name check without importing torch: bad input fails in a blink
        raise ValueError(f"unknown policy {cfg.policy!r}; known policies: {', '.join(policies())}")
    PruneConfig(cfg.policy, cfg.budget, cfg.layer, dict(cfg.options))
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be an int >= 1; got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be an int >= 1; got {cfg.limit}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an int >= 1 (or left out for the task's default); got {cfg.max_new_tokens}")
    if cfg.num_frames < 1:
        raise ValueError(f"--frames must be an int >= 1; got {cfg.num_frames}")
    if cfg.turns not in (1, 2):
        raise ValueError(f"--turns must be 1 or 2; got {cfg.turns}")
    if cfg.turns == 2 and cfg.batch_size != 1:
        raise ValueError(f"--turns 2 answers each follow-up from its own conversation's cache: use --batch-size 1 "
                         f"(got {cfg.batch_size})")
    check_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {cfg.dtype!r}")
    resolve_model_path(cfg.model)
    return task


def resolve_model_path(spec: str) -> str:
    """A built-in alias -> its package folder; a local directory -> itself; anything else is a hub id."""
    if spec in ALIASES:
        from ..testbed.tasks import testbed_model_path

        return str(testbed_model_path(spec))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"--model {spec}: no config.json in that directory (expected a save_pretrained folder)")
        _check_family(spec, p / "config.json")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ValueError(f"--model {spec}: directory not found; give a local save_pretrained folder, a hub id, "
                         f"or one of the built-in aliases: {', '.join(ALIASES)}")
    return spec


def _check_family(spec: str, config: Path) -> None:
    """A local folder's ``model_type`` must be one mmprune has an adapter for (UnsupportedModelError, before
    any weights load)."""
    from ..adapters import supported_families
    from ..errors import UnsupportedModelError

    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError) as e:
        raise ValueError(f"--model {spec}: unreadable config.json ({e})") from None
    if model_type not in supported_families():
        raise UnsupportedModelError(f"--model {spec}: unsupported model_type {model_type!r}; mmprune supports: "
                                    f"{', '.join(supported_families())}")


_DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # --dtype of eval, sweep and bench


def _dtype(name: str, device: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in table:
        raise ValueError(f"--dtype must be auto or one of {', '.join(sorted(table))}; got {name!r}")
    return table[name]


def resolve_device(device: str) -> str:
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; use --device cpu")
    if device.startswith("xpu") and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"--device {device}: XPU is not available here; use --device cpu")
    return device


def check_device(device: str) -> None:
    """The device's spelling (no torch import): auto, cpu, cuda[:N], mps or xpu[:N]."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"--device {device!r} is not supported; accepted: auto, cpu, cuda, cuda:N, mps, xpu")


def load_model(spec: str, device: str = "auto", dtype: str = "auto"):
    """Load ``(model, processor)`` the way users load a hub checkpoint (AutoModelForImageTextToText)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ..testbed.vocab import load_processor

    path = resolve_model_path(spec)
    dev = resolve_device(device)
    # --device auto with several GPUs (and no accelerate launch sharding): let accelerate spread the layers
    spread = device == "auto" and torch.cuda.device_count() > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=_dtype(dtype, dev), **({"device_map": "auto"} if spread else {})
        )
        processor = load_processor(path)
    except OSError as e:  # hub id not reachable / folder incomplete: one line, not a traceback
        raise ValueError(f"--model {spec}: could not load ({str(e).splitlines()[0]})") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per accelerate rank
    model = (model if spread else model.to(dev)).eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"  # decoder-only generation needs left padding
    return model, processor


def _messages(task_modality: str, n_images: int, text: str) -> list:
    media = [{"type": "video"}] if task_modality == "video" else [{"type": "image"}] * n_images
    return [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]


def _render(processor, modality: str, media_n: int, turns: list[str]) -> str:
    """The prompt text of a conversation: ``turns`` alternate user, assistant, user, ...; the media go with the
    first user turn; a generation prompt follows. Chat template where the processor has one, else LLaVA-1.5's
    plain "USER: ... ASSISTANT:" format (turns closed by the end-of-sequence token)."""
    if getattr(processor, "chat_template", None):
        msgs = _messages(modality, media_n, turns[0])
        for i, text in enumerate(turns[1:]):
            msgs.append({"role": "assistant" if i % 2 == 0 else "user", "content": [{"type": "text", "text": text}]})
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    tag = getattr(processor, "video_token" if modality == "video" else "image_token", "<image>")
    eos = getattr(getattr(processor, "tokenizer", None), "eos_token", None) or "</s>"
    text = f"USER: {(tag + chr(10)) * max(media_n, 1)}{turns[0]} ASSISTANT:"
    for i, t in enumerate(turns[1:]):
        text += f" {t}{eos}" if i % 2 == 0 else f"USER: {t} ASSISTANT:"
    return text


# The first turn of ``--turns 2``: a generic question, so the follow-up (the task's question) is answered from a
# cache pruned for another question (LLMC+ found token reduction collapses there).
FIRST_TURN = {"image": "Describe the image in one sentence.", "video": "Describe the video in one sentence."}
FIRST_TURN_TOKENS = 32  # a sentence; its answer is context, not scored


def build_batch(processor, task, samples, num_frames: int, device, prompt=None):
    """Processor inputs for a batch; returns (inputs, ok_samples, failures[(sample, reason)]). ``prompt``: the
    user text of a sample (default: the task's prompt)."""
    from .video import VideoReadError, read_frames

    texts, images, videos, ok, failed = [], [], [], [], []
    for s in samples:
        try:
            if task.modality == "video":
                if not s.video:
                    raise VideoReadError("sample has no video path")
                videos.append(read_frames(s.video, num_frames))
                media_n = 0
            else:
                imgs = s.images or []
                images.append(imgs)
                media_n = len(imgs)
        except (VideoReadError, OSError, ValueError) as e:
            failed.append((s, str(e)))
            continue
        texts.append(_render(processor, task.modality, media_n, [prompt(s) if prompt else task.prompt(s)]))
        ok.append(s)
    if not ok:
        return None, ok, failed
    kw: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if task.modality == "video":
        kw["videos"] = videos
    elif any(images):
        kw["images"] = images
    inputs = processor(**kw)
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}, ok, failed


class _FirstTokenClock:
    """A logits processor that notes when the prefill's logits arrive (time to first token)."""

    def __init__(self, sync):
        self.sync, self.t_first, self.calls = sync, None, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.t_first is None:
            self.sync()
            self.t_first = time.perf_counter()
        return scores


def follow_up(model, processor, task, sample, inputs, first, max_new_tokens: int):
    """Turn 2 of a conversation whose turn 1 (``inputs`` -> ``first``, a generate output with its cache) asked
    ``FIRST_TURN``: the task's question as the next user turn, generated from turn 1's (pruned) cache, the
    media not passed again. Returns (turn-1 answer, turn-2 new tokens, turn-2 ms, the conversation's ids)."""
    import torch

    ids1 = first.sequences
    gen = ids1[0, inputs["input_ids"].shape[1] :]
    answer = processor.batch_decode(gen[None], skip_special_tokens=True)[0].strip()
    media_n = 0 if task.modality == "video" else len(sample.image_refs or [])
    text1 = _render(processor, task.modality, media_n, [FIRST_TURN[task.modality]])
    text2 = _render(processor, task.modality, media_n, [FIRST_TURN[task.modality], answer, task.prompt(sample)])
    # what the template adds after turn 1's prompt and answer; turn 1's own tokens stay as generated
    cut = text2.find(answer, len(text1)) if answer else len(text1)
    suffix = text2[cut + len(answer) :] if cut >= 0 else text2[len(text1) :]
    tok = processor.tokenizer
    extra = tok(suffix, add_special_tokens=False, return_tensors="pt")["input_ids"].to(ids1.device)
    keep = ids1
    pad = {tok.eos_token_id, tok.pad_token_id} - {None}
    while keep.shape[1] > inputs["input_ids"].shape[1] and int(keep[0, -1]) in pad:  # its end token: the template's
        keep = keep[:, :-1]
    ids2 = torch.cat([keep, extra], 1)
    kw = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos", "input_ids",
                                                       "attention_mask", "mm_token_type_ids")}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids2, attention_mask=torch.ones_like(ids2), cache=first.past_key_values,
                             max_new_tokens=max_new_tokens, do_sample=False, **kw)
    return answer, out[:, ids2.shape[1] :], (time.perf_counter() - t0) * 1e3, ids2


def generate_timed(model, inputs, max_new_tokens: int, return_cache: bool = False):
    """Greedy generate; returns (sequences, prefill_ms, decode_tokens_per_s, peak_mem_mb); with ``return_cache``
    the generate output (``.sequences``, ``.past_key_values``) instead of the sequences."""
    import torch
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    clock = _FirstTokenClock(sync)
    reset_peak_memory(dev)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=return_cache)
    sync()
    t1 = time.perf_counter()
    prefill_ms = (clock.t_first - t0) * 1e3 if clock.t_first else (t1 - t0) * 1e3
    n_decode = (clock.calls - 1) * (out.sequences if return_cache else out).shape[0]
    decode_tps = n_decode / (t1 - clock.t_first) if clock.t_first and n_decode > 0 and t1 > clock.t_first else None
    return out, prefill_ms, decode_tps, peak_memory_mb(dev)


def reset_peak_memory(dev) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mb(dev) -> float:
    """GPU: ``max_memory_allocated`` since the batch started. CPU: the process's max RSS so far
    (``getrusage``; a lifetime high-water mark — cheap enough for every batch, unlike sampling RSS, which
    ``mmprune.efficiency.peak_memory`` does for ``mmprune bench``)."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def per_sample_tflops(model, trace, inputs) -> list[float]:
    """Analytic prefill TFLOPs per sample: its own per-layer token counts, plus an equal share of the batch's
    vision tower + projector FLOPs (which no stage after the projector changes)."""
    from ..efficiency import prefill_flops

    b = len(trace.n_visual)
    tower = {**inputs, **(trace.tower_inputs or {})}  # what the tower saw (downsample resizes it)
    shared = prefill_flops(model, [[0] * b] * len(trace.layer_tokens), tower, logits_positions=0)
    vision = (shared.vision + shared.projector) / max(b, 1)
    out = []
    for j in range(b):
        lengths = [[layer[j]] for layer in trace.layer_tokens]
        out.append((prefill_flops(model, lengths).total + vision) / 1e12)
    return out


def _dist():
    """(rank, world_size) under ``accelerate launch`` / torchrun; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return rank, world


def _wait_for_ranks(out: Path, key_hash: str, world: int, timeout_s: float = 24 * 3600) -> None:
    # A file barrier: no process group needed, and a rank that died shows up as a missing file.
    t0 = time.time()
    while not all((out / f".done.{key_hash}.rank{r}").exists() for r in range(world)):
        if time.time() - t0 > timeout_s:
            raise ValueError(f"timed out waiting for {world} ranks to finish under {out}")
        time.sleep(0.5)


def run_eval(cfg: EvalConfig, model=None, processor=None) -> dict:
    """Run (or resume) one evaluation; return the run dict written to ``results.json`` (rank 0)."""
    import hashlib

    task = validate(cfg)

    import torch
    from tqdm.auto import tqdm

    import mmprune

    rank, world = _dist()
    out = out_folder(cfg.out)
    load_results(out)  # a corrupt results.json is reported now, not after the samples have run
    key = run_key(cfg.model, cfg.task, cfg.policy, cfg.budget, cfg.layer, cfg.options or None, run_settings(cfg, task))
    key_hash = hashlib.sha1(key.encode()).hexdigest()[:10]
    done_flag = out / f".done.{key_hash}.rank{rank}"
    done_flag.unlink(missing_ok=True)
    samples = task.load(cfg.data, limit=cfg.limit)
    mine = shard(samples, rank, world) if world > 1 else samples
    log = SampleLog(out, rank=rank if world > 1 else None)
    done = log.done_ids(key)
    todo = [s for s in mine if s.id not in done]
    if todo:
        if model is None:
            model, processor = load_model(cfg.model, cfg.device, cfg.dtype)
        mmprune.wrap(model, cfg.policy, budget=cfg.budget, layer=cfg.layer, **cfg.options)
        dev = next(model.parameters()).device
        max_new = cfg.max_new_tokens or getattr(task, "max_new_tokens", 16)
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{cfg.task} {cfg.policy}@{cfg.budget}",
                   disable=not cfg.progress or rank != 0, unit="sample")
        try:
            for i in range(0, len(todo), cfg.batch_size):
                batch = todo[i : i + cfg.batch_size]
                torch.manual_seed(cfg.seed)
                first_q = (lambda s: FIRST_TURN[task.modality]) if cfg.turns == 2 else None
                inputs, ok, failed = build_batch(processor, task, batch, cfg.num_frames, dev, prompt=first_q)
                for s, reason in failed:
                    log.append(make_record(key, s.id, prompt=task.prompt(s), answer=s.answer, error=reason))
                if inputs is not None:
                    turn = {}
                    if cfg.turns == 2:  # turn 1 (timed: the pruned prefill), then the task's question from its cache
                        first, prefill_ms, tps, mem = generate_timed(model, inputs, FIRST_TURN_TOKENS, return_cache=True)
                        tr = mmprune.trace(model)
                        turn["turn1"], new, turn["turn2_ms"], _ = follow_up(model, processor, task, ok[0], inputs, first, max_new)
                        texts = processor.batch_decode(new, skip_special_tokens=True)
                    else:
                        seqs, prefill_ms, tps, mem = generate_timed(model, inputs, max_new)
                        tr = mmprune.trace(model)
                        texts = processor.batch_decode(seqs[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                    flops = per_sample_tflops(model, tr, inputs)
                    for j, (s, pred) in enumerate(zip(ok, texts)):
                        pred = pred.strip()
                        detail = task.score(s, pred)
                        log.append(make_record(
                            key, s.id, prompt=task.prompt(s), prediction=pred, answer=s.answer,
                            score=detail["score"], detail=detail,
                            visual_tokens_in=tr.n_visual[j] if j < len(tr.n_visual) else None,
                            visual_tokens_kept=tr.visual_tokens_kept[j] if j < len(tr.n_visual) else None,
                            prefill_tflops=flops[j], prefill_ms=prefill_ms,
                            decode_tokens_per_s=tps, peak_mem_mb=mem, batch_size=len(ok),
                            stages=[f"{st.policy}@{'pre' if st.layer is None else st.layer}" for st in tr.stages],
                            **turn,
                        ))
                bar.update(len(batch))
        finally:
            bar.close()
            log.close()
            mmprune.unwrap(model)
    else:
        log.close()
    done_flag.touch()
    if rank != 0:
        return {}
    if world > 1:
        _wait_for_ranks(out, key_hash, world)
        merge_shards(out)
    return finalize(cfg, task, key, len(samples), {str(s.id) for s in samples})


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_settings(cfg: EvalConfig, task) -> dict:
    """What besides the policy changes a sample's result, for the run key (a changed setting never reuses
    old samples): the data, dtype, seed, max new tokens and, for video tasks, the frames. ``--limit`` is
    not one (a larger limit extends a run; aggregation takes only the samples of the current limit), nor
    ``--batch-size`` or ``--device``."""
    out = {
        "data": str(Path(cfg.data).expanduser().resolve()) if cfg.data else None,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens or getattr(task, "max_new_tokens", 16),
    }
    if task.modality == "video":
        out["frames"] = cfg.num_frames
    if cfg.turns != 1:
        out["turns"] = cfg.turns
    return out


def finalize(cfg: EvalConfig, task, key: str, n_total: int, ids: set | None = None) -> dict:
    """Aggregate the run's records of the samples ``ids`` (default: all recorded) into ``results.json`` and
    ``report.md``; return the run dict."""
    log = SampleLog(cfg.out)
    records = [r for r in log.records(key) if ids is None or str(r.get("id")) in ids]
    log.close()
    details, failed = split_records(records)
    ok = [r for r in records if r.get("error") is None]
    score, metric, extra = task.aggregate(details) if details else (None, task.metric, {})
    run = {
        "key": key, "model": cfg.model, "task": cfg.task, "policy": cfg.policy, "budget": cfg.budget,
        "layer": cfg.layer, "options": cfg.options or {}, "settings": run_settings(cfg, task),
        "lmms_eval": LMMS_EVAL_VERSION, "n": len(details), "failed": len(failed),
        "n_total": n_total, "score": score, "metric": metric, "extra": extra,
        "visual_tokens_in": _mean([r.get("visual_tokens_in") for r in ok]),
        "visual_tokens_kept": _mean([r.get("visual_tokens_kept") for r in ok]),
        "prefill_tflops": _mean([r.get("prefill_tflops") for r in ok]),
        # time is per batch: median over batches (every sample of a batch carries its batch's figure)
        "prefill_ms": _median([r.get("prefill_ms") for r in ok]),
        "decode_tokens_per_s": _median([r.get("decode_tokens_per_s") for r in ok]),
        "peak_mem_mb": max([r["peak_mem_mb"] for r in ok if r.get("peak_mem_mb") is not None], default=None),
        "batch_size": cfg.batch_size,
        # the stages as run (policy@layer; a policy's default layer or its multi-stage expansion)
        "stages": next((r.get("stages") for r in ok if r.get("stages")), None),
    }
    _write_results(cfg.out, run, report=True)
    return run
