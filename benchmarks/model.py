"""Wall time of one training step of Transformer-VQ against exact attention.

One training step is the forward pass, the backward pass and the optimizer
update (`tvq.train`'s optimizer: AdamW for the weights, SGD(1) for the
codebook), jitted, timed after a warm-up run. The model is the paper's shape
scaled down: d_model 256, d_k 128, d_v 512, one head, one layer of two GAUs,
S = T = M = 512, a vocabulary of 256, batch 1. Five variants run, everything
but the attention equal, for L = 2048 .. 32768, interleaved in rounds so that
load from elsewhere on the machine hits them alike:

- vq: attention="vq", float32;
- vq-bf16: the same with dtype="bfloat16" (bf16 products, float32 sums);
- dense: attention="dense", exact causal attention block by block (flash
  style: future blocks skipped, no L x L matrix), float32;
- dense_full: attention="dense_full", the whole L x L score matrix, float32;
- dense-bf16: dense with dtype="bfloat16", the strongest exact baseline on a
  CPU with bf16 matrix instructions.

Beside each time: the step's matmul FLOPs (`tvq.flops.train_step_flops`;
the optimizer adds no products) and the rate they were done at, next to the
machine's own matmul rates measured in the same run (`machine.py`: a 2048^3
float32 product, and bf16 with float32 sums), and the CPU and its bf16 flags.

Before a length runs, XLA's compiled memory analysis gives the step's peak
memory (arguments, outputs and temporaries); a variant whose peak exceeds
--mem-budget GiB is not run, and the table says so.

As in benchmarks/attention.py, a forced host device count in XLA_FLAGS is
dropped before JAX starts: one device is what is measured.

Usage: python benchmarks/model.py [--max-len 32768] [--rounds 2]
                                  [--variants vq vq-bf16 dense dense_full dense-bf16]
                                  [--out F]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import one_device  # noqa: F401  (drops forced devices before JAX starts)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from machine import cpu_summary, matmul_rates  # noqa: E402

import tvq  # noqa: E402
from tvq.flops import train_step_flops  # noqa: E402
from tvq.train import make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (attention, dtype)
    "vq": ("vq", "float32"),
    "vq-bf16": ("vq", "bfloat16"),
    "dense": ("dense", "float32"),
    "dense_full": ("dense_full", "float32"),
    "dense-bf16": ("dense", "bfloat16"),
}
COLUMNS = [
    "length",
    "variant",
    "step_s",
    "tokens_per_s",
    "us_per_token",
    "gflop",
    "gflops",
    "machine_gflops",
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
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "book" / "data" / "model_benchmark.csv",
        help="CSV to write ('-' for none)",
    )
    return p.parse_args(argv)


def make_config(attention: str, length: int, dtype="float32") -> tvq.TransformerConfig:
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
        dtype=dtype,
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
    """One model at one length: its compiled step and live state."""

    def __init__(self, name: str, length: int):
        self.name, self.length = name, length
        attention, dtype = VARIANTS[name]
        config = make_config(attention, length, dtype)
        self.dtype = dtype
        self.flop = train_step_flops(config, length)["total"]
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
    rates = matmul_rates()
    print(f"jax {jax.__version__}; {cpu_summary()}")
    print(
        f"machine: 2048^3 matmul float32 {rates['float32']:.0f} GFLOP/s, "
        f"bfloat16 (float32 sums) {rates['bfloat16']:.0f} GFLOP/s"
    )
    rows, variants = {}, []
    for length in lengths(args.min_len, args.max_len):
        for name in args.variants:
            variant = Variant(name, length)
            fits = variant.peak_bytes <= args.mem_budget * GIB
            rows[length, name] = dict(
                length=length,
                variant=name,
                gflop=round(variant.flop / 1e9, 3),
                machine_gflops=round(rates[variant.dtype], 1),
                peak_gib=round(variant.peak_bytes / GIB, 3),
                ran=int(fits),
            )
            if fits:
                variants.append(variant)
            else:
                print(
                    f"{name} at L={length}: peak {variant.peak_bytes / GIB:.1f} "
                    f"GiB > budget {args.mem_budget} GiB, not run"
                )
            del variant
    for r in range(args.rounds):
        for variant in variants:
            variant.run(args.repeats)
            print(
                f"round {r + 1}: {variant.name:10s} L={variant.length:6d} "
                f"{min(variant.times):8.3f} s",
                flush=True,
            )
    for variant in variants:
        best = min(variant.times)
        rows[variant.length, variant.name].update(
            step_s=round(best, 5),
            tokens_per_s=round(variant.length / best, 1),
            us_per_token=round(1e6 * best / variant.length, 3),
            gflops=round(variant.flop / best / 1e9, 1),
        )
    order = {name: i for i, name in enumerate(VARIANTS)}
    table = [rows[key] for key in sorted(rows, key=lambda k: (k[0], order[k[1]]))]
    report(table, rates)
    if str(args.out) != "-":
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(table)
        print(f"wrote {args.out}")
    return table


def report(table: list[dict], rates: dict) -> None:
    """The table, the speed-ups and FLOP ratios, and whether each target is met."""
    by = {(row["length"], row["variant"]): row for row in table}
    print(
        f"{'L':>6} {'variant':>10} {'step s':>8} {'GFLOP':>8} {'GFLOP/s':>8} "
        f"{'of machine':>10} {'peak GiB':>8}"
    )
    for row in table:
        ran = row["ran"]
        step = f"{row['step_s']:8.3f}" if ran else f"{'n/a':>8}"
        rate = f"{row['gflops']:8.1f}" if ran else f"{'':>8}"
        share = f"{row['gflops'] / row['machine_gflops']:10.0%}" if ran else " " * 10
        print(
            f"{row['length']:6d} {row['variant']:>10} {step} {row['gflop']:8.1f} "
            f"{rate} {share} {row['peak_gib']:8.2f}"
        )

    def ratio(length, slow, fast, key="step_s"):
        """slow's key over fast's (None unless both exist and, for times, ran)."""
        a, b = by.get((length, slow)), by.get((length, fast))
        if a is None or b is None:
            return None
        if key == "step_s" and not (a["ran"] and b["ran"]):
            return None
        return a[key] / b[key]

    print("speed-ups (time ratio; FLOP ratio in brackets):")
    for length in sorted({row["length"] for row in table}):
        parts = []
        pairs = [("dense", "vq"), ("dense_full", "vq"), ("vq", "vq-bf16")]
        pairs.append(("dense-bf16", "vq-bf16"))
        for slow, fast in pairs:
            r, f = ratio(length, slow, fast), ratio(length, slow, fast, "gflop")
            if r is not None:
                parts.append(f"{slow}/{fast} {r:5.2f}x [{f:.2f}x]")
        print(f"  L={length:6d}: " + ", ".join(parts))

    def line(ok, text):
        print(f"    {'met' if ok else 'MISSED'}: {text}")

    if (s := ratio(8192, "vq", "vq-bf16")) is not None:
        line(s >= 2.0, f"vq-bf16 step >= 2x faster than vq at L = 8192 ({s:.2f}x)")
    for length, target in ((8192, 3.0), (32768, 12.0)):
        for dense, vq in (
            ("dense", "vq"),
            ("dense_full", "vq"),
            ("dense-bf16", "vq-bf16"),
        ):
            s = ratio(length, dense, vq)
            if s is not None:
                line(
                    s >= target,
                    f"{dense}/{vq} >= {target:g}x at L = {length} ({s:.1f}x)",
                )
            elif (length, vq) in by and (length, dense) in by:
                print(f"    {dense} does not fit at L = {length}")
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
    print(
        f"(machine: float32 {rates['float32']:.0f}, bf16 {rates['bfloat16']:.0f} "
        "GFLOP/s on a 2048^3 matmul)"
    )


if __name__ == "__main__":
    main()
