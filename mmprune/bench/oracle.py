"""The oracle: the fastest any pruning engine could run a given set of per-layer token counts.

``oracle_ms`` times the *unwrapped* model whose language model simply has the pruned run's token counts:
the vision tower and projector run in full (as they must), then each decoder layer gets exactly as many
rows as the pruned run's trace says (``Trace.layer_tokens``), by static slicing of the rows it is given:
no selection, no signals, no bookkeeping, no host synchronisation. Everything the cut needs (2-D masks,
the 4-D masks of shortened layers, ``cache_position``) is built once when it is installed, from the counts
alone. Which rows survive does not matter for the time, only how many: the oracle keeps each sample's
last ``count`` rows, left-padded to the batch's largest count like the engine does.

``oracle_efficiency = oracle_ms / pruned_ms`` (1.0: mmprune's own path costs nothing; the GPU-native
issue's goal is >= 0.95 on CPU and at GPU batch 8). Only the prefill is cut: decoding after an oracle
prefill would need the pruned prompt's columns, which is the engine's job.

Qwen3-VL's deepstack additions (a few element-wise adds on visual rows) are left out of the oracle.

Example:
    >>> from mmprune.testing import tiny_model, make_inputs
    >>> m = tiny_model("llava"); batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    >>> cut = OracleCut(m, [[12, 10]] * 2 + [[6, 6]] * 2, batch["input_ids"].shape[1])
    >>> out = m(**batch, use_cache=True); cut.remove()
    >>> out.past_key_values.layers[0].keys.shape[2], out.past_key_values.layers[3].keys.shape[2]
    (12, 6)
"""

from __future__ import annotations

import torch


class OracleCut:
    """Hooks on ``model``'s language model that cut its rows to ``layer_tokens`` (per layer, per sample).

    ``seq_len`` is the prompt's length (the LM input's rows before any cut); the counts usually come from
    ``mmprune.trace(model).layer_tokens`` of the pruned run being judged.
    """

    def __init__(self, model, layer_tokens: list[list[int]], seq_len: int):
        from ..adapters import adapter_for

        adapter = adapter_for(model)
        self.lm = adapter.language_model()
        layers = adapter.layers()
        if len(layer_tokens) != len(layers):
            raise ValueError(f"layer_tokens has {len(layer_tokens)} layers; the model has {len(layers)}")
        self.dev = next(self.lm.parameters()).device
        self.dtype = next(self.lm.parameters()).dtype
        self.counts = [list(c) for c in layer_tokens]
        self.rows = [max(c) for c in self.counts]
        self.seq_len = seq_len
        self.masks2d = [self._mask2d(c) for c in self.counts]
        self.first = self.rows[0] if self.rows[0] < seq_len else None
        self.types = [adapter.layer_type(i) for i in range(len(layers))]
        cuts = [i for i in range(1, len(layers)) if self.rows[i] < self.rows[i - 1]]
        built: dict = {}  # one 4-D mask per (counts, layer type), reused by the layers after a cut
        self.layer_masks = {}
        for i in range(cuts[0] if cuts else len(layers), len(layers)):
            key = (tuple(self.counts[i]), self.types[i])
            if key not in built:
                built[key] = self._layer_mask(i, self.types[i])
            self.layer_masks[i] = built[key]
        self.cache_position = torch.arange(self.rows[0], device=self.dev)
        self.active = False
        self.handles = [self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True)]
        for i in self.layer_masks:
            self.handles.append(layers[i].register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))

    def _mask2d(self, counts: list[int]) -> torch.Tensor:
        p = max(counts)
        cols = torch.arange(p, device=self.dev)
        return (cols[None, :] >= (p - torch.tensor(counts, device=self.dev))[:, None]).long()

    def _layer_mask(self, i: int, layer_type: str):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        from ..decode import _cache_kw

        fn = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        x = torch.zeros(len(self.counts[i]), self.rows[i], 1, device=self.dev, dtype=self.dtype)
        return fn(config=self.lm.config, inputs_embeds=x, attention_mask=self.masks2d[i], **{_cache_kw(fn): None},
                  position_ids=None)

    def _lm_pre(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        self.active = x is not None and x.shape[1] == self.seq_len  # decode steps and other shapes: untouched
        if not self.active or self.first is None:
            return None
        p = self.first
        kwargs["inputs_embeds"] = x[:, -p:]
        kwargs["attention_mask"] = self.masks2d[0]
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            kwargs["position_ids"] = pos[..., -p:]
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = self.cache_position
        for name in ("visual_pos_masks", "deepstack_visual_embeds"):  # Qwen3-VL: see the module docstring
            if name in kwargs:
                kwargs[name] = None
        return args, kwargs

    def _layer_pre(self, i: int):
        p, mask = self.rows[i], self.layer_masks[i]

        def hook(module, args, kwargs):
            if not self.active:
                return None
            hidden = (args[0] if args else kwargs["hidden_states"])[:, -p:]  # a no-op after the cut
            kwargs["attention_mask"] = mask
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(t[..., -p:, :] for t in pe)
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = kwargs["position_ids"][..., -p:]
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
