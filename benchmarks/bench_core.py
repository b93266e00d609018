"""Wrap overhead and prefill speed of pruned vs unpruned runs on a mid-size random LLaVA, on CPU.

Measures, in one process and alternating the variants each round (so machine noise hits all alike):
unwrapped, wrapped with ``none`` (budget 1.0: the pure hook overhead), and pruned variants. Reports the
median prefill time (one forward over the full prompt, no cache) and its ratio to unwrapped.

    python benchmarks/bench_core.py --layers 8 --hidden 1024 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(layers: int, hidden: int, image: int, patch: int):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmprune.testing import IMAGE_ID, _llama_text

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image, patch_size=patch)
    text = _llama_text(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def main() -> None:
    import mmprune
    from mmprune.testing import make_inputs

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--image", type=int, default=336)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(args.layers, args.hidden, args.image, args.patch)
    batch = make_inputs(model, [[1]] * args.batch, prompt_lens=[40] * args.batch)
    variants = {
        "unwrapped": None,
        "none@1.0 (hook overhead)": [mmprune.PruneConfig("none", 1.0)],
        "uniform@1.0 pre-LLM": [mmprune.PruneConfig("uniform", 1.0)],
        "uniform@0.25 pre-LLM": [mmprune.PruneConfig("uniform", 0.25)],
        "fastv@0.25 layer 2": [mmprune.PruneConfig("fastv", 0.25, layer=2)],
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            model(**batch)
        for _ in range(args.repeats):
            for name, cfg in variants.items():
                mmprune.unwrap(model)
                if cfg is not None:
                    mmprune.wrap(model, cfg)
                t0 = time.perf_counter()
                model(**batch)
                times[name].append((time.perf_counter() - t0) * 1e3)
    mmprune.unwrap(model)
    base = statistics.median(times["unwrapped"])
    n_vis = (args.image // args.patch) ** 2
    print(f"LLaVA-like: {args.layers} layers x {args.hidden} hidden, {n_vis} visual + ~45 text tokens, "
          f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "prefill_ms": round(med, 1), "vs_unwrapped": round(med / base, 3)})
        print(f"  {name:28s} {med:8.1f} ms   x{med / base:.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
