"""What the last prefill forward of a wrapped model did: one ``StageTrace`` per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _none():
    return None


@dataclass
class StageTrace:
    """One stage of the last prefill.

    ``layer`` is None for a pre-LLM stage, else the decoder layer where tokens were dropped. ``kept`` holds,
    per sample, the sorted indices (into that sample's visual tokens entering the stage) that survived; merged
    tokens are represented by their kept representative. ``scores`` holds the per-token signal the policy
    ranked by, where it used one (e.g. fastv's attention), aligned with the tokens entering the stage.
    ``merged`` is True when dropped tokens were merged into kept ones (their features are group means);
    ``assign`` then holds, per sample, the position in ``kept`` each entering token merged into (-1: dropped);
    ``seconds`` the wall time of the policy's own selection in this stage (all samples).
    """

    policy: str
    layer: int | None
    kept: list[torch.Tensor]
    n_before: list[int]
    n_after: list[int]
    # lazy fields default through a factory: a plain ``= None`` would be a class attribute, found before
    # ``__getattr__`` is ever asked
    scores: list[torch.Tensor] | None = field(default_factory=_none)
    merged: bool = False
    seconds: float = 0.0
    assign: list[torch.Tensor | None] | None = field(default_factory=_none)

    # The engine records a stage as device tensors and converts them to these host lists only when a
    # field is first read (a device-to-host copy: a sync on a GPU, which the prefill itself must not make).
    # ``__getattr__`` (called only for a missing attribute), not ``__getattribute__``: torch.compile traces
    # the construction of a plain class, and cannot trace a custom ``__getattribute__`` (issue 20).
    _LAZY = ("kept", "scores", "assign")

    @classmethod
    def lazy(cls, policy, layer, n_before, n_after, merged, seconds, keep, scores=None, assign=None) -> StageTrace:
        """A stage recorded as device tensors: ``keep [B, K]`` (-1 padded), ``scores`` / ``assign [B, N]``."""
        out = cls.__new__(cls)
        out.policy, out.layer, out.n_before, out.n_after = policy, layer, n_before, n_after
        out.merged, out.seconds = merged, seconds
        out._device = (keep, scores, assign)
        return out

    def __getattr__(self, name):
        d = self.__dict__
        if name not in StageTrace._LAZY or "_device" not in d:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        keep, scores, assign = d.pop("_device")
        kh = keep.cpu()
        d["kept"] = [kh[i, :t] for i, t in enumerate(self.n_after)]
        d["scores"] = None if scores is None else [scores[i, :n].detach().float().cpu() for i, n in enumerate(self.n_before)]
        d["assign"] = None if assign is None else [assign[i, :n].long().cpu() for i, n in enumerate(self.n_before)]
        return d[name]


@dataclass
class Trace:
    """What the last prefill forward kept.

    ``n_visual`` is the per-sample number of visual tokens the model produced; ``layer_tokens[i]`` the
    per-sample count of (non-padding) tokens that decoder layer ``i`` processed — what analytic FLOPs use.
    ``signal_seconds``: time spent computing the signals policies asked for (vision-tower taps, attention
    rows at layer K-1); ``notes``: why a declared signal was unavailable (the policy's fallback was used).

    Example:
        >>> t = Trace(stages=[StageTrace("uniform", None, [torch.tensor([0, 2])], [4], [2])], n_visual=[4])
        >>> t.visual_tokens_kept
        [2]
    """

    stages: list[StageTrace] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)
    signal_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # the pixel inputs the vision tower ran on when a policy changed them (``downsample``), for its FLOPs
    tower_inputs: dict | None = None

    @classmethod
    def recording(cls, n_visual: list[int]) -> Trace:
        """A trace the engine fills during a prefill: ``layer_tokens`` is recorded as device tensors ``[B]``
        (``layer_rows``) and becomes host lists when first read (see ``StageTrace``)."""
        out = cls.__new__(cls)
        out.stages, out.n_visual, out.signal_seconds, out.notes, out.tower_inputs = [], n_visual, 0.0, [], None
        out.layer_rows = []
        return out

    def __getattr__(self, name):
        d = self.__dict__
        if name != "layer_tokens" or "layer_rows" not in d:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        host: dict = {}  # layers after a stage share its tensor: one read each, not one per layer
        for r in d["layer_rows"]:
            if isinstance(r, torch.Tensor) and id(r) not in host:
                host[id(r)] = [int(v) for v in r.tolist()]
        d["layer_tokens"] = [host[id(r)] if isinstance(r, torch.Tensor) else r for r in d.pop("layer_rows")]
        return d["layer_tokens"]

    @property
    def policy_seconds(self) -> float:
        """The policies' own overhead in the last prefill: selection plus signal computation."""
        return self.signal_seconds + sum(s.seconds for s in self.stages)

    @property
    def visual_tokens_kept(self) -> list[int]:
        """Per-sample visual tokens left after the last stage."""
        return list(self.stages[-1].n_after) if self.stages else list(self.n_visual)

    def __repr__(self) -> str:
        parts = [f"{s.policy}@{'pre' if s.layer is None else s.layer}: {s.n_before}->{s.n_after}" for s in self.stages]
        return f"Trace(n_visual={self.n_visual}, stages=[{', '.join(parts)}])"
