"""What every adapter provides. The defaults fit the layout shared by LLaVA and Qwen-VL families in
transformers 5: ``model.model.language_model`` (``.layers``, ``.norm``) and ``model.model.get_*_features``.
"""

from __future__ import annotations

import torch

from ..syncs import clock


class VisionCapture:
    """Hooks on a vision tower, installed once at wrap time and live for one encoder call at a time; after a
    call, per-item signals.

    Subclasses implement ``_install()`` (append handles to ``self.handles``; hook bodies go through
    ``self._guard`` so a failing tap never breaks the model and an idle tap does nothing), ``_reset()`` (the
    per-call state) and ``_items(output, args, kwargs)`` returning, per image / video in encoder order, a
    dict ``{signal: tensor with one row per visual token}``. Anything that cannot be mapped exactly raises;
    the engine then passes None and the policy uses its documented fallback, with the reason in
    ``Trace.notes`` (never a silently wrong index). The hooks stay installed between calls (``active`` gates
    them) because registering a hook inside a compiled forward is a graph break (``RemovableHandle.next_id``
    is a class attribute torch.compile will not trace a write to).
    """

    def __init__(self, adapter, modality: str, names: tuple) -> None:
        self.adapter, self.modality, self.names = adapter, modality, names
        self.handles: list = []
        self.start()
        self.stop()  # the per-call state exists before the first call; idle until an encoder call starts it

    def install(self) -> None:
        self._install()

    def start(self) -> None:
        self.rows: list = []
        self.error: str | None = None
        self.seconds = 0.0
        self._reset()
        self.active = True

    def stop(self) -> None:
        self.active = False

    def _reset(self) -> None:
        """Clear what one encoder call leaves behind (subclasses with more per-call state extend this)."""

    def _guard(self, fn):
        def hook(*a, **k):
            if not self.active:
                return None
            t0 = clock()
            try:
                with torch.no_grad():
                    fn(*a, **k)
            except Exception as e:  # the model must run even if a tap fails
                self.error = self.error or f"vision signal tap failed ({type(e).__name__}: {e})"
            self.seconds += clock() - t0
            return None

        return hook

    def items(self, output, args, kwargs):
        t0 = clock()
        try:
            if self.error:
                return None
            with torch.no_grad():
                return self._items(output, args, kwargs)
        except Exception as e:
            self.error = f"vision signals unavailable ({type(e).__name__}: {e})"
            return None
        finally:
            self.seconds += clock() - t0

    def _install(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _items(self, output, args, kwargs):  # pragma: no cover - interface
        raise NotImplementedError


def split_channels(sig: torch.Tensor, layout) -> dict:
    """Channels ``[..., valid]`` -> signal dict, by ``layout`` (``(name, width)`` in channel order); rows with
    valid 0 (newline tokens) get zeros."""
    valid = (sig[:, -1] > 0.5).to(sig.dtype)
    out, c = {}, 0
    for name, width in layout:
        part = sig[:, c : c + width] * valid[:, None]
        out[name] = part[:, 0] if width == 1 and name != "keys" else part
        c += width
    return out


class Adapter:
    """Model-family specifics the engine needs; subclasses override what differs.

    Example:
        >>> from mmprune.adapters import adapter_for
        >>> # adapter_for(model) picks the subclass from config.model_type
    """

    family = ""
    model_types: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("image",)
    # a decode step's position ids are the running count of the 2-D mask (1-D RoPE); False for M-RoPE
    text_positions = True

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config

    # -- modules
    def inner(self):
        """The base model holding the tower and the decoder: ``model.model`` of a ``*ForConditionalGeneration``,
        the model itself when a bare ``LlavaModel`` / ``Qwen2VLModel`` / ... is wrapped."""
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    def language_model(self):
        return self.inner().language_model

    def layers(self):
        return self.language_model().layers

    def final_norm(self):
        return self.language_model().norm

    def attention_module(self, layer: int):
        return self.layers()[layer].self_attn

    def attention_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What decoder layer ``layer``'s attention module receives for the layer input ``hidden``."""
        return self.layers()[layer].input_layernorm(hidden)

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
        items = []  # a loop, not a comprehension: compiled as a frame of its own, a comprehension breaks the graph
        for i, f in enumerate(output.pooler_output):
            n = int(f.shape[0])
            items.append((n, self.grid_of(modality, n, i, args, kwargs)))
        return items

    def grid_of(self, modality, n, i, args, kwargs):
        return None

    @property
    def host_copies(self) -> dict:
        """name -> (device tensor, ``locate.HostCopy``): small inputs the engine copies to the host at the
        top of a forward, before the vision tower is queued, so reading them later does not stall."""
        return self.__dict__.setdefault("_host_copies", {})

    def host_of(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the host: the prefetched copy when ``t`` is the tensor the engine copied, else a read."""
        pre = self.host_copies.get(name)
        if pre is not None and pre[0] is t:
            return pre[1].get()
        return t.cpu()

    def host_values(self, name: str, t: torch.Tensor) -> list:
        """``host_of(name, t).tolist()``, from the prefetched copy's kept list where there is one."""
        pre = self.host_copies.get(name)
        if pre is not None and pre[0] is t:
            return pre[1].values()
        return t.tolist()

    # -- vision-tower signals
    def vision_capture(self, modality: str, names: tuple):
        """A ``VisionCapture`` for this modality's encoder calls, or None when the family has no tap (policies
        fall back)."""
        return None

    # -- extras
    def prune_lm_kwargs(self, kwargs: dict, run) -> None:
        """Prune any extra per-token language-model inputs (Qwen3-VL deepstack) after pre-LLM stages."""

    def install_extras(self, engine) -> None:
        """Hooks beyond the generic ones (Qwen3-VL deepstack inside the LLM)."""
