"""Baselines and the identity: ``none``, ``uniform``, ``random``."""

from __future__ import annotations

import torch

from .base import Plan, Policy, Tokens, per_segment


class NoPrune(Policy):
    """Identity: keeps every token. The unpruned reference that evaluation compares against.

    Example:
        >>> NoPrune().select(Tokens(torch.zeros(3, 2), [3], [1])).keep
        tensor([0, 1, 2])
    """

    name = "none"
    data_free = True
    summary = "identity (unpruned reference)"
    where = "before the LLM"

    def select(self, tokens: Tokens) -> Plan:
        return Plan(keep=torch.arange(tokens.n))


class Uniform(Policy):
    """Evenly spaced subset of each image's tokens, in sequence order (text-independent).

    Picks ``floor((i + 0.5) * n / k)`` for ``i < k``: the centres of k equal bins, so budget 1.0 keeps all.

    Example:
        >>> Uniform().select(Tokens(torch.zeros(8, 2), [8], [4])).keep
        tensor([1, 3, 5, 7])
    """

    name = "uniform"
    data_free = True
    summary = "evenly spaced subset (baseline)"
    where = "before the LLM"

    def select(self, tokens: Tokens) -> Plan:
        def pick(n, k, _):
            return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long().clamp(max=n - 1)

        return Plan(keep=per_segment(tokens, pick))


class Random(Policy):
    """Seeded random subset of each image's tokens (baseline).

    The generator is seeded with ``(seed, segment index, segment size)`` so the choice depends only on
    the image's shape, never on its place in the batch: batch 1 and batch 3 keep the same tokens, and
    beams of one prompt agree (required for a KV cache shared by beam search).

    Example:
        >>> a = Random(seed=1).select(Tokens(torch.zeros(10, 2), [10], [3])).keep
        >>> torch.equal(a, Random(seed=1).select(Tokens(torch.ones(10, 2), [10], [3])).keep)
        True
    """

    name = "random"
    data_free = True
    summary = "seeded random subset (baseline)"
    where = "before the LLM"

    @classmethod
    def option_defaults(cls):
        return {"seed": 0}

    def select(self, tokens: Tokens) -> Plan:
        seed = int(self.options["seed"])

        def pick(n, k, i):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i * 7919 + n)
            return torch.randperm(n, generator=g)[:k]

        return Plan(keep=per_segment(tokens, pick))
