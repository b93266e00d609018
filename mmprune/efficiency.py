"""Analytic prefill FLOPs of a vision-language model, and the timing / memory helpers the harnesses share.

FLOPs conventions (one multiply-add = 2 FLOPs; ``torch.utils.flop_counter`` counts the same way, and the
tests check this module against it on every supported family):

- **Decoder layer** processing ``n`` tokens (per sample: the non-padding tokens it sees; see
  ``Trace.layer_tokens``) with ``n_kv = n`` keys (prefill, no cache): projections
  ``2 n d (H + 2 KV) hd + 2 n H hd d`` (GQA: ``KV`` key/value heads), attention scores and values
  ``2 * 2 H hd n n_kv``, MLP ``2 n d I`` times 3 matrices when gated (Llama / Qwen SwiGLU), else 2.
- **Causal masking**: ``causal="full"`` (default) counts the whole ``n x n`` score matrix, because that
  is what eager attention and SDPA's math / CPU kernels compute before the mask is applied (and what
  ``FlopCounterMode`` reports); ``causal="half"`` counts ``n (n + 1) / 2`` pairs, what a block-skipping
  FlashAttention kernel approaches. The quadratic term is a few % of a 7B prefill at 600 tokens either way.
- **lm_head**: ``2 d V`` per computed position: ``logits_positions=1`` (per sample) is what ``generate``
  computes at prefill (``logits_to_keep=1``); pass ``None`` for all positions (scoring / training).
- **Vision tower + projector**: every encoder layer the model runs (LLaVA runs all CLIP layers even
  though it reads layer -2), per tile / frame / Qwen attention segment (Qwen2.5-VL: per window), the
  patch embedding, the projector / patch merger (Qwen3-VL: plus one merger per deepstack level).
  Neither pre-LLM pruning after the projector nor in-LLM pruning changes these.
- Not counted: norms, activations, RoPE, softmax, residual adds, embedding lookups, biases (elementwise,
  well under 1% here).

Example (a hand count: 1 layer, d=8, 2 heads of 4, 1 KV head, gated MLP of 16, vocab 10, 3 tokens):
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
    ...                   num_hidden_layers=1, vocab_size=10)
    >>> r = prefill_flops(cfg, [3])
    >>> r.attn_proj == 2*3*8*(8 + 2*4) + 2*3*8*8, r.attn_scores == 2*2*2*4*3*3, r.mlp == 3*2*3*8*16
    (True, True, True)
    >>> r.lm_head, r.total == r.attn_proj + r.attn_scores + r.mlp + r.lm_head
    (160, True)
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# text model types whose MLP has two matrices (up, down); every other decoder is taken as gated (gate, up,
# down: Llama, Mistral, Qwen2/2.5/3, Gemma, Phi-3 ...)
_NOT_GATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "mpt", "stablelm"}


@dataclass
class FlopsReport:
    """Prefill FLOPs split by where they are spent (absolute FLOPs, whole batch)."""

    attn_proj: int = 0
    attn_scores: int = 0
    mlp: int = 0
    lm_head: int = 0
    vision: int = 0
    projector: int = 0
    per_layer: list = field(default_factory=list)  # decoder layer i -> FLOPs (all samples)

    @property
    def llm(self) -> int:
        return self.attn_proj + self.attn_scores + self.mlp + self.lm_head

    @property
    def total(self) -> int:
        return self.llm + self.vision + self.projector

    @property
    def tflops(self) -> float:
        return self.total / 1e12

    def as_dict(self) -> dict:
        return {"total": self.total, "llm": self.llm, "vision": self.vision, "projector": self.projector,
                "attn_proj": self.attn_proj, "attn_scores": self.attn_scores, "mlp": self.mlp,
                "lm_head": self.lm_head}


# --------------------------------------------------------------------------------------------- LLM


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg, (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg)


def _text_dims(tc) -> dict:
    heads = tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return dict(d=tc.hidden_size, h=heads, kv=getattr(tc, "num_key_value_heads", None) or heads, hd=hd,
                i=tc.intermediate_size, v=tc.vocab_size, layers=tc.num_hidden_layers,
                gated=getattr(tc, "model_type", "llama") not in _NOT_GATED)


def _normalise_lengths(trace_or_lengths, n_layers: int) -> list[list[int]]:
    """-> per layer, per sample token counts."""
    lt = getattr(trace_or_lengths, "layer_tokens", trace_or_lengths)
    if isinstance(lt, int):
        return [[lt]] * n_layers
    lt = list(lt)
    if not lt:
        raise ValueError("no per-layer token counts: pass a Trace from a wrapped prefill, a list of per-layer "
                         "lengths, or an int (the same length at every layer)")
    rows = [[int(x)] if isinstance(x, int) else [int(v) for v in x] for x in lt]
    if len(rows) == 1 and n_layers > 1:
        rows = rows * n_layers
    if len(rows) != n_layers:
        raise ValueError(f"got token counts for {len(rows)} layers; the text model has {n_layers}")
    return rows


def llm_flops(model_or_config, trace_or_lengths, *, logits_positions: int | None = 1,
              causal: str = "full") -> FlopsReport:
    """Decoder FLOPs of one prefill (see the module docstring for the conventions).

    ``trace_or_lengths``: a ``Trace`` (its ``layer_tokens``), a list with one entry per decoder layer
    (an int, or a list with one int per sample), or an int used at every layer.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16, num_hidden_layers=2)
        >>> llm_flops(cfg, [[5, 3], [2, 3]]).per_layer[1] < llm_flops(cfg, 5).per_layer[1]
        True
    """
    if causal not in ("full", "half"):
        raise ValueError(f"causal must be 'full' (what eager / SDPA-math compute) or 'half'; got {causal!r}")
    _, tc = _text_config(model_or_config)
    dm = _text_dims(tc)
    d, h, kv, hd = dm["d"], dm["h"], dm["kv"], dm["hd"]
    lengths = _normalise_lengths(trace_or_lengths, dm["layers"])
    rep = FlopsReport()
    for per_sample in lengths:
        layer = 0
        for n in per_sample:
            proj = 2 * n * d * (h + 2 * kv) * hd + 2 * n * h * hd * d
            pairs = n * n if causal == "full" else n * (n + 1) // 2
            scores = 2 * 2 * h * hd * pairs
            mlp = (3 if dm["gated"] else 2) * 2 * n * d * dm["i"]
            rep.attn_proj += proj
            rep.attn_scores += scores
            rep.mlp += mlp
            layer += proj + scores + mlp
        rep.per_layer.append(layer)
    last = lengths[-1]
    n_logits = sum(last) if logits_positions is None else sum(min(n, logits_positions) for n in last)
    rep.lm_head = 2 * n_logits * d * dm["v"]
    return rep


# --------------------------------------------------------------------------------------------- vision


def _vit_layer(tokens: int, d: int, inter: int, gated: bool = False) -> int:
    """One pre-norm ViT block on ``tokens`` tokens, full attention among them."""
    return 4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d + (3 if gated else 2) * 2 * tokens * d * inter


def _llava_tiles(cfg, inputs: dict) -> tuple[int, int]:
    """(image tiles, video frames) the LLaVA-family tower will encode for ``inputs``."""
    tiles = frames = 0
    pv = inputs.get("pixel_values")
    if pv is not None:
        if pv.dim() == 4:  # LLaVA-1.5: one 336-px tile per image
            tiles = int(pv.shape[0])
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            sizes = inputs.get("image_sizes")
            if sizes is None:
                tiles = int(pv.shape[0] * pv.shape[1])
            else:
                tiles = sum(image_size_to_num_patches(tuple(int(x) for x in s), cfg.image_grid_pinpoints,
                                                      cfg.vision_config.image_size) for s in sizes.tolist())
    pvv = inputs.get("pixel_values_videos")
    if pvv is not None:
        frames = int(pvv.shape[0] * pvv.shape[1])
    return tiles, frames


def _llava_vision(cfg, inputs: dict) -> tuple[int, int]:
    vc = cfg.vision_config
    d, inter = vc.hidden_size, vc.intermediate_size
    grid = (vc.image_size // vc.patch_size) ** 2
    cls = 1 if vc.model_type == "clip_vision_model" else 0
    t = grid + cls
    per_tile = 2 * grid * 3 * vc.patch_size ** 2 * d + vc.num_hidden_layers * _vit_layer(t, d, inter)
    if getattr(vc, "vision_use_head", False):  # SigLIP attention-pooling head: one probe query over t tokens
        per_tile += 2 * d * d + 2 * 2 * t * d * d + 2 * 2 * t * d + 2 * d * d + 2 * 2 * d * inter
    layers = cfg.vision_feature_layer
    n_feat_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
    feat_tokens = grid if getattr(cfg, "vision_feature_select_strategy", "default") == "default" else t
    dt = cfg.text_config.hidden_size
    per_tile_proj = 2 * feat_tokens * (d * n_feat_layers * dt + dt * dt)
    tiles, frames = _llava_tiles(cfg, inputs)
    n = tiles + frames
    return n * per_tile, n * per_tile_proj


def _qwen_window_sizes(t: int, h: int, w: int, vc) -> list[int]:
    """Patch counts of Qwen2.5-VL's attention windows for one item (per frame, edge windows partial)."""
    m = vc.spatial_merge_size
    win = vc.window_size // m // vc.patch_size
    gh, gw = h // m, w // m
    out = []
    for _ in range(t):
        for i in range(0, gh, win):
            for j in range(0, gw, win):
                out.append(min(win, gh - i) * min(win, gw - j) * m * m)
    return out


def _qwen_vision(cfg, inputs: dict) -> tuple[int, int]:
    vc = cfg.vision_config
    fam = cfg.model_type
    d = getattr(vc, "embed_dim", None) if fam == "qwen2_vl" else vc.hidden_size
    if fam == "qwen2_vl":
        inter, gated, out_d = int(d * vc.mlp_ratio), False, vc.hidden_size
    else:
        inter, gated, out_d = vc.intermediate_size, fam == "qwen2_5_vl", vc.out_hidden_size
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    m2 = vc.spatial_merge_size ** 2
    n_mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or [])
    full_blocks = set(getattr(vc, "fullatt_block_indexes", None) or range(vc.depth)) if fam == "qwen2_5_vl" \
        else set(range(vc.depth))
    vis = proj = 0
    for key in ("image_grid_thw", "video_grid_thw"):
        grids = inputs.get(key)
        if grids is None:
            continue
        for t, h, w in grids.tolist():
            p = t * h * w
            vis += 2 * p * patch_in * d
            dense = (4 * 2 * p * d * d) + (3 if gated else 2) * 2 * p * d * inter
            full_pairs = t * (h * w) ** 2
            win_pairs = sum(s * s for s in _qwen_window_sizes(t, h, w, vc)) if fam == "qwen2_5_vl" else full_pairs
            for blk in range(vc.depth):
                pairs = full_pairs if blk in full_blocks else win_pairs
                vis += dense + 2 * 2 * pairs * d
            proj += n_mergers * 2 * (p // m2) * (m2 * d * m2 * d + m2 * d * out_d)
    return vis, proj


def vision_flops(model_or_config, inputs: dict | None) -> tuple[int, int]:
    """``(vision tower FLOPs, projector / merger FLOPs)`` for the pixel inputs of one batch.

    ``inputs`` is the model's keyword batch (``pixel_values`` + ``image_sizes``, ``pixel_values_videos``,
    ``image_grid_thw`` / ``video_grid_thw``), as a processor returns it. ``None`` -> ``(0, 0)``.

    Example:
        >>> import torch
        >>> from transformers import LlavaConfig
        >>> v, p = vision_flops(LlavaConfig(), {"pixel_values": torch.zeros(1, 3, 336, 336)})
        >>> round(v / 1e9), round(p / 1e9)     # CLIP-L/336 on one image; 2-layer MLP projector
        (382, 24)
    """
    if not inputs:
        return 0, 0
    cfg, _ = _text_config(model_or_config)
    fam = getattr(cfg, "model_type", None)
    if fam in ("llava", "llava_next", "llava_onevision"):
        return _llava_vision(cfg, inputs)
    if fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return _qwen_vision(cfg, inputs)
    if any(k.startswith("pixel_values") for k in inputs):
        raise ValueError(f"no vision FLOPs formula for model_type {fam!r}; supported: llava, llava_next, "
                         "llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl")
    return 0, 0


def prefill_flops(model_or_config, trace_or_lengths, inputs: dict | None = None, *,
                  logits_positions: int | None = 1, causal: str = "full") -> FlopsReport:
    """Analytic FLOPs of one prefill: decoder layers at their own token counts + lm_head + vision + projector.

    ``model_or_config``: a model or its (composite) config. ``trace_or_lengths``: ``mmprune.trace(model)``
    after a wrapped prefill, per-layer lengths, or one int. ``inputs``: the batch (for the vision tower);
    None counts the LLM only.

    Example:
        >>> from transformers import LlavaConfig
        >>> cfg = LlavaConfig()                                  # LLaVA-1.5-7B shapes
        >>> full = prefill_flops(cfg, 576 + 64)                  # 576 visual + 64 text tokens, all layers
        >>> pruned = prefill_flops(cfg, 144 + 64)                # 25% of the visual tokens before the LLM
        >>> round(full.tflops, 2), round(full.llm / pruned.llm, 2)
        (8.5, 3.13)
    """
    rep = llm_flops(model_or_config, trace_or_lengths, logits_positions=logits_positions, causal=causal)
    rep.vision, rep.projector = vision_flops(model_or_config, inputs)
    return rep


def full_lengths(attention_mask, num_layers: int) -> list[list[int]]:
    """Per-layer, per-sample token counts of an unpruned prefill (every layer sees every non-pad token)."""
    per_sample = [int(v) for v in attention_mask.sum(-1).tolist()]
    return [per_sample] * num_layers


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall-clock samples of one callable, in milliseconds."""

    samples_ms: list

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms)) if self.samples_ms else float("nan")

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 4:
            return float(max(self.samples_ms) - min(self.samples_ms)) if self.samples_ms else float("nan")
        q = statistics.quantiles(self.samples_ms, n=4)
        return float(q[2] - q[0])


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class Stopwatch:
    """Times one region: ``perf_counter`` on CPU; CUDA events on GPU (read after a final synchronize).

    Example:
        >>> sw = Stopwatch("cpu"); sw.start(); sw.stop(); sw.elapsed_ms() >= 0
        True
    """

    def __init__(self, device="cpu"):
        self.cuda = _is_cuda(device)
        self._t0 = self._t1 = None

    def _mark(self):
        """Now: a recorded CUDA event on GPU (asynchronous), else ``perf_counter``."""
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self):
        self._t0 = self._mark()

    def stop(self):
        self._t1 = self._mark()

    def elapsed_ms(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return float(self._t0.elapsed_time(self._t1))
        return (self._t1 - self._t0) * 1e3


def time_once(fn: Callable[[], Any], device="cpu") -> tuple[Any, float]:
    """Run ``fn`` once; return ``(result, milliseconds)`` (GPU: CUDA events around it, then synchronize)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize()
    sw = Stopwatch(device)
    sw.start()
    out = fn()
    sw.stop()
    return out, sw.elapsed_ms()


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device="cpu") -> Timing:
    """Median-friendly timing of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    CPU: ``time.perf_counter`` around the call. GPU: CUDA events recorded around the call, read after a
    synchronize, so host-side launch overhead that overlaps the GPU is not counted twice.

    Example:
        >>> t = measure(lambda: sum(range(1000)), repeats=3)
        >>> len(t.samples_ms), t.median_ms >= 0
        (3, True)
    """
    for _ in range(warmup):
        time_once(fn, device)
    return Timing([time_once(fn, device)[1] for _ in range(repeats)])


def measure_interleaved(fns: dict, repeats: int = 5, warmup: int = 1, device="cpu") -> dict:
    """Time several callables round-robin (A B C, B C A, ...) so machine-load drift hits all alike.

    Example:
        >>> r = measure_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2)
        >>> sorted(r), len(r["a"].samples_ms)
        (['a', 'b'], 2)
    """
    names = list(fns)
    out = {k: Timing([]) for k in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            _, ms = time_once(fns[k], device)
            if r >= warmup:
                out[k].samples_ms.append(ms)
    return out


# --------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    """Hand memory that earlier calls freed back to the OS (glibc ``malloc_trim``), so the next call's growth
    shows in RSS instead of silently reusing retained heap pages. No lasting effect; a no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device="cpu", interval_s: float = 0.0005) -> dict:
    """Run ``fn`` once and report its peak memory: ``{"peak_mb", "delta_mb", "method"}``.

    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact for the caching
    allocator's live tensors; excludes the allocator's reserved-but-free cache and the CUDA context).
    ``delta_mb`` is the peak above what was allocated before the call (activations + KV cache).

    CPU: resident set size sampled every ``interval_s`` from ``/proc/self/statm`` by a helper thread while
    ``fn`` runs (torch releases the GIL inside ops, so the sampler keeps running). Limits: a spike shorter
    than the interval can be missed; RSS counts the whole process (weights, libraries), hence ``delta_mb``;
    memory freed to the allocator but not to the OS would hide growth, so the heap is trimmed first
    (``malloc_trim``); blocks glibc keeps cached inside the call are reused there, which is what a peak is. Off Linux it falls back to ``resource.getrusage`` max-RSS,
    a process-lifetime high-water mark that only moves when a call exceeds every earlier one.

    Run it in a separate pass from timing: the sampler thread competes for a CPU core.

    Example:
        >>> r = peak_memory(lambda: bytearray(64 << 20))
        >>> r["method"] in ("cuda.max_memory_allocated", "rss-sampled", "getrusage-maxrss"), r["delta_mb"] > 32
        (True, True)
    """
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "delta_mb": (peak - before) / 2**20, "method": "cuda.max_memory_allocated"}
    _trim_heap()
    before = _rss_bytes()
    if before is None:
        import resource

        b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mb": a / 1024, "delta_mb": (a - b) / 1024, "method": "getrusage-maxrss"}
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            v = _rss_bytes()
            if v is not None and v > peak[0]:
                peak[0] = v
            time.sleep(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    v = _rss_bytes()
    peak[0] = max(peak[0], v or 0)
    return {"peak_mb": peak[0] / 2**20, "delta_mb": (peak[0] - before) / 2**20, "method": "rss-sampled"}


def median(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")
