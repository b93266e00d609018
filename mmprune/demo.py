"""``mmprune demo``: wrap a tiny random model of every family, generate, print the trace.

Random weights: this shows the mechanics (what is kept, where, at what cost), not accuracy.

Example:
    $ mmprune demo --policy uniform --budget 0.5
"""

from __future__ import annotations

import time


def run_demo(policy: str, budget, layer=None) -> None:
    import torch

    import mmprune
    from mmprune.config import validate_budget
    from mmprune.policies import get_policy
    from mmprune.testing import FAMILIES, make_inputs, tiny_model

    get_policy(policy)
    validate_budget(budget)
    print(f"policy={policy} budget={budget} layer={layer if layer is not None else 'default'}")
    for family in FAMILIES:
        model = tiny_model(family)
        batch = make_inputs(model, [[1], [2]], prompt_lens=[6, 3])
        mmprune.wrap(model, policy, budget=budget, layer=layer)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        ms = (time.perf_counter() - t0) * 1e3
        tr = mmprune.trace(model)
        print(f"{family:16s} visual tokens {tr.n_visual} -> {tr.visual_tokens_kept}  "
              f"stages {tr}  new tokens {out[:, -4:].tolist()}  {ms:.0f} ms")
        mmprune.unwrap(model)
