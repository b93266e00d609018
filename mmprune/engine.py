"""The stage machinery shared by every model family: hooks, per-forward state, index bookkeeping.

How a wrapped forward runs (see shared/DESIGN.md, "The three seams"):

1. A pre-hook on the top-level model records the call: where the visual placeholder tokens are, and how
   many tokens each image / video produced (read from ``mm_encoder_outputs`` or recorded by the
   instance-level wrap of ``get_image_features``).
2. A pre-hook on the language model sees the merged ``inputs_embeds``. On a prefill it runs the pre-LLM
   stages and *removes* the dropped rows: embeddings, the 2-D mask, position ids (all rows of Qwen's
   M-RoPE ids, **gathered from the original positions**), Qwen3's deepstack inputs. Ragged samples are
   re-padded on the left. A 2-D mask is always passed afterwards (gaps in position ids with no mask are
   read as packed sequences by transformers). During decode it swaps the pruned prompt's columns into
   the full-length mask that ``generate`` grows.
3. Pre-hooks on decoder layers ``>= K`` run the in-LLM stages: rows of hidden states, (cos, sin),
   position ids and a mask rebuilt for the shorter rows with transformers' own ``create_causal_mask``
   (``layer_idx`` makes it read that layer's cache length, since DynamicCache layers < K stay longer).
4. A post-hook on the language model scatters the survivors back to full length, dropped rows carrying
   the state they had when dropped (through the final norm), so ``logits`` keep the input's length and
   ``labels`` work unchanged.

Signals and merges (policy library): a stage's policy declares ``signals``; vision-tower signals
(``cls_attn`` / ``keys`` / ``cls_sim``) are captured by adapter hooks installed only for the duration of the
instance-level ``get_*_features`` wrap and travel on the encoder output (so ``generate``'s encode-once path
keeps them), then are mapped per visual token and sliced with the surviving tokens at every stage; LLM
signals (``attn``, ``text_attn``, ``llm_keys``) are computed in a pre-hook on layer K-1's attention
module, or, for a policy whose ``signal_layer`` is ``"own"`` (PyramidDrop), from layer K's own input norm
and q/k projections on its input, just before the stage drops. A ``Plan.assign`` merges dropped tokens into kept ones (``kernels.merge_tokens`` weighted means);
the engine tracks, per original visual token, its representative and weight, so Qwen3-VL deepstack rows
merge with the same groups (``Run.merge_originals``) and later stages see each token's ``sizes``.
Multi-stage policies expand into several stages at wrap time (``Policy.expand``). Time spent in policy
selection and signal computation is recorded in the trace (``StageTrace.seconds``,
``Trace.signal_seconds``); a declared signal that fell back is named in ``Trace.notes``.

Per-sequence state that must outlive one forward (the kept prompt columns) travels on the cache object
that ``generate`` threads through decoding, never in a module-global: two wrapped models, or two
generations, never see each other's state.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import attention_probs, pagerank_importance, rotary_keys
from .kernels import gather_tokens, scatter_tokens
from .policies.base import Plan, Tokens, resolve_budget
from .traces import StageTrace, Trace

_IDS = itertools.count()


def _cache_of(kwargs: dict):
    """The KV cache a forward call was given: inside the language model transformers < 5.24 names it
    ``past_key_values``, 5.24 ``cache`` (the top-level model still takes ``past_key_values``)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


@functools.cache
def _cache_kw(fn) -> str:
    """The name ``create_causal_mask`` (or the sliding-window one) takes the cache under (5.24: ``cache``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


# Signals captured in the vision tower (adapter.vision_capture), per visual token.
VISION_SIGNALS = ("cls_attn", "keys", "cls_sim", "tome_groups", "tower_cls", "next_cls_attn", "next_keys", "tower_assign")
# Signals read at decoder layer K-1 (the score hook on its attention module).
LLM_SIGNALS = ("attn", "text_attn", "llm_keys", "pagerank")


@dataclass
class Stage:
    config: Any  # PruneConfig
    policy: Any  # Policy instance
    layer: int | None  # None = pre-LLM


@dataclass
class CallCtx:
    """One top-level forward: where the visual tokens are and how they split into images / videos."""

    input_ids: torch.Tensor | None = None
    visual: torch.Tensor | None = None  # [B, L] bool
    items: dict = field(default_factory=dict)  # modality -> list of (n_tokens, grid)
    signals: dict = field(default_factory=dict)  # modality -> list (per item) of {signal: tensor} or None
    notes: list = field(default_factory=list)
    decode: bool = False
    keep_full: bool = True  # False when only the last logits are used (generate): skip the scatter-back


@dataclass
class SeqState:
    """What decoding needs to know about a pruned prompt; stored on the cache object."""

    owner: int
    full_len: int  # L0: prompt length before pruning
    index0: torch.Tensor  # [B, P] original column of each pre-LLM row (-1 = pad)
    stage_masks: dict = field(default_factory=dict)  # layer -> [B, P_K] 2-D mask of the prompt at layer K


@dataclass
class Run:
    """Working state of one prefill forward through the language model."""

    ctx: CallCtx
    cache: Any
    orig: torch.Tensor  # [B, P] current rows -> original column (-1 pad)
    rel: torch.Tensor  # [B, P] current rows -> row of the LM input (-1 pad)
    mask2d: torch.Tensor  # [B, P] long
    vis_rows: list  # per sample: LongTensor of current rows that are visual, in order
    vis_ids: list  # per sample: LongTensor of original visual-token ids of those rows
    seg_ids: list  # per sample: LongTensor segment index of each of those rows
    grids: list  # per sample: list of grids per segment
    fill: torch.Tensor | None = None  # [B, L0, D] state of dropped rows, when they were dropped
    pos_emb: Any = None
    pos_ids: Any = None
    masks: dict = field(default_factory=dict)  # layer type -> mask for the current rows
    pruned_in_llm: bool = False
    signals: dict = field(default_factory=dict)  # layer -> {signal: tensor} read at layer K-1
    trace: Trace = field(default_factory=Trace)
    vsig: list = field(default_factory=list)  # per sample: {vision signal: [n_vis, ...] or None}
    pos0: list = field(default_factory=list)  # per sample: index of each original visual token in its segment
    seg_n0: list = field(default_factory=list)  # per sample: token count of each segment before any stage
    rep: list = field(default_factory=list)  # per sample: original visual id of each original's representative (-1 gone)
    alpha: list = field(default_factory=list)  # per sample: weight of each original in its representative's mean
    mix: list = field(default_factory=list)  # per sample: [surviving, original] weights once a combine plan ran
    embeds0: torch.Tensor | None = None  # the LM's input embeddings before any stage (signal "input_embeds")
    vis_pos0: list = field(default_factory=list)  # per sample: original columns of its visual tokens
    merged: bool = False

    def mixing(self, b: int) -> torch.Tensor:
        """Sample b's ``[surviving, original]`` mixing matrix from its representatives and weights."""
        ids = self.vis_ids[b].cpu()
        inv = torch.full((len(self.rep[b]),), -1, dtype=torch.long)
        inv[ids] = torch.arange(len(ids))
        live = (self.rep[b] >= 0).nonzero().flatten()
        return torch.zeros(len(ids), len(self.rep[b])).index_put_((inv[self.rep[b][live]], live), self.alpha[b][live])

    def merge_originals(self, b: int, x: torch.Tensor) -> torch.Tensor:
        """Rows ``x [n_vis, D]`` of sample b's original visual tokens -> one row per surviving token, merged
        with the same groups and weights as the features (Qwen3-VL deepstack inputs follow merges this way)."""
        if self.mix[b] is not None:
            return (self.mix[b].to(x.device) @ x.float()).to(x.dtype)
        ids = self.vis_ids[b].to(x.device)
        rep, alpha = self.rep[b].to(x.device), self.alpha[b].to(x.device)
        inv = torch.full((len(rep),), -1, dtype=torch.long, device=x.device)
        inv[ids] = torch.arange(len(ids), device=x.device)
        live = rep >= 0
        out = torch.zeros(len(ids), *x.shape[1:], dtype=torch.float32, device=x.device)
        w = alpha[live].view(-1, *([1] * (x.dim() - 1)))
        out.index_add_(0, inv[rep[live]], x[live].float() * w)
        return out.to(x.dtype)


def _left_pad_index(rows: list[torch.Tensor], device) -> torch.Tensor:
    """Stack per-sample row lists into ``[B, P]``, left-padded with -1."""
    p = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), p), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        if len(r):
            out[b, p - len(r) :] = r.to(device)
    return out


def _gather_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``index [B, K]`` along ``dim`` of a tensor whose batch dim is ``dim - 1`` (pads -> 0)."""
    if dim == 1 and t.dim() == 3:
        return gather_tokens(t, index, check=False)  # engine-built indices: valid, no sync
    if t.shape[dim - 1] == 1 and index.shape[0] > 1:  # positions shared across the batch
        t = t.expand(*t.shape[: dim - 1], index.shape[0], *t.shape[dim:])
    safe = index.clamp(min=0)
    shape = list(t.shape)
    view = [1] * t.dim()
    view[dim - 1], view[dim] = index.shape[0], index.shape[1]
    expand = list(shape)
    expand[dim] = index.shape[1]
    out = torch.gather(t, dim, safe.view(view).expand(expand))
    return out.masked_fill((index < 0).view(view).expand(expand), 0)


class Engine:
    """Installs and runs the stages of one wrap on one model instance."""

    def __init__(self, model, adapter, stages: list[Stage]):
        self.id = next(_IDS)
        self.model = model
        self.adapter = adapter
        self.stages = stages
        self.pre_stages = [s for s in stages if s.layer is None]
        self.llm_stages = sorted([s for s in stages if s.layer is not None], key=lambda s: s.layer)
        self.enabled = True
        self.call: CallCtx | None = None
        self.run: Run | None = None
        self.decode_state: SeqState | None = None
        self.decode_masks: dict = {}
        self.decode_lm_mask: torch.Tensor | None = None
        self.last_trace: Trace | None = None
        self.handles: list = []
        self.notes: list = []  # wrap-time notes, copied into every trace
        self.patched: list = []  # (obj, attr_name, had_instance_attr, old_value)
        self.lm = adapter.language_model()
        self.layers = adapter.layers()
        wanted = {sig for s in stages for sig in s.policy.signals}
        self.vision_signals = tuple(sig for sig in VISION_SIGNALS if sig in wanted)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._top_post, always_call=True))
        self.handles.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True))
        if self.llm_stages:
            first = self.llm_stages[0].layer
            for i in range(first, len(self.layers)):
                self.handles.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            for s in self.llm_stages:
                needs = tuple(sig for sig in LLM_SIGNALS if sig in s.policy.signals)
                if needs and s.policy.signal_layer == "previous":
                    attn = self.adapter.attention_module(s.layer - 1)
                    hook = self._score_hook(s.layer, needs)
                    self.handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        for s in self.pre_stages:
            install = getattr(s.policy, "install_encoder", None)
            if install is not None:
                install(self)
        for modality, owner, name in self.adapter.encoder_methods():
            self._patch(owner, name, self._wrap_encoder(modality, getattr(owner, name)))
        self._patch(m, "prepare_inputs_for_generation", self._wrap_prepare(m.prepare_inputs_for_generation))
        self.adapter.install_extras(self)

    def _patch(self, obj, name, value) -> None:
        had = name in obj.__dict__
        self.patched.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for obj, name, had, old in reversed(self.patched):
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)
        self.handles.clear()
        self.patched.clear()

    # ------------------------------------------------------------------ instance-level wraps
    def _wrap_encoder(self, modality: str, fn):
        import functools

        @functools.wraps(fn)  # keeps the signature: generate() inspects it to pick encoder kwargs
        def wrapped(*args, **kwargs):
            cap = None
            if self.enabled and self.vision_signals:
                cap = self.adapter.vision_capture(modality, self.vision_signals)
            if cap is not None:
                cap.start()
            try:
                out = fn(*args, **kwargs)
            finally:
                if cap is not None:
                    cap.stop()
            try:
                out._mmprune_items = self.adapter.encoder_items(modality, out, args, kwargs)
            except Exception:  # never break the model for bookkeeping; fall back to contiguous runs
                out._mmprune_items = None
            out._mmprune_signals = None
            if cap is not None:
                out._mmprune_signals = cap.items(out, args, kwargs)  # None (+ cap.error) when unavailable
                out._mmprune_signal_note = cap.error
                out._mmprune_signal_s = cap.seconds
            if self.call is not None and not self.call.decode:
                if out._mmprune_items is not None:
                    self.call.items[modality] = out._mmprune_items
                self._take_signals(self.call, modality, out)
            return out

        return wrapped

    @staticmethod
    def _take_signals(ctx: CallCtx, modality: str, out) -> None:
        sig = getattr(out, "_mmprune_signals", None)
        if sig is not None:
            ctx.signals[modality] = sig
        note = getattr(out, "_mmprune_signal_note", None)
        if note:
            ctx.notes.append(f"{modality}: {note}")
        secs = getattr(out, "_mmprune_signal_s", None)
        if secs is not None:
            ctx.notes.append(("signal_s", secs))

    def _wrap_prepare(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            mask = kwargs.get("attention_mask")
            out = fn(*args, **kwargs)
            # generate() pre-builds 4-D masks for static caches from the *full-length* 2-D mask; after
            # pruning the cache is shorter, so hand the 2-D mask on and let the LM build the mask itself.
            if self.enabled and "attention_mask" in out and (mask is None or mask.dim() == 2):
                out["attention_mask"] = mask
            return out

        return wrapped

    # ------------------------------------------------------------------ top-level hooks
    def _top_pre(self, module, args, kwargs):
        self.call, self.run, self.decode_state, self.decode_masks, self.decode_lm_mask = None, None, None, {}, None
        if not self.enabled:
            return None
        cache = _cache_of(kwargs)
        state = getattr(cache, "_mmprune", None) if cache is not None else None
        if state is not None and state.owner == self.id and cache.get_seq_length() > 0:
            self.call = CallCtx(decode=True)
            self.decode_state = state
            if kwargs.get("attention_mask") is None:
                # Without a mask the model would derive positions from the (shorter) cache length.
                ids = kwargs.get("input_ids", args[0] if args else None)
                ref = ids if ids is not None else kwargs["inputs_embeds"]
                b, q = ref.shape[0], ref.shape[1]
                done = cache.get_seq_length() - state.index0.shape[1]
                kwargs["attention_mask"] = torch.ones(b, state.full_len + done + q, dtype=torch.long, device=ref.device)
                return args, kwargs
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        ctx = CallCtx(input_ids=ids)
        if ids is not None:
            ctx.visual = self.adapter.visual_mask(ids)
        for modality, out in (kwargs.get("mm_encoder_outputs") or {}).items():
            items = getattr(out, "_mmprune_items", None)
            if items is None and out is not None:
                try:
                    items = self.adapter.encoder_items(modality, out, (), {})
                except Exception:
                    items = None
            if items is not None:
                ctx.items[modality] = items
            if out is not None:
                self._take_signals(ctx, modality, out)
        ltk = kwargs.get("logits_to_keep", 0)
        ctx.keep_full = not (isinstance(ltk, int) and ltk == 1)
        self.call = ctx
        return None

    def _top_post(self, module, args, output):
        self.call, self.run, self.decode_state, self.decode_masks, self.decode_lm_mask = None, None, None, {}, None
        return None

    # ------------------------------------------------------------------ segments
    def _segments(self, ctx: CallCtx, b_count: int):
        """Per sample: list of (start, n_tokens, grid) over its visual tokens, in sequence order.

        Items (images / videos, with counts from the encoder output) are matched to the placeholder
        tokens of their modality in order; an item may span several runs (Qwen3-VL separates a video's
        frames by timestamp text). Tokens no item accounts for become one segment per contiguous run.
        """
        ids, visual = ctx.input_ids, ctx.visual
        queues = {}
        for m, v in ctx.items.items():
            sig = ctx.signals.get(m)
            if sig is None or len(sig) != len(v):
                sig = [None] * len(v)
            queues[m] = [(cnt, grid, sg) for (cnt, grid), sg in zip(v, sig)]
        token_modality = self.adapter.token_modalities()
        out = []
        for b in range(b_count):
            pos = visual[b].nonzero().flatten()
            mods = [token_modality.get(t) for t in ids[b, pos].tolist()]
            segs, j = [], 0
            while j < len(pos):
                q = queues.get(mods[j])
                same = [k for k in range(j, len(pos)) if mods[k] == mods[j]]
                n_left = len(same)
                if q and q[0][0] <= n_left:
                    cnt, grid, sg = q.pop(0)
                    members = same[:cnt]
                    if members[-1] - j + 1 == cnt:  # contiguous in visual order
                        segs.append((j, cnt, grid, sg))
                        j += cnt
                        continue
                    q.insert(0, (cnt, grid, sg))
                # unknown split: this contiguous run is one segment
                k = j + 1
                while k < len(pos) and pos[k] == pos[k - 1] + 1 and mods[k] == mods[j]:
                    k += 1
                segs.append((j, k - j, None, None))
                j = k
            out.append(segs)
        return out

    @staticmethod
    def _seg_ids(segs, n, dev) -> torch.Tensor:
        """Segment index of each of a sample's n visual tokens."""
        out = torch.zeros(n, dtype=torch.long, device=dev)
        for i, (start, cnt, _, _) in enumerate(segs):
            out[start : start + cnt] = i
        return out

    def _vision_signals(self, segs, n, dev) -> dict:
        """One sample's vision-tower signals over its n visual tokens; a signal is None unless every
        segment has it with the right length (then the policy's documented fallback applies)."""
        out = {}
        for name in self.vision_signals:
            parts = []
            for _, cnt, _, sg in segs:
                t = None if sg is None else sg.get(name)
                if t is None or t.shape[0] != cnt:
                    parts = None
                    break
                parts.append(t.to(dev))
            out[name] = torch.cat(parts) if parts else None
        return out

    @staticmethod
    def _positions(segs, n, dev) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.long, device=dev)
        for start, cnt, _, _ in segs:
            out[start : start + cnt] = torch.arange(cnt, device=dev)
        return out

    # ------------------------------------------------------------------ language-model hooks
    def _lm_pre(self, module, args, kwargs):
        ctx = self.call
        if not self.enabled or ctx is None:
            return None
        if ctx.decode:
            return self._lm_decode(args, kwargs)
        cache = _cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # continuing from a cache we did not prune: leave untouched
        x = kwargs.get("inputs_embeds")
        if x is None or ctx.visual is None or ctx.visual.shape != x.shape[:2]:
            return None
        b, l0, _ = x.shape
        dev = x.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
            raise ValueError("mmprune needs a 2-D attention_mask (or None) at the language model; got a prebuilt mask")
        mask2d = torch.ones(b, l0, dtype=torch.long, device=dev) if mask is None else mask.long()
        segs = self._segments(ctx, b)
        vis_pos = [ctx.visual[i].nonzero().flatten() for i in range(b)]
        arange = torch.arange(l0, device=dev).expand(b, l0)
        run = Run(
            ctx=ctx,
            cache=cache,
            orig=arange,
            rel=arange,
            mask2d=mask2d,
            vis_rows=vis_pos,
            vis_ids=[torch.arange(len(v), device=dev) for v in vis_pos],
            seg_ids=[self._seg_ids(s, len(v), dev) for s, v in zip(segs, vis_pos)],
            grids=[[g for _, _, g, _ in s] for s in segs],
            trace=Trace(n_visual=[len(v) for v in vis_pos]),
            vsig=[self._vision_signals(s, len(v), dev) for s, v in zip(segs, vis_pos)],
            pos0=[self._positions(s, len(v), dev) for s, v in zip(segs, vis_pos)],
            seg_n0=[[cnt for _, cnt, _, _ in s] for s in segs],
            rep=[torch.arange(len(v)) for v in vis_pos],
            alpha=[torch.ones(len(v)) for v in vis_pos],
            mix=[None for _ in vis_pos],
            embeds0=x if any("input_embeds" in s.policy.signals for s in self.stages) else None,
            vis_pos0=vis_pos,
        )
        run.trace.notes.extend(self.notes)
        for note in ctx.notes:
            if isinstance(note, tuple):
                run.trace.signal_seconds += note[1]
            else:
                run.trace.notes.append(note)
        for name in self.vision_signals:  # say which declared signals fell back (never silently)
            if name not in ("tome_groups", "tower_cls", "tower_assign") and any(len(v) and sg.get(name) is None for v, sg in zip(vis_pos, run.vsig)):
                run.trace.notes.append(f"{name}: not available from the {self.adapter.family} tower for some "
                                       "items; the policy's documented fallback was used")
        self.run = run
        self.last_trace = run.trace
        run.fill = x if ctx.keep_full else None
        if not any(len(v) for v in vis_pos):
            return None
        if cache is not None:
            cache._mmprune = SeqState(owner=self.id, full_len=l0, index0=arange.clone())
        if not self.pre_stages:
            return None
        feats = x
        for stage in self.pre_stages:
            feats, _ = self._apply_stage(stage, run, feats)
        kwargs["inputs_embeds"] = feats
        kwargs["attention_mask"] = run.mask2d
        pos = kwargs.get("position_ids")
        if pos is None:  # what the text model would use by default
            pos = arange
        kwargs["position_ids"] = _gather_rows(pos, run.orig, pos.dim() - 1)
        self.adapter.prune_lm_kwargs(kwargs, run)
        run.rel = torch.where(run.orig >= 0, torch.arange(run.orig.shape[1], device=dev).expand_as(run.orig), -1)
        if cache is not None:
            cache._mmprune.index0 = run.orig.clone()
        return args, kwargs

    def _lm_decode(self, args, kwargs):
        state, cache = self.decode_state, _cache_of(kwargs)
        mask = kwargs.get("attention_mask")
        ref = kwargs.get("inputs_embeds")
        q = ref.shape[1]
        p = state.index0.shape[1]
        cached = cache.get_seq_length()
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] == state.full_len + (cached - p) + q:
                if kwargs.get("position_ids") is None:
                    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
                prompt = _gather_rows(mask[:, : state.full_len], state.index0, 1)
                mask = torch.cat([prompt, mask[:, state.full_len :]], dim=1)
                kwargs["attention_mask"] = mask
            elif mask.shape[1] != cached + q:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns; with a pruned prompt of {state.full_len} tokens "
                    f"expected {state.full_len + cached - p + q} (full length) or {cached + q} (pruned length)"
                )
        self.decode_lm_mask = mask
        return args, kwargs

    def _lm_post(self, module, args, kwargs, output):
        run = self.run
        if run is None or not self.enabled:
            return None
        self._record_layer_tokens(run)
        l0 = run.ctx.visual.shape[1]
        untouched = run.orig.shape[1] == l0 and bool((run.orig == torch.arange(l0, device=run.orig.device)).all())
        if run.fill is None or untouched:
            return None
        h = output.last_hidden_state
        full = self.adapter.final_norm()(run.fill.to(h.dtype))
        output.last_hidden_state = scatter_tokens(full, run.orig, h, check=False)
        return output

    def _record_layer_tokens(self, run: Run) -> None:
        counts = run.trace.layer_tokens
        n_layers = len(self.layers)
        if len(counts) < n_layers:  # layers after the last stage keep the last count
            last = counts[-1] if counts else [int(v) for v in run.mask2d.sum(-1).tolist()]
            counts.extend([last] * (n_layers - len(counts)))

    # ------------------------------------------------------------------ decoder-layer hooks
    def _layer_hook(self, i: int):
        stages = [s for s in self.llm_stages if s.layer == i]

        def hook(module, args, kwargs):
            if not self.enabled or self.call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.run is not None:
                return self._layer_prefill(i, stages, module, args, kwargs, hidden)
            if self.decode_state is not None:
                return self._layer_decode(i, args, kwargs, hidden)
            return None

        return hook

    def _layer_prefill(self, i, stages, module, args, kwargs, hidden):
        run = self.run
        if not any(len(v) for v in run.vis_rows) and not run.pruned_in_llm:
            return None
        if stages and not run.pruned_in_llm:
            pe = kwargs.get("position_embeddings")
            run.pos_emb = tuple(t.expand(hidden.shape[0], *t.shape[1:]) for t in pe) if pe is not None else None
            run.pos_ids = kwargs.get("position_ids")
            # layers before K ran on the LM-input rows: record their token counts for FLOPs accounting
            run.trace.layer_tokens = [[int(v) for v in run.mask2d.sum(-1).tolist()]] * i
        for stage in stages:
            if run.fill is not None:
                run.fill = scatter_tokens(run.fill.to(hidden.dtype), run.orig, hidden, check=False)
            needs = tuple(sig for sig in LLM_SIGNALS if sig in stage.policy.signals)
            if needs and stage.policy.signal_layer == "own":  # layer K's own q/k on its input (PyramidDrop)
                pe = run.pos_emb if run.pruned_in_llm else kwargs.get("position_embeddings")
                normed = self.adapter.attention_input(i, hidden)
                run.signals[stage.layer] = self._signals(self.adapter.attention_module(i), normed, pe, needs)
            p_old = hidden.shape[1]
            hidden, index = self._apply_stage(stage, run, hidden, scores=run.signals.get(stage.layer))
            if stage is stages[-1]:
                run.signals.clear()
            run.pos_emb = tuple(_gather_rows(t, index, 1) for t in run.pos_emb) if run.pos_emb else None
            if isinstance(run.pos_ids, torch.Tensor) and run.pos_ids.shape[-1] == p_old:
                run.pos_ids = _gather_rows(run.pos_ids, index, run.pos_ids.dim() - 1)
            run.masks = {}
            run.pruned_in_llm = True
            if run.cache is not None and getattr(run.cache, "_mmprune", None) is not None:
                run.cache._mmprune.stage_masks[stage.layer] = run.mask2d.clone()
        if not run.pruned_in_llm:
            return None
        if stages or len(run.trace.layer_tokens) <= i:
            run.trace.layer_tokens.append([int(v) for v in run.mask2d.sum(-1).tolist()])
        ltype = self.adapter.layer_type(i)
        if ltype not in run.masks:
            run.masks[ltype] = self._make_mask(hidden, run.mask2d, run.cache, i, ltype)
        kwargs["attention_mask"] = run.masks[ltype]
        kwargs["position_embeddings"] = run.pos_emb
        if "position_ids" in kwargs:
            kwargs["position_ids"] = run.pos_ids
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _layer_decode(self, i, args, kwargs, hidden):
        state = self.decode_state
        active = [s.layer for s in self.llm_stages if s.layer <= i and s.layer in state.stage_masks]
        if not active:
            return None
        k = active[-1]
        ltype = self.adapter.layer_type(i)
        key = (k, ltype)
        if key not in self.decode_masks:
            lm_mask = self.decode_lm_mask
            p = state.index0.shape[1]
            prompt = state.stage_masks[k]
            if lm_mask is None:  # the top-level hook synthesises one, so only a direct LM call lands here
                raise ValueError("decoding after in-LLM pruning needs a 2-D attention_mask; got None")
            mask2d = torch.cat([prompt.to(lm_mask.device, lm_mask.dtype), lm_mask[:, p:]], dim=1)
            self.decode_masks[key] = self._make_mask(hidden, mask2d, _cache_of(kwargs), i, ltype)
        kwargs["attention_mask"] = self.decode_masks[key]
        return args, kwargs

    def _make_mask(self, hidden, mask2d, cache, layer_idx, layer_type):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        fn = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        return fn(
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            **{_cache_kw(fn): cache},
            position_ids=None,
            layer_idx=layer_idx,
        )

    def _score_hook(self, layer: int, needs: tuple):
        """Pre-hook on layer K-1's attention module: the signals of the stage at K, from K-1's q/k (FastV)."""

        def hook(module, args, kwargs):
            run = self.run
            if not self.enabled or run is None or not any(len(v) for v in run.vis_rows):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            run.signals[layer] = self._signals(module, hidden, kwargs.get("position_embeddings"), needs)
            return None

        return hook

    def _signals(self, attn, hidden, pe, needs: tuple) -> dict:
        """LLM signals of the current rows, from ``attn``'s projections of its (normed) input ``hidden``."""
        run = self.run
        t0 = time.perf_counter()
        valid = run.mask2d.bool()
        sig = {}
        if "attn" in needs:
            last = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(-1, keepdim=True)
            probs = attention_probs(attn, hidden, pe, last, valid)
            sig["attn"] = probs.mean(1)[:, 0]  # [B, P]: head-averaged, last query
        if "text_attn" in needs:
            rows = _left_pad_index([self._question_rows(run, b) for b in range(valid.shape[0])], valid.device)
            if rows.shape[1]:
                sig["text_attn"] = attention_probs(attn, hidden, pe, rows, valid).mean(1)  # [B, Q, P]
            sig["text_rows"] = rows
        if "pagerank" in needs:
            sig["pagerank"] = pagerank_importance(attn, hidden, pe, valid)  # [B, P], AIM's importance
        if "llm_keys" in needs:  # what the KV cache holds: post-RoPE keys, heads concatenated (DART's)
            sig["llm_keys"] = rotary_keys(attn, hidden, pe).permute(0, 2, 1, 3).flatten(2)  # [B, P, H_kv * hd]
        run.trace.signal_seconds += time.perf_counter() - t0
        return sig

    @staticmethod
    def _question_rows(run: Run, b: int) -> torch.Tensor:
        """Current rows of sample b's question: valid text rows after its last visual row (else all text)."""
        valid = run.mask2d[b].bool().clone()
        vis = run.vis_rows[b]
        valid[vis] = False
        rows = valid.nonzero().flatten()
        if len(vis) and len(rows):
            after = rows[rows > vis.max()]
            if len(after):
                return after
        return rows

    # ------------------------------------------------------------------ one stage
    def _apply_stage(self, stage: Stage, run: Run, feats: torch.Tensor, scores=None):
        """Select per sample, merge if planned, drop rows; returns (feats of survivors, index into old rows)."""
        b, p_old = feats.shape[0], feats.shape[1]
        dev = feats.device
        alive_rows, kept_all, n_before, n_after, sc_all, as_all = [], [], [], [], [], []
        merged = None
        marks = torch.zeros(b, p_old, dtype=torch.bool, device=dev)
        sigs = set(stage.policy.signals)
        scores = scores or {}
        seconds = 0.0
        any_merge = False
        for i in range(b):
            rows, seg = run.vis_rows[i], run.seg_ids[i]
            n = len(rows)
            n_seg = len(run.grids[i])
            counts = torch.bincount(seg, minlength=n_seg).tolist() if n else [0] * n_seg
            if n:
                tok = self._tokens(stage, run, i, feats, rows, counts, scores, sigs)
                t0 = time.perf_counter()
                plan: Plan = stage.policy.select(tok)
                seconds += time.perf_counter() - t0
                keep = plan.keep.to(dev).long()
                self._check_plan(stage, plan, n)
                if plan.assign is not None and not plan.premerged:
                    merged = merged if merged is not None else feats.clone()
                    merged[i, rows[keep]] = self._merge(tok.features, plan, len(keep))
                any_merge = any_merge or plan.assign is not None
                as_all.append(None if plan.assign is None else plan.assign.long().cpu())
                self._track_groups(run, i, plan, keep.cpu())
                sc_all.append(None if plan.scores is None else plan.scores.detach().float().cpu())
            else:
                keep = torch.zeros(0, dtype=torch.long, device=dev)
                sc_all.append(None)
                as_all.append(None)
            kept_all.append(keep.cpu())
            n_before.append(n)
            n_after.append(len(keep))
            alive = run.orig[i] >= 0
            drop = torch.ones(n, dtype=torch.bool, device=dev)
            drop[keep] = False
            alive[rows[drop]] = False
            alive_rows.append(alive.nonzero().flatten())
            marks[i, rows[keep]] = True
            run.vis_ids[i] = run.vis_ids[i][keep]
            run.seg_ids[i] = seg[keep]
        run.merged = run.merged or any_merge
        feats = merged if merged is not None else feats
        index = _left_pad_index(alive_rows, dev)
        new_marks = _gather_rows(marks.unsqueeze(-1), index, 1).squeeze(-1)
        run.vis_rows = [new_marks[i].nonzero().flatten() for i in range(b)]
        run.orig = _gather_rows(run.orig.unsqueeze(-1) + 1, index, 1).squeeze(-1) - 1
        run.rel = _gather_rows(run.rel.unsqueeze(-1) + 1, index, 1).squeeze(-1) - 1
        run.mask2d = _gather_rows(run.mask2d.unsqueeze(-1), index, 1).squeeze(-1)
        run.trace.stages.append(
            StageTrace(
                policy=stage.policy.name,
                layer=stage.layer,
                kept=kept_all,
                n_before=n_before,
                n_after=n_after,
                scores=sc_all if any(s is not None for s in sc_all) else None,
                merged=any_merge,
                seconds=seconds,
                assign=as_all if any_merge else None,
            )
        )
        return _gather_rows(feats, index, 1), index

    def _tokens(self, stage, run: Run, i: int, feats, rows, counts, scores: dict, sigs: set) -> Tokens:
        """The ``Tokens`` view of sample i's visual rows, with the signals the stage's policy declared."""
        ids = run.vis_ids[i]
        text = question = None
        seq = run.mask2d[i].long().cumsum(0) - 1  # row -> index in the sample's unpadded current sequence
        extra = {"rows": seq[rows].cpu()}
        q_rows = self._question_rows(run, i) if sigs & {"question", "llm_keys", "final_norm", "input_embeds"} else None
        if "text" in sigs or "question" in sigs:
            t = run.mask2d[i].bool().clone()
            t[rows] = False
            text = feats[i][t]
            if "question" in sigs:
                question = feats[i][q_rows]
        if q_rows is not None:
            extra["question_rows"] = seq[q_rows].cpu()
        if "input_embeds" in sigs and run.embeds0 is not None:  # SparseVLM's raters: the LM-input embeddings
            extra["visual_embeds"] = run.embeds0[i, run.vis_pos0[i]]
            extra["question_embeds"] = run.embeds0[i, run.orig[i, q_rows]]
        if "final_norm" in sigs and stage.layer is not None:  # DART's cosine space: the LM's final norm
            norm = self.adapter.final_norm()
            extra["normed"], extra["question_normed"] = norm(feats[i, rows]), norm(feats[i, q_rows])
        for name in self.vision_signals:
            if name in sigs and run.vsig[i].get(name) is not None:
                extra[name] = run.vsig[i][name][ids.to(run.vsig[i][name].device)]
        attn = scores.get("attn")
        if "text_attn" in sigs and scores.get("text_attn") is not None:
            q_rows = scores["text_rows"][i]
            ta = scores["text_attn"][i][q_rows >= 0]  # [Q, P]
            extra["text_attn"] = ta[:, rows]
        if "pagerank" in sigs and scores.get("pagerank") is not None:
            extra["pagerank"] = scores["pagerank"][i, rows]
        if "llm_keys" in sigs and scores.get("llm_keys") is not None:
            extra["llm_keys"] = scores["llm_keys"][i, rows]
            extra["question_keys"] = scores["llm_keys"][i, q_rows]
        rep, inv = run.rep[i], torch.full((len(run.rep[i]),), -1, dtype=torch.long)
        inv[ids.cpu()] = torch.arange(len(ids))
        live = rep >= 0
        sizes = torch.bincount(inv[rep[live]], minlength=len(ids)).float()
        return Tokens(
            features=feats[i, rows],
            segments=counts,
            budgets=[resolve_budget(stage.config.budget, c) for c in counts],
            grids=list(run.grids[i]),
            attn=None if attn is None else attn[i, rows],
            text=text if "text" in sigs else None,
            question=question,
            layer=stage.layer,
            pos=run.pos0[i][ids].cpu(),
            sizes=sizes,
            origin=list(run.seg_n0[i]),
            **extra,
        )

    @staticmethod
    def _check_plan(stage, plan: Plan, n: int) -> None:
        keep = plan.keep.long().cpu()
        bad = len(keep) and (keep.min() < 0 or keep.max() >= n or not bool((keep[1:] > keep[:-1]).all()))
        bad = bad or plan.reduce not in ("mean", "sum")
        bad = bad or (plan.combine is not None and (plan.assign is None or tuple(plan.combine.shape) != (len(keep), n)))
        if plan.assign is not None and not bad:
            a = plan.assign.long().cpu()
            bad = a.shape != (n,) or a.max() >= len(keep) or not torch.equal(a[keep], torch.arange(len(keep)))
        if bad:
            raise ValueError(f"policy {stage.policy.name!r} returned an invalid plan: keep must be sorted unique "
                             "indices < n, assign [n] must map kept tokens to their own position, reduce "
                             "must be 'mean' or 'sum', and combine (with assign) must be [len(keep), n]")

    @staticmethod
    def _track_groups(run: Run, i: int, plan: Plan, keep: torch.Tensor) -> None:
        """Update which surviving token each original visual token is represented by, and its weight; after
        a ``combine`` plan, the exact ``[surviving, original]`` mixing matrix instead (``Run.mix``)."""
        ids = run.vis_ids[i].cpu()
        n = len(ids)
        if plan.combine is not None or run.mix[i] is not None:
            mix = run.mix[i] if run.mix[i] is not None else run.mixing(i)
            if plan.combine is not None:
                step = plan.combine.float().cpu()
            elif plan.assign is not None:
                a = plan.assign.long().cpu()
                w = torch.ones(n) if plan.weight is None else plan.weight.float().cpu()
                w = torch.where(a >= 0, w, torch.zeros_like(w))
                step = torch.zeros(len(keep), n).index_put_((a.clamp(min=0), torch.arange(n)), w)
                if plan.reduce == "mean":
                    step = step / step.sum(1, keepdim=True).clamp(min=1e-30)
            else:
                step = torch.zeros(len(keep), n).index_put_((torch.arange(len(keep)), keep), torch.ones(len(keep)))
            run.mix[i] = step @ mix
        if plan.assign is not None:
            a = plan.assign.long().cpu()
            w = torch.ones(n) if plan.weight is None else plan.weight.float().cpu()
            w = torch.where(a >= 0, w, torch.zeros_like(w))
            total = torch.zeros(len(keep)).scatter_add_(0, a.clamp(min=0), w)
            if plan.reduce == "sum":
                total = torch.ones_like(total)
            new_rep = torch.where(a >= 0, ids[keep[a.clamp(min=0)]], -1)
            factor = torch.where(a >= 0, w / total[a.clamp(min=0)].clamp(min=1e-30), torch.zeros_like(w))
        else:
            new_rep = torch.full((n,), -1, dtype=torch.long)
            new_rep[keep] = ids[keep]
            factor = torch.ones(n)
        rep = run.rep[i]
        inv = torch.full((len(rep),), -1, dtype=torch.long)
        inv[ids] = torch.arange(n)
        live = rep >= 0
        j = inv[rep[live]]
        rep[live] = new_rep[j]
        run.alpha[i][live] = run.alpha[i][live] * factor[j]

    @staticmethod
    def _merge(features: torch.Tensor, plan: Plan, k: int) -> torch.Tensor:
        from .kernels import merge_tokens

        if plan.combine is not None:
            return (plan.combine.to(features.device).float() @ features.float()).to(features.dtype)

        assign = plan.assign.to(features.device).long()
        w = None if plan.weight is None else plan.weight.to(features.device)[None]
        out, total = merge_tokens(features[None], assign[None], k, w)
        if plan.reduce == "sum":
            return (out[0].float() * total[0, :, None]).to(out.dtype)
        return out[0]
