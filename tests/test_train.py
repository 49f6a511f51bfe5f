"""tvq.train: optimizer, truncated backprop through time, data parallelism, eval.

References are computed independently: AdamW and the schedule in NumPy from
their formulas, the EMA from the captured keys with brute-force nearest codes,
the truncated gradient by differentiating one window with a frozen state.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import brute_ema, brute_nearest

import tvq
from tvq import train as tt
from tvq.model import Transformer, loss_fn

SMALL = dict(
    n_vocab=11, d_model=8, d_k=4, d_v=8, n_head=2, n_code=6, n_layer=1,
    block_len=4, mem_len=4, sequence_len=16, update_len=8, agg_cache=True,
    grad_thru_cache=True, pe_abs=False, pe_lam=10_000, c_beta=1e-2, c_gamma=0.9,
    e_tie=True, e_preln=True, e_scale=1.0, p_dropemb=0.0, p_dropsin=0.0,
    p_dropres=0.0, p_droplyr=0.0, is_train=True, grad_clip=1.0, optimizer="adamw",
    lr_max=1e-2, lr_schedule="cosine", wd_lam=1e-3, n_warmup_step=3, n_max_step=20,
)  # fmt: skip


def small_config(**overrides) -> tvq.TransformerConfig:
    return tvq.TransformerConfig.create(**{**SMALL, **overrides})


def random_batch(seed, b=8, length=16, n_vocab=11):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, n_vocab, size=(b, length), dtype=np.int32)
    return dict(
        inputs=inputs,
        targets=np.roll(inputs, -1, axis=1),
        loss_mask=(rng.uniform(size=(b, length)) > 0.3).astype(np.int32),
        codebook_mask=(rng.uniform(size=(b, length)) > 0.2).astype(np.int32),
    )


def leaves_by_path(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def max_abs_diff(a, b) -> float:
    a, b = leaves_by_path(a), leaves_by_path(b)
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ---------------------------------------------------------------- optimizer


def test_schedule_is_warmup_then_cosine_to_a_tenth():
    config = small_config(n_warmup_step=4, n_max_step=14)
    sched = tt.lr_schedule(config)
    for t in range(4):
        np.testing.assert_allclose(sched(t), t / 4, atol=1e-7)
    for t in range(4, 15):
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 10))
        np.testing.assert_allclose(sched(t), want, atol=1e-6)
    np.testing.assert_allclose(sched(100), 0.1, atol=1e-7)
    lin = tt.lr_schedule(config.replace(lr_schedule="linear"))
    np.testing.assert_allclose(lin(9), 1 - 0.9 * 5 / 10, atol=1e-6)


def test_optimizer_matches_adamw_by_hand():
    """Two steps on a toy tree: clip, AdamW, schedule, decay only off 1-D leaves."""
    config = small_config(
        grad_clip=0.5, lr_max=0.1, wd_lam=0.01, n_warmup_step=1, n_max_step=5
    )
    rng = np.random.default_rng(0)
    params = {
        "w": {"kernel": rng.normal(size=(3, 2)), "b": rng.normal(size=3)},
        "quantizer": {"c_sum": rng.normal(size=(2, 3, 2)), "c_count": np.ones((2, 3))},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = [
        jax.tree.map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
        )
        for _ in range(2)
    ]
    tx = tt.make_optimizer(config)
    opt_state = tx.init(params)
    p = {k: np.asarray(v, np.float64) for k, v in leaves_by_path(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    sched = [0.0, 1.0]  # warm-up from 0, then the cosine's first value
    for t, g in enumerate(grads):
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        g = leaves_by_path(g)
        main = [k for k in g if "c_" not in k]
        norm = math.sqrt(sum(np.sum(g[k].astype(np.float64) ** 2) for k in main))
        clip = min(1.0, 0.5 / norm)
        for k in g:
            if "c_" in k:  # SGD with learning rate 1
                p[k] = p[k] - g[k]
                continue
            gk = g[k] * clip
            m[k] = 0.9 * m[k] + 0.1 * gk
            v2[k] = 0.98 * v2[k] + 0.02 * gk**2
            mhat, vhat = m[k] / (1 - 0.9 ** (t + 1)), v2[k] / (1 - 0.98 ** (t + 1))
            step = -0.1 * mhat / (np.sqrt(vhat) + 1e-9) * sched[t]
            if p[k].ndim != 1:
                step = step - 0.01 * p[k]
            p[k] = p[k] + step
        got = leaves_by_path(params)
        for k in p:
            np.testing.assert_allclose(got[k], p[k], rtol=1e-5, atol=1e-6, err_msg=k)


def captured_keys(config, params, inputs, state):
    """[G] list of each GAU's keys [B, H, P, K], from the k_ln outputs."""
    apply = functools.partial(
        Transformer(config).apply,
        capture_intermediates=lambda mdl, _: mdl.name == "k_ln",
        mutable=["intermediates"],
    )
    _, inter = jax.jit(apply)({"params": params}, inputs, state, None)
    keys = []
    for layer in range(config.n_layer):
        for attn in ("attn1", "attn2"):
            found = inter["intermediates"][f"layers_{layer}"][attn]["k_ln"]
            keys.append(np.asarray(found["__call__"][0]) * config.d_k**-0.25)
    return keys


def test_codebook_after_a_step_is_the_ema_of_the_window():
    """One window of 2 blocks: c_sum, c_count move to the EMA over codebook_mask."""
    config = small_config(sequence_len=8, update_len=8, n_layer=2)
    state = tt.init_train_state(config, jax.random.key(0))
    batch = random_batch(1, length=8)
    new, _ = tt.train_step(
        config, tt.make_optimizer(config), state, batch, jax.random.key(1)
    )
    init_state = Transformer.initial_state(config, 8)
    keys = captured_keys(
        config.replace(is_train=False), state.params, batch["inputs"], init_state
    )
    g = 0
    for layer in range(config.n_layer):
        for attn in ("attn1", "attn2"):
            q_old = state.params[f"layers_{layer}"][attn]["quantizer"]
            q_new = new.params[f"layers_{layer}"][attn]["quantizer"]
            codebook = (
                np.asarray(q_old["c_sum"]) / np.asarray(q_old["c_count"])[..., None]
            )
            codes, _ = brute_nearest(keys[g], codebook)
            want_sum, want_count = brute_ema(
                keys[g], codes, q_old["c_sum"], q_old["c_count"], config.c_gamma,
                batch["codebook_mask"],
            )  # fmt: skip
            np.testing.assert_allclose(q_new["c_sum"], want_sum, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(q_new["c_count"], want_count, rtol=1e-6)
            g += 1
    # The masks differ, so the loss mask alone would give other counts.
    assert not np.array_equal(batch["loss_mask"], batch["codebook_mask"])


# ------------------------------------------------------ truncated backprop


def frozen_config(**overrides):
    """No parameter moves: lr 0, no decay, c_gamma 1 (the EMA keeps c_sum, c_count)."""
    return small_config(lr_max=0.0, wd_lam=0.0, c_gamma=1.0, **overrides)


@functools.partial(jax.jit, static_argnames="config")
def window_loss(config, params, window, state):
    """Training loss of one window, and the state after it."""
    spec = tt.window_spec(config, jnp.asarray(window["codebook_mask"]))
    out = Transformer(config).apply({"params": params}, window["inputs"], state, spec)
    terms = loss_fn(out, window["targets"], window["loss_mask"], config)
    return terms["loss"], out["attn_state"]


def split_windows(batch, u):
    return [{k: v[:, i : i + u] for k, v in batch.items()} for i in (0, u)]


@pytest.mark.parametrize("attention", ["vq", "dense"])
def test_state_is_carried_from_window_to_window(attention):
    config = frozen_config(attention=attention)
    state = tt.init_train_state(config, jax.random.key(0))
    tx = tt.make_optimizer(config)
    batch = random_batch(2)
    changed = dict(batch, inputs=batch["inputs"].copy())
    changed["inputs"][:, :8] = (changed["inputs"][:, :8] + 1) % config.n_vocab
    step = jax.jit(functools.partial(tt.train_step, config, tx))  # one compile
    losses = [step(state, b, jax.random.key(0))[1]["loss"] for b in (batch, changed)]
    # Frozen parameters: the second window differs only through the state.
    assert abs(float(losses[0][1] - losses[1][1])) > 1e-4
    # And it is the loss of window 2 after window 1's state, computed by hand.
    first, second = split_windows(batch, 8)
    init = Transformer.initial_state(config, 8, 16)
    loss1, state1 = window_loss(config, state.params, first, init)
    loss2, _ = window_loss(config, state.params, second, state1)
    np.testing.assert_allclose(losses[0], [loss1, loss2], rtol=1e-5)
    loss2_fresh, _ = window_loss(config, state.params, second, init)
    assert abs(float(loss2_fresh - loss2)) > 1e-4


def test_no_gradient_crosses_a_window_boundary():
    """With SGD(1) the second update is minus the gradient of window 2 alone."""
    config = small_config()
    tx = optax.sgd(1.0)
    state = tt.init_train_state(config, jax.random.key(0))
    state = state.replace(opt_state=tx.init(state.params))
    batch = random_batch(3)
    first, second = split_windows(batch, 8)
    after1, _ = tt.train_step(
        config.replace(sequence_len=8), tx, state, first, jax.random.key(0)
    )
    after2, _ = tt.train_step(config, tx, state, batch, jax.random.key(0))
    got = jax.tree.map(lambda a, b: a - b, after1.params, after2.params)

    init = Transformer.initial_state(config, 8, 16)
    _, state1 = window_loss(config, state.params, first, init)

    def truncated(p):
        return window_loss(config, p, second, jax.lax.stop_gradient(state1))[0]

    def through(p):
        _, s1 = window_loss(config, p, first, init)
        return window_loss(config, p, second, s1)[0]

    want = jax.grad(truncated)(after1.params)
    assert max_abs_diff(got, want) < 1e-5
    # Differentiating through the carried state would give another gradient.
    assert max_abs_diff(jax.grad(through)(after1.params), want) > 1e-3


# ---------------------------------------------------------- data parallel


def run_steps(config, mesh, batches, start, seed=0):
    state = tt.replicate(jax.tree.map(np.array, start), mesh)  # a fresh copy
    step = tt.make_train_step(config, mesh)
    rng = tt.replicate(jax.random.key_data(jax.random.key(seed)), mesh)
    for batch in batches:
        state, _ = step(state, tt.shard_batch(batch, mesh), rng)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)


@pytest.mark.parametrize("attention", ["vq", "dense"])
def test_eight_devices_give_the_one_device_step(attention):
    config = small_config(attention=attention)
    batches = [random_batch(s, b=16) for s in range(3)]
    start = tt.init_train_state(config, jax.random.key(0))
    one = run_steps(config, tvq.make_data_mesh(1), batches, start)
    eight = run_steps(config, tvq.make_data_mesh(8), batches, start)
    assert jax.tree.leaves(one)[0].dtype == np.float32
    err = max_abs_diff(one, eight)
    print(f"{attention}: max |params 8 devices - 1 device| after 6 steps = {err:.2e}")
    assert err < 1e-5
    # The steps moved the parameters far more than that.
    assert max_abs_diff(one, start.params) > 1e-3


# ------------------------------------------------------ training and eval


def test_train_learns_and_records_every_step(capsys):
    """Targets are a fixed token: the loss falls; one history row per window."""
    config = small_config(n_max_step=40, n_warmup_step=2, lr_max=3e-2)
    batches = []
    for s in range(20):
        b = random_batch(s)
        batches.append(dict(b, targets=np.full_like(b["targets"], 5)))
    state = tt.init_train_state(config, jax.random.key(0))
    state, hist = tt.train(
        config, state, iter(batches), rng=jax.random.key(0), n_batch=20
    )
    assert "train" in capsys.readouterr().out  # the progress bar, on stdout
    np.testing.assert_array_equal(hist["step"], np.arange(40))
    assert int(state.step.addressable_data(0)) == 40
    for k in ("loss", "l_lm", "l_commit", "l_codebook", "c_entropy", "c_dead"):
        assert hist[k].shape == (40,), k
    assert hist["relative_err_mean"].shape == (40,)
    assert hist["loss"][-5:].mean() < 0.2 * hist["loss"][:5].mean()
    assert hist["accuracy"][-5:].min() == 1.0
    assert np.all(hist["c_entropy"] <= math.log(config.n_code) + 1e-6)
    np.testing.assert_allclose(hist["lr_scale"][:3], [0.0, 0.5, 1.0], atol=1e-6)


def test_evaluate_is_the_mean_over_counted_positions():
    config = small_config()
    params = tt.init_train_state(config, jax.random.key(0)).params
    batches = [random_batch(s) for s in (5, 6)]
    got = tt.evaluate(config, params, batches)
    eval_config = config.replace(is_train=False)
    apply = jax.jit(Transformer(eval_config).apply)
    nll, right, n = 0.0, 0, 0
    for b in batches:
        state = Transformer.initial_state(eval_config, 8, 16)
        out = apply({"params": params}, b["inputs"], state)
        lp = np.asarray(out["logprobs"], np.float64)
        for i, t in zip(*np.nonzero(b["loss_mask"]), strict=True):
            nll -= lp[i, t, b["targets"][i, t]]
            right += int(np.argmax(lp[i, t]) == b["targets"][i, t])
            n += 1
    assert got["n_counted"] == n
    np.testing.assert_allclose(got["loss"], nll / n, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], right / n)
    one = tt.evaluate(config, params, batches, mesh=tvq.make_data_mesh(1))
    np.testing.assert_allclose(one["loss"], got["loss"], rtol=1e-5)


def test_code_counts_stacks_every_gau():
    config = small_config(n_layer=2)
    params = tt.init_train_state(config, jax.random.key(0)).params
    counts = tt.code_counts(params)
    assert counts.shape == (4, 2, 6)
    np.testing.assert_array_equal(
        counts[3], params["layers_1"]["attn2"]["quantizer"]["c_count"]
    )
    dense = tt.init_train_state(small_config(attention="dense"), jax.random.key(0))
    with pytest.raises(ValueError, match="no c_count"):
        tt.code_counts(dense.params)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lr_max=None), "needs config.lr_max, got None"),
        (
            dict(optimizer="sgd"),
            "optimizer must be one of ('adamw', 'adafactor', 'lion'), got 'sgd'",
        ),
        (dict(lr_schedule="step"), "lr_schedule must be one of"),
        (dict(n_warmup_step=30), "n_warmup_step=30, n_max_step=20"),
        (dict(update_len=6), "update_len=6 must be a positive multiple of block_len=4"),
        (dict(update_len=12), "divides sequence_len=16"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tt.make_optimizer(small_config(**overrides))


def test_bad_batch():
    config = small_config()
    state = tt.init_train_state(config, jax.random.key(0))
    tx = tt.make_optimizer(config)
    batch = random_batch(0)
    with pytest.raises(ValueError, match="batch needs key 'targets'"):
        tt.train_step(config, tx, state, {"inputs": batch["inputs"]}, jax.random.key(0))
    short = {k: v[:, :8] for k, v in batch.items()}
    with pytest.raises(
        ValueError,
        match=re.escape("must have shape [B, L=16] (2 dims), got shape [8, 8]"),
    ):
        tt.train_step(config, tx, state, short, jax.random.key(0))
    odd = {k: v[:6] for k, v in batch.items()}
    with pytest.raises(ValueError, match="B=6 .* divisible by the 8 devices"):
        tt.shard_batch(odd, tvq.make_data_mesh(8))
