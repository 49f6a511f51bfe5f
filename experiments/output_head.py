"""What stalls MQAR training with a tied, pre-LayerNorm output head.

The training chapter's first runs used the head `e_tie=True, e_preln=True`:
the last GAU's output goes through a final LayerNorm and is multiplied by the
transposed embeddings. Both the dense and the VQ model stalled with it. This
script separates the two things that head changes, tying and the final
normalization, on the chapter's dense MQAR model (experiments/mqar.py, the same
seeds, batches and held-out set as mqar_seeds.py), for 300 steps per run:

  untied: out_proj on the raw residual stream (the chapter's head, e_tie=False,
    e_preln=False; equal to the `dense` setting of mqar_seeds.py);
  untied_ln: out_proj after the final LayerNorm (e_preln=True);
  tied: the embeddings as output weights, no final LayerNorm (e_tie=True);
  tied_ln: the first runs' head (e_tie=True, e_preln=True);
  untied_identity: untied_ln with the final norm's division by the RMS
    removed (its gain and bias kept): y = x g + b;
  untied_sg_rms: untied_ln with 1/rms held constant in the backward pass:
    y = x sg(1 / rms(x)) g + b, the same forward pass as untied_ln.
The last two replace `out_ln` with flax's method interception; tvq offers
neither.

Per run it also probes the residual stream entering the head (the last layer's
output) on a fixed batch: its mean norm per position, and that of its
embedding part, at steps 0, 5, .., 50 and every 25 steps to the end.

Writes --out (one row per run: first-logit spread, held-out accuracy and loss,
seconds) and --probe (one row per run and probed step).

    python experiments/output_head.py
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import mqar  # noqa: E402

import tvq  # noqa: E402
from tvq import train as tt  # noqa: E402
from tvq.layers import LayerNorm  # noqa: E402

HEADS = {
    "untied": dict(e_tie=False, e_preln=False),
    "untied_ln": dict(e_tie=False, e_preln=True),
    "tied": dict(e_tie=True, e_preln=False),
    "tied_ln": dict(e_tie=True, e_preln=True),
    "untied_identity": dict(e_tie=False, e_preln=True),
    "untied_sg_rms": dict(e_tie=False, e_preln=True),
}
FIELDS = ["head", "seed", "logit_std", "accuracy", "loss", "seconds"]
PROBE_FIELDS = ["head", "seed", "step", "residual_norm", "embedding_norm",
                "train_accuracy"]  # fmt: skip
PROBE_STEPS = [*range(0, 50, 5), *range(50, mqar.N_STEP + 1, 25)]


def final_norm(kind: str):
    """A method interceptor that replaces the final norm `out_ln`, or None."""
    if kind not in ("untied_identity", "untied_sg_rms"):
        return None

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, LayerNorm) and module.name == "out_ln"):
            return next_fun(*args, **kwargs)
        next_fun(*args, **kwargs)  # creates g and b at init
        x = args[0]
        g = module.get_variable("params", "g")
        b = module.get_variable("params", "b")
        if kind == "untied_identity":
            return x * g + b
        inv_rms = jax.lax.rsqrt(module.eps + jnp.mean(x * x, -1, keepdims=True))
        return x * jax.lax.stop_gradient(inv_rms) * g + b

    return intercept


def probe_fn(config):
    """jit(params, inputs) -> (mean residual norm, mean embedding norm, logit std)."""
    model = tvq.Transformer(config.replace(is_train=False))

    def probe(params, inputs):
        state = tvq.Transformer.initial_state(model.config, inputs.shape[0])
        out, inter = model.apply(
            {"params": params},
            inputs,
            state,
            capture_intermediates=lambda mdl, _: isinstance(mdl, tvq.TransformerLayer),
            mutable=["intermediates"],
        )
        last = f"layers_{config.n_layer - 1}"
        x = inter["intermediates"][last]["__call__"][0][0]  # [B, P, D]
        emb = jnp.take(params["embs"], inputs, axis=0)
        norm = lambda a: jnp.mean(jnp.linalg.norm(a, axis=-1))  # noqa: E731
        return norm(x), norm(emb), jnp.mean(jnp.std(out["logprobs"], axis=-1))

    return jax.jit(probe)


def one(head: str, seed: int, n_step: int):
    interceptor = final_norm(head)
    with nn.intercept_methods(interceptor) if interceptor else nullcontext():
        return _run(head, seed, n_step)


def _run(head: str, seed: int, n_step: int):
    config = mqar.make_config(
        n_step, mqar.TASK["seq_len"], attention="dense", **HEADS[head]
    )
    start = time.perf_counter()
    state = tt.init_train_state(config, jax.random.key(seed))
    data = mqar.mqar_batches(
        jax.random.key(10_000 + seed), n_step, n_vocab=config.n_vocab, **mqar.TASK
    )
    held_out = mqar.mqar_batches(
        jax.random.key(99_999), 4, n_vocab=config.n_vocab, **mqar.TASK
    )
    held_out = list(held_out)
    probe = probe_fn(config)
    inputs = jnp.asarray(held_out[0]["inputs"])
    # The training loop of tvq.train.train, with a probe between steps.
    mesh = tvq.make_data_mesh()
    step_fn = tt.make_train_step(config, mesh)
    state = tt.replicate(state, mesh)
    rng = jax.random.key(seed)
    probes, accuracies = [], []
    for i, batch in enumerate(data):
        if i in PROBE_STEPS:
            probes.append(_probe_row(head, seed, i, probe, state, inputs, accuracies))
        rng_batch = jax.random.key_data(jax.random.fold_in(rng, i))
        state, metrics = step_fn(
            state, tt.shard_batch(batch, mesh), tt.replicate(rng_batch, mesh)
        )
        accuracies.append(
            float(np.asarray(metrics["accuracy"].addressable_data(0))[-1])
        )
    if n_step in PROBE_STEPS:
        probes.append(_probe_row(head, seed, n_step, probe, state, inputs, accuracies))
    params = jax.device_get(state.params)
    result = tt.evaluate(config, params, held_out)
    row = dict(
        head=head,
        seed=seed,
        logit_std=probes[0]["logit_std"],
        accuracy=result["accuracy"],
        loss=result["loss"],
        seconds=time.perf_counter() - start,
    )
    print(row, flush=True)
    for p in probes:
        del p["logit_std"]
    return row, probes


def _probe_row(head, seed, step, probe, state, inputs, accuracies):
    params = jax.device_get(state.params)
    residual, embedding, logit_std = (float(a) for a in probe(params, inputs))
    since = PROBE_STEPS[max(PROBE_STEPS.index(step) - 1, 0)]
    recent = accuracies[since:step]
    return dict(
        head=head,
        seed=seed,
        step=step,
        residual_norm=residual,
        embedding_norm=embedding,
        train_accuracy=float(np.mean(recent)) if recent else "",
        logit_std=logit_std,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    parser.add_argument("--n-step", type=int, default=mqar.N_STEP)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="book/data/output_head.csv")
    parser.add_argument("--probe", default="book/data/output_head_probe.csv")
    a = parser.parse_args()
    start = time.perf_counter()
    jobs = [(h, seed, a.n_step) for h in a.heads for seed in a.seeds]
    spawn = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    with ProcessPoolExecutor(a.jobs, mp_context=spawn) as pool:
        results = list(pool.map(one, *zip(*jobs, strict=True)))
    for path, fields, rows in (
        (a.out, FIELDS, [r for r, _ in results]),
        (a.probe, PROBE_FIELDS, [p for _, ps in results for p in ps]),
    ):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
