"""``PruneConfig``: one token-reduction stage (policy, budget, layer, options), validated on creation."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any


def validate_budget(budget: Any) -> float | int:
    """Return ``budget`` if valid, else raise a one-line ValueError naming what is accepted.

    A float in (0, 1] is a fraction of the visual tokens entering the stage; an int >= 1 is the number
    of tokens kept per image (per video for video inputs).

    Example:
        >>> validate_budget(0.25), validate_budget(64)
        (0.25, 64)
    """
    accepted = "a float in (0, 1] (fraction kept) or an int >= 1 (tokens kept per image)"
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be {accepted}; got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget must be {accepted}; got int {budget}")
        return int(budget)
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0 or budget > 1:
        raise ValueError(f"budget must be {accepted}; got float {budget}")
    return budget


@dataclass
class PruneConfig:
    """One stage of token reduction.

    ``layer=None`` means the policy's default stage (pre-LLM for most policies, layer 2 for ``fastv``);
    an int is the decoder layer at which tokens are dropped (in-LLM).

    Example:
        >>> PruneConfig("fastv", budget=0.25, layer=2)
        PruneConfig(policy='fastv', budget=0.25, layer=2, options={})
    """

    policy: str
    budget: float | int = 1.0
    layer: int | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy must be a registered policy name (str); got {self.policy!r}")
        self.budget = validate_budget(self.budget)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral)):
            raise ValueError(f"layer must be None (the policy's default stage) or an int >= 0; got {self.layer!r}")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be None (the policy's default stage) or an int >= 0; got {self.layer}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict; got {type(self.options).__name__}")
