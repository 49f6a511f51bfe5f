"""Learning-rate schedules at every step, and what the optimizer does with them.

Closed forms (the reference's launch script): a linear warm-up t / W for
t < W = n_warmup_step, then, with s = min(t - W, D) / D and
D = n_max_step - W, "cosine" 0.1 + 0.45 (1 + cos(pi s)), "linear" 1 - 0.9 s,
"constant" 1. AdamW under a constant gradient g moves every parameter by
-lr_max * schedule(t) * g / (|g| + eps) at step t, so the parameter path
recovers the schedule the optimizer really applies. Decoupled weight decay
p <- (1 - wd_lam) p acts on every leaf that is not 1-D (scalars included), is
scaled neither by the learning rate nor by the schedule, and leaves the
codebook statistics alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_config

from tvq import train as tt


def closed_form(kind: str, t: int, n_warm: int, n_max: int) -> float:
    if t < n_warm:
        return t / n_warm
    s = min(t - n_warm, n_max - n_warm) / (n_max - n_warm)
    return {
        "cosine": 0.1 + 0.45 * (1 + math.cos(math.pi * s)),
        "linear": 1 - 0.9 * s,
        "constant": 1.0,
    }[kind]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("n_warm, n_max", [(0, 7), (1, 6), (4, 13)])
def test_every_step_of_every_schedule(kind, n_warm, n_max):
    config = tiny_config(lr_schedule=kind, n_warmup_step=n_warm, n_max_step=n_max)
    schedule = tt.lr_schedule(config)
    steps = np.arange(n_max + 4)
    got = np.array([float(schedule(t)) for t in steps])
    want = np.array([closed_form(kind, int(t), n_warm, n_max) for t in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The schedule runs also on a traced step (the jitted train step).
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), got, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_adamw_moves_by_lr_max_times_the_schedule(kind):
    n_warm, n_max, lr_max = 2, 7, 0.03
    config = tiny_config(
        lr_schedule=kind, n_warmup_step=n_warm, n_max_step=n_max, lr_max=lr_max,
        wd_lam=0.0, grad_clip=None,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.zeros(3)}
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    tx = tt.make_optimizer(config)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(n_max + 3):
        updates, opt_state = update(grads, opt_state, params)
        for name in params:
            g = np.asarray(grads[name])
            lr = lr_max * closed_form(kind, t, n_warm, n_max)
            want = -lr * g / (np.abs(g) + 1e-9)
            np.testing.assert_allclose(
                updates[name], want, rtol=1e-6, atol=1e-12, err_msg=f"{name} {t}"
            )
        params = jax.tree.map(lambda p, u: p + u, params, updates)


def test_weight_decay_on_every_leaf_but_vectors_and_codebook():
    """Zero gradients: only the decay moves parameters, at step 0 too, where
    the warm-up makes the learning rate 0."""
    wd = 0.05
    config = tiny_config(wd_lam=wd, n_warmup_step=3, grad_clip=1.0)
    rng = np.random.default_rng(1)
    params = {
        "embs": rng.normal(size=(5, 4)),
        "bias_out": rng.normal(size=5),
        "pe_scale": np.asarray(rng.normal()),
        "layers_0": {
            "attn1": {
                "kernel": rng.normal(size=(4, 4)),
                "u": rng.normal(size=4),
                "quantizer": {
                    "c_sum": rng.normal(size=(2, 3, 4)),
                    "c_count": rng.uniform(1, 2, size=(2, 3)),
                },
            }
        },
    }
    params = jax.tree.map(jnp.asarray, params)
    tx = tt.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for (path, got), p in zip(
        jax.tree_util.tree_leaves_with_path(updates),
        jax.tree.leaves(params),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        codebook = "c_sum" in name or "c_count" in name
        decayed = p.ndim != 1 and not codebook
        want = -wd * np.asarray(p) if decayed else np.zeros(p.shape)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=name)
