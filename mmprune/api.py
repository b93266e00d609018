"""``wrap`` / ``unwrap`` / ``disabled`` / ``trace``: the one-call API.

Example:
    >>> import mmprune
    >>> # model = AutoModelForImageTextToText.from_pretrained(...)
    >>> # mmprune.wrap(model, "fastv", budget=0.25, layer=2); model.generate(...); mmprune.trace(model)
"""

from __future__ import annotations

import contextlib

from .config import PruneConfig


def _configs(policy, budget, layer, options) -> list[PruneConfig]:
    """``wrap``'s arguments as the list of PruneConfigs they describe (what the engine keeps and
    ``mmprune.json`` stores), with a one-line error for a mix it cannot read."""
    if isinstance(policy, PruneConfig):
        if budget is not None or layer is not None or options:
            raise ValueError("pass budget/layer/options inside the PruneConfig, not beside it")
        return [policy]
    if isinstance(policy, (list, tuple)):
        if not policy or not all(isinstance(c, PruneConfig) for c in policy):
            raise ValueError("policy must be a name, a PruneConfig, or a non-empty list of PruneConfig")
        if budget is not None or layer is not None or options:
            raise ValueError("pass budget/layer/options inside each PruneConfig, not beside the list")
        return list(policy)
    if isinstance(policy, str):
        return [PruneConfig(policy, 1.0 if budget is None else budget, layer, dict(options))]
    raise ValueError(f"policy must be a name, a PruneConfig, or a list of PruneConfig; got {type(policy).__name__}")


def _stages(model_adapter, configs: list[PruneConfig]):
    from .engine import Stage
    from .policies import get_policy

    n_layers = model_adapter.num_layers()
    stages = []
    for c in configs:
        cls = get_policy(c.policy)
        expanded = cls.expand(c, n_layers)
        if expanded is None:
            pol = cls(**c.options)
            expanded = [(c, pol, c.layer if c.layer is not None else cls.layer_for(n_layers))]
        for cfg, pol, layer_ in expanded:
            _check_layer(c.policy, pol, layer_, n_layers)
            stages.append(Stage(config=cfg, policy=pol, layer=layer_))
    # pre-LLM stages first (in the given order), then by increasing layer
    pre = [s for s in stages if s.layer is None]
    llm = sorted([s for s in stages if s.layer is not None], key=lambda s: s.layer)
    return pre + llm


# signals read at layer K-1 of the LLM: such stages need K >= 1
LLM_SIGNALS = ("attn", "text_attn", "llm_keys")


def _check_layer(name, pol, layer_, n_layers) -> None:
    if layer_ is None and "pre" not in pol.stages:
        raise ValueError(f"policy {name!r} acts inside the LLM; give layer= in [1, {n_layers})")
    if layer_ is not None:
        if "llm" not in pol.stages:
            raise ValueError(f"policy {name!r} acts before the LLM only; use layer=None")
        lo = 1 if any(s in pol.signals for s in LLM_SIGNALS) else 0  # attention signals are read at layer K-1
        if not lo <= layer_ < n_layers:
            raise ValueError(f"layer {layer_} for policy {name!r} is outside [{lo}, {n_layers}) for this model")


SAVED_FILE = "mmprune.json"


def save_config(model, directory) -> str:
    """Write the wrap of ``model`` to ``directory/mmprune.json`` (a wrapped model's ``save_pretrained`` does);
    ``mmprune.wrap(reloaded)`` with no policy restores it. Returns the file's path.

    Example:
        >>> # mmprune.wrap(model, "visionzip", budget=0.25); model.save_pretrained("ckpt")  # also ckpt/mmprune.json
        >>> # reloaded = AutoModelForImageTextToText.from_pretrained("ckpt"); mmprune.wrap(reloaded)
    """
    import json
    from pathlib import Path

    engine = _engine(model)
    stages = [{"policy": c.policy, "budget": c.budget, "layer": c.layer, "options": c.options}
              for c in engine.configs]
    try:
        text = json.dumps({"stages": stages}, indent=2)
    except TypeError as e:
        raise ValueError(f"the wrap's options cannot be saved as JSON ({e}); save_pretrained wrote the model only") from None
    path = Path(directory) / SAVED_FILE
    path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def _saved_configs(model) -> list[PruneConfig]:
    import json
    from pathlib import Path

    where = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(str(where)) / SAVED_FILE
    if not where or not path.is_file():
        raise ValueError("wrap needs a policy: give one (see mmprune.policies()), or wrap a model loaded from a "
                         f"folder that a wrapped model's save_pretrained wrote ({SAVED_FILE} beside the weights)")
    try:
        stages = json.loads(path.read_text(encoding="utf-8"))["stages"]
        return [PruneConfig(st["policy"], st["budget"], st.get("layer"), dict(st.get("options") or {})) for st in stages]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid {SAVED_FILE} ({e})") from None


def wrap(model, policy=None, *, budget=None, layer=None, static=False, **options):
    """Install token reduction on ``model`` in place and return it.

    ``policy`` is a registered name (see ``mmprune.policies()``), a ``PruneConfig``, or a list of them
    (stages: pre-LLM first, then by increasing layer). ``budget``: float in (0, 1] = fraction of the visual
    tokens entering the stage, int >= 1 = tokens kept per image. ``layer``: None = the policy's default
    stage, int = the decoder layer where tokens are dropped. Wrapping a wrapped model replaces the wrap.
    ``copy.deepcopy`` of a wrapped model is a wrapped copy (its own hooks on its own modules); pickling one
    (``torch.save(model)``) raises: save the ``state_dict`` (or ``save_pretrained``), wrap again after loading.
    ``save_pretrained`` of a wrapped model writes the unwrapped files plus ``mmprune.json``; ``policy=None``
    wraps a model loaded from such a folder the way it was saved. ``static=True`` refuses policies whose kept
    count depends on the data (``adaptive``): with a fixed count every tensor's shape follows from the prompt's
    layout alone (ragged batches pad to the longest sample), which is what CUDA graphs, ``torch.compile``
    without recompilation and ``torch.export`` need; the switch makes a pipeline that relies on it fail at
    wrap time instead of recompiling per prompt.

    Example:
        >>> import mmprune
        >>> # mmprune.wrap(model, "uniform", budget=0.5)
        >>> # mmprune.wrap(model, [mmprune.PruneConfig("uniform", 0.5), mmprune.PruneConfig("fastv", 0.5, layer=2)])
    """
    from .adapters import adapter_for
    from .engine import Engine

    adapter = adapter_for(model)
    if policy is None:
        if budget is not None or layer is not None or options:
            raise ValueError("budget / layer / options need a policy; give one, or none of them to restore mmprune.json")
        policy = _saved_configs(model)
    configs = _configs(policy, budget, layer, options)
    stages = _stages(adapter, configs)
    if static:
        adaptive = list(dict.fromkeys(s.policy.name for s in stages if not _fixed_count(s.policy)))
        if adaptive:
            raise ValueError(f"static=True needs policies with a fixed kept count; {', '.join(adaptive)} choose "
                             "theirs from the data (pass adaptive=False where the policy offers it, or pick a "
                             "policy whose count is its budget)")
    unwrap(model)
    engine = Engine(model, adapter, stages, configs)
    engine.install()
    model.__dict__["_mmprune"] = engine
    return model


def _fixed_count(policy) -> bool:
    """Whether a policy keeps exactly its budget's count (no data-dependent count)."""
    return not getattr(policy, "adaptive", False) or policy.options.get("adaptive") is False


def _engine(model):
    engine = getattr(model, "__dict__", {}).get("_mmprune")
    if engine is None:
        raise ValueError(f"{type(model).__name__} is not wrapped by mmprune; call mmprune.wrap(model, ...) first")
    return engine


def unwrap(model):
    """Remove everything ``wrap`` installed (hooks, instance attributes); a no-op on an unwrapped model."""
    engine = getattr(model, "__dict__", {}).pop("_mmprune", None)
    if engine is not None:
        engine.remove()
    return model


@contextlib.contextmanager
def disabled(model):
    """Context manager: run the wrapped model unpruned inside the block.

    Example:
        >>> # with mmprune.disabled(model): reference = model(**inputs)
    """
    engine = _engine(model)
    before = engine.enabled
    engine.enabled = False
    try:
        yield model
    finally:
        engine.enabled = before


def trace(model):
    """The ``Trace`` of the last prefill forward of a wrapped model (None before the first forward)."""
    return _engine(model).last_trace


def is_wrapped(model) -> bool:
    return "_mmprune" in getattr(model, "__dict__", {})
