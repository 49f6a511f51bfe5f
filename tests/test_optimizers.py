"""Adafactor and Lion in `tvq.train.make_optimizer`, against NumPy from the papers.

Adafactor (Shazeer and Stern, 2018, Algorithms 4 and 5): second moments of
matrices whose two largest axes both have at least 128 entries kept as row
and column means, V = R C^T / mean(R); decay 1 - t^-0.8; the update G / sqrt(V)
clipped to RMS 1, scaled by max(1e-3, RMS(parameter)) and the learning rate.
Lion (Chen et al., 2023): the sign of b1 m + (1 - b1) g, then m <- b2 m +
(1 - b2) g, with m stored in bfloat16 (and its products with b1 and b2
rounded to bfloat16, as optax computes them). Around both, as around AdamW in
tests/test_train.py: global-norm clipping, the schedule, decoupled decay off
1-D leaves, SGD(1) for the codebook statistics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

import tvq
from tvq import train as tt

SMALL = dict(
    n_vocab=11, d_model=8, d_k=4, d_v=8, n_head=2, n_code=6, n_layer=1,
    block_len=4, mem_len=4, sequence_len=16, update_len=8, agg_cache=True,
    grad_thru_cache=True, pe_abs=False, pe_lam=10_000, c_beta=1e-2, c_gamma=0.9,
    e_tie=False, e_preln=False, e_scale=1.0, p_dropemb=0.0, p_dropsin=0.0,
    p_dropres=0.0, p_droplyr=0.0, is_train=True, grad_clip=1.0, optimizer="adamw",
    lr_max=1e-2, lr_schedule="cosine", wd_lam=1e-3, n_warmup_step=3, n_max_step=20,
)  # fmt: skip


def small_config(**overrides) -> tvq.TransformerConfig:
    return tvq.TransformerConfig.create(**{**SMALL, **overrides})


def leaves_by_path(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def toy_problem(seed: int):
    """Params with a factored matrix (130 x 140), small ones, and codebook leaves."""
    rng = np.random.default_rng(seed)
    params = {
        "big": {"kernel": rng.normal(size=(130, 140))},
        "w": {"kernel": rng.normal(size=(3, 2)), "b": rng.normal(size=3)},
        "quantizer": {"c_sum": rng.normal(size=(2, 3, 2)), "c_count": np.ones((2, 3))},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = [
        jax.tree.map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
        )
        for _ in range(3)
    ]
    return params, grads


def cosine(t, n_max=6):
    """The schedule with no warm-up: cosine from 1 to 0.1 over n_max steps."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, n_max) / n_max))


def run_optax(config, params, grads):
    tx = tt.make_optimizer(config)
    opt_state = tx.init(params)
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    return leaves_by_path(params)


def clip_factor(g: dict, grad_clip: float) -> float:
    norm = math.sqrt(
        sum(np.sum(g[k].astype(np.float64) ** 2) for k in g if "c_" not in k)
    )
    return min(1.0, grad_clip / norm)


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def test_adafactor_matches_the_paper():
    config = small_config(
        optimizer="adafactor", grad_clip=0.5, lr_max=0.05, wd_lam=0.01,
        n_warmup_step=0, n_max_step=6,
    )  # fmt: skip
    params, grads = toy_problem(0)
    got = run_optax(config, params, grads)
    p = {k: v.astype(np.float64) for k, v in leaves_by_path(params).items()}
    row, col, second = {}, {}, {}
    for t, g in enumerate(grads, start=1):
        g = {k: v.astype(np.float64) for k, v in leaves_by_path(g).items()}
        clip = clip_factor(g, 0.5)
        beta = 1.0 - t**-0.8
        for k in p:
            if "c_" in k:
                p[k] = p[k] - g[k]
                continue
            gk = g[k] * clip
            sq = gk**2 + 1e-30
            if min(gk.shape, default=0) >= 128:
                row[k] = beta * row.get(k, 0.0) + (1 - beta) * sq.mean(axis=1)
                col[k] = beta * col.get(k, 0.0) + (1 - beta) * sq.mean(axis=0)
                v = np.outer(row[k], col[k]) / row[k].mean()
            else:
                second[k] = beta * second.get(k, 0.0) + (1 - beta) * sq
                v = second[k]
            u = gk / np.sqrt(v)
            u = u / max(1.0, rms(u))
            step = -0.05 * max(1e-3, rms(p[k])) * u * cosine(t - 1)
            if p[k].ndim != 1:
                step = step - 0.01 * p[k]
            p[k] = p[k] + step
    assert any(k.startswith("['big']") for k in row)  # the factored path ran
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=2e-5, atol=2e-6, err_msg=k)


def bf16_product(scalar: float, m) -> np.ndarray:
    """scalar * m rounded to bfloat16 (the moment's dtype), as float32."""
    return (
        (np.float32(scalar) * m.astype(np.float32))
        .astype(ml_dtypes.bfloat16)
        .astype(np.float32)
    )


def test_lion_matches_the_paper():
    config = small_config(
        optimizer="lion", grad_clip=0.5, lr_max=0.01, wd_lam=0.01,
        n_warmup_step=0, n_max_step=6,
    )  # fmt: skip
    params, grads = toy_problem(1)
    got = run_optax(config, params, grads)
    p = {k: v.astype(np.float64) for k, v in leaves_by_path(params).items()}
    m = {k: np.zeros(v.shape, ml_dtypes.bfloat16) for k, v in p.items()}
    # Where b1 m + (1 - b1) g is within bfloat16 round-off of 0, its sign
    # depends on the order of roundings: those entries are not compared.
    unsure = {k: np.zeros(v.shape, bool) for k, v in p.items()}
    for t, g in enumerate(grads, start=1):
        g = {k: v.astype(np.float64) for k, v in leaves_by_path(g).items()}
        clip = clip_factor(g, 0.5)
        for k in p:
            if "c_" in k:
                p[k] = p[k] - g[k]
                continue
            gk = (g[k] * clip).astype(np.float32)
            c = 0.05 * gk + bf16_product(0.95, m[k])
            unsure[k] |= np.abs(c) < 1e-2 * np.abs(bf16_product(0.95, m[k]))
            step = -0.01 * np.sign(c) * cosine(t - 1)
            m[k] = (0.02 * gk + bf16_product(0.98, m[k])).astype(ml_dtypes.bfloat16)
            if p[k].ndim != 1:
                step = step - 0.01 * p[k]
            p[k] = p[k] + step
    n_unsure = sum(int(u.sum()) for u in unsure.values())
    assert n_unsure < 1e-2 * sum(u.size for u in unsure.values())
    for k in p:
        sure = ~unsure[k]
        np.testing.assert_allclose(
            got[k][sure], p[k][sure], rtol=1e-5, atol=1e-6, err_msg=k
        )


def test_every_optimizer_trains_the_model():
    """One train_step per optimizer runs and changes the parameters."""
    for name in tt.OPTIMIZERS:
        config = small_config(optimizer=name)
        state = tt.init_train_state(config, jax.random.key(0))
        rng = np.random.default_rng(0)
        inputs = rng.integers(0, 11, size=(8, 16), dtype=np.int32)
        batch = dict(inputs=inputs, targets=inputs, loss_mask=np.ones_like(inputs))
        new, metrics = tt.train_step(
            config, tt.make_optimizer(config), state, batch, jax.random.key(1)
        )
        assert np.isfinite(np.asarray(metrics["loss"])).all(), name
        moved = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(
                jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True
            )
        )
        assert moved > 1e-4, name
