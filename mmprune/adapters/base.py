"""What every adapter provides. The defaults fit the layout shared by LLaVA and Qwen-VL families in
transformers 5: ``model.model.language_model`` (``.layers``, ``.norm``) and ``model.model.get_*_features``.
"""

from __future__ import annotations

import torch


class Adapter:
    """Model-family specifics the engine needs; subclasses override what differs.

    Example:
        >>> from mmprune.adapters import adapter_for
        >>> # adapter_for(model) picks the subclass from config.model_type
    """

    family = ""
    model_types: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("image",)

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config

    # -- modules
    def inner(self):
        return self.model.model

    def language_model(self):
        return self.inner().language_model

    def layers(self):
        return self.language_model().layers

    def final_norm(self):
        return self.language_model().norm

    def attention_module(self, layer: int):
        return self.layers()[layer].self_attn

    def text_config(self):
        return self.config.get_text_config()

    def num_layers(self) -> int:
        return len(self.layers())

    def layer_type(self, i: int) -> str:
        types = getattr(self.text_config(), "layer_types", None)
        return types[i] if types else "full_attention"

    # -- visual tokens
    def token_ids(self) -> dict[str, int]:
        """modality -> placeholder token id."""
        out = {}
        for modality in self.modalities:
            for key in (f"{modality}_token_id", f"{modality}_token_index"):
                v = getattr(self.config, key, None)
                if v is not None:
                    out[modality] = int(v)
                    break
        return out

    def token_modalities(self) -> dict[int, str]:
        return {v: k for k, v in self.token_ids().items()}

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(list(self.token_ids().values()), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def encoder_methods(self):
        """(modality, object, method name) of the feature extractors to wrap on the instance."""
        inner = self.inner()
        return [(m, inner, f"get_{m}_features") for m in self.modalities if hasattr(inner, f"get_{m}_features")]

    def encoder_items(self, modality, output, args, kwargs):
        """Per image / video, in order: (token count, (t, h, w) grid or None), from an encoder output."""
        feats = output.pooler_output
        return [(int(f.shape[0]), self.grid_of(modality, int(f.shape[0]), i, args, kwargs)) for i, f in enumerate(feats)]

    def grid_of(self, modality, n, i, args, kwargs):
        return None

    # -- extras
    def prune_lm_kwargs(self, kwargs: dict, run) -> None:
        """Prune any extra per-token language-model inputs (Qwen3-VL deepstack) after pre-LLM stages."""

    def install_extras(self, engine) -> None:
        """Hooks beyond the generic ones (Qwen3-VL deepstack inside the LLM)."""
