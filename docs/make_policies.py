"""Write docs/policies.md from the registered policy classes (their docstrings are the reference text).

    python docs/make_policies.py          # rewrite docs/policies.md and the README's policy table
    python docs/make_policies.py --check  # exit 1 when either is stale (tests/test_docs.py runs this)

Generated, so the page cannot drift from the code: each section is the class's own docstring (method, official
code and commit, fallbacks, deviations and the options that restore the paper), with its stage, count and options.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "policies.md"
README = OUT.parents[1] / "README.md"
START, END = "<!-- policies-table:start -->", "<!-- policies-table:end -->"

HEAD = """# Policies

Every policy is a small registered class that returns an index plan (what to keep, what merges into what) and never
touches the model. `mmprune policies` lists them; this page is generated from their docstrings by
`python docs/make_policies.py` (a test fails when it is stale). A policy with official code reproduces it by
default (kept set, counts, layer, merged features), proven by the differential tests in `tests/test_faithful.py`
against references written from that code at the commit linked below; every deviation is named in its section,
with the option that restores the paper where one exists. Budgets: a float in (0, 1] is the fraction of the visual
tokens entering the stage, an int the tokens kept per image (per video); for adaptive policies it is a cap or a target.

Signals come from the adapters: [CLS] attention, tower keys and [CLS] similarity from a tap on the vision tower's
feature layer (SigLIP and the Qwen towers have no [CLS]: mean attention received instead; no similarity: cosine to
the mean token), question embeddings and layer K-1 attention rows from the LLM (recomputed from the layer's own
projections, so SDPA works and `output_attentions` is never needed). A signal a family cannot give is replaced by the
policy's documented fallback and named in `mmprune.trace(model).notes`.

"""

CUSTOM = '''## Writing a policy

A policy is registered by name and implements `select(Tokens) -> Plan` per sample (`mmprune/policies/base.py`
documents every field). That alone works everywhere, batches included (the engine calls it sample by sample, reading
the device once per call: a host synchronisation on a GPU). The fast path is `select_batch(BatchTokens) -> BatchPlan`
over the whole batch as padded device tensors (`mmprune/policies/batch.py`), or `data_free = True` for a plan that
depends only on counts, budgets and grids (computed once per layout on the host and cached):

```python
from mmprune.policies import register_policy
from mmprune.policies._ops import topk_indices
from mmprune.policies.base import Plan, Policy
from mmprune.policies.batch import BatchPlan, topk_keep

class Mine(Policy):
    name = "mine"
    stages, signals, default_layer = ("llm",), ("attn",), 2
    batched = True                      # select_batch: the whole batch as padded device tensors

    def select(self, tokens):           # the reference, kept: select_batch must select exactly this
        return Plan(keep=topk_indices(tokens.attn, tokens.total_budget), scores=tokens.attn)

    def select_batch(self, bt):         # bt.features [B, N, D], bt.valid, bt.segment, bt.pos, bt.attn [B, N], ...
        ks = [min(sum(b), sum(c)) for b, c in zip(bt.budgets, bt.counts)]   # host lists: no device read
        return BatchPlan(topk_keep(bt.attn, bt.valid, ks), scores=bt.attn, totals=ks)

register_policy("mine", Mine)
```

Every registered policy runs on the fast path; each batched policy selects exactly what its per-sample reference
selects on ragged batches of several images per sample, and the engine's logits, traces and generations are the same
on both paths (`tests/test_batched.py`). Multi-stage policies (`aim`, `todre`, `pyramiddrop`, `sparsevlm`, `atp`,
`prefusion`) override `expand(config, num_layers)` and become one stage per layer, so the trace shows each.
Merged tokens are weighted means at their representative's position (`StageTrace.assign` says which token went
where), except where a paper's code merges otherwise (VisionZip's contextual tokens, PruMerge+'s weighted sums).
'''


def render() -> str:
    sys.path.insert(0, str(OUT.parents[1]))
    from mmprune.cli import _code_ref, _policies_markdown
    from mmprune.policies import get_policy, policies

    parts = [HEAD, _policies_markdown(), "\n\n", CUSTOM]
    for name in policies():
        cls = get_policy(name)
        facts = [f"default stage: {cls.where}", "count: " + ("adaptive" if cls.adaptive else "fixed"),
                 "signals: " + (", ".join(f"`{s}`" for s in cls.signals) or "none")]
        opts = cls.option_defaults()
        if opts:
            facts.append("options: " + ", ".join(f"`{k}={v!r}`" for k, v in opts.items()))
        if cls.paper_url:
            facts.append(f"paper: [{cls.paper}]({cls.paper_url})")
        if cls.code_url:
            repo, sha = _code_ref(cls.code_url)
            facts.append(f"official code: [{repo} at {sha}]({cls.code_url})")
        else:
            facts.append("official code: none compared (see below)" if cls.paper_url else "official code: -")
        doc = inspect.getdoc(cls) or ""
        parts.append(f"\n## `{name}`\n\n" + "; ".join(facts) + f". Class `{cls.__module__}.{cls.__qualname__}`.\n\n"
                     + doc.replace("Example:\n", "Example:\n\n") + "\n")
    return "".join(parts)


def readme_with_table() -> str:
    """README.md with the generated policy table between its markers."""
    from mmprune.cli import _policies_markdown

    head, rest = README.read_text().split(START, 1)
    return head + START + "\n" + _policies_markdown("docs/policies.md") + "\n" + END + rest.split(END, 1)[1]


if __name__ == "__main__":
    text, readme = render(), readme_with_table()
    if "--check" in sys.argv:
        stale = [p.name for p, t in ((OUT, text), (README, readme)) if p.read_text() != t]
        if stale:
            print(f"{' and '.join(stale)} stale: run python docs/make_policies.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
        README.write_text(readme)
