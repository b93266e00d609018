"""The policy interface: one small class per method, one uniform signature, an index plan out.

A policy never touches the model. For each sample and stage it receives a ``Tokens`` view (the visual
tokens entering the stage, their per-image budgets, and the signals it declared) and returns a ``Plan``:
which tokens to keep, and optionally which dropped tokens merge into which kept one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Tokens:
    """One sample's visual tokens entering a stage.

    ``features`` is ``[N, D]`` (projected features pre-LLM, hidden states in-LLM); ``segments`` the token
    count of each image / video in sequence order (sums to N); ``budgets`` the tokens to keep per segment;
    ``grids`` each segment's ``(t, h, w)`` token grid where known (None otherwise); ``attn`` ``[N]`` the
    head-averaged attention the query tokens pay to each token (only for policies with signal "attn");
    ``text`` ``[T, D]`` the sample's text-token features; ``layer`` None pre-LLM, else the decoder layer.
    """

    features: torch.Tensor
    segments: list[int]
    budgets: list[int]
    grids: list[tuple[int, int, int] | None] = field(default_factory=list)
    attn: torch.Tensor | None = None
    text: torch.Tensor | None = None
    layer: int | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def total_budget(self) -> int:
        return int(sum(self.budgets))

    def segment_slices(self) -> list[slice]:
        out, start = [], 0
        for s in self.segments:
            out.append(slice(start, start + s))
            start += s
        return out


@dataclass
class Plan:
    """What to keep (sorted indices into the stage's tokens) and, optionally, what merges where.

    ``assign[n]`` is the position in ``keep`` that token ``n`` merges into (-1 = dropped outright); kept
    tokens map to themselves. ``weight`` optionally weights each token in its group's mean.
    """

    keep: torch.Tensor
    assign: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class Policy:
    """Base class. Subclasses set the class attributes and implement ``select``.

    ``stages``: where the policy can run ("pre" = before the LLM, "llm" = at a decoder layer).
    ``signals``: what it needs beyond features ("attn": query->visual attention at the previous layer,
    "text": the text-token features). ``default_layer``: None = pre-LLM by default, else the decoder layer.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ("pre", "llm")
    signals: ClassVar[tuple[str, ...]] = ()
    default_layer: ClassVar[int | None] = None
    adaptive: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.option_defaults())
        if unknown:
            known = ", ".join(sorted(self.option_defaults())) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for policy {self.name!r}; accepted: {known}")
        self.options = {**self.option_defaults(), **options}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {}

    def select(self, tokens: Tokens) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError


def per_segment(tokens: Tokens, pick) -> torch.Tensor:
    """Apply ``pick(n_tokens, k, segment_index) -> local indices`` to every segment; return global sorted keep."""
    keep = []
    for i, (sl, k) in enumerate(zip(tokens.segment_slices(), tokens.budgets)):
        n = sl.stop - sl.start
        if n == 0 or k <= 0:
            continue
        local = torch.as_tensor(pick(n, min(k, n), i), dtype=torch.long)
        keep.append(local + sl.start)
    if not keep:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(keep).sort().values


def resolve_budget(budget: float | int, n: int) -> int:
    """Tokens to keep out of ``n`` for a budget (fraction or per-image count); at least 1 when n > 0.

    Example:
        >>> resolve_budget(0.25, 576), resolve_budget(64, 576), resolve_budget(64, 10)
        (144, 64, 10)
    """
    if n <= 0:
        return 0
    if isinstance(budget, float):
        return max(1, min(n, int(round(budget * n))))
    return max(1, min(n, int(budget)))
