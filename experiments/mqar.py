"""Shared setup of the MQAR experiments: the model, the data and one training run.

`run(seed, **overrides)` trains one model on fresh MQAR batches with
`tvq.train.train` and evaluates it on held-out batches; the experiment scripts
in this folder call it once per setting and seed and write a CSV.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import tvq
from tvq import train as tt
from tvq.data import MQAR_STATIC_ARGNAMES, mqar_batch

# The chapter's model and task (book/training.ipynb). The output head is
# the reference's enwik8 one: an untied projection, no final LayerNorm.
MODEL = dict(
    n_vocab=32, d_model=64, d_k=32, d_v=64, n_head=2, n_code=64, n_layer=1,
    block_len=8, mem_len=8, agg_cache=True, grad_thru_cache=True, pe_abs=False,
    pe_lam=10_000, c_beta=1e-4, c_gamma=0.99, e_tie=False, e_preln=False,
    e_scale=1.0, p_dropemb=0.0, p_dropsin=0.0, p_dropres=0.0, p_droplyr=0.0,
    is_train=True, attention="vq", grad_clip=None, optimizer="adamw",
    lr_max=1e-2, lr_schedule="cosine", wd_lam=0.0, n_warmup_step=0,
)  # fmt: skip
TASK = dict(seq_len=16, n_pairs=4, batch_size=32)
N_STEP = 300
make_batch = jax.jit(mqar_batch, static_argnames=MQAR_STATIC_ARGNAMES)


def mqar_batches(rng, n_batch: int, *, n_vocab: int, **task):
    """n_batch MQAR batches (NumPy) whose keys all update the codebook."""
    for i in range(n_batch):
        batch = make_batch(jax.random.fold_in(rng, i), n_vocab=n_vocab, **task)
        batch = {k: np.asarray(v) for k, v in batch.items()}
        batch["codebook_mask"] = np.ones_like(batch["loss_mask"])
        yield batch


def make_config(n_step: int, seq_len: int, **overrides) -> tvq.TransformerConfig:
    """The chapter's model for n_step batches of seq_len tokens, one window each."""
    kwargs = dict(MODEL, sequence_len=seq_len, update_len=seq_len, n_max_step=n_step)
    return tvq.TransformerConfig.create(**{**kwargs, **overrides})


def run(seed: int, n_step: int, task: dict | None = None, **overrides) -> dict:
    """Train for n_step batches from seed: held-out accuracy, loss, health, history."""
    task = {**TASK, **(task or {})}
    config = make_config(n_step, task["seq_len"], **overrides)
    start = time.perf_counter()
    state = tt.init_train_state(config, jax.random.key(seed))
    data = mqar_batches(
        jax.random.key(10_000 + seed), n_step, n_vocab=config.n_vocab, **task
    )
    state, hist = tt.train(
        config, state, data, rng=jax.random.key(seed), n_batch=n_step, progress=False
    )
    held_out = list(
        mqar_batches(jax.random.key(99_999), 4, n_vocab=config.n_vocab, **task)
    )
    result = tt.evaluate(config, state.params, held_out)
    result["seconds"] = time.perf_counter() - start
    if config.attention == "vq":
        counts = tt.code_counts(state.params)
        result["codes_used"] = float(np.mean(np.sum(counts >= 1.0, axis=-1)))
        for k in ("c_entropy", "relative_err_mean"):
            result[k] = float(hist[k][-1])
    result["history"] = hist
    return result
