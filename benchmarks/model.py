"""Wall time of one training step of Transformer-VQ against the dense baseline.

One training step is the forward pass, the backward pass and the optimizer
update (`tvq.train`'s optimizer: AdamW for the weights, SGD(1) for the
codebook), jitted, timed after a warm-up run. The model is the paper's shape
scaled down: d_model 256, d_k 128, d_v 512, one head, one layer of two GAUs,
S = T = M = 512, 256 tokens, float32, batch 1. The same model runs with
attention="vq" and attention="dense" (exact causal attention over raw keys,
everything else equal), for L = 2048 .. 32768, interleaved in rounds so that
load from elsewhere on the machine hits both alike.

Before a length runs, XLA's compiled memory analysis gives the step's peak
memory (arguments, outputs and temporaries); a variant whose peak exceeds
--mem-budget GiB is not run, and the table says so.

As in benchmarks/attention.py, a forced host device count in XLA_FLAGS is
dropped before JAX starts: one device is what is measured.

Usage: python benchmarks/model.py [--max-len 32768] [--rounds 2] [--out F]
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

import tvq  # noqa: E402
from tvq.train import make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "length",
    "variant",
    "step_s",
    "tokens_per_s",
    "us_per_token",
    "peak_gib",
    "ran",
]
GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min-len", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=2, help="passes over all lengths")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per round")
    p.add_argument("--mem-budget", type=float, default=20.0, help="GiB")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "book" / "data" / "model_benchmark.csv",
        help="CSV to write ('-' for none)",
    )
    return p.parse_args(argv)


def make_config(attention: str, length: int) -> tvq.TransformerConfig:
    """The benchmark model: one layer of two GAUs, S = T = M = 512."""
    return tvq.TransformerConfig.create(
        n_vocab=256,
        d_model=256,
        d_k=128,
        d_v=512,
        n_head=1,
        n_code=512,
        n_layer=1,
        block_len=512,
        mem_len=512,
        agg_cache=True,
        grad_thru_cache=True,
        pe_abs=False,
        pe_lam=10_000,
        c_beta=1e-4,
        c_gamma=0.99,
        e_tie=True,
        e_preln=True,
        e_scale=1.0,
        p_dropemb=0.0,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        is_train=True,
        attention=attention,
        sequence_len=length,
        update_len=length,
        grad_clip=1.0,
        optimizer="adamw",
        lr_max=1e-3,
        lr_schedule="cosine",
        wd_lam=0.0,
        n_warmup_step=10,
        n_max_step=1000,
    )


class Variant:
    """One model (vq or dense) at one length: its compiled step and live state."""

    def __init__(self, attention: str, length: int):
        self.attention, self.length = attention, length
        config = make_config(attention, length)
        model = tvq.Transformer(config)
        tokens = jax.random.randint(jax.random.key(0), (1, length + 1), 0, 256)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = jnp.ones([1, length], jnp.float32)
        spec = tvq.VQSpec(
            jnp.ones([1]), jnp.full([1], length // config.block_len), mask
        )
        # One call holds the whole sequence: the dense state carries no buffer.
        state = tvq.Transformer.initial_state(config, 1, max_len=0)
        params = model.init(jax.random.key(1), inputs, state, spec)["params"]
        tx = make_optimizer(config)

        def step(params, opt_state):
            def loss(params):
                out = model.apply({"params": params}, inputs, state, spec)
                return tvq.loss_fn(out, targets, mask, config)["loss"]

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return jax.tree.map(jnp.add, params, updates), opt_state

        self.args = (params, tx.init(params))
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*self.args)
        self.step = lowered.compile()
        mem = self.step.memory_analysis()
        self.peak_bytes = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
        self.times: list[float] = []

    def run(self, repeats: int) -> None:
        """A warm-up run, then `repeats` timed steps."""
        self.args = jax.block_until_ready(self.step(*self.args))
        for _ in range(repeats):
            start = time.perf_counter()
            self.args = jax.block_until_ready(self.step(*self.args))
            self.times.append(time.perf_counter() - start)


def lengths(lo: int, hi: int) -> list[int]:
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    print(
        f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"device {jax.devices()[0].device_kind}"
    )
    rows = {}
    variants = []
    for length in lengths(args.min_len, args.max_len):
        for attention in ("vq", "dense"):
            variant = Variant(attention, length)
            fits = variant.peak_bytes <= args.mem_budget * GIB
            rows[length, attention] = dict(
                length=length,
                variant=attention,
                peak_gib=round(variant.peak_bytes / GIB, 3),
                ran=int(fits),
            )
            if fits:
                variants.append(variant)
            else:
                print(
                    f"{attention} at L={length}: peak {variant.peak_bytes / GIB:.1f} "
                    f"GiB > budget {args.mem_budget} GiB, not run"
                )
            del variant
    for r in range(args.rounds):
        for variant in variants:
            variant.run(args.repeats)
            print(
                f"round {r + 1}: {variant.attention:5s} L={variant.length:6d} "
                f"{min(variant.times):8.3f} s",
                flush=True,
            )
    for variant in variants:
        best = min(variant.times)
        rows[variant.length, variant.attention].update(
            step_s=round(best, 5),
            tokens_per_s=round(variant.length / best, 1),
            us_per_token=round(1e6 * best / variant.length, 3),
        )
    table = [rows[key] for key in sorted(rows)]
    report(table)
    if str(args.out) != "-":
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(table)
        print(f"wrote {args.out}")
    return table


def report(table: list[dict]) -> None:
    """Print the table, the speed-ups and whether each target is met."""
    by = {(row["length"], row["variant"]): row for row in table}
    print(
        f"{'L':>6} {'vq s':>8} {'dense s':>8} {'speed-up':>8} "
        f"{'vq tok/s':>9} {'dense tok/s':>11} {'vq GiB':>7} {'dense GiB':>9}"
    )
    for length in sorted({row["length"] for row in table}):
        vq, dense = by[length, "vq"], by[length, "dense"]
        ds = f"{dense['step_s']:8.3f}" if dense["ran"] else f"{'n/a':>8}"
        dt = f"{dense['tokens_per_s']:11.0f}" if dense["ran"] else f"{'n/a':>11}"
        sp = f"{dense['step_s'] / vq['step_s']:7.1f}x" if dense["ran"] else f"{'':>8}"
        print(
            f"{length:6d} {vq['step_s']:8.3f} {ds} {sp} {vq['tokens_per_s']:9.0f} "
            f"{dt} {vq['peak_gib']:7.2f} {dense['peak_gib']:9.2f}"
        )

    def speedup(length):
        vq, dense = by.get((length, "vq")), by.get((length, "dense"))
        if vq is None or dense is None or not dense["ran"]:
            return None
        return dense["step_s"] / vq["step_s"]

    def line(ok, text):
        print(f"    {'met' if ok else 'MISSED'}: {text}")

    for length, target in ((8192, 3.0), (32768, 12.0)):
        s = speedup(length)
        if s is not None:
            line(s >= target, f"speed-up >= {target:g}x at L = {length} ({s:.1f}x)")
        elif (length, "vq") in by:
            print(f"    dense does not fit at L = {length}")
    if (32768, "vq") in by and (8192, "vq") in by and speedup(32768) is None:
        ratio = by[32768, "vq"]["step_s"] / (4 * by[8192, "vq"]["step_s"])
        line(
            ratio <= 1.25,
            f"vq at 32768 within 1.25x of 4x its 8192 time ({ratio:.2f}x)",
        )
    per_token = [
        by[n, "vq"]["us_per_token"]
        for n in (4096, 8192, 16384, 32768)
        if (n, "vq") in by
    ]
    if len(per_token) > 1:
        spread = max(per_token) / min(per_token) - 1
        line(
            spread <= 0.25,
            f"vq time per token flat within 25% from L = 4096 to 32768 "
            f"(max/min - 1 = {spread:.0%})",
        )


if __name__ == "__main__":
    main()
