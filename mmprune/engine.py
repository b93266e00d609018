"""The stage machinery shared by every model family: the hooks, and the order in which the seams run.

The work is split by seam, one module each: ``locate`` (where each sample's visual tokens sit, and how
they split into images / videos), ``select`` (a stage's policy over the batch: ``select_batch``, a cached
data-free plan, or the per-sample slow path), ``apply`` (the batched working state ``Run``: drop, merge,
re-pad, positions, masks, groups) and ``decode`` (the pruned prompt through ``generate``'s cache, and the
masks of pruned layers). This module installs the hooks and calls them in order.

On a GPU the hot path never waits for the host (issue 19): every width comes from host mirrors of the
per-sample counts (fixed-budget policies know them before any data is read), bookkeeping is gathers and
scatters, traces convert to host lists only when read, and the one read a batch needs (the host copy of
``input_ids``, to split items over samples) starts before the vision tower is queued.
``benchmarks/sync_audit.py`` lists what each policy still costs; ``tests/test_batched.py`` holds the
ported ones at zero.

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
   position ids and a mask for the shorter rows (SDPA: built here, see ``decode``; otherwise
   transformers' own ``create_causal_mask``, whose ``layer_idx`` makes it read that layer's cache length,
   since DynamicCache layers < K stay longer).
4. A post-hook on the language model scatters the survivors back to full length, dropped rows carrying
   the state they had when dropped (through the final norm), so ``logits`` keep the input's length and
   ``labels`` work unchanged.

Signals and merges (policy library): a stage's policy declares ``signals``; vision-tower signals
(``cls_attn`` / ``keys`` / ``cls_sim``) are captured by adapter hooks installed only for the duration of the
instance-level ``get_*_features`` wrap and travel on the encoder output (so ``generate``'s encode-once path
keeps them), then are mapped per visual token and sliced with the surviving tokens at every stage; LLM
signals (``attn``, ``text_attn``, ``llm_keys``) are computed in a forward hook on layer K-1's attention
module (keys tapped from its own ``k_proj`` output, query rows projected again), or, for a policy whose ``signal_layer`` is ``"own"`` (PyramidDrop), from layer K's own input norm
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

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .apply import Run, gather_rows
from .attention import attention_probs, pagerank_importance, rotary_keys
from .beside import Beside
from .decode import DecodeMixin, SeqState, _cache_of
from .kernels import scatter_tokens
from .locate import HostCopy, host_rows, locate, prefetch_ids
from .select import SelectMixin, _question_batch
from .syncs import clock, compiling
from .traces import Trace

_IDS = itertools.count()

# Signals captured in the vision tower (adapter.vision_capture), per visual token.
VISION_SIGNALS = ("cls_attn", "keys", "cls_sim", "tome_groups", "tower_cls", "next_cls_attn", "next_keys", "tower_assign")
# Signals read at decoder layer K-1 (the score hook on its attention module).
LLM_SIGNALS = ("attn", "text_attn", "llm_keys", "pagerank")


def _layer_counts(run: Run) -> list:
    """The trace's per-layer token counts as recorded (device tensors; ``Trace`` converts them when read)."""
    return run.trace.layer_rows


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
    encoded: dict = field(default_factory=dict)  # modality -> the encoder call's info, its signals read at the LM
    notes: list = field(default_factory=list)
    decode: bool = False
    synth_mask: bool = False  # decode: the all-ones mask came from us (the caller passed none)
    host_ids: Any = None  # locate.HostCopy: the host copy of input_ids, started before the vision tower
    host_rows: Any = None  # locate.host_rows of it, read here when compiling (one graph break, outermost frame)
    keep_full: bool = True  # False when only the last logits are used (generate): skip the scatter-back


class Engine(SelectMixin, DecodeMixin):
    """Installs and runs the stages of one wrap on one model instance."""

    def __init__(self, model, adapter, stages: list[Stage], configs: list):
        self.id = next(_IDS)
        self.model = model
        # what was asked for (before multi-stage policies expand): a deep copy is wrapped with it, and
        # save_pretrained writes it to mmprune.json
        self.configs = list(configs)
        self.adapter = adapter
        self.stages = stages
        self.pre_stages = [s for s in stages if s.layer is None]
        self.llm_stages = sorted([s for s in stages if s.layer is not None], key=lambda s: s.layer)
        self.enabled = True
        # keeps every token whatever the input (policy none, or a fixed-count policy at budget 1.0): such a wrap
        # passes through what it could not prune (a custom 4-D or per-layer-type attention mask)
        self.identity = all(s.policy.name == "none" or (isinstance(s.config.budget, float) and s.config.budget >= 1.0
                                                         and not getattr(s.policy, "adaptive", False)) for s in stages)
        self.call: CallCtx | None = None
        self.run: Run | None = None
        self.decode_state: SeqState | None = None
        self.decode_masks: dict = {}
        self.decode_lm_mask: torch.Tensor | None = None
        # (cache, SeqState) of the decode step generate is about to run, set eagerly by ``_wrap_prepare``: a
        # compiled step reads the state from here, not from ``caches`` (keyed by ``id(cache)``: dynamo guards
        # on that identity, so every new generation would recompile)
        self.step: tuple | None = None
        self.caches = Beside()  # a KV cache this engine pruned the prompt of -> its SeqState
        self.encoded = Beside()  # an encoder output -> {"items", "signals", "note", "seconds"[, "pending"]}
        self.pending: dict = {}  # modality -> the info of an encoder call whose tower signals are still unread
        # thread id -> the last prefill's Trace in that thread (None: the latest of any). Never empty: a compiled
        # forward guards on the dict's emptiness, so a first call would recompile the second (measured)
        self._traces: dict = {None: None}
        self.last_host_read = False  # the last prefill's layout needed the host copy of input_ids
        # One forward at a time: the per-call state above lives on the engine (and on the adapter's vision
        # taps), so forwards from several threads are serialised (``_enter`` / ``_exit``), not interleaved.
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self.handles: list = []
        self.notes: list = []  # wrap-time notes, copied into every trace
        self.patched: list = []  # (obj, attr_name, had_instance_attr, old_value)
        self.lm = adapter.language_model()
        self.layers = adapter.layers()
        wanted = {sig for s in stages for sig in s.policy.signals}
        self.vision_signals = tuple(sig for sig in VISION_SIGNALS if sig in wanted)

    @property
    def last_trace(self) -> Trace | None:
        """The last prefill's trace in the calling thread, else the latest of any thread."""
        return self._traces.get(threading.get_ident(), self._traces.get(None))

    @last_trace.setter
    def last_trace(self, trace: Trace | None) -> None:
        self._traces[None if compiling() else threading.get_ident()] = self._traces[None] = trace

    def _enter(self, top: bool = False) -> None:
        """Take the engine for this thread (re-entrant: the encoder runs inside the forward). ``top``: the
        top-level forward, never nested, so finding the engine already ours means a call of this thread
        died before ``_top_post`` (an interrupt): take it over instead of counting deeper."""
        if compiling():  # a traced forward: no lock (dynamo cannot trace one; see syncs.compiling)
            return
        me = threading.get_ident()
        if self._owner == me:
            self._depth = 1 if top else self._depth + 1
            return
        self._mutex.acquire()
        self._owner, self._depth = me, 1

    def _exit(self) -> None:
        if compiling() or self._owner != threading.get_ident():
            return
        self._depth -= 1
        if self._depth <= 0:
            self._owner, self._depth = None, 0
            self._mutex.release()

    # ------------------------------------------------------------------ install / remove
    # torch.compile does not guard on module hooks by default (``skip_nnmodule_hook_guards``): a graph compiled
    # before a wrap, or for an unwrapped copy of the same architecture, would then run a wrapped model's
    # forward *without* its hooks, silently unpruned (measured: a compiled copy cut at layer 0 timed as the
    # full model, 246 vs 93 ms, when the full copy was compiled first). While any wrap is live, hooks are guarded.
    _live = 0
    _hook_guards_before = None

    @classmethod
    def _guard_hooks(cls, on: bool) -> None:
        import torch._dynamo.config as dynamo_config

        if on:
            if cls._live == 0:
                cls._hook_guards_before = dynamo_config.skip_nnmodule_hook_guards
                dynamo_config.skip_nnmodule_hook_guards = False
            cls._live += 1
        elif cls._live > 0:
            cls._live -= 1
            if cls._live == 0 and cls._hook_guards_before is not None:
                dynamo_config.skip_nnmodule_hook_guards = cls._hook_guards_before

    def install(self) -> None:
        m = self.model
        Engine._guard_hooks(True)
        self.guarding = True
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
                    tap, hook = self._score_hooks(s.layer, needs)
                    if isinstance(getattr(attn, "k_proj", None), torch.nn.Module):
                        self.handles.append(attn.k_proj.register_forward_hook(tap))
                    self.handles.append(attn.register_forward_hook(hook, with_kwargs=True))
        for s in self.pre_stages:
            install = getattr(s.policy, "install_encoder", None)
            if install is not None:
                install(self)
        self.captures: dict = {}  # modality -> VisionCapture, hooks installed now, active during encoder calls
        for modality, owner, name in self.adapter.encoder_methods():
            if self.vision_signals and modality not in self.captures:
                cap = self.adapter.vision_capture(modality, self.vision_signals)
                if cap is not None:
                    cap.install()
                    self.handles.extend(cap.handles)
                self.captures[modality] = cap
            self._patch(owner, name, self._wrap_encoder(modality, getattr(owner, name)))
        if hasattr(m, "prepare_inputs_for_generation"):  # a bare base model has no generate
            self._patch(m, "prepare_inputs_for_generation", self._wrap_prepare(m.prepare_inputs_for_generation))
        if hasattr(m, "_expand_multimodal_outputs"):
            self._patch(m, "_expand_multimodal_outputs", self._wrap_expand(m._expand_multimodal_outputs))
        self.adapter.install_extras(self)
        # copies: hooks and patched methods close over this engine and this model's modules, so a plain deep
        # copy would run the original's tower (or nothing); pickling would fail on the closures
        self._patch(m, "__deepcopy__", self._deepcopy)
        self._patch(m, "__reduce_ex__", self._refuse_pickle)
        if hasattr(m, "save_pretrained"):
            self._patch(m, "save_pretrained", self._wrap_save(m.save_pretrained))

    def _wrap_save(self, fn):
        """``save_pretrained``: the model's own files (hooks change no weight or config), plus ``mmprune.json``."""
        import functools

        @functools.wraps(fn)
        def wrapped(save_directory, *args, **kwargs):
            from .api import save_config

            out = fn(save_directory, *args, **kwargs)
            save_config(self.model, save_directory)
            return out

        return wrapped

    def _deepcopy(self, memo):
        """``copy.deepcopy(model)``: copy the model without this wrap, then wrap the copy the same way."""
        import copy

        from .api import wrap

        m = self.model
        self._enter()
        try:
            self.remove()
            m.__dict__.pop("_mmprune", None)
            try:
                twin = copy.deepcopy(m, memo)
            finally:
                self.install()
                m.__dict__["_mmprune"] = self
        finally:
            self._exit()
        wrap(twin, self.configs)
        twin.__dict__["_mmprune"].enabled = self.enabled
        return twin

    def _refuse_pickle(self, protocol=None):
        raise TypeError(
            f"a model wrapped by mmprune cannot be pickled (torch.save(model), copy.copy): save "
            f"model.state_dict() or save_pretrained(), or call mmprune.unwrap(model) first, and wrap again after "
            f"loading ({type(self.model).__name__})"
        )

    def _patch(self, obj, name, value) -> None:
        had = name in obj.__dict__
        self.patched.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def remove(self) -> None:
        if getattr(self, "guarding", False):
            self.guarding = False
            Engine._guard_hooks(False)
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
            self._enter()  # generate encodes outside the forward; inside it this nests
            try:
                return encode(*args, **kwargs)
            finally:
                self._exit()

        def encode(*args, **kwargs):
            cap = self.captures.get(modality) if self.enabled else None
            if cap is not None:
                self._read_signals(self.pending.get(modality))  # an earlier call's taps, before they restart
                cap.start()
            try:
                out = fn(*args, **kwargs)
            finally:
                if cap is not None:
                    cap.stop()
            if isinstance(out, tuple):  # return_dict=False: a user's direct call; the forward asks for an output
                return out
            info = {"items": None, "signals": None, "note": None, "seconds": None}
            try:
                info["items"] = self.adapter.encoder_items(modality, out, args, kwargs)
            except Exception:  # never break the model for bookkeeping; fall back to contiguous runs
                pass
            if cap is not None:
                # read at the language model (``_read_signals``), not here: under torch.compile the forward
                # that called the encoder has already broken its graph at the tower (transformers' own
                # breaks), so tensor work here would be one more graph; at the LM it joins the prefill's
                info["pending"] = (modality, cap, out, args, kwargs)
                self.pending[modality] = info
            self.encoded.put(out, info)  # generate encodes once and hands the output back to the forward
            if self.call is not None and not self.call.decode:
                if info["items"] is not None:
                    self.call.items[modality] = info["items"]
                self.call.encoded[modality] = info
            return out

        return wrapped

    def _read_signals(self, info: dict | None) -> None:
        """Turn an encoder call's captured tower rows into per-item signals (None, with the reason in
        ``info["note"]``, when unavailable); once."""
        pending = None if info is None else info.pop("pending", None)
        if pending is None:
            return
        modality, cap, out, args, kwargs = pending
        if self.pending.get(modality) is info:
            del self.pending[modality]
        info["signals"] = cap.items(out, args, kwargs)
        info["note"], info["seconds"] = cap.error, cap.seconds

    def _take_signals(self, ctx: CallCtx) -> None:
        for modality, info in ctx.encoded.items():
            self._read_signals(info)
            if info["signals"] is not None:
                ctx.signals[modality] = info["signals"]
            if info["note"]:
                ctx.notes.append(f"{modality}: {info['note']}")
            if info["seconds"] is not None:
                ctx.notes.append(("signal_s", info["seconds"]))

    def _wrap_prepare(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            mask = kwargs.get("attention_mask")
            ids = args[0] if args else kwargs.get("input_ids")
            cache = _cache_of(kwargs)
            state = self.caches.get(cache) if cache is not None else None
            nsl = kwargs.get("next_sequence_length")
            first = kwargs.get("is_first_iteration", False)
            if state is not None and ids is not None and nsl is not None:
                # continuing from a pruned cache with the whole conversation as input_ids (a chat's next turn):
                # generate counts the new tokens from the cache's (pruned) length; count them from the length
                # the cache stands for instead
                past = int(cache.get_seq_length())
                if nsl == ids.shape[1] - past:
                    kwargs["next_sequence_length"] = ids.shape[1] - (state.full_len + past - state.index0.shape[1])
            out = fn(*args, **kwargs)
            # a decode step: after generate's first iteration one new token per step needs no read; a first
            # iteration (a new turn on a pruned cache, or a reset static cache) reads the cache length once
            q = None if ids is None else ids.shape[1] if nsl is None else nsl
            known = not first and q == 1
            self.step = (cache, state) if state is not None and (known or int(cache.get_seq_length()) > 0) else None
            # generate() pre-builds 4-D masks for static caches from the *full-length* 2-D mask; after
            # pruning the cache is shorter, so hand the 2-D mask on and let the LM build the mask itself.
            if self.enabled and "attention_mask" in out and (mask is None or mask.dim() == 2):
                out["attention_mask"] = mask
                if self.step is not None and (mask is not None or ids is not None):
                    full = mask if mask is not None else torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
                    self._fixed_width_step(out, cache, state, full)
            return out

        return wrapped

    def _fixed_width_step(self, out: dict, cache, state: SeqState, mask: torch.Tensor) -> None:
        """For a compileable (static) cache, hand a decode step the mask in the cache's own columns, padded to
        the cache's capacity: fixed-shape, so a compiled step neither reads the cache length (a device scalar)
        nor sees a mask that grows every step (measured on a tiny LLaVA: 9-10 graphs per generation with the
        growing mask, the unwrapped model's one graph with this). Position ids come from generate, which
        keeps them from the full-length mask; where it does not, a 1-D RoPE family's are the full mask's
        running count, computed here (eagerly, outside the compiled step), and other families (M-RoPE) keep
        the growing mask."""
        get = getattr(cache, "get_max_cache_shape", None) or getattr(cache, "get_max_length", None)
        width = get() if get is not None else None  # a static cache's capacity (dynamic ones: -1 / None)
        ids = out.get("input_ids")
        if not (getattr(cache, "is_compileable", False) and isinstance(width, int) and width > 0 and ids is not None):
            return
        q, p = ids.shape[1], state.index0.shape[1]
        if mask.shape[1] - state.full_len + p > width:
            return
        if out.get("position_ids") is None:
            if not self.adapter.text_positions:
                return
            out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
        # one buffer per generation: the prompt's kept columns written once, each step copies the growing tail
        buf, tail = state.buffers.get("fixed", (None, 0))
        new = mask[:, state.full_len :]
        if (buf is None or buf.shape != (mask.shape[0], width) or buf.dtype != mask.dtype or buf.device != mask.device
                or new.shape[1] < tail):
            buf = torch.zeros(mask.shape[0], width, dtype=mask.dtype, device=mask.device)
            buf[:, :p] = gather_rows(mask[:, : state.full_len], state.index0, 1)
        buf[:, p : p + new.shape[1]] = new
        state.buffers["fixed"] = (buf, new.shape[1])
        out["attention_mask"] = buf
        state.fixed = width

    def _wrap_expand(self, fn):
        """``generate`` encodes the images once, then repeats the encoder outputs for ``num_beams`` /
        ``num_return_sequences`` (``GenerationMixin._expand_multimodal_outputs``: each sample's group of
        images ``expand_size`` times). The items and signals this engine attached to those outputs are
        repeated in the same order, so every copy of a sample keeps the same tokens."""
        import functools
        from itertools import accumulate

        @functools.wraps(fn)
        def wrapped(input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
            orders = {}
            for modality, out in (mm_encoder_output or {}).items():
                self._read_signals(self.encoded.get(out))  # from the outputs as encoded, before they repeat
                feats = getattr(out, "pooler_output", None)
                token_id = getattr(self.model.config, f"{modality}_token_id", None)
                if feats is None or expand_size == 1 or input_ids is None or input_ids.numel() == 0 or token_id is None:
                    continue
                # the offsets transformers computes (same formula): a sample's images end where the running
                # count of encoded tokens meets the running count of its placeholders
                in_text = set(accumulate((input_ids == token_id).sum(-1).tolist()))
                in_vision = list(accumulate(len(f) for f in feats))
                offsets = [0] + [i + 1 for i, n in enumerate(in_vision) if n in in_text]
                orders[modality] = [i for a, b in zip(offsets[:-1], offsets[1:]) for _ in range(expand_size)
                                    for i in range(a, b)]
            result = fn(input_ids, mm_encoder_output, expand_size=expand_size, inputs_embeds=inputs_embeds)
            for modality, order in orders.items():
                out = result.get(modality)
                info = self.encoded.get(out)
                n = len(out.pooler_output)
                for name in ("items", "signals"):
                    vals = None if info is None else info[name]
                    if isinstance(vals, list):
                        ok = len(order) == n and all(i < len(vals) for i in order)
                        info[name] = [vals[i] for i in order] if ok else None
            return result

        return wrapped

    # ------------------------------------------------------------------ top-level hooks
    def _top_pre(self, module, args, kwargs):
        self._enter(top=True)  # released by _top_post (always called, also when the forward raises)
        self.call, self.run, self.decode_state, self.decode_masks, self.decode_lm_mask = None, None, None, {}, None
        if not self.enabled:
            return None
        cache = _cache_of(kwargs)
        if self.step is not None and self.step[0] is cache:  # generate's decode step: known without a read
            state, decoding = self.step[1], True
        else:
            state = self.caches.get(cache) if cache is not None else None
            decoding = state is not None and self._has_past(cache)
        if decoding:
            self.call = CallCtx(decode=True)
            self.decode_state = state
            if kwargs.get("attention_mask") is None:
                # Without a mask the model would derive positions from the (shorter) cache length.
                ids = kwargs.get("input_ids", args[0] if args else None)
                ref = ids if ids is not None else kwargs["inputs_embeds"]
                b, q = ref.shape[0], ref.shape[1]
                done = cache.get_seq_length() - state.index0.shape[1]
                kwargs["attention_mask"] = torch.ones(b, state.full_len + done + q, dtype=torch.long, device=ref.device)
                self.call.synth_mask = True
                return args, kwargs
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        ctx = CallCtx(input_ids=ids)
        if ids is not None:  # (the visual mask is computed at the LM, inside its graph when compiled)
            media = sum(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
            ctx.host_ids = prefetch_ids(ids, media)
            if ctx.host_ids is not None and compiling() and not torch.compiler.is_exporting():
                ctx.host_rows = host_rows(ctx.host_ids, self.adapter)
        for name in ("image_grid_thw", "video_grid_thw", "image_sizes"):  # small layout inputs the adapters read
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor):
                self.adapter.host_copies[name] = (t, HostCopy(t))
                if compiling():  # read here, outside the towers' graphs
                    self.adapter.host_copies[name][1].values()
        for modality, out in (kwargs.get("mm_encoder_outputs") or {}).items():
            info = self.encoded.get(out) if out is not None else None
            items = None if info is None else info["items"]
            if items is None and out is not None:
                try:
                    items = self.adapter.encoder_items(modality, out, (), {})
                except Exception:
                    items = None
            if items is not None:
                ctx.items[modality] = items
            if info is not None:
                ctx.encoded[modality] = info
        ltk = kwargs.get("logits_to_keep", 0)
        ctx.keep_full = not (isinstance(ltk, int) and ltk == 1)
        self.call = ctx
        return None

    @staticmethod
    def _has_past(cache) -> bool:
        """Whether ``cache`` already holds tokens. A compileable cache counts them on the device; while
        dynamo traces, such a count is data, and generate compiles only decode steps (which ``self.step``
        identifies), so a traced forward that gets here is a prefill into a fresh cache."""
        seen = cache.get_seq_length()
        if isinstance(seen, torch.Tensor):
            return False if compiling() else bool(seen > 0)
        return seen > 0

    def _top_post(self, module, args, output):
        self.adapter.host_copies.clear()
        self.step = None
        self.call, self.run, self.decode_state, self.decode_masks, self.decode_lm_mask = None, None, None, {}, None
        self._exit()
        return None

    # ------------------------------------------------------------------ locate
    def _vision_signals(self, segs) -> dict:
        """One sample's vision-tower signals over its visual tokens; a signal is None unless every segment
        has it with the right length (then the policy's documented fallback applies)."""
        out = {}
        for name in self.vision_signals:
            parts = []
            for _, cnt, _, sg in segs:
                t = None if sg is None else sg.get(name)
                if t is None or t.shape[0] != cnt:
                    parts = None
                    break
                parts.append(t)
            out[name] = torch.cat(parts) if parts else None
        return out

    @staticmethod
    def _mark_lm_input(run: Run) -> None:
        n = run.vid.shape[1]
        run.lm_slot = torch.where(run.vid >= 0, torch.arange(n, device=run.vid.device), -1)
        run.lm_totals = list(run.totals)

    # ------------------------------------------------------------------ language-model hooks
    def _lm_pre(self, module, args, kwargs):
        ctx = self.call
        if not self.enabled or ctx is None:
            return None
        if ctx.decode:
            return self._lm_decode(args, kwargs)
        cache = _cache_of(kwargs)
        if cache is not None and self._has_past(cache):
            return None  # continuing from a cache we did not prune: leave untouched
        x = kwargs.get("inputs_embeds")
        if x is None or ctx.input_ids is None or ctx.input_ids.shape != x.shape[:2]:
            return None
        ctx.visual = self.adapter.visual_mask(ctx.input_ids)
        b, l0, _ = x.shape
        dev = x.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
            if self.identity:  # nothing to prune: the custom mask goes through untouched
                self.last_trace = Trace(notes=["a custom attention mask went through unpruned (identity wrap)"])
                return None
            form = "a dict of masks by layer type" if isinstance(mask, dict) else f"a {mask.dim()}-D mask"
            raise ValueError(f"mmprune cannot prune with a custom attention mask ({form}); pass a 2-D [batch, "
                             f"length] mask or None, or wrap with policy 'none' / budget 1.0 to pass it through")
        mask2d = torch.ones(b, l0, dtype=torch.long, device=dev) if mask is None else mask.long()
        self._take_signals(ctx)
        lay = locate(ctx, self.adapter, dev)
        arange = torch.arange(l0, device=dev).expand(b, l0)
        v0 = lay.cols.shape[1]
        vid0 = torch.where(lay.cols >= 0, torch.arange(v0, device=dev), -1)
        origin = [[c for _, c, _, _ in s] for s in lay.segs]
        run = Run(
            ctx=ctx, cache=cache, orig=arange, rel=arange, mask2d=mask2d,
            rows=lay.cols, vid=vid0, seg=lay.seg, pos0=lay.pos, cols0=lay.cols,
            rep=vid0.clone(), alpha=torch.ones(b, v0, device=dev),
            totals=list(lay.n), counts=[list(o) for o in origin], nrows=[l0] * b,
            origin=origin, grids=[[g for _, _, g, _ in s] for s in lay.segs],
            vsig=[self._vision_signals(s) for s in lay.segs],
            trace=Trace.recording(list(lay.n)),
            embeds0=x if any("input_embeds" in s.policy.signals for s in self.stages) else None,
        )
        run.trace.notes.extend(self.notes)
        for note in ctx.notes:
            if isinstance(note, tuple):
                run.trace.signal_seconds += note[1]
            else:
                run.trace.notes.append(note)
        for name in self.vision_signals:  # say which declared signals fell back (never silently)
            if name not in ("tome_groups", "tower_cls", "tower_assign") and any(n and sg.get(name) is None for n, sg in zip(lay.n, run.vsig)):
                run.trace.notes.append(f"{name}: not available from the {self.adapter.family} tower for some "
                                       "items; the policy's documented fallback was used")
        self.run = run
        self.last_trace = run.trace
        self.last_host_read = lay.host_read
        run.fill = x if ctx.keep_full else None
        if not any(lay.n):
            return None
        if cache is not None:
            self.caches.put(cache, SeqState(owner=self.id, full_len=l0, index0=arange.clone()))
        if not self.pre_stages:
            self._mark_lm_input(run)
            return None
        feats = x
        for stage in self.pre_stages:
            feats, _ = self._apply_stage(stage, run, feats)
        kwargs["inputs_embeds"] = feats
        if mask is not None or b > 1:  # batch 1 without a mask stays None: SDPA's causal path, packed position_ids
            kwargs["attention_mask"] = run.mask2d
        self._mark_lm_input(run)
        pos = kwargs.get("position_ids")
        if pos is None:  # what the text model would use by default
            pos = arange
        kwargs["position_ids"] = gather_rows(pos, run.orig, pos.dim() - 1)
        self.adapter.prune_lm_kwargs(kwargs, run)
        run.rel = torch.where(run.orig >= 0, torch.arange(run.orig.shape[1], device=dev).expand_as(run.orig), -1)
        if cache is not None:
            self.caches.get(cache).index0 = run.orig.clone()
        return args, kwargs

    def _lm_post(self, module, args, kwargs, output):
        run = self.run
        if run is None or not self.enabled:
            return None
        self._record_layer_tokens(run)
        if run.fill is None or not run.changed:
            return None
        h = output.last_hidden_state
        full = self.adapter.final_norm()(run.fill.to(h.dtype))
        output.last_hidden_state = scatter_tokens(full, run.orig, h, check=False)
        return output

    def _record_layer_tokens(self, run: Run) -> None:
        counts = _layer_counts(run)
        n_layers = len(self.layers)
        if len(counts) < n_layers:  # layers after the last stage keep the last count
            last = counts[-1] if counts else run.mask2d.sum(-1)
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
        if not any(run.totals) and not run.pruned_in_llm:
            return None
        if stages and not run.pruned_in_llm:
            pe = kwargs.get("position_embeddings")
            run.pos_emb = tuple(t.expand(hidden.shape[0], *t.shape[1:]) for t in pe) if pe is not None else None
            run.pos_ids = kwargs.get("position_ids")
            # layers before K ran on the LM-input rows: record their token counts for FLOPs accounting
            run.trace.layer_rows[:] = [run.mask2d.sum(-1)] * i
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
            run.pos_emb = tuple(gather_rows(t, index, 1) for t in run.pos_emb) if run.pos_emb else None
            if isinstance(run.pos_ids, torch.Tensor) and run.pos_ids.shape[-1] == p_old:
                run.pos_ids = gather_rows(run.pos_ids, index, run.pos_ids.dim() - 1)
            run.masks = {}
            run.pruned_in_llm = True
            state = self.caches.get(run.cache) if run.cache is not None else None
            if state is not None:
                state.stage_masks[stage.layer] = run.mask2d.clone()
        if not run.pruned_in_llm:
            return None
        counts = _layer_counts(run)
        if stages or len(counts) <= i:
            counts.append(run.mask2d.sum(-1))
        ltype = self.adapter.layer_type(i)
        if ltype not in run.masks:
            run.masks[ltype] = self._prefill_mask(run, hidden, i, ltype, kwargs.get("attention_mask"))
        kwargs["attention_mask"] = run.masks[ltype]
        kwargs["position_embeddings"] = run.pos_emb
        if "position_ids" in kwargs:
            kwargs["position_ids"] = run.pos_ids
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _score_hooks(self, layer: int, needs: tuple):
        """Hooks on layer K-1's attention module: the signals of the stage at K, from K-1's q/k (FastV). The
        keys come from a tap on the module's own ``k_proj`` output (recomputing that projection for every
        row cost 2.7% of an unpruned prefill at batch 4, llava-1.5-7b --shrink 8, CPU); only the query rows
        are projected again. Without a tap (a fused qkv module) the keys are recomputed."""
        taps: dict = {}

        def tap(module, args, output):
            if self.enabled and self.run is not None:
                taps["k"] = output

        def hook(module, args, kwargs, output):
            run = self.run
            k = taps.pop("k", None)
            if not self.enabled or run is None or not any(run.totals):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if k is not None and k.shape[:2] != hidden.shape[:2]:
                k = None
            run.signals[layer] = self._signals(module, hidden, kwargs.get("position_embeddings"), needs, k)
            return None

        return tap, hook

    def _signals(self, attn, hidden, pe, needs: tuple, k_proj: torch.Tensor | None = None) -> dict:
        """LLM signals of the current rows, from ``attn``'s projections of its (normed) input ``hidden``."""
        run = self.run
        t0 = clock()
        valid = run.mask2d.bool()
        sig = {}
        if "attn" in needs:
            last = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(-1, keepdim=True)
            probs = attention_probs(attn, hidden, pe, last, valid, k_proj=k_proj)
            sig["attn"] = probs.mean(1)[:, 0]  # [B, P]: head-averaged, last query
        if "text_attn" in needs:
            rows = _question_batch(run)  # [B, Q], -1 padded at the end: no read
            if rows.shape[1]:
                sig["text_attn"] = attention_probs(attn, hidden, pe, rows, valid, k_proj=k_proj).mean(1)  # [B, Q, P]
            sig["text_rows"] = rows
        if "pagerank" in needs:
            sig["pagerank"] = pagerank_importance(attn, hidden, pe, valid, k_proj=k_proj)  # [B, P], AIM's importance
        if "llm_keys" in needs:  # what the KV cache holds: post-RoPE keys, heads concatenated (DART's)
            sig["llm_keys"] = rotary_keys(attn, hidden, pe, k_proj).permute(0, 2, 1, 3).flatten(2)  # [B, P, H_kv * hd]
        run.trace.signal_seconds += clock() - t0
        return sig
