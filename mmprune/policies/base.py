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

    Optional signals, filled by the engine only for policies that declare them in ``signals`` (None where a
    family cannot provide one; each policy documents its fallback):

    - ``cls_attn [N]`` (signal ``"cls_attn"``): head-averaged attention the vision tower's [CLS] token pays to
      each patch at the feature layer (LLaVA-1.5 / NeXT CLIP towers). Towers without [CLS] (SigLIP,
      Qwen-VL) give the mean attention each token *receives* at that layer instead (Qwen: last block,
      averaged over each 2x2 merge group).
    - ``keys [N, Dk]`` (``"keys"``): the vision tower's attention keys at that layer, averaged over heads
      (Qwen: averaged over each 2x2 merge group); what ToMe / VisionZip / PruMerge compare.
    - ``cls_sim [N]`` (``"cls_sim"``): cosine similarity of each patch to the tower's [CLS] output at the
      feature layer (SigLIP: to the mean patch; Qwen: None).
    - ``tome_groups [N]`` (``"tome_groups"``): after ToMe merged inside the vision tower (LLaVA-1.5), the
      in-image index of the token standing for each token's group (the tower's outputs are unmerged copies).
    - ``next_cls_attn [N]`` / ``next_keys [N, D]`` (``"next_cls_attn"``, ``"next_keys"``): PruMerge's reading,
      the [CLS] attention and the keys of the tower block *after* the feature layer, q and k taken as one
      full-width head (LLaVA's CLIP towers; None elsewhere).
    - ``tower_assign [N]`` (``"tower_assign"``): where a policy already merged before the projector (VisionZip,
      PruMerge+ on LLaVA-1.5, as their official code), each token's representative (its in-image index; -1
      dropped); ``premerged_plan`` turns it into the stage's plan.
    - ``tower_cls [N]`` (``"tower_cls"``): 1 where the token's vision tower has a [CLS] token (CLIP), so
      ``cls_attn`` is [CLS]'s own attention row; None for towers without one (SigLIP, Qwen).
    - ``question [Q, D]`` (``"question"``): features of the text tokens after the sample's last visual token
      (the instruction); all text tokens when nothing follows the image.
    - ``text_attn [Q, N]`` (``"text_attn"``, in-LLM): head-averaged attention of each question token to each
      visual token at layer K-1.
    - ``llm_keys [N, Dk]`` (``"llm_keys"``, in-LLM): the keys layer K-1 writes to its KV cache (post-RoPE,
      k_norm applied, KV heads concatenated); ``question_keys [Q, Dk]`` the same for the question tokens.
    - ``pagerank [N]`` (``"pagerank"``, in-LLM): AIM's importance, PageRank over layer K-1's whole attention
      matrix at temperature 0.1 (``mmprune.attention.pagerank_importance``).
    - ``visual_embeds [N0, D]`` / ``question_embeds [Q, D]`` (``"input_embeds"``): the language model's input
      embeddings of *all* the sample's original visual tokens and of its question tokens (SparseVLM's raters).
    - ``normed [N, D]`` / ``question_normed [Q, D]`` (``"final_norm"``, in-LLM): the stage's input hidden states
      of the visual / question tokens through the language model's final norm (DART's similarity space).

    Always filled: ``rows [N]`` each token's index in its sample's current (unpadded) sequence, and
    ``question_rows [Q]`` the same for the question tokens where a question signal was declared (the
    official codes' absolute indices); ``pos [N]`` each token's original index inside its segment (so grid-based policies work
    after an earlier stage dropped tokens), ``sizes [N]`` how many original tokens each token already stands
    for (1 unless an earlier stage merged), ``origin`` each segment's token count before the first stage.

    ``grids[i] = (t, h, w)``: ``t * h * w`` tokens in raster order (frame, row, column); a segment may hold
    a few more tokens after the grid (LLaVA-OneVision's trailing newline token of a video).
    """

    features: torch.Tensor
    segments: list[int]
    budgets: list[int]
    grids: list[tuple[int, int, int] | None] = field(default_factory=list)
    attn: torch.Tensor | None = None
    text: torch.Tensor | None = None
    layer: int | None = None
    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    cls_sim: torch.Tensor | None = None
    tome_groups: torch.Tensor | None = None
    tower_cls: torch.Tensor | None = None
    tower_assign: torch.Tensor | None = None
    next_cls_attn: torch.Tensor | None = None
    next_keys: torch.Tensor | None = None
    question: torch.Tensor | None = None
    text_attn: torch.Tensor | None = None
    llm_keys: torch.Tensor | None = None
    pagerank: torch.Tensor | None = None
    question_keys: torch.Tensor | None = None
    normed: torch.Tensor | None = None
    visual_embeds: torch.Tensor | None = None
    question_embeds: torch.Tensor | None = None
    question_normed: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    question_rows: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    origin: list[int] | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def total_budget(self) -> int:
        return int(sum(self.budgets))

    def positions(self) -> torch.Tensor:
        """``pos``, or each token's index inside its segment when no earlier stage ran."""
        if self.pos is not None:
            return self.pos.long().cpu()
        return torch.cat([torch.arange(s) for s in self.segments]) if self.segments else torch.zeros(0, dtype=torch.long)

    def token_sizes(self) -> torch.Tensor:
        return torch.ones(self.n) if self.sizes is None else self.sizes.float().cpu()

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
    tokens map to themselves. ``weight`` optionally weights each token in its group's mean. ``reduce="sum"``
    makes a group's feature the weighted *sum* instead (VisionZip's ``target + mean(others)`` is the sum with
    weight 1 for the target and ``1 / count`` for the others). ``combine [K, N]`` is a general linear merge
    for methods whose groups overlap (PruMerge+ adds each kept token's 32 nearest neighbours, kept or not):
    kept token j's feature is ``sum_n combine[j, n] * feature[n]``; ``assign`` still maps each token to
    its main group (token sizes, the trace). ``premerged=True``: the kept tokens' features were merged
    upstream already (in the vision tower, before the projector); the engine keeps them as they are.
    """

    keep: torch.Tensor
    assign: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    reduce: str = "mean"
    combine: torch.Tensor | None = None
    premerged: bool = False


class Policy:
    """Base class. Subclasses set the class attributes and implement ``select``.

    ``stages``: where the policy can run ("pre" = before the LLM, "llm" = at a decoder layer).
    ``signals``: what it needs beyond features ("attn": last token->visual attention at the previous layer,
    or at the stage's own layer when ``signal_layer = "own"``: layer K's q/k on its input, before the drop,
    "text": the text-token features, and the optional ``Tokens`` fields: "cls_attn", "keys", "cls_sim",
    "question", "text_attn", "llm_keys"; "grid" / "frames" only document that the policy reads
    ``Tokens.grids``). ``default_layer``: None = pre-LLM by default, else the decoder layer
    (``layer_for(num_layers)`` may scale it with depth). ``adaptive``: the policy picks its own count per
    instance (then the budget is its cap or target, documented per policy).

    How the engine runs it (``mmprune.policies.batch``): ``batched = True`` with ``select_batch(BatchTokens)
    -> BatchPlan`` selects for the whole batch on the device, no host synchronisation; ``data_free = True``
    says the plan depends only on counts, budgets and grids (never features), so the engine computes it once
    per layout on the host with ``select`` and reuses it; otherwise ``select`` runs per sample (the slow path
    every custom policy gets without writing anything more). ``select`` stays the reference that
    ``select_batch`` must reproduce exactly (``tests/test_batched.py``).

    Multi-stage policies override ``expand(config, num_layers)`` and return one ``(PruneConfig, Policy
    instance, layer)`` per stage; the wrap installs them as separate stages, so the trace shows each.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ("pre", "llm")
    signals: ClassVar[tuple[str, ...]] = ()
    default_layer: ClassVar[int | None] = None
    signal_layer: ClassVar[str] = "previous"
    adaptive: ClassVar[bool] = False
    batched: ClassVar[bool] = False
    data_free: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: the default stage in words ("LLM layer 2", "before the LLM"), for ``mmprune policies`` and the docs
    where: ClassVar[str] = ""
    #: the paper (arXiv abstract page) and the official code a differential test in ``tests/test_faithful.py``
    #: compares the default with (a GitHub tree at the commit cited there); empty where there is none
    paper_url: ClassVar[str] = ""
    code_url: ClassVar[str] = ""
    #: options whose value is one of a fixed set, checked at construction so a typo fails before any model runs
    option_choices: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.option_defaults())
        if unknown:
            known = ", ".join(sorted(self.option_defaults())) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for policy {self.name!r}; accepted: {known}")
        self.options = {**self.option_defaults(), **options}
        for key, allowed in self.option_choices.items():
            if self.options[key] not in allowed:
                raise ValueError(f"{self.name} option {key} must be one of {', '.join(map(repr, allowed))}; "
                                 f"got {self.options[key]!r}")

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def layer_for(cls, num_layers: int) -> int | None:
        """The default decoder layer for a model of ``num_layers`` layers (None = pre-LLM)."""
        if cls.default_layer is None:
            return None
        return max(0, min(cls.default_layer, num_layers - 1))

    @classmethod
    def expand(cls, config, num_layers: int):
        """Multi-stage policies: list of ``(PruneConfig, Policy, layer)``; None = one ordinary stage."""
        return None

    def select(self, tokens: Tokens) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError

    def select_batch(self, tokens):  # -> BatchPlan | None
        """The batched selection (``batched = True``); None = use ``select`` per sample for this call."""
        return None


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
