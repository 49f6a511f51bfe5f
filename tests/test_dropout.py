"""Dropout: each site's rate, rng collection and shape, and none in evaluation.

The reference has four dropout sites: the embeddings (p_dropemb, rng
collection "ephemeral"), the relative-position sinusoids of each GAU
(p_dropsin, "timeless"), the residual of each GAU (p_dropres, "ephemeral")
and LayerDrop of each GAU's residual (p_droplyr, "timeless", one draw per
sequence). Training draws "ephemeral" afresh for every update window and
"timeless" once per batch; `train` gives batch i the key fold_in(rng, i).

Every `nn.Dropout` call is recorded (input and output) with a method
interceptor, so each site is checked on what it did: kept entries are the
input over 1 - p, dropped ones are 0, the kept fraction is 1 - p within five
standard deviations, and the mask moves with its own collection only.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
from tiny_model import init_params, random_mask, random_tokens, tiny_config, vq_spec

import tvq
from tvq import train as tt

# Distinct rates, so a site using another site's rate shows in its scale.
RATES = dict(p_dropemb=0.1, p_dropsin=0.2, p_dropres=0.3, p_droplyr=0.45)
# Site name -> (rate field, rng collection, one draw per sequence).
SITES = {
    "dropemb": ("p_dropemb", "ephemeral", False),
    "dropsin": ("p_dropsin", "timeless", False),
    "dropres": ("p_dropres", "ephemeral", False),
    "droplyr1": ("p_droplyr", "timeless", True),
    "droplyr2": ("p_droplyr", "timeless", True),
}
B, L = 16, 8


def expected_sites(n_layer: int) -> set:
    names = {"dropemb"}
    for i in range(n_layer):
        names |= {f"layers_{i}/droplyr1", f"layers_{i}/droplyr2"}
        for gau in ("attn1", "attn2"):
            names |= {f"layers_{i}/{gau}/dropsin", f"layers_{i}/{gau}/dropres"}
    return names


def site_kind(name: str):
    return SITES[name.rsplit("/", 1)[-1]]


@functools.cache
def setup(**overrides):
    config = tiny_config(**{**RATES, **overrides})
    params = init_params(config)
    tokens = random_tokens(0, (B, L), config.n_vocab)
    mask = random_mask(1, (B, L))
    return config, params, tokens, mask


def dropout_calls(config, params, tokens, mask, rngs):
    """(logprobs, {site path: (input, output)}) of one forward."""
    calls = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and context.method_name == (
            "__call__"
        ):
            name = "/".join(context.module.path)
            assert name not in calls, f"{name} called twice"
            calls[name] = (args[0], out)
        return out

    state = tvq.Transformer.initial_state(config, *tokens.shape)
    with nn.intercept_methods(record):
        out = tvq.Transformer(config).apply(
            {"params": params}, tokens, state, vq_spec(mask), rngs=rngs
        )
    return out["logprobs"], calls


@functools.partial(jax.jit, static_argnames="config")
def train_calls(config, params, tokens, mask, seed_ephemeral, seed_timeless):
    rngs = dict(
        ephemeral=jax.random.key(seed_ephemeral),
        timeless=jax.random.key(seed_timeless),
    )
    return dropout_calls(config, params, tokens, mask, rngs)


def decisions(calls) -> dict:
    """Site -> bool array of its own keep decisions.

    Elementwise sites: output != 0 (their zero inputs, sin 0, are fixed).
    LayerDrop: one per sequence, whether any entry survived (its input, the
    residual after dropres, has zeros that move with the ephemeral key).
    """
    out = {}
    for name, (_, y) in calls.items():
        kept = np.asarray(y) != 0
        out[name] = kept.any(axis=(1, 2)) if site_kind(name)[2] else kept
    return out


def test_every_site_drops_at_its_rate_with_the_right_scale():
    config, params, tokens, mask = setup()
    kept = {}  # rate field -> [n kept, n nonzero inputs]
    for seed in range(6):
        _, calls = train_calls(config, params, tokens, mask, seed, 100 + seed)
        assert set(calls) == expected_sites(config.n_layer)
        for name, (x, y) in calls.items():
            field = site_kind(name)[0]
            p = getattr(config, field)
            x, y = np.asarray(x), np.asarray(y)
            nonzero = x != 0
            drop = (y == 0) & nonzero
            keep = nonzero & ~drop
            np.testing.assert_allclose(
                y[keep], x[keep] / (1 - p), rtol=1e-12, err_msg=name
            )
            counts = kept.setdefault(field, np.zeros(2))
            if site_kind(name)[2]:  # one draw per sequence
                counts += [np.sum(keep.any(axis=(1, 2))), x.shape[0]]
            else:
                counts += [np.sum(keep), np.sum(nonzero)]
    assert set(kept) == set(RATES)
    for field, (n_kept, n) in kept.items():
        p = RATES[field]
        sd = np.sqrt(p * (1 - p) / n)
        assert abs(n_kept / n - (1 - p)) < 5 * sd, (field, n_kept / n, 1 - p, n)


def test_each_site_draws_from_its_rng_collection():
    """A new "ephemeral" key changes the ephemeral masks only; a new
    "timeless" key the timeless ones only."""
    config, params, tokens, mask = setup()
    base = decisions(train_calls(config, params, tokens, mask, 0, 100)[1])
    new_eph = decisions(train_calls(config, params, tokens, mask, 1, 100)[1])
    new_tml = decisions(train_calls(config, params, tokens, mask, 0, 101)[1])
    for name, m in base.items():
        collection = site_kind(name)[1]
        same_eph = np.array_equal(m, new_eph[name])
        same_tml = np.array_equal(m, new_tml[name])
        assert (same_eph, same_tml) == (
            collection == "timeless",
            collection == "ephemeral",
        ), name


def test_layerdrop_is_one_draw_per_sequence():
    config, params, tokens, mask = setup()
    _, calls = train_calls(config, params, tokens, mask, 0, 7)
    drawn = decisions(calls)
    for name, (x, y) in calls.items():
        if not site_kind(name)[2]:
            continue
        x, y = np.asarray(x), np.asarray(y)  # [B, P, D]
        per_seq = drawn[name][:, None, None]
        # A kept sequence keeps every entry; a dropped one loses every entry.
        np.testing.assert_array_equal(y != 0, per_seq & (x != 0), err_msg=name)
        assert np.mean(x != 0) > 0.5, name  # most entries could show a drop
        # Sequences draw independently: some kept, some dropped.
        assert 0 < per_seq.sum() < B, name
    # The two LayerDrops of a layer draw separately.
    assert not np.array_equal(drawn["layers_0/droplyr1"], drawn["layers_0/droplyr2"])


@functools.partial(jax.jit, static_argnames="config")
def eval_logprobs(config, params, tokens):
    state = tvq.Transformer.initial_state(config, *tokens.shape)
    return tvq.Transformer(config).apply({"params": params}, tokens, state)["logprobs"]


def test_evaluation_does_not_drop():
    config, params, tokens, mask = setup()
    want = np.asarray(eval_logprobs(tiny_config(is_train=False), params, tokens))
    eval_config = config.replace(is_train=False)
    np.testing.assert_allclose(
        eval_logprobs(eval_config, params, tokens), want, rtol=1e-12
    )
    # Not even when a caller passes dropout keys.
    got, calls = train_calls(eval_config, params, tokens, mask, 0, 1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert set(calls) == expected_sites(config.n_layer)
    for name, (x, y) in calls.items():
        np.testing.assert_array_equal(y, x, err_msg=name)
    # While training with the same keys does change the output.
    train_out, _ = train_calls(config, params, tokens, mask, 0, 1)
    assert np.max(np.abs(np.asarray(train_out) - want)) > 1e-3


def test_evaluate_and_generate_ignore_dropout_of_a_training_config():
    config, params, tokens, mask = setup()
    plain = tiny_config()
    batch = dict(inputs=tokens, targets=np.roll(tokens, -1, 1), loss_mask=mask)
    mesh = tvq.make_data_mesh(1)
    got = tt.evaluate(config, params, [batch], mesh=mesh)
    logprobs = np.asarray(eval_logprobs(plain.replace(is_train=False), params, tokens))
    nll = -np.take_along_axis(logprobs, batch["targets"][..., None], -1)[..., 0]
    # evaluate sums in float32.
    np.testing.assert_allclose(got["loss"], np.sum(mask * nll) / mask.sum(), rtol=1e-6)
    assert got["n_counted"] == int(mask.sum())
    prompt = tokens[:2, :5]
    run = functools.partial(
        tvq.generate, params=params, prompt=prompt, max_new_tokens=6,
        rng=jax.random.key(3), p_nucleus=0.9,
    )  # fmt: skip
    np.testing.assert_array_equal(run(config), run(plain.replace(is_train=False)))


# ------------------------------------------------ randomness of a train step

# Each query sees only itself (no window, no cache, no absolute positions), so
# an update window's loss does not depend on the windows before it; with the
# parameters frozen, two equal windows differ only by their dropout masks.
ISOLATED = dict(
    mem_len=0, agg_cache=False, pe_abs=False, lr_max=0.0, wd_lam=0.0, c_gamma=1.0
)
TIMELESS_ONLY = dict(p_droplyr=0.3)
EPHEMERAL_ONLY = dict(p_dropemb=0.2, p_dropres=0.3)


@functools.cache
def isolated(**rates):
    """(config, train state, jitted train step) of a frozen isolated model."""
    config = tiny_config(**ISOLATED, **rates)
    # Dropout has no parameters: every rate setting shares one initial state.
    state = tt.init_train_state(tiny_config(**ISOLATED), jax.random.key(0))
    tx = tt.make_optimizer(config)
    return config, state, jax.jit(functools.partial(tt.train_step, config, tx))


def equal_windows_batch(n_vocab, seed=0):
    """A [8, 16] batch whose two update windows of 8 are the same."""
    half = random_tokens(seed, (8, 8), n_vocab)
    inputs = np.concatenate([half, half], axis=1)
    mask = np.tile(random_mask(seed + 1, (8, 8)), (1, 2))
    return dict(inputs=inputs, targets=np.roll(inputs, -1, 1), loss_mask=mask)


def window_losses(rates, seed):
    """[2] losses of the two equal windows of one batch, batch key `seed`."""
    config, state, step = isolated(**rates)
    batch = equal_windows_batch(config.n_vocab)
    return np.asarray(step(state, batch, jax.random.key(seed))[1]["loss"])


def test_timeless_is_drawn_once_per_batch():
    losses = [window_losses(TIMELESS_ONLY, seed) for seed in (5, 6)]
    # The same LayerDrop in both windows of a batch (this also shows that
    # the windows are isolated) ...
    for pair in losses:
        np.testing.assert_allclose(pair[1], pair[0], rtol=1e-12)
    # ... and a new one for another batch key: the dropout is on.
    assert abs(losses[0][0] - losses[1][0]) > 1e-6


def test_ephemeral_is_redrawn_for_every_window():
    losses = window_losses(EPHEMERAL_ONLY, 5)
    assert abs(losses[1] - losses[0]) > 1e-6


def test_train_gives_batch_i_the_key_fold_in_rng_i():
    config, state, step = isolated(**TIMELESS_ONLY)
    batch = equal_windows_batch(config.n_vocab, 1)
    rng = jax.random.key(9)
    mesh = tvq.make_data_mesh(1)
    _, hist = tt.train(config, state, [batch] * 3, rng=rng, mesh=mesh, progress=False)
    want = [step(state, batch, jax.random.fold_in(rng, i))[1]["loss"] for i in range(3)]
    np.testing.assert_allclose(hist["loss"], np.concatenate(want), rtol=1e-10)
    # Equal batches, frozen parameters: only the keys make the losses differ.
    assert len(np.unique(np.round(hist["loss"][::2], 8))) == 3
