"""``--baseline eager-fastv``: FastV the way its reference code gets attention, for a like-for-like timing.

FastV's reference implementation (and the toolkits built on it) needs the model loaded with
``attn_implementation="eager"`` and reads layer K-1's attention weights from the layer output
(``output_attentions``), then keeps the top-k visual tokens by the last token's head-averaged attention
and drops the rest at layer K. This module reproduces exactly that inside mmprune's own engine, so the
*only* difference from ``mmprune.wrap(model, "fastv", ...)`` is how the signal is obtained:

- the same model instance (same weights) is switched to eager attention for the whole forward
  (``model.set_attn_implementation("eager")``, vision tower included, as ``from_pretrained(...,
  attn_implementation="eager")`` does) and back afterwards;
- mmprune's SDPA-side tap (``mmprune.attention.attention_probs`` projecting one query row again in a forward hook)
  is disabled; instead a forward hook on layer K-1's ``self_attn`` takes the eager attention
  probabilities ``[B, H, P, P]`` the layer already returns, the last valid row, averaged over heads;
- selection, dropping at K, masks, cache handling and the trace are mmprune's (identical kept sets up to
  float ties, since both signals are the same softmax row).

What it costs, and why it is slower: every attention layer (LLM and vision tower) materialises the full
``B x H x P x P`` score matrix, runs softmax in fp32 and a second batched matmul for the values, instead
of SDPA's fused kernel (flash / memory-efficient on GPU, flash-CPU on CPU); memory grows with ``P^2`` per
layer. The signal itself is free (it is already there), but it forces the slow path on all layers, and
the layers before K are the ones with the full sequence. Our tap instead costs one ``k_proj`` over the
``P`` rows at layer K-1 plus ``O(B H P hd)`` for one query row.

Example:
    >>> from mmprune.testing import tiny_model, make_inputs
    >>> m = tiny_model("llava"); batch = make_inputs(m, [[1]])
    >>> install(m, budget=0.5, layer=2)
    >>> _ = m(**batch); import mmprune; mmprune.trace(m).stages[0].n_after
    [8]
    >>> uninstall(m); m.config.text_config._attn_implementation
    'sdpa'
"""

from __future__ import annotations

import torch

from ..engine import Engine


class EagerFastVEngine(Engine):
    """mmprune's engine with the attention signal read from eager attention weights (FastV reference style)."""

    _dict_signals = False

    def _score_hooks(self, layer: int, *rest):
        # The engine calls this with the signal names when it keeps per-layer signals as a dict
        # ({"attn": [B, P]}); older engines stored the [B, P] tensor itself. Follow whichever it uses.
        self._dict_signals = bool(rest)

        def noop(*args):  # the SDPA-side recompute is not used by this baseline
            return None

        return noop, noop

    def install(self) -> None:
        super().install()
        for s in self.llm_stages:
            if "attn" in s.policy.signals:
                attn = self.adapter.attention_module(s.layer - 1)
                self.handles.append(attn.register_forward_hook(self._eager_signal(s.layer)))

    def _eager_signal(self, layer: int):
        def hook(module, args, output):
            run = self.run
            if not self.enabled or run is None or not any(run.totals):
                return None
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("eager-fastv needs eager attention weights at layer K-1; got None "
                                   "(is the model in attn_implementation='eager'?)")
            valid = run.mask2d.bool()
            last = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(-1)
            rows = weights[torch.arange(weights.shape[0], device=weights.device), :, last]  # [B, H, P]
            attn = rows.float().mean(1)
            run.signals[layer] = {"attn": attn} if self._dict_signals else attn
            return None

        return hook


def install(model, budget, layer=None, previous: str = "sdpa") -> None:
    """Switch ``model`` to eager attention and wrap it with FastV reading the eager weights."""
    from .. import api
    from ..adapters import adapter_for

    api.unwrap(model)
    model.set_attn_implementation("eager")
    adapter = adapter_for(model)
    configs = api._configs("fastv", budget, layer, {})
    engine = EagerFastVEngine(model, adapter, api._stages(adapter, configs), configs)
    engine.install()
    model.__dict__["_mmprune"] = engine
    model.__dict__["_mmprune_bench_attn"] = previous


def uninstall(model) -> None:
    """Remove the baseline and restore the attention implementation the model had."""
    from .. import api

    api.unwrap(model)
    model.set_attn_implementation(model.__dict__.pop("_mmprune_bench_attn", "sdpa"))
