"""How stale is the attention state that training carries across updates?

`tvq.train.train_step` takes one optimizer step per update window and hands
the attention state (window and per-code cache) to the next window. That state
was computed by the parameters before the step, and the next window reads it
with the parameters after it: its shortcodes were chosen by an older codebook,
its counts and means filed under codewords the EMA has since moved, its keys
and values made by older projections.

This script trains the training chapter's VQ model (experiments/mqar.py) in
two regimes. "trained": first as the chapter does, --n-step optimizer steps
on MQAR sequences of 16 tokens, one update window each (the state is never
carried), then --n-carry more steps as below. "scratch": --n-step steps as
below from the start. Below means: on MQAR sequences of 32 tokens (4 pairs,
then 4 queries spread over the other 24 positions) in two update windows of
16, two optimizer steps per batch, the state of the first window carried
into the second. The queries of the second window find their pairs only
through that state, most of them only through its per-code cache (its window
holds 8 positions), which the first phase of "trained" taught the model to
read (the chapter's section on the cache). Before each second window it
compares the carried (stale) state with the state the current parameters
compute from the same first window (fresh):

  code_mismatch: the fraction of carried positions (cache and window) filed
    under another code than the current parameters choose, summed over GAUs,
    heads and the batch (half the L1 distance of the code histograms);
  mean_mismatch: the count-weighted relative difference of the cache's
    per-code mean values;
  codeword_drift: how far the last update moved the codewords the cache
    holds, count-weighted, relative to their length;
  loss_stale, loss_fresh, acc_stale, acc_fresh: loss and accuracy at the
    second window's answers with either state (n_answers of them);
  answer_tv: the mean total-variation distance between the two predicted
    distributions at the answers.

The loop is `tvq.train.train_step` written out window by window (checked
against it on a batch of two windows). Writes --out, one row per regime, seed
and batch of 32 tokens; first_accuracy is the held-out accuracy after the
first phase of "trained", on 16-token sequences (empty for "scratch").

    python experiments/stale_state.py
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).parent))
import mqar  # noqa: E402

import tvq  # noqa: E402
from tvq import train as tt  # noqa: E402

N_WINDOW = 2  # update windows per sequence
WINDOW = mqar.TASK["seq_len"]  # 16 tokens, the chapter's sequence length
TASK = dict(mqar.TASK, seq_len=N_WINDOW * WINDOW)
REGIMES = ("trained", "scratch")
FIELDS = ["regime", "seed", "first_accuracy", "step", "window", "n_answers",
          "code_mismatch", "mean_mismatch", "codeword_drift", "loss_stale",
          "loss_fresh", "acc_stale", "acc_fresh", "answer_tv"]  # fmt: skip


def batches(rng, n_batch: int, config):
    """MQAR batches of N_WINDOW * WINDOW tokens, distances dropped."""
    for batch in mqar.mqar_batches(rng, n_batch, n_vocab=config.n_vocab, **TASK):
        yield {k: v for k, v in batch.items() if k != "distance"}


def make_steps(config):
    """jit functions: one training window, and a forward pass from a state."""
    tx = tt.make_optimizer(config)
    model = tvq.Transformer(config)
    evaluator = tvq.Transformer(config.replace(is_train=False))

    @jax.jit
    def window_step(train_state, attn_state, window):
        spec = tt.window_spec(config, window["codebook_mask"])

        def loss(params):
            out = model.apply({"params": params}, window["inputs"], attn_state, spec)
            terms = tvq.loss_fn(out, window["targets"], window["loss_mask"], config)
            return terms["loss"], out["attn_state"]

        grads, new_attn_state = jax.grad(loss, has_aux=True)(train_state.params)
        updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
        new_train_state = tt.TrainState(
            step=train_state.step + 1,
            params=optax.apply_updates(train_state.params, updates),
            opt_state=opt_state,
        )
        return new_train_state, jax.tree.map(jax.lax.stop_gradient, new_attn_state)

    @jax.jit
    def forward(params, inputs, attn_state):
        out = evaluator.apply({"params": params}, inputs, attn_state)
        return out["logprobs"], out["attn_state"]

    return tx, window_step, forward


def answers(logprobs, window):
    """(mean nll, accuracy, [N, V] probabilities) at the window's answers."""
    lp = np.asarray(logprobs, np.float64)
    mask = window["loss_mask"] != 0
    nll = -np.take_along_axis(lp, window["targets"][..., None], -1)[..., 0]
    right = lp.argmax(-1) == window["targets"]
    return nll[mask].mean(), right[mask].mean(), np.exp(lp[mask])


def gau_states(state):
    """The GAU states of a model state, in order."""
    return [gau for layer in state for gau in layer]


def mismatch(stale, fresh, n_code):
    """(code mismatch, mean mismatch) between two model states."""
    moved = total = mean_diff = mean_size = 0.0
    for st, fr in zip(gau_states(stale), gau_states(fresh), strict=True):
        n_st = np.asarray(st["aggcache"]["lower"], np.float64)
        n_fr = np.asarray(fr["aggcache"]["lower"], np.float64)
        moved += 0.5 * np.abs(n_st - n_fr).sum()
        total += n_fr.sum()
        z_st, z_fr = np.asarray(st["xlcache"]["z"]), np.asarray(fr["xlcache"]["z"])
        filled = z_fr < n_code
        moved += np.sum(filled & (z_st != z_fr))
        total += filled.sum()
        m_st = np.asarray(st["aggcache"]["upper_div_lower"], np.float64)
        m_fr = np.asarray(fr["aggcache"]["upper_div_lower"], np.float64)
        both = np.minimum(n_st, n_fr)[..., None]
        mean_diff += np.sum(both * np.abs(m_st - m_fr))
        mean_size += np.sum(both * np.abs(m_fr))
    return moved / total, mean_diff / max(mean_size, 1e-30)


def codebooks(params):
    """[G, H, S, K] codebooks of every GAU, in parameter order."""
    layers = [params[k] for k in sorted(params) if k.startswith("layers_")]
    return np.stack(
        [
            np.asarray(
                tvq.codebook_from_stats(
                    layer[gau]["quantizer"]["c_sum"], layer[gau]["quantizer"]["c_count"]
                )
            )
            for layer in layers
            for gau in ("attn1", "attn2")
        ]
    )


def codeword_drift(before, after, stale):
    """Count-weighted |C_after - C_before| / |C_before| of the cached codes."""
    counts = np.stack(
        [np.asarray(g["aggcache"]["lower"]).sum(0) for g in gau_states(stale)]
    )  # [G, H, S]
    moved = np.linalg.norm(after - before, axis=-1)
    size = np.linalg.norm(before, axis=-1)
    return float(np.sum(counts * moved) / np.sum(counts * size))


def check_against_train_step(config, tx, window_step, start, batch):
    """The window loop equals tvq.train.train_step on one batch."""
    want, _ = jax.jit(lambda s, b: tt.train_step(config, tx, s, b, jax.random.key(0)))(
        start, batch
    )
    state = start
    attn = tvq.Transformer.initial_state(config, TASK["batch_size"])
    u = config.update_len
    for w in range(N_WINDOW):
        window = {k: v[:, w * u : (w + 1) * u] for k, v in batch.items()}
        state, attn = window_step(state, attn, window)
    gap = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(want.params), strict=True
        )
    )
    # Round-off differs between the two compiled programs, and Adam turns a
    # difference in a near-zero gradient into up to lr_max; allow a tenth.
    if gap > 0.1 * config.lr_max:
        raise AssertionError(f"window loop differs from train_step by {gap}")


def one(regime: str, seed: int, n_step: int, n_carry: int):
    if regime == "scratch":
        n_step, n_carry = 0, n_step
    u = WINDOW
    config = mqar.make_config(n_step + n_carry, TASK["seq_len"], update_len=u)
    tx, window_step, forward = make_steps(config)
    state = tt.init_train_state(config, jax.random.key(seed))
    data = list(batches(jax.random.key(20_000 + seed), n_carry // N_WINDOW, config))
    check_against_train_step(config, tx, window_step, state, data[0])
    b = TASK["batch_size"]
    # First phase: the chapter's training, one window per sequence.
    first = mqar.mqar_batches(
        jax.random.key(10_000 + seed), n_step, n_vocab=config.n_vocab, **mqar.TASK
    )
    for batch in first:
        window = {k: v for k, v in batch.items() if k != "distance"}
        fresh_state = tvq.Transformer.initial_state(config, b)
        state, _ = window_step(state, fresh_state, window)
    held_out = mqar.mqar_batches(
        jax.random.key(99_999), 4, n_vocab=config.n_vocab, **mqar.TASK
    )
    first_accuracy = (
        tt.evaluate(config, state.params, held_out)["accuracy"] if n_step else ""
    )
    # Second phase: two windows per sequence, the state carried.
    rows = []
    for batch in data:
        attn = tvq.Transformer.initial_state(config, b)
        before = codebooks(state.params)
        for w in range(N_WINDOW):
            window = {k: v[:, w * u : (w + 1) * u] for k, v in batch.items()}
            if w > 0 and window["loss_mask"].any():
                now = codebooks(state.params)
                init = tvq.Transformer.initial_state(config, b)
                _, fresh = forward(state.params, batch["inputs"][:, : w * u], init)
                lp_stale, _ = forward(state.params, window["inputs"], attn)
                lp_fresh, _ = forward(state.params, window["inputs"], fresh)
                loss_s, acc_s, p_s = answers(lp_stale, window)
                loss_f, acc_f, p_f = answers(lp_fresh, window)
                codes, means = mismatch(attn, fresh, config.n_code)
                rows.append(
                    dict(
                        regime=regime,
                        seed=seed,
                        first_accuracy=first_accuracy,
                        step=int(state.step),
                        window=w,
                        n_answers=int(np.sum(window["loss_mask"] != 0)),
                        code_mismatch=codes,
                        mean_mismatch=means,
                        codeword_drift=codeword_drift(before, now, attn),
                        loss_stale=loss_s,
                        loss_fresh=loss_f,
                        acc_stale=acc_s,
                        acc_fresh=acc_f,
                        answer_tv=0.5 * np.abs(p_s - p_f).sum(-1).mean(),
                    )
                )
                before = now
            state, attn = window_step(state, attn, window)
    print(f"{regime}, seed {seed}: {len(rows)} rows; last {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-step", type=int, default=mqar.N_STEP)
    parser.add_argument("--n-carry", type=int, default=200)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="book/data/stale_state.csv")
    a = parser.parse_args()
    start = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    with ProcessPoolExecutor(a.jobs, mp_context=spawn) as pool:
        jobs = [(r, seed, a.n_step, a.n_carry) for r in a.regimes for seed in a.seeds]
        results = list(pool.map(one, *zip(*jobs, strict=True)))
    with open(a.out, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(r for rows in results for r in rows)
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
