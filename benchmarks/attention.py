"""Wall time of dense causal attention and of `tvq.attention.vq_attention`.

Both run jitted, side by side in one process, on float32 inputs with one head,
K = V = 64, S = 512 codes and blocks of 512 positions, for L = 1k .. 32k. Each
time is the best of --repeats runs after a warm-up run (for vq_attention and
the matmul, the best over --rounds such passes through all lengths). The table
and the CSV give the speed-up, the time per token, and the rate of vq_attention
in GFLOP/s next to the rate of a plain matmul of the same FLOP count on the same
machine.

FLOPs of vq_attention (matmuls only, 2 M N K each; see `vq_attention_flops`):
2 L (S K + (S + T) K + (S + T) (V + 1)). The reference matmul has the same
shape of work: a scan over block-sized [T, K] x [K, S] products, as many as
make up the same FLOP count (rounded up), summed into one [T, S] carry so that
everything stays in cache, as the blocks of vq_attention do.

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
import os
import platform
import time
from pathlib import Path

import one_device  # noqa: F401  (drops forced devices before JAX starts)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tvq.attention import vq_attention, vq_attention_flops  # noqa: E402
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


def check_agreement(args, block_len):
    """vq_attention equals dense attention over the quantized keys (sanity check)."""
    q, k, v, codebook = args
    k_hat = get_codewords(get_shortcodes(k, codebook)[0], codebook)
    got = vq_attention(q, k, v, codebook, block_len=block_len)
    np.testing.assert_allclose(got, dense(q, k_hat, v), rtol=1e-4, atol=1e-4)


def run(opts):
    """Time every length; return one dict per length with the COLUMNS.

    vq_attention and the matmul are timed for every length first, dense
    attention after, so the gigabytes that dense attention allocates and frees
    at long lengths do not disturb the much shorter vq timings.
    """
    vq_fn = jax.jit(vq_attention, static_argnames="block_len")
    t, d, s = opts.block_len, opts.d, opts.codes
    mm_flop = 2 * t * d * s
    lengths = []
    while opts.min_len * 2 ** len(lengths) <= opts.max_len:
        lengths.append(opts.min_len * 2 ** len(lengths))
    check_agreement(make_inputs(lengths[0], opts.heads, d, s), t)

    flop, cases = {}, {}
    for length in lengths:
        flop[length] = opts.heads * vq_attention_flops(length, s, t, d, d)
        n_mm = math.ceil(flop[length] / mm_flop)
        rng = np.random.default_rng(1)
        a = jnp.asarray(rng.standard_normal((n_mm, t, d), np.float32))
        b = jnp.asarray(rng.standard_normal((d, s), np.float32))
        cases[length] = (make_inputs(length, opts.heads, d, s), (a, b), n_mm)

    # Rounds over all lengths spread each length's runs out in time, so a
    # stretch of load from elsewhere on the machine cannot spoil all of them.
    vq_s = dict.fromkeys(lengths, math.inf)
    matmul_s = dict.fromkeys(lengths, math.inf)
    matmul_fn = jax.jit(block_matmuls)
    for round_ in range(opts.rounds):
        for length in lengths:
            vq_args, mm_args, _ = cases[length]
            vq_time = best_time(
                lambda *a: vq_fn(*a, block_len=t), vq_args, opts.repeats
            )
            vq_s[length] = min(vq_s[length], vq_time)
            mm_time = best_time(matmul_fn, mm_args, opts.repeats)
            matmul_s[length] = min(matmul_s[length], mm_time)
        print(f"round {round_ + 1}/{opts.rounds}: vq_attention and matmul timed")
    n_mm = {length: cases[length][2] for length in lengths}
    del cases

    rows = []
    for length in lengths:
        q, k, v, _ = make_inputs(length, opts.heads, d, s)
        dense_s = best_time(jax.jit(dense), (q, k, v), opts.repeats)
        del q, k, v
        vq_rate = flop[length] / vq_s[length]
        matmul_rate = n_mm[length] * mm_flop / matmul_s[length]
        rows.append(
            dict(
                length=length,
                dense_s=dense_s,
                vq_s=vq_s[length],
                speedup=dense_s / vq_s[length],
                dense_us_per_token=1e6 * dense_s / length,
                vq_us_per_token=1e6 * vq_s[length] / length,
                vq_gflop=flop[length] / 1e9,
                vq_gflops=vq_rate / 1e9,
                matmul_gflops=matmul_rate / 1e9,
                matmul_over_vq=matmul_rate / vq_rate,
            )
        )
        print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(row, header):
    """One line of the table (and its header first)."""
    if header:
        print(
            f"{'L':>6} {'dense ms':>9} {'vq ms':>8} {'speed-up':>8} "
            f"{'vq us/tok':>9} {'vq GFLOP/s':>10} {'matmul GFLOP/s':>14} "
            f"{'matmul/vq':>9}"
        )
    print(
        f"{row['length']:>6} {1e3 * row['dense_s']:>9.1f} {1e3 * row['vq_s']:>8.2f} "
        f"{row['speedup']:>7.1f}x {row['vq_us_per_token']:>9.2f} "
        f"{row['vq_gflops']:>10.1f} {row['matmul_gflops']:>14.1f} "
        f"{row['matmul_over_vq']:>9.2f}",
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
        f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"H={opts.heads} K=V={opts.d} S={opts.codes} T={opts.block_len} float32, "
        f"best of {opts.repeats} x {opts.rounds} rounds"
    )
    rows = run(opts)
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
