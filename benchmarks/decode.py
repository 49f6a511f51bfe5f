"""Time per generated token: Transformer-VQ's fixed state against a KV cache.

One layer of two GAUs (n_layer = 1), d_model 256, d_k 128, d_v 512, one head,
S = T = M = 512, float32, batch 1, 256-token vocabulary, random parameters
(the cost of a token does not depend on what the model has learned). For each
context length the context is prefilled (`tvq.sample.prefill`) and then the
next --new tokens are sampled (`tvq.sample.decode`, one jitted `lax.scan`
of single-token steps); the time of that decode divided by --new is the time
per token. attention="vq" carries its window and per-code cache; the dense
model (same shapes, exact attention, no codebook) carries a key/value buffer
that grows with the context.

Prefill is not timed. The dense context is prefilled in chunks of --chunk
tokens, its buffer grown to the end of each chunk, so no call builds a score
matrix larger than [T, L] and the quadratic prefill costs about half of what a
full-size buffer would. Decode timings run in --rounds passes over all lengths,
vq and dense interleaved, and each keeps its best pass, so a stretch of load
from elsewhere on a shared machine cannot spoil one length alone; odd passes
run the lengths in reverse order.

State bytes: `tvq.state_nbytes`; for vq also summed over the leaves of the
state actually reached after the context (it must not depend on the length);
for dense, the buffer holding the context.

Forced host devices (--xla_force_host_platform_device_count, the tests' and
the book's setting) slow XLA's CPU runtime down for small scan steps, so the
flag is dropped here before JAX starts.

Usage: python benchmarks/decode.py [--lengths 1024 4096 16384 65536]
                                   [--new 256] [--rounds 3] [--out F]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import one_device  # noqa: F401  (drops forced devices before JAX starts)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from model import make_config  # noqa: E402  (benchmarks/model.py)

import tvq  # noqa: E402
from tvq.sample import decode, prefill, state_nbytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "context",
    "vq_ms_per_token",
    "dense_ms_per_token",
    "speedup",
    "vq_state_bytes",
    "dense_state_bytes",
    "vq_prefill_s",
    "dense_prefill_s",
]
TARGETS = (
    "vq time per token flat within 25% from the shortest to the longest context",
    "vq >= 5x faster per token than dense at the longest context",
    "vq state bytes identical at every length",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--new", type=int, default=256, help="tokens timed per run")
    p.add_argument("--rounds", type=int, default=3, help="passes over all lengths")
    p.add_argument("--chunk", type=int, default=8192, help="dense prefill chunk")
    p.add_argument(
        "--out",
        default=str(ROOT / "book" / "data" / "decode_benchmark.csv"),
        help="CSV path, or - for none",
    )
    return p.parse_args(argv)


def model_config(attention: str) -> tvq.TransformerConfig:
    """The model benchmark's one-layer model (benchmarks/model.py), for decoding."""
    # sequence_len is left unset: every dense state here is sized explicitly.
    return make_config(attention, length=512).replace(
        sequence_len=None, p_nucleus=1.0, is_train=False
    )


def init_params(config, seed=0):
    """Random parameters of the benchmark model."""
    tokens = jnp.zeros([1, config.block_len], jnp.int32)
    state = tvq.Transformer.initial_state(config, 1, config.block_len)
    return tvq.Transformer(config).init(jax.random.key(seed), tokens, state)["params"]


def grow(state, max_len):
    """A dense state with its key/value buffers zero-padded to max_len."""

    def pad(gau):
        extra = max_len - gau["k"].shape[2]
        widths = [(0, 0), (0, 0), (0, extra), (0, 0)]
        return dict(gau, k=jnp.pad(gau["k"], widths), v=jnp.pad(gau["v"], widths))

    return [[pad(gau) for gau in layer] for layer in state]


def prefill_vq(config, params, context):
    state = tvq.Transformer.initial_state(config, 1)
    return prefill(config, params, context, state)


def prefill_dense(config, params, context, chunk, n_new):
    """Prefill chunk by chunk, then leave room for n_new decoded tokens."""
    length = context.shape[1]
    state = tvq.Transformer.initial_state(config, 1, min(chunk, length))
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        state = grow(state, end)
        logprobs, state = prefill(config, params, context[:, start:end], state)
    return logprobs, grow(state, length + n_new)


def leaf_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def time_decode(config, params, logprobs, state, n_new, seed):
    start = time.perf_counter()
    tokens, _, _ = decode(
        config, params, logprobs, state, n_steps=n_new, rng=jax.random.key(seed), p=1.0
    )
    tokens.block_until_ready()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    configs = {name: model_config(name) for name in ("vq", "dense")}
    params = {name: init_params(cfg) for name, cfg in configs.items()}
    rng = np.random.default_rng(0)
    ready, rows = {}, {}
    for length in args.lengths:
        context = jnp.asarray(rng.integers(0, 256, size=(1, length)), jnp.int32)
        row = dict(context=length)
        start = time.perf_counter()
        ready["vq", length] = prefill_vq(configs["vq"], params["vq"], context)
        jax.block_until_ready(ready["vq", length])
        row["vq_prefill_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ready["dense", length] = prefill_dense(
            configs["dense"], params["dense"], context, args.chunk, args.new
        )
        jax.block_until_ready(ready["dense", length])
        row["dense_prefill_s"] = time.perf_counter() - start
        row["vq_state_bytes"] = state_nbytes(configs["vq"], 1)
        row["vq_reached_bytes"] = leaf_bytes(ready["vq", length][1])
        row["dense_state_bytes"] = state_nbytes(configs["dense"], 1, length)
        rows[length] = row
        print(
            f"prefilled {length}: vq {row['vq_prefill_s']:.1f} s, "
            f"dense {row['dense_prefill_s']:.1f} s",
            flush=True,
        )
    best = {key: float("inf") for key in ready}
    for key in ready:  # compile (dense: one shape per length) before timing
        time_decode(configs[key[0]], params[key[0]], *ready[key], args.new, 0)
    for r in range(args.rounds):
        # Odd rounds run the lengths backwards: no length always follows the
        # dense model's longest run, which leaves the caches cold.
        for length in args.lengths[:: 1 if r % 2 == 0 else -1]:
            for name in ("vq", "dense"):
                key = (name, length)
                seconds = time_decode(
                    configs[name], params[name], *ready[key], args.new, r + 1
                )
                best[key] = min(best[key], seconds)
        print(f"round {r + 1} of {args.rounds} done", flush=True)
    for length, row in rows.items():
        row["vq_ms_per_token"] = 1e3 * best["vq", length] / args.new
        row["dense_ms_per_token"] = 1e3 * best["dense", length] / args.new
        row["speedup"] = row["dense_ms_per_token"] / row["vq_ms_per_token"]
    report(args, list(rows.values()))


def report(args, rows):
    print(
        f"\ndecode, {args.new} new tokens after each context, best of "
        f"{args.rounds} rounds; JAX {jax.__version__}, {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'context':>8} {'vq ms/tok':>10} {'dense ms/tok':>13} {'speed-up':>9} "
        f"{'vq state B':>11} {'dense state B':>14}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['context']:8d} {row['vq_ms_per_token']:10.3f} "
            f"{row['dense_ms_per_token']:13.3f} {row['speedup']:9.1f} "
            f"{row['vq_state_bytes']:11d} {row['dense_state_bytes']:14d}"
        )
    times = [row["vq_ms_per_token"] for row in rows]
    spread = max(times) / min(times) - 1
    states = {row["vq_state_bytes"] for row in rows}
    states |= {row["vq_reached_bytes"] for row in rows}
    checks = (
        (spread <= 0.25, f"spread {100 * spread:.0f}%"),
        (rows[-1]["speedup"] >= 5, f"{rows[-1]['speedup']:.1f}x"),
        (len(states) == 1, f"{sorted(states)} bytes"),
    )
    for (ok, detail), target in zip(checks, TARGETS, strict=True):
        print(f"{'met' if ok else 'MISSED'}: {target} ({detail})")
    if args.out != "-":
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {
                        k: round(v, 6) if isinstance(v, float) else v
                        for k, v in row.items()
                    }
                )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
