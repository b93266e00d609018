"""Decode: the prompt's pruned columns through ``generate``'s cache, and the masks of pruned layers.

A pruned prompt leaves a shorter KV cache (layers >= K shorter still after in-LLM stages) while ``generate``
grows a full-length 2-D mask and counts positions from it. Per step the language model's mask gets the
kept prompt columns (``SeqState.index0``), and each pruned layer a mask of its own cache length; both are
views of buffers built once per generation, into which a step copies only the mask's growing tail. Masks the
engine builds itself (SDPA, full attention, a dynamic cache) are tensor algebra: transformers'
``create_causal_mask`` first asks ``padding_mask.all()`` to choose SDPA's ``is_causal`` path, a host sync per
call (one per decode step and pruned layer type before issue 19).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .apply import Run, gather_rows


def _cache_of(kwargs: dict):
    """The KV cache a forward call was given: inside the language model transformers < 5.24 names it
    ``past_key_values``, 5.24 ``cache`` (the top-level model still takes ``past_key_values``)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


_CACHE_KW: dict = {}


def _cache_kw(fn) -> str:
    """The name ``create_causal_mask`` (or the sliding-window one) takes the cache under (5.24: ``cache``).
    A plain dict, not ``functools.cache``: dynamo warns that it traces through an lru_cache wrapper."""
    kw = _CACHE_KW.get(fn)
    if kw is None:
        import inspect

        kw = _CACHE_KW[fn] = "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
    return kw


@dataclass
class SeqState:
    """What decoding needs to know about a pruned prompt; stored on the cache object."""

    owner: int
    full_len: int  # L0: prompt length before pruning
    index0: torch.Tensor  # [B, P] original column of each pre-LLM row (-1 = pad)
    stage_masks: dict = field(default_factory=dict)  # layer -> [B, P_K] 2-D mask of the prompt at layer K
    buffers: dict = field(default_factory=dict)  # the generation's mask buffers (``_grown``)
    fixed: int = 0  # > 0: decode masks come in the cache's columns, padded to this width (a static cache)


def _grown(state: SeqState, key, head, tail: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``cat([head(), tail], 1)`` as a view of a buffer kept for the whole generation: the prompt part
    ``head()`` is built when the buffer is (once per generation: the cached keys were computed under it, so
    a caller cannot meaningfully change it mid-generation) and the growing tail is copied in place each
    step; capacity doubles, so a generation of n steps allocates O(log n) times instead of every step."""
    dtype = dtype or tail.dtype
    b, t = tail.shape
    buf, h = state.buffers.get(key, (None, 0))
    if buf is None or buf.shape[1] < h + t or buf.shape[0] != b or buf.dtype != dtype or buf.device != tail.device:
        first = head()
        grow = 2 * buf.shape[1] if buf is not None and buf.shape[0] == b else 0
        h = first.shape[1]
        buf = torch.empty(b, max(h + t, grow, h + 32), dtype=dtype, device=tail.device)
        buf[:, :h] = first
        state.buffers[key] = (buf, h)
    buf[:, h : h + t] = tail
    return buf[:, : h + t]


class DecodeMixin:
    """The engine's decode-side methods and pruned-layer masks (mixed into ``Engine``)."""

    def _lm_decode(self, args, kwargs):
        state, cache = self.decode_state, _cache_of(kwargs)
        mask = kwargs.get("attention_mask")
        ref = kwargs.get("inputs_embeds")
        q = ref.shape[1]
        p = state.index0.shape[1]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and state.fixed and mask.shape[1] == state.fixed:
            pass  # already in the cache's columns, with its position ids (Engine._fixed_width_step)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            cached = cache.get_seq_length()
            if mask.shape[1] == state.full_len + (cached - p) + q:
                if kwargs.get("position_ids") is None:
                    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
                full = mask
                mask = _grown(state, "lm", lambda: gather_rows(full[:, : state.full_len], state.index0, 1),
                              mask[:, state.full_len :])
                kwargs["attention_mask"] = mask
            elif mask.shape[1] != cached + q:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns; with a pruned prompt of {state.full_len} tokens "
                    f"expected {state.full_len + cached - p + q} (full length) or {cached + q} (pruned length)"
                )
        self.decode_lm_mask = mask
        if self.call.synth_mask and state.index0.shape[0] == 1 and kwargs.get("position_ids") is not None:
            # batch 1 without a caller's mask has no padding: hand the LM None (what the unwrapped model gets),
            # not our all-ones mask, whose padding check (``padding_mask.all()``) syncs every step
            kwargs["attention_mask"] = None
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
            cache = _cache_of(kwargs)
            if hidden.shape[1] == 1 and self._own_masks(ltype, cache):  # one query sees every cached key
                self.decode_masks[key] = _grown(state, key, lambda: prompt, lm_mask[:, p:], torch.bool)[:, None, None, :]
            else:
                mask2d = torch.cat([prompt.to(lm_mask.device, lm_mask.dtype), lm_mask[:, p:]], dim=1)
                self.decode_masks[key] = self._make_mask(hidden, mask2d, cache, i, ltype)
        kwargs["attention_mask"] = self.decode_masks[key]
        return args, kwargs

    def _own_masks(self, layer_type, cache) -> bool:
        """Whether the engine builds a pruned layer's mask itself: SDPA, full attention, a dynamic (or no)
        cache. transformers' ``create_causal_mask`` first asks ``padding_mask.all()`` to pick SDPA's
        ``is_causal`` path, a host sync per call; these masks are plain tensor algebra instead."""
        impl = getattr(self.lm.config, "_attn_implementation", None)
        return impl == "sdpa" and layer_type == "full_attention" and (cache is None or type(cache).__name__ == "DynamicCache")

    def _prefill_mask(self, run: Run, hidden, layer_idx, layer_type, given):
        """The mask of a pruned layer's rows at prefill. Where transformers passed None for the LM input
        (no padding: SDPA's ``is_causal``) and the drop left every sample the same length, None again;
        otherwise causal AND key-valid as a boolean ``[B, 1, P, P]`` (pad rows see themselves, so no row
        of SDPA's softmax is empty)."""
        if not self._own_masks(layer_type, run.cache):
            return self._make_mask(hidden, run.mask2d, run.cache, layer_idx, layer_type)
        if given is None and len(set(run.nrows)) == 1:
            return None
        p = run.mask2d.shape[1]
        ar = torch.arange(p, device=run.mask2d.device)
        causal = ar.view(1, p) <= ar.view(p, 1)
        mask = (causal.unsqueeze(0) & run.mask2d.bool().unsqueeze(1)) | torch.eye(p, dtype=torch.bool, device=ar.device)
        return mask.unsqueeze(1)

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
