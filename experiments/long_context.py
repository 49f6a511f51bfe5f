"""Experiment 2 of "Transformer-VQ on real data": what linear time buys at 8k.

Three byte models of the same shapes on the standard-library corpus of
`stdlib.py`, with sequences of 8,192 bytes cut into update windows of 2,048
(truncated backpropagation, one optimizer step per window):

- vq: Transformer-VQ (attention="vq"), its state carried across the four
  windows of a sequence and started afresh with every sequence, as the
  reference's `ops/train.py` does (`--carry-state` carries it from batch to
  batch instead: the rows are continuous streams);
- dense: exact causal attention (attention="dense", block by block), its
  key/value buffer carried across the four windows of a sequence;
- window: the VQ layer with the cache switched off (agg_cache=False), so each
  position sees only its block and the M positions before it.

They train in alternation, one batch each, on the same batches (the same
`tvq.corpus.train_batch` indices), each until it has spent `--minutes` of
training time; the first batch of each, which compiles, is not counted. Each
variant's cosine schedule ends at the step it is expected to reach, from the
time of two batches measured before the run. All three compute in `--dtype`.

Every `--eval-every` batches each model is scored on the first
`--eval-bytes` held-out bytes, as streams. At the end every model is scored
on all held-out files as streams (vq and window carry their state over a
whole file; dense starts a fresh buffer every 8,192 bytes, its training
context), with the loss split by position in the file; the vq and window
models are scored again with their parameters at the batch where dense
stopped (equal tokens).

    python experiments/long_context.py               # the committed run

Writes under --out (book/data): long_context_curve.csv and
long_context_results.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

FORCE_DEVICES = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith(FORCE_DEVICES)
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import stdlib  # noqa: E402

from tvq import lm  # noqa: E402
from tvq.corpus import load_corpus, starts_epoch, stream_batches, train_batch  # noqa: E402
from tvq.model import Transformer  # noqa: E402
from tvq.parallel import make_data_mesh  # noqa: E402
from tvq.sample import state_nbytes  # noqa: E402
from tvq.train import (  # noqa: E402
    carries_state,
    eval_step,
    init_train_state,
    make_train_step,
    replicate,
    shard_batch,
    shard_state,
)

ROOT = Path(__file__).resolve().parents[1]
LOG2E = 1.0 / math.log(2.0)
SHAPES = dict(
    d_model=256,
    d_k=128,
    d_v=512,
    n_layer=2,
    n_code=512,
    block_len=512,
    mem_len=512,
    sequence_len=8192,
    update_len=2048,
    global_batch_size=2,
    lr_max=2e-3,
    n_warmup_step=40,
)
VARIANTS = {
    "vq": dict(attention="vq"),
    "dense": dict(attention="dense"),
    "window": dict(attention="vq", agg_cache=False),
}
# Position bins in a held-out file, in bytes: [lo, hi).
BINS = [(0, 512), (512, 2048), (2048, 8192), (8192, None)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per variant")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=15, help="batches")
    p.add_argument("--eval-bytes", type=int, default=1 << 17)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--carry-state",
        action="store_true",
        help="vq and window carry their state from batch to batch (default: "
        "a fresh state every sequence, as the reference's train_op)",
    )
    p.add_argument("--workdir", default=str(ROOT / "runs" / "real_data"))
    p.add_argument("--out", default=str(ROOT / "book" / "data"))
    return p.parse_args(argv)


def bin_name(lo, hi) -> str:
    return f"bpb_{lo}_{hi if hi is not None else 'end'}"


class Scorer:
    """Held-out bits per byte as streams, split by position in each file."""

    def __init__(self, config, corpus, batch_size=8):
        self.config = config.replace(is_train=False)
        self.corpus, self.b = corpus, batch_size
        self.carry = carries_state(config)
        chunk = self.config.sequence_len
        self.fresh = Transformer.initial_state(
            self.config, batch_size, None if self.carry else chunk
        )
        self.step = jax.jit(lambda p, batch, s: eval_step(self.config, p, batch, s))

    def __call__(self, params, documents) -> dict:
        chunk = self.config.sequence_len
        sums = np.zeros([len(BINS), 2])
        state = None
        c = 0
        for first, batch in stream_batches(
            self.corpus, documents, batch_size=self.b, chunk_len=chunk
        ):
            c = 0 if first else c + 1
            if first or not self.carry:
                state = self.fresh
            out = self.step(params, batch, state)
            state = out["attn_state"]
            nll = np.asarray(out["nll"], np.float64)
            mask = batch["loss_mask"] != 0
            pos = c * chunk + np.arange(chunk)
            for i, (lo, hi) in enumerate(BINS):
                inside = mask & (pos >= lo) & (pos < (hi or np.inf))
                sums[i] += [nll[inside].sum(), inside.sum()]
        total = sums.sum(0)
        result = dict(bpb=total[0] / total[1] * LOG2E, n_bytes=int(total[1]))
        for (lo, hi), (s, n) in zip(BINS, sums, strict=True):
            result[bin_name(lo, hi)] = s / n * LOG2E if n else float("nan")
        return result


class Runner:
    """One variant: its config, state and the training time it has spent."""

    def __init__(self, name, config, mesh, seed, carry=False):
        self.name, self.config, self.mesh = name, config, mesh
        self.carry = carry and carries_state(config)
        rng_init, self.rng = jax.random.split(jax.random.key(seed))
        self.state = replicate(init_train_state(config, rng_init), mesh)
        self.step_fn = make_train_step(config, mesh, carry=self.carry)
        self.attn = None
        self.batches, self.seconds, self.compile_s = 0, 0.0, 0.0
        self.last_bpb = float("nan")

    def train_on(self, corpus, seed) -> float:
        """One batch; returns its wall time."""
        b, length = self.config.global_batch_size, self.config.sequence_len
        batch = train_batch(
            corpus, self.batches, batch_size=b, sequence_len=length, seed=seed
        )
        batch = shard_batch(batch, self.mesh)
        key = replicate(
            jax.random.key_data(jax.random.fold_in(self.rng, self.batches)), self.mesh
        )
        t0 = time.perf_counter()
        if self.carry:
            if self.attn is None or starts_epoch(corpus, self.batches, b, length):
                self.attn = shard_state(
                    Transformer.initial_state(self.config, b), self.mesh
                )
            self.state, self.attn, metrics = self.step_fn(
                self.state, self.attn, batch, key
            )
        else:
            self.state, metrics = self.step_fn(self.state, batch, key)
        self.last_bpb = float(np.mean(np.asarray(metrics["l_lm_per_token"]))) * LOG2E
        seconds = time.perf_counter() - t0
        self.batches += 1
        return seconds

    def params(self):
        return jax.device_get(self.state.params)


def make_configs(args, n_steps: dict | None = None) -> dict:
    configs = {}
    for name in args.variants:
        fields = dict(SHAPES, **lm.parse_overrides(args.set), **VARIANTS[name])
        fields["n_max_step"] = (n_steps or {}).get(name, 1000)
        configs[name] = lm.make_config("cpu", fields, args.dtype)
    return configs


def main(argv=None):
    args = parse_args(argv)
    src = stdlib.stage(Path(args.workdir))
    corpus = load_corpus([str(src)], Path(args.workdir) / "corpus_long", 0.05)
    print(corpus.summary(), flush=True)
    mesh = make_data_mesh()
    budget = 60.0 * args.minutes

    # Calibration: the time of a batch, to end each cosine schedule on time.
    n_steps = {}
    for name, config in make_configs(args).items():
        runner = Runner(name, config, mesh, args.seed, args.carry_state)
        runner.train_on(corpus, args.seed)  # compiles
        per_batch = min(runner.train_on(corpus, args.seed) for _ in range(2))
        windows = config.sequence_len // config.update_len
        n_steps[name] = max(int(budget / per_batch) * windows, 2 * config.n_warmup_step)
        print(
            f"{name}: {per_batch:.2f} s a batch -> n_max_step {n_steps[name]}",
            flush=True,
        )
        del runner

    configs = make_configs(args, n_steps)
    runners = {
        n: Runner(n, c, mesh, args.seed, args.carry_state) for n, c in configs.items()
    }
    some = next(iter(configs.values()))
    tokens_per_batch = some.global_batch_size * some.sequence_len
    heldout_all = corpus.heldout_documents()
    heldout_curve = corpus.heldout_documents(args.eval_bytes)
    scorers = {n: Scorer(c, corpus) for n, c in configs.items()}
    curve, snapshots = [], {}
    stop_batch = None  # the batch count where the first variant ran out of time

    def record(r):
        score = scorers[r.name](r.state.params, heldout_curve)
        curve.append(
            dict(
                variant=r.name,
                seed=args.seed,
                batch=r.batches,
                tokens=r.batches * tokens_per_batch,
                train_seconds=round(r.seconds, 2),
                train_bpb=round(r.last_bpb, 5),
                heldout_bpb=round(score["bpb"], 5),
            )
        )
        print(
            f"{r.name:6s} batch {r.batches:4d} {r.seconds:7.1f} s "
            f"train {r.last_bpb:.3f} held-out {score['bpb']:.3f}",
            flush=True,
        )

    while True:
        active = [r for r in runners.values() if r.seconds < budget]
        if not active:
            break
        if stop_batch is None and len(active) < len(runners):
            stop_batch = min(r.batches for r in runners.values())
            snapshots = {r.name: r.params() for r in runners.values()}
        for r in active:
            seconds = r.train_on(corpus, args.seed)
            if r.batches == 1:
                r.compile_s = seconds
            else:
                r.seconds += seconds
            if r.batches % args.eval_every == 0 or r.seconds >= budget:
                record(r)

    results = []
    for name, r in runners.items():
        config = configs[name]
        final = scorers[name](r.state.params, heldout_all)
        row = dict(
            variant=name,
            seed=args.seed,
            dtype=args.dtype,
            when="equal time",
            batches=r.batches,
            tokens=r.batches * tokens_per_batch,
            train_seconds=round(r.seconds, 1),
            tokens_per_s=round((r.batches - 1) * tokens_per_batch / r.seconds, 1),
            n_param=sum(x.size for x in jax.tree.leaves(r.state.params)),
            state_bytes=state_nbytes(
                config.replace(is_train=False), 1, config.sequence_len
            ),
        ) | rounded(final)
        results.append(row)
        print(row, flush=True)
        if stop_batch is not None and name in snapshots and r.batches > stop_batch:
            early = scorers[name](snapshots[name], heldout_all)
            results.append(
                dict(
                    row,
                    when="equal tokens",
                    batches=stop_batch,
                    tokens=stop_batch * tokens_per_batch,
                    train_seconds="",
                    tokens_per_s="",
                )
                | rounded(early)
            )
            print(results[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "long_context_curve.csv", curve)
    write_csv(out / "long_context_results.csv", results)


def rounded(score: dict) -> dict:
    return {
        k: round(float(v), 5) if isinstance(v, float) else v for k, v in score.items()
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
