"""How many host synchronisations mmprune adds to a prefill and to each decode step, per policy.

Counts the ops that would stall a GPU (``mmprune.syncs``: nonzero, .item(), boolean indexing, .tolist(),
.cpu(), ...) on tiny CPU models, as ``wrapped - unwrapped`` on identical inputs, so transformers' own
syncs are not charged to mmprune. The GPU-native issue's target is 0 for fixed-budget policies.

    python benchmarks/sync_audit.py                      # all policies, llava + qwen2_vl (+ videos), batch 1 and 3
    python benchmarks/sync_audit.py --policies uniform --where   # and the mmprune lines they come from

Writes ``benchmarks/results/sync_audit.{md,json}`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLES = {1: [[1]], 3: [[1], [1, 1], [1]]}
PROMPTS = {1: [5], 3: [5, 2, 3]}


def _diff(a: Counter, b: Counter) -> dict:
    return {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}


def audit(family: str, policy: str, batch: int, budget: float = 0.25, new_tokens: int = 4, where: bool = False):
    import mmprune
    from mmprune.syncs import count_syncs
    from mmprune.testing import make_inputs, tiny_model

    family, _, kind = family.partition(":")  # "qwen2_vl:video": the same samples with videos instead of images
    model = tiny_model(family)
    inputs = make_inputs(model, SAMPLES[batch], prompt_lens=PROMPTS[batch], video=kind == "video")
    gen = dict(do_sample=False, pad_token_id=0)

    def measure():
        with torch.no_grad():
            pre = count_syncs(lambda: model(**inputs, use_cache=True), stacks=where)
            g1 = count_syncs(lambda: model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **gen))
            gn = count_syncs(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen))
        return pre, g1.counts, gn.counts

    base_pre, base_g1, base_gn = measure()
    mmprune.wrap(model, policy, budget=budget)
    try:
        pre, g1, gn = measure()
    finally:
        mmprune.unwrap(model)
    prefill = _diff(pre.counts, base_pre.counts)
    step = _diff(Counter(_diff(gn, g1)), Counter(_diff(base_gn, base_g1)))
    return {
        "prefill": sum(prefill.values()),
        "prefill_ops": dict(sorted(prefill.items())),
        "decode_per_step": sum(step.values()) / (new_tokens - 1),
        "decode_ops": dict(sorted(step.items())),
        "where": {k: dict(v.most_common(8)) for k, v in pre.where.items()} if where else None,
    }


def main(argv=None) -> int:
    from mmprune.policies import policies as registered

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="llava,qwen2_vl,qwen2_vl:video", help="family[:video],...")
    ap.add_argument("--policies", default="all")
    ap.add_argument("--batches", default="1,3")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--where", action="store_true", help="print the mmprune source lines behind each op")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    names = sorted(registered()) if a.policies == "all" else a.policies.split(",")
    names = [n for n in names if n != "none"]
    fams, batches = a.families.split(","), [int(x) for x in a.batches.split(",")]
    torch.set_num_threads(1)
    rows = {}
    for name in names:
        for fam in fams:
            for b in batches:
                r = audit(fam, name, b, a.budget, where=a.where)
                rows[f"{name}|{fam}|{b}"] = r
                print(f"{name:12s} {fam:9s} batch {b}: prefill {r['prefill']:4d} {r['prefill_ops']}  "
                      f"decode/step {r['decode_per_step']:.1f} {r['decode_ops']}", flush=True)
                if a.where and r["where"]:
                    for op, lines in r["where"].items():
                        print(f"    {op}: {lines}")
    if a.no_write:
        return 0
    cols = [(f, b) for f in fams for b in batches]
    md = ["# Host synchronisations added by mmprune", "",
          f"`python benchmarks/sync_audit.py` (budget {a.budget}, tiny CPU models, torch {torch.__version__})", "",
          "| policy | " + " | ".join(f"{f} b{b} prefill / decode step" for f, b in cols) + " |",
          "|---|" + "---|" * len(cols)]
    for name in names:
        cells = [f"{rows[f'{name}|{f}|{b}']['prefill']} / {rows[f'{name}|{f}|{b}']['decode_per_step']:g}" for f, b in cols]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "Counts are wrapped - unwrapped on the same inputs: nonzero, `.item()` (`_local_scalar_dense`), boolean "
           "`index` / `index_put`, `masked_select`, `unique`, tensor `repeat_interleave`, `.tolist()`, `.cpu()`, "
           "`.numpy()`, copies to the CPU (`mmprune.syncs`). Each is a host round trip on a GPU."]
    out = ROOT / "benchmarks" / "results"
    (out / "sync_audit.md").write_text("\n".join(md) + "\n")
    (out / "sync_audit.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out / 'sync_audit.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
