"""What the last prefill forward of a wrapped model did: one ``StageTrace`` per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageTrace:
    """One stage of the last prefill.

    ``layer`` is None for a pre-LLM stage, else the decoder layer where tokens were dropped. ``kept`` holds,
    per sample, the sorted indices (into that sample's visual tokens entering the stage) that survived; merged
    tokens are represented by their kept representative. ``scores`` holds the per-token signal the policy
    ranked by, where it used one (e.g. fastv's attention), aligned with the tokens entering the stage.
    """

    policy: str
    layer: int | None
    kept: list[torch.Tensor]
    n_before: list[int]
    n_after: list[int]
    scores: list[torch.Tensor] | None = None


@dataclass
class Trace:
    """What the last prefill forward kept.

    ``n_visual`` is the per-sample number of visual tokens the model produced; ``layer_tokens[i]`` the
    per-sample count of (non-padding) tokens that decoder layer ``i`` processed — what analytic FLOPs use.

    Example:
        >>> t = Trace(stages=[StageTrace("uniform", None, [torch.tensor([0, 2])], [4], [2])], n_visual=[4])
        >>> t.visual_tokens_kept
        [2]
    """

    stages: list[StageTrace] = field(default_factory=list)
    n_visual: list[int] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)

    @property
    def visual_tokens_kept(self) -> list[int]:
        """Per-sample visual tokens left after the last stage."""
        return list(self.stages[-1].n_after) if self.stages else list(self.n_visual)

    def __repr__(self) -> str:
        parts = [f"{s.policy}@{'pre' if s.layer is None else s.layer}: {s.n_before}->{s.n_after}" for s in self.stages]
        return f"Trace(n_visual={self.n_visual}, stages=[{', '.join(parts)}])"
