"""Benchmark the token kernels of mmprune.kernels: time, achieved GB/s and fraction of peak, vs torch.

Not a test. Needs a CUDA GPU. For each op and LLaVA / Qwen-sized shape (B 1-8, N 576-8192, D 4096,
bf16) it reports the median time of

* ``triton``: the Triton launcher alone (``mmprune.kernels.triton_backend``; no index-range check),
  replayed from a CUDA graph (GPU time; compact_kv eager), with the eager time in the JSON,
* ``op``: the public op with ``impl="triton"`` (adds the range check: one ``aminmax`` and a host sync),
  and the same inside ``index_checks(False)`` (out-of-range mapped to -1 on the device, no sync),
* ``torch``: the public op with ``impl="torch"`` (the reference path, same check),
* ``index``: bare torch indexing with no -1 handling and no check (``torch.gather`` / ``scatter_``),
  timed like ``triton``,

and GB/s = the fewest bytes the op must move (each input row read once, each output row written once,
plus the int64 index) / the ``triton`` time, as a fraction of a measured device-to-device copy (bytes
read + written) and of the spec peak given by ``--spec-gbs``. Eager timings are
``triton.testing.do_bench`` medians; both methods flush L2 before every call.

Example:
    python benchmarks/bench_kernels.py                      # full table, bf16
    python benchmarks/bench_kernels.py --quick --sweep      # a few shapes plus a tile-size sweep
    python benchmarks/bench_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from mmprune.kernels import (
    compact_kv,
    gather_tokens,
    gather_tokens_multi,
    index_checks,
    merge_tokens,
    scatter_tokens,
)
from mmprune.kernels import triton_backend as tb
from mmprune.kernels.testing import rand_index

SHAPES = [(1, 576), (8, 576), (1, 2880), (8, 2880), (1, 8192), (8, 8192)]
QUICK = [(1, 576), (8, 2880), (8, 8192)]


def bench(fn, rep: int = 200) -> float:
    """Median ms of ``fn`` (L2 flushed before each call by do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


def bench_graph(fn, reps: int = 100) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph, L2 flushed before each replay.

    GPU time only: no Python or launch overhead between the op's kernels, as when the host runs ahead of
    the GPU in a model's forward pass. At 576 tokens eager timings swung 30-40% between two runs
    (host overhead racing do_bench's L2 flush), which graph replay removes.
    """
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        _FLUSH[0].zero_()
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in ev)
    del g
    return times[len(times) // 2]


def copy_peak(gib: float = 1.0) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = int(gib * (1 << 30))
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * n / ms / 1e6


def row(op, shape, nbytes, t_tr, t_op, t_torch, t_index, peak, spec):
    """One table row. Speedups compare like with like: the checked ops eagerly (op vs torch path), the
    bare kernels by the same timer (triton vs index)."""
    gbs = nbytes / t_tr / 1e6
    return {
        "op": op, "shape": shape, "MB": nbytes / 1e6, "triton_ms": t_tr, "op_ms": t_op, "torch_ms": t_torch,
        "index_ms": t_index, "GBs": gbs, "pct_copy": 100 * gbs / peak, "pct_spec": 100 * gbs / spec,
        "speedup_vs_torch": t_torch / t_op, "speedup_vs_index": None if t_index is None else t_index / t_tr,
    }


def run_ops(shapes, dtype, peak, spec):
    rows = []
    for b, n in shapes:
        rows += ops_at(b, n, dtype, peak, spec)
        torch.cuda.empty_cache()
    return rows


def ops_at(b, n, dtype, peak, spec, d=4096, keep=4):
    """gather / scatter / merge rows at one shape (locals die with the call, freeing the GPU memory)."""
    es = torch.tensor([], dtype=dtype).element_size()
    rows = []
    k = n // keep
    x = torch.randn(b, n, d, device="cuda").to(dtype)
    idx = rand_index(b, n, k).cuda()
    idx_e = idx.clamp(min=0).unsqueeze(-1).expand(b, k, d)
    shape = f"B{b} N{n} K{k} D{d}"
    # gather: read K rows, write K rows, read the index
    nb = 2 * b * k * d * es + b * k * 8
    rows.append(row("gather", shape, nb, bench_graph(lambda: tb.gather(x, idx)),
                    bench(lambda: gather_tokens(x, idx, impl="triton")),
                    bench(lambda: gather_tokens(x, idx, impl="torch")),
                    bench_graph(lambda: torch.gather(x, 1, idx_e)), peak, spec))
    # scatter (out of place): read N rows (K from src, N-K from dst), write N rows, index
    src = torch.randn(b, k, d, device="cuda").to(dtype)
    nb = 2 * b * n * d * es + b * k * 8
    rows.append(row("scatter", shape, nb, bench_graph(lambda: tb.scatter(x, idx, src)),
                    bench(lambda: scatter_tokens(x, idx, src, impl="triton")),
                    bench(lambda: scatter_tokens(x, idx, src, impl="torch")),
                    bench_graph(lambda: x.clone().scatter_(1, idx_e, src)), peak, spec))
    # merge N rows into M = N / keep groups: read N rows, write M rows and totals, read assign
    m = k
    assign = torch.randint(0, m, (b, n), device="cuda")
    w = torch.rand(b, n, device="cuda")
    nb = b * n * d * es + b * m * d * es + b * m * 4 + b * n * 8
    shape_m = f"B{b} N{n} M{m} D{d}"
    rows.append(row("merge", shape_m, nb, bench_graph(lambda: tb.merge(x, assign, m)),
                    bench(lambda: merge_tokens(x, assign, m, impl="triton")),
                    bench(lambda: merge_tokens(x, assign, m, impl="torch")), None, peak, spec))
    nb_w = nb + b * n * 4
    rows.append(row("merge+w", shape_m, nb_w, bench_graph(lambda: tb.merge(x, assign, m, w)),
                    bench(lambda: merge_tokens(x, assign, m, w, impl="triton")),
                    bench(lambda: merge_tokens(x, assign, m, w, impl="torch")), None, peak, spec))
    # the same kernels timed eagerly (host overhead included when it outlasts the L2 flush), and the
    # public ops without the host-synchronising index check
    for r, fn, op in zip(
        rows,
        [lambda: tb.gather(x, idx), lambda: tb.scatter(x, idx, src),
         lambda: tb.merge(x, assign, m), lambda: tb.merge(x, assign, m, w)],
        [lambda: gather_tokens(x, idx), lambda: scatter_tokens(x, idx, src),
         lambda: merge_tokens(x, assign, m), lambda: merge_tokens(x, assign, m, w)],
    ):
        r["triton_eager_ms"] = bench(fn)
        with index_checks(False):
            r["op_unchecked_ms"] = bench(op)
    return rows


def run_fused(shapes, dtype, peak, spec):
    rows = []
    for b, n in shapes:
        rows.append(multi_at(b, n, dtype, peak, spec))
        rows.append(kv_at(b, n, dtype, peak, spec))
        torch.cuda.empty_cache()
    return rows


def multi_at(b, n, dtype, peak, spec, d=4096, hd=128, keep=4):
    """Hidden + cos + sin + mrope position ids gathered in one launch."""
    es = torch.tensor([], dtype=dtype).element_size()
    k = n // keep
    idx = rand_index(b, n, k).cuda()
    h = torch.randn(b, n, d, device="cuda").to(dtype)
    cos, sin = (torch.randn(3, b, n, hd, device="cuda").to(dtype) for _ in range(2))
    pos = torch.randint(0, 9999, (3, b, n), device="cuda")
    ts, dims, bdims = [h, cos, sin, pos], [1, 2, 2, 2], [0, 1, 1, 1]
    nb = 2 * b * k * (d * es + 2 * 3 * hd * es + 3 * 8) + b * k * 8
    shape = f"B{b} N{n} K{k} h+cos+sin+pos"

    def separate():
        return [tb.gather_multi([t], idx, [dm], [bd]) for t, dm, bd in zip(ts, dims, bdims)]

    r = row("multi", shape, nb, bench_graph(lambda: tb.gather_multi(ts, idx, dims, bdims)),
            bench(lambda: gather_tokens_multi(ts, idx, dims, bdims, impl="triton")),
            bench(lambda: gather_tokens_multi(ts, idx, dims, bdims, impl="torch")), None, peak, spec)
    r["triton_separate_ms"] = bench_graph(separate)
    r["triton_eager_ms"] = bench(lambda: tb.gather_multi(ts, idx, dims, bdims))
    with index_checks(False):
        r["op_unchecked_ms"] = bench(lambda: gather_tokens_multi(ts, idx, dims, bdims))
    return r


def kv_at(b, n, dtype, peak, spec, hd=128, layers=32, heads=32, keep=4):
    """K and V caches of all layers compacted in one launch."""
    es = torch.tensor([], dtype=dtype).element_size()
    k = n // keep
    bk = min(b, 2) if n >= 8192 else b  # keep 2 x 32 layers of KV under ~10 GB
    idx_k = rand_index(bk, n, k).cuda()
    caches = [torch.randn(bk, heads, n, hd, device="cuda").to(dtype) for _ in range(2 * layers)]
    nb = 2 * len(caches) * bk * heads * k * hd * es + bk * k * 8
    shape = f"B{bk} L{n} K{k} {layers}x(K,V) H{heads} hd{hd}"
    idx_kv = idx_k.clamp(min=0).view(bk, 1, k, 1).expand(bk, heads, k, hd)
    # eager: the per-call upload of the cache pointers cannot be captured in a graph
    r = row("compact_kv", shape, nb, bench(lambda: tb.compact_kv(caches, idx_k)),
            bench(lambda: compact_kv(caches, idx_k, impl="triton")),
            bench(lambda: compact_kv(caches, idx_k, impl="torch")),
            bench(lambda: [torch.gather(c, 2, idx_kv) for c in caches]), peak, spec)
    with index_checks(False):
        r["op_unchecked_ms"] = bench(lambda: compact_kv(caches, idx_k))
    return r


def sweep(dtype, peak, spec, b=8, n=2880, d=4096):
    """Tile bytes x warps for gather, scatter and merge at one mid shape."""
    out = []
    x = torch.randn(b, n, d, device="cuda").to(dtype)
    es = x.element_size()
    k = n // 4
    idx = rand_index(b, n, k).cuda()
    src = torch.randn(b, k, d, device="cuda").to(dtype)
    assign = torch.randint(0, k, (b, n), device="cuda")
    saved = tb.TILE_BYTES, tb.NUM_WARPS
    for tile_bytes in (4096, 8192, 16384, 32768):
        for warps in (4, 8):
            tb.TILE_BYTES, tb.NUM_WARPS = tile_bytes, warps
            t_g = bench_graph(lambda: tb.gather(x, idx))
            t_s = bench_graph(lambda: tb.scatter(x, idx, src))
            t_m = bench_graph(lambda: tb.merge(x, assign, k))
            out.append({
                "tile_bytes": tile_bytes, "warps": warps,
                "gather_ms": t_g, "gather_GBs": (2 * b * k * d * es) / t_g / 1e6,
                "scatter_ms": t_s, "scatter_GBs": (2 * b * n * d * es) / t_s / 1e6,
                "merge_ms": t_m, "merge_GBs": (b * n * d * es + b * k * d * es) / t_m / 1e6,
            })
    tb.TILE_BYTES, tb.NUM_WARPS = saved
    # index work inside scatter / merge, alone
    out.append({"inverse_ms (scatter)": bench_graph(lambda: tb._inverse(idx, n)),
                "segments_ms (merge sort+searchsorted)": bench_graph(lambda: tb._segments(assign, k))})
    # where the merge's index time goes: the composite keys sorted flat vs per row, and the bounds search
    base, bounds = tb._bounds(b, k, n, torch.int32, x.device)
    keys = torch.add(base, assign.to(torch.int32), alpha=n)
    flat = keys.view(-1)
    sorted_flat = torch.sort(flat)[0]
    out.append({"sort_flat_int32_ms": bench_graph(lambda: torch.sort(flat)),
                "sort_rows_int32_ms": bench_graph(lambda: torch.sort(keys, dim=1)),
                "searchsorted_ms": bench_graph(lambda: torch.searchsorted(sorted_flat, bounds)),
                "keys_ms": bench_graph(lambda: torch.add(base, assign.to(torch.int32), alpha=n))})
    out += scatter_strategies(dtype)
    return out


def scatter_strategies(dtype, d=4096):
    """Scatter as copy + write (small) vs one pass through the inverse index (large), per shape."""
    out = []
    saved = tb.SCATTER_CLONE_BELOW
    for b, n in SHAPES:
        k = n // 4
        x = torch.randn(b, n, d, device="cuda").to(dtype)
        idx = rand_index(b, n, k).cuda()
        src = torch.randn(b, k, d, device="cuda").to(dtype)
        tb.SCATTER_CLONE_BELOW = 1 << 62
        t_clone = bench_graph(lambda: tb.scatter(x, idx, src))  # noqa: B023 - called before the loop moves on
        tb.SCATTER_CLONE_BELOW = 0
        t_inv = bench_graph(lambda: tb.scatter(x, idx, src))  # noqa: B023
        out.append({"scatter shape": f"B{b} N{n} K{k}", "src_MB": 2 * src.numel() * src.element_size() / 1e6,
                    "copy+write_ms": t_clone, "inverse_ms": t_inv})
    tb.SCATTER_CLONE_BELOW = saved
    return out


def vector_report() -> dict:
    """Count 16-byte global loads / stores in the PTX of every compiled kernel (are rows vectorized?)."""
    mod = tb.kernels(False)
    report = {}
    for name in ("rows_kernel", "segment_kernel", "multi_kernel", "table_kernel", "invert_kernel"):
        fn = getattr(mod, name)
        try:
            for entry in getattr(fn, "device_caches", {}).values():
                for i, ck in enumerate(entry[0].values()):
                    ptx = ck.asm.get("ptx", "")
                    report[f"{name}#{i}"] = {
                        "ld.v4": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                        "ld.v2": ptx.count("ld.global.v2") + ptx.count("ld.global.nc.v2"),
                        "ld.scalar.b16": ptx.count("ld.global.b16") + ptx.count("ld.global.nc.b16"),
                        "st.v4": ptx.count("st.global.v4"), "regs": getattr(ck, "n_regs", None),
                        "spills": getattr(ck, "n_spills", None),
                    }
        except Exception as e:  # noqa: BLE001 - a report, not a check: Triton's cache layout varies
            report[name] = f"n/a ({type(e).__name__})"
    return report


def fmt(rows):
    head = ("| op | shape | MB | triton ms | GB/s | % copy | % spec | triton eager ms | op ms (checked) "
            "| op ms (unchecked) | torch ms | index ms | op vs torch path | triton vs index |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        idx = "-" if r["index_ms"] is None else f"{r['index_ms']:.4f}"
        vs = "-" if r["speedup_vs_index"] is None else f"{r['speedup_vs_index']:.2f}x"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['MB']:.1f} | {r['triton_ms']:.4f} | {r['GBs']:.0f} | "
            f"{r['pct_copy']:.0f}% | {r['pct_spec']:.0f}% | {r.get('triton_eager_ms', r['triton_ms']):.4f} | "
            f"{r['op_ms']:.4f} | {r.get('op_unchecked_ms', float('nan')):.4f} | {r['torch_ms']:.4f} | {idx} | "
            f"{r['speedup_vs_torch']:.2f}x | {vs} |"
        )
        if "triton_separate_ms" in r:
            lines[-1] += f" separate launches: {r['triton_separate_ms']:.4f} ms"
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="three shapes instead of six")
    p.add_argument("--sweep", action="store_true", help="also sweep tile bytes x warps at B8 N2880")
    p.add_argument("--spec-gbs", type=float, default=3350.0, help="datasheet peak (H100 SXM: 3350 GB/s)")
    p.add_argument("--json", help="write all figures here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    peak = copy_peak()
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}; "
          f"copy peak {peak:.0f} GB/s (read+write); spec {a.spec_gbs:.0f} GB/s; dtype {a.dtype}")
    shapes = QUICK if a.quick else SHAPES
    result = {"device": dev, "copy_GBs": peak, "spec_GBs": a.spec_gbs, "dtype": a.dtype}
    if a.sweep:
        result["sweep"] = sweep(dtype, peak, a.spec_gbs)
        for s in result["sweep"]:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()})
    rows = run_ops(shapes, dtype, peak, a.spec_gbs) + run_fused(shapes, dtype, peak, a.spec_gbs)
    result["rows"] = rows
    result["ptx"] = vector_report()
    for k, v in result["ptx"].items():
        print("ptx", k, v)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(fmt(rows))
    worst = min((r for r in rows if r["speedup_vs_index"]), key=lambda r: r["speedup_vs_index"])
    worst_op = min(rows, key=lambda r: r["speedup_vs_torch"])
    print(f"slowest vs torch indexing: {worst['op']} {worst['shape']} at {worst['speedup_vs_index']:.2f}x; "
          f"slowest checked op vs torch path: {worst_op['op']} {worst_op['shape']} at "
          f"{worst_op['speedup_vs_torch']:.2f}x; "
          f"geomean % of copy: {math.exp(sum(math.log(r['pct_copy']) for r in rows) / len(rows)):.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
