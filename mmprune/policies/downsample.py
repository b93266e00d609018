"""The ``downsample`` policy (VTC-Bench's baseline): see ``Downsample``."""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import Plan, Policy, Tokens
from .batch import BatchPlan, BatchTokens

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class Downsample(Policy):
    """``downsample``: the image itself made smaller before the vision tower, so the tower emits about the budget's
    tokens (and costs less: the tower is half of Qwen2-VL's prefill on a GPU). VTC-Bench (2025) found plain
    downsampling beats many pruning methods; it is the baseline every reduction policy should be compared with.

    Dynamic-resolution towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each image / video is resized on the processor's
    output (``mmprune.adapters.qwen_resize``: patches back to frames, bicubic with antialiasing, patches again;
    each side scaled by ``sqrt(budget)`` and rounded to the merge size; an int budget is tokens per item), and its
    placeholder run in ``input_ids`` shrinks to match, in ``generate`` and in a forward call alike. The model then
    runs unwrapped on that input (its own M-RoPE positions and cache); ``generate`` returns the caller's prompt
    followed by the new tokens; a forward call's logits cover the shortened prompt. The trace's ``n_visual`` is the
    original count, its stage keeps the new one. It reads the prompt's ids, its mask and the grids on the host once
    per call (three reads: the input's shapes change, so this cannot stay on the device).

    LLaVA-NeXT images: each is re-tiled as the smaller image whose anyres token count is the largest within the
    budget (``mmprune.adapters.llava_tiles``: a smaller grid pinpoint, so fewer 336-px tiles reach the tower; the
    base tile kept), ``image_sizes`` and the placeholder runs changed to match. The smallest pinpoint bounds it
    (llava-v1.6: 1176 of a square image's 2928 tokens, 40%): a smaller budget gets that grid, and the trace says
    what was kept. LLaVA-OneVision videos: the tower's resolution is fixed, so a video keeps fewer frames instead
    (evenly spaced, ``round(frames * budget)``, at least one), its placeholder run shrinking to match; its images
    are pooled. Fixed-resolution towers otherwise (LLaVA-1.5, OneVision images): no smaller input exists for the
    tower, so the policy falls back to ``pool`` (grid pooling of the projected tokens to the budget), said in the
    trace.

    Example:
        >>> from mmprune.adapters.qwen_resize import target_grid
        >>> target_grid((1, 32, 48), 0.25, 2)  # a quarter of the tokens: each side halved
        (1, 16, 24)
    """

    name = "downsample"
    stages = ("pre",)
    data_free = True
    paper = "VTC-Bench baseline, 2025"
    summary = "a smaller image before the vision tower (Qwen-VL, NeXT tiles, OneVision frames); else pool"
    where = "before the vision tower"
    paper_url = "https://arxiv.org/abs/2510.07143"
    option_choices = {"mode": ("bicubic", "bilinear", "area", "nearest")}

    @classmethod
    def option_defaults(cls):
        return {"mode": "bicubic"}

    def __init__(self, **options):
        super().__init__(**options)
        self._pool = None  # the fallback of fixed-resolution towers
        self._videos_done = False  # OneVision: videos already have fewer frames; pool only the images

    # -- the stage: identity where the input was resized, pooling elsewhere
    def select(self, tokens: Tokens) -> Plan:
        if self._pool is not None:
            if self._videos_done:  # a segment with a frame grid is a video: its budget is everything it has
                budgets = [n if g is not None else b for n, b, g in zip(tokens.segments, tokens.budgets, tokens.grids)]
                tokens = dataclasses.replace(tokens, budgets=budgets)
            return self._pool.select(tokens)
        return Plan(keep=torch.arange(tokens.n))

    def select_batch(self, bt: BatchTokens) -> BatchPlan | None:
        if self._pool is not None:
            if self._videos_done:
                budgets = [[n if g is not None else b for n, b, g in zip(cs, bs, list(gs) + [None] * len(cs))]
                           for cs, bs, gs in zip(bt.counts, bt.budgets, bt.grids)]
                bt = dataclasses.replace(bt, budgets=budgets)
            return self._pool.select_batch(bt)
        return None  # data-free identity: the engine's cached plan

    def install_encoder(self, engine) -> None:
        stage = next(s for s in engine.stages if s.policy is self)
        budget, mode = stage.config.budget, self.options["mode"]
        if engine.adapter.family in QWEN:
            _install_rewrite(engine, lambda model, kw: downsample_inputs(model, kw, budget, mode))
            return
        if engine.adapter.family == "llava_next":
            _install_rewrite(engine, lambda model, kw: fewer_tiles(model, kw, budget, mode))
            engine.notes.append("downsample: LLaVA-NeXT images re-tiled as a smaller image (fewer anyres tiles)")
            return
        from .merging import Pool

        self._pool = Pool()
        if engine.adapter.family == "llava_onevision":
            self._videos_done = True
            _install_rewrite(engine, lambda model, kw: fewer_frames(model, kw, budget))
            engine.notes.append("downsample: OneVision videos keep fewer frames; its images are pooled (fixed-resolution tower)")
            return
        engine.notes.append(f"downsample: the {engine.adapter.family} tower has a fixed resolution; pooled instead")


def downsample_inputs(model, kwargs: dict, budget, mode: str = "bicubic"):
    """Qwen-VL inputs with every image / video resized to about ``budget`` of its tokens: ``(new kwargs,
    original per-sample visual counts)``, or None when there is nothing to resize. Reads ``input_ids`` and the
    grids on the host (one copy each: this policy changes shapes, so it cannot stay on the device)."""
    from ..adapters.qwen_resize import resize_items

    cfg, ids = model.config, kwargs.get("input_ids")
    mods = [(m, kwargs.get(f"pixel_values{'' if m == 'image' else '_videos'}"), kwargs.get(f"{m}_grid_thw"))
            for m in ("image", "video")]
    mods = [(m, pv, g) for m, pv, g in mods if pv is not None and g is not None]
    if ids is None or not mods:
        return None
    merge = cfg.vision_config.spatial_merge_size
    new = dict(kwargs)
    token_ids, runs = {}, {}
    for m, pv, grid in mods:
        grids = [tuple(int(v) for v in g) for g in grid.tolist()]  # a read: the items' grids
        counts = [t * h * w // merge**2 for t, h, w in grids]
        fractions = [budget if isinstance(budget, float) else min(1.0, budget / max(n, 1)) for n in counts]
        pixels, grids2 = resize_items(pv, grids, fractions, cfg.vision_config, mode)
        new[f"pixel_values{'' if m == 'image' else '_videos'}"] = pixels
        new[f"{m}_grid_thw"] = torch.tensor(grids2, dtype=grid.dtype, device=grid.device)
        token_ids[m] = int(getattr(cfg, f"{m}_token_id"))
        # Qwen3-VL writes a timestamp before each temporal patch of a video: one placeholder run per patch
        per_patch = m == "video" and cfg.model_type.startswith("qwen3")
        runs[m] = [(h * w // merge**2, h2 * w2 // merge**2) for (t, h, w), (_, h2, w2) in zip(grids, grids2) for _ in range(t)] \
            if per_patch else [(t * h * w // merge**2, t2 * h2 * w2 // merge**2) for (t, h, w), (t2, h2, w2) in zip(grids, grids2)]
    new["input_ids"], new["attention_mask"], originals = _shrink_runs(model, kwargs, token_ids, runs)
    if kwargs.get("mm_token_type_ids") is not None:  # 1 image, 2 video, 0 text (the processor's codes)
        kinds = torch.zeros_like(new["input_ids"])
        for m, code in (("image", 1), ("video", 2)):
            if m in token_ids:
                kinds = torch.where(new["input_ids"] == token_ids[m], code, kinds)
        new["mm_token_type_ids"] = kinds.to(kwargs["mm_token_type_ids"].dtype)
    new.pop("position_ids", None)  # the model derives them from the new grids
    return new, originals


def _shrink_runs(model, kwargs: dict, token_ids: dict, runs: dict):
    """``input_ids`` (left padded) with every placeholder run replaced by its new length: ``runs[modality]`` lists
    ``(length, new length)`` per run in order, and a run of another length raises (the placeholders do not
    match the pixels). Returns ``(new input_ids, new attention_mask, original per-sample visual counts)``."""
    from ..syncs import host_side

    ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    host = ids.cpu()  # the reads: the prompt's ids and mask, once (then host work only)
    host_mask = mask.cpu().bool() if mask is not None else None
    with host_side():
        return _shrink_host(model, ids, host, host_mask, token_ids, runs)


def _shrink_host(model, ids, host, host_mask, token_ids: dict, runs: dict):
    if host_mask is None:
        host_mask = torch.ones_like(host, dtype=torch.bool)
    which = {v: k for k, v in token_ids.items()}
    nxt = {m: iter(r) for m, r in runs.items()}
    visual = set(int(getattr(model.config, f"{m}_token_id")) for m in ("image", "video")
                 if getattr(model.config, f"{m}_token_id", None) is not None)
    rows, originals = [], []
    for b in range(host.shape[0]):
        seq = host[b][host_mask[b]].tolist()
        out, i, n_vis = [], 0, 0
        while i < len(seq):
            tok, j = seq[i], i + 1
            while j < len(seq) and seq[j] == tok and tok in which:
                j += 1
            if tok in visual:
                n_vis += j - i
            if tok in which:
                length, new_length = next(nxt[which[tok]], (None, None))
                if length != j - i:
                    raise ValueError(f"downsample: a run of {j - i} {which[tok]} placeholders where the pixels give "
                                     f"{length}; the prompt does not match its {which[tok]}s")
                out.extend([tok] * new_length)
            else:
                out.extend(seq[i:j])
            i = j
        rows.append(out)
        originals.append(n_vis)
    width = max(len(r) for r in rows)
    pad = model.config.get_text_config().pad_token_id or 0
    new_ids = torch.full((len(rows), width), pad, dtype=ids.dtype)
    new_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, as generation needs
        new_ids[b, width - len(r) :] = torch.tensor(r, dtype=ids.dtype)
        new_mask[b, width - len(r) :] = 1
    return new_ids.to(ids.device), new_mask.to(ids.device), originals


def fewer_frames(model, kwargs: dict, budget):
    """LLaVA-OneVision inputs whose videos keep about ``budget`` of their frames (evenly spaced, at least one):
    ``(new kwargs, original per-sample visual counts)``, or None without videos."""
    pv, ids = kwargs.get("pixel_values_videos"), kwargs.get("input_ids")
    if pv is None or ids is None or pv.dim() != 5:
        return None
    frames = pv.shape[1]
    vc = model.config.vision_config
    side = math.ceil((vc.image_size // vc.patch_size) / 2)  # the 2x2-pooled frame grid
    per_video = frames * side * side + 1  # + the newline token after the frames
    keep = max(1, round(frames * budget)) if isinstance(budget, float) else max(1, min(frames, budget // (side * side)))
    idx = ((torch.arange(keep, dtype=torch.float64) + 0.5) * frames / keep).floor().long().clamp(max=frames - 1)
    new = dict(kwargs)
    new["pixel_values_videos"] = pv[:, idx.to(pv.device)]
    token = int(model.config.video_token_id)
    new["input_ids"], new["attention_mask"], originals = _shrink_runs(
        model, kwargs, {"video": token}, {"video": [(per_video, keep * side * side + 1)] * pv.shape[0]})
    new.pop("position_ids", None)
    return new, originals


def fewer_tiles(model, kwargs: dict, budget, mode: str = "bicubic"):
    """LLaVA-NeXT inputs whose images are re-tiled as the smaller image whose token count is the largest within
    ``budget`` (``mmprune.adapters.llava_tiles``): ``(new kwargs, original per-sample visual counts)``, or None
    without images. The smallest grid pinpoint bounds how few tokens an image can get (llava-v1.6: 1176 of a
    square image's 2928, 40%); below that, the image gets that grid. Reads ``image_sizes`` on the host."""
    from ..adapters.llava_tiles import anyres_tokens, retile, smaller_size, tile_count

    pv, sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
    if pv is None or sizes is None or kwargs.get("input_ids") is None or pv.dim() != 5:
        return None
    cfg = model.config
    old = [tuple(int(v) for v in hw) for hw in sizes.tolist()]  # a read: the images' sizes
    counts = [anyres_tokens(cfg, hw) for hw in old]
    new_sizes = [smaller_size(cfg, hw, budget * n if isinstance(budget, float) else budget) for hw, n in zip(old, counts)]
    tiles = [retile(cfg, pv[i], hw, nhw, mode) if nhw != hw else pv[i, : tile_count(cfg, hw)]
             for i, (hw, nhw) in enumerate(zip(old, new_sizes))]
    width = max(t.shape[0] for t in tiles)
    new = dict(kwargs)
    new["pixel_values"] = torch.stack([torch.cat([t, t.new_zeros(width - t.shape[0], *t.shape[1:])]) for t in tiles])
    new["image_sizes"] = torch.tensor(new_sizes, dtype=sizes.dtype, device=sizes.device)
    token = int(cfg.image_token_id)
    runs = [(n, anyres_tokens(cfg, hw)) for n, hw in zip(counts, new_sizes)]
    new["input_ids"], new["attention_mask"], originals = _shrink_runs(model, kwargs, {"image": token}, {"image": runs})
    new.pop("position_ids", None)
    return new, originals


def _install_rewrite(engine, rewrite) -> None:
    import functools

    model, inside = engine.model, {"on": False}

    def note_counts(originals, new):
        trace = engine.last_trace
        if trace is not None and trace.stages:
            trace.n_visual = list(originals)
            trace.stages[0].n_before = list(originals)
            trace.tower_inputs = {k: v for k, v in new.items()
                                  if k.startswith("pixel_values") or k.endswith("_thw") or k == "image_sizes"}

    def pre(module, args, kwargs):  # a forward call outside generate
        if inside["on"] or not engine.enabled or args:
            return None
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and cache.get_seq_length() > 0:
            return None
        got = rewrite(model, kwargs)
        if got is None:
            return None
        inside["rewritten"] = got
        return args, got[0]

    def post(module, args, output):  # the trace of that forward call: the original counts in
        got = inside.pop("rewritten", None)
        if got is not None:
            note_counts(got[1], got[0])
        return None

    original_generate = model.generate

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if not engine.enabled:
            return original_generate(*args, **kwargs)
        if args:
            kwargs, args = {**kwargs, "input_ids": args[0]}, args[1:]
        got = rewrite(model, kwargs)
        if got is None:
            return original_generate(*args, **kwargs)
        new, originals = got
        inside["on"] = True
        try:
            out = original_generate(*args, **new)
        finally:
            inside["on"] = False
        note_counts(originals, new)
        prompt, width = kwargs["input_ids"], new["input_ids"].shape[1]
        if isinstance(out, torch.Tensor):
            return torch.cat([prompt, out[:, width:]], 1)
        out.sequences = torch.cat([prompt, out.sequences[:, width:]], 1)
        return out

    engine.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
    engine.handles.append(model.register_forward_hook(post))
    engine._patch(model, "generate", generate)
