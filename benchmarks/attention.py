"""Wall time of exact causal attention, two ways, and of `vq_attention`.

Three functions run jitted, side by side in one process, on float32 inputs
with one head, K = V = 64, S = 512 codes and blocks of 512 positions, for
L = 1k .. 32k:

- dense: `jax.nn.dot_product_attention(..., is_causal=True)`, the whole
  L x L score matrix;
- blockwise: `tvq.dense.dense_attention` with no relative terms and M = 0,
  exact causal attention block by block (flash style, future blocks skipped);
- vq: `tvq.attention.vq_attention`.

Each time is the best of --repeats runs after a warm-up run (for vq, the
blockwise form and the matmul, the best over --rounds such passes through all
lengths). The table and the CSV give the speed-ups, the time per token, and
each function's matmul FLOPs and rate in GFLOP/s, next to the rate of a plain
matmul of vq's FLOP count and the machine's float32 and bf16 rates on a
2048^3 matmul (`machine.py`), measured in the same run.

FLOPs (matmuls only, 2 M N K each): vq, `vq_attention_flops`,
2 L (S K + (S + T) (K + V)); blockwise, `dense_attention_flops`; dense,
2 L^2 (K + V) (XLA computes the whole matrix, masked half included). The
reference matmul has vq's shape of work: a scan over block-sized [T, K] x
[K, S] products, as many as make up the same FLOP count (rounded up), summed
into one [T, S] carry so that everything stays in cache, as the blocks of
vq_attention do.

Both functions run on one device. Forced host devices (the tests' and the
book's setting, --xla_force_host_platform_device_count in XLA_FLAGS) slow XLA's
CPU runtime down for the many small steps of vq_attention's scan (about 25% on
a 2-core machine) and do not change dense attention, so a shell that exports
that flag does not skew the numbers: it is dropped here before JAX starts.

Usage: python benchmarks/attention.py [--max-len 8192] [--repeats 5] [--rounds 3]
                                     [--out F]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import one_device  # noqa: F401  (drops forced devices before JAX starts)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import cpu_summary, matmul_rates  # noqa: E402

from tvq.attention import vq_attention, vq_attention_flops  # noqa: E402
from tvq.dense import dense_attention, dense_attention_flops  # noqa: E402
from tvq.vq import get_codewords, get_shortcodes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "length",
    "dense_s",
    "vq_s",
    "speedup",
    "dense_us_per_token",
    "vq_us_per_token",
    "vq_gflop",
    "vq_gflops",
    "matmul_gflops",
    "matmul_over_vq",
    "blockwise_s",
    "blockwise_speedup",
    "dense_gflop",
    "dense_gflops",
    "blockwise_gflop",
    "blockwise_gflops",
    "machine_f32_gflops",
    "machine_bf16_gflops",
]
TARGETS = (
    "speed-up >= 10x at L = 8192",
    "speed-up >= 40x at L = 32768",
    "vq time per token flat within 25% from L = 4096 to 32768",
    "vq_attention within 2x of the matmul rate (every L >= 4096)",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    p.add_argument(
        "--rounds", type=int, default=3, help="passes over all lengths (vq, matmul)"
    )
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--d", type=int, default=64, help="K = V")
    p.add_argument("--codes", type=int, default=512, help="S")
    p.add_argument("--block-len", type=int, default=512, help="T")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "book" / "data" / "attention_benchmark.csv",
        help="CSV to write ('-' for none)",
    )
    return p.parse_args(argv)


def best_time(fn, args, repeats, min_total=1.0):
    """Best wall time in seconds of fn(*args), after a warm-up run.

    Runs at least `repeats` times and, for fast functions, until the runs add up
    to `min_total` seconds, so a short burst of load from elsewhere on the
    machine cannot spoil every run.
    """
    jax.block_until_ready(fn(*args))
    times = []
    while len(times) < repeats or sum(times) < min_total:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def make_inputs(length, heads, d, n_code, seed=0):
    """float32 q (scaled by 1/sqrt(K)), k, v [1, H, L, d] and a [H, S, d] codebook."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, heads, length, d), np.float32) for _ in "qkv")
    # Codewords drawn from the keys, as a k-means initialisation would.
    codebook = k[0, :, rng.choice(length, n_code, replace=length < n_code)]
    codebook = np.swapaxes(codebook, 0, 1)
    return [jnp.asarray(x) for x in (q / np.sqrt(d), k, v, codebook)]


def dense(q, k, v):
    """Causal softmax attention, [B, H, L, D] in and out, with no extra scaling."""
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # jax.nn wants [B, L, H, D]
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True)
    return jnp.swapaxes(out, 1, 2)


def block_matmuls(a, b):
    """sum_n a[n] @ b for [N, T, K] a and [K, S] b, one product per scan step."""

    def step(total, a_n):
        return total + a_n @ b, None

    total = jnp.zeros((a.shape[1], b.shape[1]), a.dtype)
    return jax.lax.scan(step, total, a)[0]


def blockwise(q, k, v, block_len):
    """`tvq.dense.dense_attention`, no state, no window, no relative terms."""
    empty = jnp.zeros([*q.shape[:2], 0, q.shape[3]], q.dtype)
    state = dict(pos_offset=jnp.zeros([], jnp.int32), k=empty, v=empty)
    out, _ = dense_attention(
        q, k, v, state, block_len=block_len, mem_len=0, q_pos=None, r=None
    )
    return out


def check_agreement(args, block_len):
    """vq_attention equals dense attention over the quantized keys, and so
    does the blockwise form (sanity checks)."""
    q, k, v, codebook = args
    k_hat = get_codewords(get_shortcodes(k, codebook)[0], codebook)
    got = vq_attention(q, k, v, codebook, block_len=block_len)
    want = dense(q, k_hat, v)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(blockwise(q, k_hat, v, block_len), want, atol=1e-4)


def run(opts):
    """Time every length; return one dict per length with the COLUMNS.

    vq_attention, the blockwise form and the matmul are timed for every
    length first, dense attention after, so the gigabytes that dense attention
    allocates and frees at long lengths do not disturb the shorter timings.
    """
    vq_fn = jax.jit(vq_attention, static_argnames="block_len")
    blockwise_fn = jax.jit(blockwise, static_argnames="block_len")
    t, d, s = opts.block_len, opts.d, opts.codes
    mm_flop = 2 * t * d * s
    rates = matmul_rates()
    lengths = []
    while opts.min_len * 2 ** len(lengths) <= opts.max_len:
        lengths.append(opts.min_len * 2 ** len(lengths))
    check_agreement(make_inputs(lengths[0], opts.heads, d, s), t)

    flop, cases = {}, {}
    for length in lengths:
        flop[length] = dict(
            vq=opts.heads * vq_attention_flops(length, s, t, d, d),
            blockwise=opts.heads
            * dense_attention_flops(length, t, 0, d, d, relative=False),
            dense=opts.heads * 2 * length * length * (d + d),
        )
        n_mm = math.ceil(flop[length]["vq"] / mm_flop)
        rng = np.random.default_rng(1)
        a = jnp.asarray(rng.standard_normal((n_mm, t, d), np.float32))
        b = jnp.asarray(rng.standard_normal((d, s), np.float32))
        cases[length] = (make_inputs(length, opts.heads, d, s), (a, b), n_mm)

    # Rounds over all lengths spread each length's runs out in time, so a
    # stretch of load from elsewhere on the machine cannot spoil all of them.
    vq_s = dict.fromkeys(lengths, math.inf)
    blockwise_s = dict.fromkeys(lengths, math.inf)
    matmul_s = dict.fromkeys(lengths, math.inf)
    matmul_fn = jax.jit(block_matmuls)
    for round_ in range(opts.rounds):
        for length in lengths:
            vq_args, mm_args, _ = cases[length]
            vq_time = best_time(
                lambda *a: vq_fn(*a, block_len=t), vq_args, opts.repeats
            )
            vq_s[length] = min(vq_s[length], vq_time)
            bw_time = best_time(
                lambda q, k, v, _: blockwise_fn(q, k, v, block_len=t),
                vq_args,
                opts.repeats,
            )
            blockwise_s[length] = min(blockwise_s[length], bw_time)
            mm_time = best_time(matmul_fn, mm_args, opts.repeats)
            matmul_s[length] = min(matmul_s[length], mm_time)
        print(f"round {round_ + 1}/{opts.rounds}: vq, blockwise and matmul timed")
    n_mm = {length: cases[length][2] for length in lengths}
    del cases

    rows = []
    for length in lengths:
        q, k, v, _ = make_inputs(length, opts.heads, d, s)
        dense_s = best_time(jax.jit(dense), (q, k, v), opts.repeats)
        del q, k, v
        f = flop[length]
        vq_rate = f["vq"] / vq_s[length]
        matmul_rate = n_mm[length] * mm_flop / matmul_s[length]
        rows.append(
            dict(
                length=length,
                dense_s=dense_s,
                vq_s=vq_s[length],
                speedup=dense_s / vq_s[length],
                dense_us_per_token=1e6 * dense_s / length,
                vq_us_per_token=1e6 * vq_s[length] / length,
                vq_gflop=f["vq"] / 1e9,
                vq_gflops=vq_rate / 1e9,
                matmul_gflops=matmul_rate / 1e9,
                matmul_over_vq=matmul_rate / vq_rate,
                blockwise_s=blockwise_s[length],
                blockwise_speedup=blockwise_s[length] / vq_s[length],
                dense_gflop=f["dense"] / 1e9,
                dense_gflops=f["dense"] / dense_s / 1e9,
                blockwise_gflop=f["blockwise"] / 1e9,
                blockwise_gflops=f["blockwise"] / blockwise_s[length] / 1e9,
                machine_f32_gflops=rates["float32"],
                machine_bf16_gflops=rates["bfloat16"],
            )
        )
        print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(row, header):
    """One line of the table (and its header first)."""
    if header:
        print(
            f"{'L':>6} {'dense ms':>9} {'blockw ms':>9} {'vq ms':>8} "
            f"{'dense/vq':>8} {'blockw/vq':>9} {'vq us/tok':>9} "
            f"{'GFLOP/s: dense':>14} {'blockw':>6} {'vq':>5} {'matmul':>6}"
        )
    print(
        f"{row['length']:>6} {1e3 * row['dense_s']:>9.1f} "
        f"{1e3 * row['blockwise_s']:>9.1f} {1e3 * row['vq_s']:>8.2f} "
        f"{row['speedup']:>7.1f}x {row['blockwise_speedup']:>8.1f}x "
        f"{row['vq_us_per_token']:>9.2f} {row['dense_gflops']:>14.1f} "
        f"{row['blockwise_gflops']:>6.1f} {row['vq_gflops']:>5.1f} "
        f"{row['matmul_gflops']:>6.1f}",
        flush=True,
    )


def check_targets(rows):
    """(target, verdict) for each target whose lengths this run covered."""
    by_len = {r["length"]: r for r in rows}
    verdicts = []
    for target, length, minimum in ((TARGETS[0], 8192, 10), (TARGETS[1], 32768, 40)):
        if length in by_len:
            got = by_len[length]["speedup"]
            verdicts.append((target, got >= minimum, f"{got:.1f}x"))
    flat = [r["vq_us_per_token"] for r in rows if 4096 <= r["length"] <= 32768]
    if 32768 in by_len and 4096 in by_len:
        spread = max(flat) / min(flat) - 1
        verdicts.append((TARGETS[2], spread <= 0.25, f"max/min - 1 = {spread:.0%}"))
    ratios = [r["matmul_over_vq"] for r in rows if r["length"] >= 4096]
    if ratios:
        worst = max(ratios)
        verdicts.append((TARGETS[3], worst <= 2, f"worst matmul/vq = {worst:.2f}"))
    return verdicts


def main(argv=None):
    opts = parse_args(argv)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; {cpu_summary()}; "
        f"H={opts.heads} K=V={opts.d} S={opts.codes} T={opts.block_len} float32, "
        f"best of {opts.repeats} x {opts.rounds} rounds"
    )
    rows = run(opts)
    print(
        f"machine: 2048^3 matmul float32 {rows[0]['machine_f32_gflops']:.0f}, "
        f"bfloat16 (float32 sums) {rows[0]['machine_bf16_gflops']:.0f} GFLOP/s"
    )
    for target, ok, detail in check_targets(rows):
        print(f"{'met' if ok else 'NOT met':>7}: {target} ({detail})")
    if str(opts.out) != "-":
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        with open(opts.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {c: row[c] if c == "length" else f"{row[c]:.6g}" for c in COLUMNS}
                )
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
