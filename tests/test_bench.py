"""``mmprune bench`` and ``mmprune.efficiency``: FLOPs formulas, the --json contract, bad input, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from mmprune.efficiency import (
    full_lengths,
    llm_flops,
    measure,
    measure_interleaved,
    prefill_flops,
    vision_flops,
)

# --------------------------------------------------------------------------------------------- FLOPs


def test_llm_flops_hand_count():
    from transformers import LlamaConfig

    # 2 layers, d=16, 4 heads of 4, 2 KV heads (GQA), gated MLP 24, vocab 50; layer 0 sees 6 tokens, layer 1 sees 3
    cfg = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                      num_hidden_layers=2, vocab_size=50)
    r = llm_flops(cfg, [[6], [3]])
    d, h, kv, hd, i = 16, 4, 2, 4, 24
    proj = lambda n: 2 * n * d * h * hd + 2 * 2 * n * d * kv * hd + 2 * n * h * hd * d  # noqa: E731
    scores = lambda n: 2 * 2 * h * hd * n * n  # noqa: E731  (full n x n: what eager / SDPA-math compute)
    mlp = lambda n: 3 * 2 * n * d * i  # noqa: E731
    assert r.attn_proj == proj(6) + proj(3)
    assert r.attn_scores == scores(6) + scores(3)
    assert r.mlp == mlp(6) + mlp(3)
    assert r.lm_head == 2 * 1 * d * 50  # generate's prefill computes one row of logits
    assert r.per_layer == [proj(6) + scores(6) + mlp(6), proj(3) + scores(3) + mlp(3)]
    assert llm_flops(cfg, [[6], [3]], logits_positions=None).lm_head == 2 * 3 * d * 50
    half = llm_flops(cfg, [[6], [3]], causal="half")
    assert half.attn_scores == 2 * 2 * h * hd * (6 * 7 // 2 + 3 * 4 // 2)
    # batch: per-sample lengths add up; an int means every layer
    assert llm_flops(cfg, [[6, 3], [6, 3]]).mlp == 2 * (mlp(6) + mlp(3))
    assert llm_flops(cfg, 6).total == llm_flops(cfg, [[6], [6]]).total
    with pytest.raises(ValueError, match="3 layers"):
        llm_flops(cfg, [[1], [1], [1]])
    with pytest.raises(ValueError, match="causal"):
        llm_flops(cfg, 4, causal="none")


def test_non_gated_mlp_counts_two_matrices():
    from transformers import GPT2Config

    cfg = GPT2Config(n_embd=8, n_head=2, n_layer=1, vocab_size=10, n_inner=32)
    cfg.intermediate_size = 32
    assert llm_flops(cfg, 5).mlp == 2 * 2 * 5 * 8 * 32


@pytest.mark.parametrize("family,video", [("llava", False), ("llava_next", False), ("llava_onevision", True), ("qwen2_vl", True),
                                          ("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_flops_match_torch_flop_counter(family, video):
    """The analytic count equals torch's FlopCounterMode on a real forward (eager attention: every matmul seen)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmprune.testing import make_inputs, tiny_model

    m = tiny_model(family, attn="eager")
    b = make_inputs(m, [[2]], prompt_lens=[5], video=video)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(**b, logits_to_keep=1)
    lengths = full_lengths(b["attention_mask"], m.config.get_text_config().num_hidden_layers)
    assert prefill_flops(m, lengths, b).total == fc.get_total_flops()


def test_flops_from_a_pruned_trace_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    import mmprune
    from mmprune.testing import make_inputs, tiny_model

    m = tiny_model("llava", attn="eager")
    b = make_inputs(m, [[1]], prompt_lens=[5])
    mmprune.wrap(m, "uniform", budget=0.25)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(**b, logits_to_keep=1)
    tr = mmprune.trace(m)
    rep = prefill_flops(m, tr, b)
    assert rep.total == fc.get_total_flops()
    assert rep.llm < prefill_flops(m, full_lengths(b["attention_mask"], 4), b).llm
    assert vision_flops(m, None) == (0, 0)


def test_measure_helpers():
    t = measure(lambda: sum(range(100)), repeats=3, warmup=1)
    assert len(t.samples_ms) == 3 and t.median_ms >= 0
    r = measure_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0)
    assert len(r["a"].samples_ms) == len(r["b"].samples_ms) == 2


# --------------------------------------------------------------------------------------------- archs / inputs


def test_published_configs():
    from mmprune.bench.archs import ARCHS, build_config
    from mmprune.bench.command import ARCH_NAMES

    assert tuple(ARCHS) == ARCH_NAMES  # the CLI's light copy of the names stays in sync
    c = build_config("llava-1.5-7b")
    assert (c.text_config.hidden_size, c.text_config.num_hidden_layers, c.text_config.intermediate_size) == (4096, 32, 11008)
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.vision_config.image_size) == (1024, 24, 336)
    q = build_config("qwen2.5-vl-7b")
    assert (q.text_config.hidden_size, q.text_config.num_key_value_heads, q.vision_config.hidden_size,
            q.vision_config.fullatt_block_indexes) == (3584, 4, 1280, [7, 15, 23, 31])
    q3 = build_config("qwen3-vl-8b")
    assert (q3.text_config.num_hidden_layers, q3.vision_config.patch_size, q3.vision_config.deepstack_visual_indexes) == (36, 16, [8, 16, 24])
    s = build_config("qwen3-vl-8b", shrink=8)
    assert s.text_config.head_dim == 128 and s.text_config.hidden_size == 512
    assert s.text_config.num_attention_heads % s.text_config.num_key_value_heads == 0
    with pytest.raises(ValueError, match="accepted: llava-1.5-7b"):
        build_config("gpt-4v")


def test_inputs_follow_the_processors():
    from mmprune.bench.archs import build_model
    from mmprune.bench.inputs import make_bench_inputs, qwen_grid

    assert qwen_grid(672, 14, 2) == (1, 48, 48)          # 576 tokens
    assert qwen_grid(336, 14, 2, frames=8) == (4, 24, 24)
    assert qwen_grid(768, 16, 2, pixels=(65536, 16777216)) == (1, 48, 48)
    m = build_model("llava-next-7b", shrink=32)
    b = make_bench_inputs(m, image_size=672, prompt_tokens=6)
    meta = b.pop("_meta")
    assert meta["tiles"] == 5 and meta["visual_tokens"] == 2928  # base + 2x2 tiles, 48 rows of 48 + newline
    assert int((b["input_ids"] == m.config.image_token_index).sum()) == 2928


# --------------------------------------------------------------------------------------------- eager-fastv


def test_eager_fastv_keeps_what_fastv_keeps():
    import mmprune
    from mmprune.bench import eager_fastv
    from mmprune.testing import make_inputs, tiny_model

    m = tiny_model("qwen2_vl")
    b = make_inputs(m, [[1], [2]], prompt_lens=[5, 3])
    with torch.no_grad():
        mmprune.wrap(m, "fastv", budget=0.5, layer=2)
        m(**b)
        ours = mmprune.trace(m).stages[0].kept
        eager_fastv.install(m, 0.5, 2)
        assert m.config.text_config._attn_implementation == "eager"
        m(**b)
        ref = mmprune.trace(m).stages[0].kept
        eager_fastv.uninstall(m)
    assert m.config.text_config._attn_implementation == "sdpa" and not mmprune.is_wrapped(m)
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


# --------------------------------------------------------------------------------------------- CLI


def _cli(argv, capsys):
    from mmprune.cli import main

    threads = torch.get_num_threads()
    try:
        rc = main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads 1 (stable on a busy 2-core box) must not leak into other tests
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv,match", [
    (["--arch", "gpt-4v"], "accepted: llava-1.5-7b"),
    (["--arch", "llava-1.5-7b", "--policy", "nope"], "known policies"),
    (["--arch", "llava-1.5-7b", "--budget", "1.5"], "budget must be"),
    (["--arch", "llava-1.5-7b", "--budget", "abc"], "budget must be"),
    (["--arch", "llava-1.5-7b", "--budget", "0"], "budget must be"),
    (["--arch", "llava-1.5-7b", "--frames", "4"], "video architectures only"),
    (["--arch", "qwen2-vl-7b", "--baseline", "eager-vtw"], "accepted: eager-fastv"),
    (["--arch", "qwen2-vl-7b", "--shrink", "0"], "--shrink must be"),
    (["--arch", "llava-1.5-7b", "--compile", "--compile-backend", "tvm"], "accepted: inductor, aot_eager, eager"),
    (["--arch", "llava-1.5-7b", "--compile", "--compile-mode", "fast"], "accepted: default, reduce-overhead"),
    (["--arch", "llava-1.5-7b", "--compile", "--baseline", "eager-fastv"], "--baseline is not timed with --compile"),
])
def test_bad_input_is_one_line_exit_2(argv, match, capsys):
    rc, out, err = _cli(["bench", *argv], capsys)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1 and not out


def test_image_size_with_frames_is_rejected():
    import argparse

    from mmprune.bench.command import validate

    ns = argparse.Namespace(arch="qwen2-vl-7b", image_size=448, frames=4, shrink=1, batch_size=1, prompt_tokens=8,
                            new_tokens=2, repeats=1, warmup=0, baseline=None, budget="0.25", policy="fastv",
                            device="cpu", dtype="auto")
    with pytest.raises(ValueError, match="--image-size or --frames"):
        validate(ns)


def test_json_has_every_key_and_a_tiny_run_is_fast(capsys):
    import time

    t0 = time.perf_counter()
    rc, out, err = _cli(["bench", "--arch", "llava-1.5-7b", "--shrink", "32", "--policy", "fastv", "--budget", "0.25",
                         "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--prompt-tokens", "8",
                         "--baseline", "eager-fastv", "--threads", "1", "--json"], capsys)
    assert rc == 0, err
    assert time.perf_counter() - t0 < 60
    res = json.loads(out)
    for k in ("full", "pruned", "speedup", "ideal_speedup", "efficiency", "scoring_overhead", "eager_fastv",
              "speedup_vs_eager_fastv"):
        assert k in res, k
    for side in ("full", "pruned", "eager_fastv"):
        for k in ("prefill_ms", "decode_tokens_per_s", "peak_mem_mb", "prefill_tflops", "visual_tokens"):
            assert k in res[side], (side, k)
    assert res["full"]["visual_tokens"] == 576 and res["pruned"]["visual_tokens"] == 144
    assert res["pruned"]["prefill_tflops"] < res["full"]["prefill_tflops"]
    assert res["ideal_speedup"] == pytest.approx(res["full"]["prefill_tflops"] / res["pruned"]["prefill_tflops"])
    assert res["scoring_overhead"] > 0  # fastv's attention tap ran and was timed


def test_qwen_video_run(capsys):
    rc, out, err = _cli(["bench", "--arch", "qwen3-vl-8b", "--shrink", "32", "--policy", "uniform", "--budget", "0.5",
                         "--frames", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--prompt-tokens", "6",
                         "--no-memory", "--threads", "1", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["setup"]["inputs"]["grid"] == [2, 24, 24]
    assert res["pruned"]["visual_tokens"] * 2 == res["full"]["visual_tokens"] == 2 * 144


@pytest.mark.parametrize("arch, policy", [("llava-1.5-7b", "fastv"), ("qwen3-vl-8b", "uniform")])
def test_oracle_is_timed_and_carried_in_json(arch, policy, capsys):
    rc, out, err = _cli(["bench", "--arch", arch, "--shrink", "32", "--policy", policy, "--budget", "0.25",
                         "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--prompt-tokens", "8",
                         "--no-memory", "--threads", "1", "--oracle", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["oracle_ms"] > 0 and res["pruned"]["oracle_ms"] == res["oracle_ms"]
    assert res["oracle_efficiency"] == pytest.approx(res["oracle_ms"] / res["pruned"]["prefill_ms"])
    plain = json.loads(_cli(["bench", "--arch", arch, "--shrink", "32", "--repeats", "1", "--warmup", "0",
                             "--new-tokens", "2", "--prompt-tokens", "8", "--no-memory", "--json"], capsys)[1])
    assert "oracle_ms" not in plain and plain["pruned"]["oracle_ms"] is None  # not timed unless asked


@pytest.mark.parametrize("arch, policy", [("llava-1.5-7b", "fastv"), ("qwen2-vl-7b", "uniform")])
def test_compiled_bench_times_full_pruned_and_oracle(arch, policy, capsys):
    """``--compile`` (aot_eager here: inductor's C++ build would dominate a CI run): three compiled copies, the
    pruned one computing what the eager one does, decode through the static cache, figures in the JSON."""
    rc, out, err = _cli(["bench", "--arch", arch, "--shrink", "32", "--policy", policy, "--budget", "0.25",
                         "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--prompt-tokens", "8",
                         "--threads", "1", "--compile", "--compile-backend", "aot_eager", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    c = res["compiled"]
    assert set(c) == {"full", "pruned", "oracle"} and res["setup"]["backend"] == "aot_eager"
    assert all(c[k]["prefill_ms"] > 0 and c[k]["compile_s"] > 0 for k in c)
    assert c["full"]["decode_tokens_per_s"] > 0 and c["pruned"]["decode_tokens_per_s"] > 0
    assert c["oracle"]["decode_tokens_per_s"] is None  # only the prefill is cut
    assert c["pruned"]["max_abs_diff_vs_eager"] < 1e-4
    assert res["oracle_efficiency"] == pytest.approx(c["oracle"]["prefill_ms"] / c["pruned"]["prefill_ms"])
    assert res["speedup"] == pytest.approx(c["full"]["prefill_ms"] / c["pruned"]["prefill_ms"])
    assert res["ideal_speedup"] > 1 and res["visual_tokens"] < res["setup"]["inputs"]["visual_tokens"]
