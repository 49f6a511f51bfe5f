"""tvq.Transformer: carried state, decoding, causality, stability, bf16, the
dense baselines against jax.nn.dot_product_attention, and bad input.

The quadratic-form reference and the gradient checks are in
test_layer_reference.py; this file reuses its builders.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_layer_reference import (
    gau_projections,
    jit,
    random_params,
    random_tokens,
    relative_bias,
    runner,
    small_config,
)

import tvq
import tvq.dense
from tvq.attention import update_state

F32 = jnp.float32


def spec_for(tokens, loss_mask=None):
    """VQSpec for one device and one block per update; loss_mask [B, P]
    defaults to all ones."""
    if loss_mask is None:
        loss_mask = jnp.ones(tokens.shape, jnp.int32)
    return tvq.VQSpec(jnp.array([1]), jnp.array([1]), jnp.asarray(loss_mask))


def tree_allclose(got, want, **tol):
    """assert_allclose leaf by leaf, with equal shapes and dtypes."""
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        err_msg = jax.tree_util.keystr(path)
        assert jnp.shape(g) == jnp.shape(w) and g.dtype == w.dtype, err_msg
        np.testing.assert_allclose(g, w, err_msg=err_msg, **tol)


# ----------------------------------------------------------------------------
# Carried state, decoding, causality.

STATE_CONFIGS = {
    "vq": dict(block_len=4, mem_len=4, n_code=5, pe_abs=True),
    "vq, no aggcache": dict(block_len=4, mem_len=6, n_code=3, agg_cache=False),
    "dense": dict(block_len=4, mem_len=4, n_code=None, attention="dense"),
    "dense_full": dict(block_len=4, mem_len=4, n_code=None, attention="dense_full"),
}


def state_config(name, **overrides):
    kw = dict(STATE_CONFIGS[name], **overrides)
    return small_config(kw.pop("block_len"), kw.pop("mem_len"), kw.pop("n_code"), **kw)


@pytest.mark.parametrize("name", list(STATE_CONFIGS))
def test_carried_state_equals_one_call(name):
    """P = 4T in one call == two halves == four calls of T, in float64:
    log-probabilities and the final state (dense: with a KV buffer of 4T)."""
    config = state_config(name, dtype="float64")
    params = random_params(config, seed=21)
    t = config.block_len
    tokens = random_tokens(config, 2, 4 * t, seed=22)
    run = runner(config)
    state = tvq.Transformer.initial_state(config, 2, max_len=4 * t)
    whole = run(params, tokens, state)
    for n_call in (2, 4):
        carried, logprobs = state, []
        for chunk in jnp.split(tokens, n_call, axis=1):
            out = run(params, chunk, carried)
            carried = out["attn_state"]
            logprobs.append(out["logprobs"])
        np.testing.assert_allclose(
            jnp.concatenate(logprobs, axis=1), whole["logprobs"], rtol=1e-12, atol=0
        )
        tree_allclose(carried, whole["attn_state"], rtol=1e-12, atol=1e-14)
    assert int(whole["attn_state"][0][1]["pos_offset"]) == 4 * t


@pytest.mark.parametrize("name", ["vq", "dense", "dense_full"])
def test_decoding_equals_block_forward(name):
    """block_len=1, same params and mem_len, one token at a time with the
    carried state == the block-wise forward (float32, 1e-5)."""
    config = state_config(name)
    decoder = config.replace(block_len=1)
    params = random_params(config, seed=23)
    length = 12
    tokens = random_tokens(config, 2, length, seed=24)
    want = runner(config)(params, tokens, tvq.Transformer.initial_state(config, 2))
    state = tvq.Transformer.initial_state(decoder, 2, max_len=length)
    step, got = runner(decoder), []
    for i in range(length):
        out = step(params, tokens[:, i : i + 1], state)
        state = out["attn_state"]
        got.append(out["logprobs"])
    np.testing.assert_allclose(
        jnp.concatenate(got, axis=1), want["logprobs"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", list(STATE_CONFIGS))
def test_causality(name):
    """Changing the tokens after position i changes no log-probability at <= i
    (also inside i's block), and changes the later ones."""
    config = state_config(name, dtype="float64")
    params = random_params(config, seed=25)
    tokens = random_tokens(config, 2, 16, seed=26)
    i = 9
    other = tokens.at[:, i + 1 :].set((tokens[:, i + 1 :] + 3) % config.n_vocab)
    run = runner(config)
    state = tvq.Transformer.initial_state(config, 2, max_len=16)
    a = run(params, tokens, state)["logprobs"]
    b = run(params, other, state)["logprobs"]
    np.testing.assert_allclose(a[:, : i + 1], b[:, : i + 1], rtol=1e-13, atol=0)
    assert np.all(np.abs(a[:, i + 1 :] - b[:, i + 1 :]).max(axis=-1) > 1e-6)


# ----------------------------------------------------------------------------
# Stability.


def stressed_params(config, params, kind):
    """Params that make scores about 1e4 times larger, or add a far code."""
    p = jax.tree.map(np.array, params)
    for layer in range(config.n_layer):
        for gau in p["params"][f"layers_{layer}"].values():
            qz = gau["quantizer"]
            if kind == "huge u":  # (q + u).k grows with u
                gau["u"] *= 1e4
            elif kind == "huge codebook":  # every k_hat grows
                qz["c_sum"] *= 1e4
            elif kind == "far unused code":  # |c_0| = 1e4, no key near it
                qz["c_sum"][:, 0] *= 1e4
    return jax.tree.map(jnp.asarray, p)


@functools.partial(jit, static_argnames="config")
def outputs_and_grads(config, params, tokens, loss_mask):
    """((loss, model outputs), gradients of the loss)."""
    spec = spec_for(tokens, loss_mask)
    state = tvq.Transformer.initial_state(config, tokens.shape[0])

    def loss(params):
        out = tvq.Transformer(config).apply(params, tokens, state, spec)
        return tvq.loss_fn(out, tokens, loss_mask, config)["loss"], out

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize(
    "kind", ["huge u", "huge codebook", "far unused code", "all rows masked"]
)
def test_extreme_scores_and_padding_stay_finite(kind):
    """No inf or NaN in log-probs, losses, metrics, state or gradients, in
    float32, with scores ~1e4, a far code, and loss_mask rows all zero."""
    config = small_config(4, 4, 5, is_train=True, pe_abs=True)
    params = stressed_params(config, random_params(config, seed=27), kind)
    tokens = random_tokens(config, 2, 16, seed=28)
    loss_mask = np.ones(tokens.shape, np.int32)
    loss_mask[1] = 0  # padding: a whole row
    if kind == "all rows masked":
        loss_mask[:] = 0
    (loss, out), grads = outputs_and_grads(config, params, tokens, loss_mask)
    for path, leaf in jax.tree_util.tree_leaves_with_path((loss, out, grads)):
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    # Still log-probabilities.
    np.testing.assert_allclose(
        jax.scipy.special.logsumexp(out["logprobs"], axis=-1), 0.0, atol=1e-5
    )
    if kind == "far unused code":  # in no GAU's cache or window
        for gau in out["attn_state"][0]:
            assert np.all(gau["aggcache"]["lower"][..., 0] == 0)
            assert np.all(gau["xlcache"]["z"] != 0)
    if kind == "all rows masked":
        # No statistics: one SGD(lr=1) step of l_codebook is the decay alone.
        qz = params["params"]["layers_0"]["attn1"]["quantizer"]
        gz = grads["params"]["layers_0"]["attn1"]["quantizer"]
        np.testing.assert_allclose(
            qz["c_count"] - gz["c_count"], config.c_gamma * qz["c_count"], rtol=1e-6
        )


def test_running_means_in_float32_at_64k_positions():
    """After 65,536 positions in blocks of 512, the float32 aggcache's counts
    are exact and its running means within 1e-5 (relative) of float64's."""
    length, t, s, dv = 65_536, 512, 8, 4
    rng = np.random.default_rng(29)
    z = rng.integers(0, s, [length // t, 1, 1, t]).astype(np.int32)
    v = rng.normal(1.0, 1.0, [length // t, 1, 1, t, dv])

    def final_state(dtype):
        state = tvq.initial_attention_state(1, 1, s, t, 2, dv, dtype)
        k_hat = jnp.zeros([1, 1, t, 2], dtype)

        def step(state, blk):
            return update_state(state, blk[0], k_hat, blk[1]), None

        return jax.jit(lambda: jax.lax.scan(step, state, (z, v.astype(dtype)))[0])()

    s32, s64 = final_state(jnp.float32), final_state(jnp.float64)
    assert s32["aggcache"]["upper_div_lower"].dtype == jnp.float32
    # All blocks but the last (still in the window) are folded in.
    folded_z, folded_v = z[:-1].reshape(-1), v[:-1].reshape(-1, dv)
    counts = np.bincount(folded_z, minlength=s)
    means = np.stack([folded_v[folded_z == c].mean(0) for c in range(s)])
    np.testing.assert_array_equal(s32["aggcache"]["lower"][0, 0], counts)
    np.testing.assert_allclose(s64["aggcache"]["upper_div_lower"][0, 0], means, 1e-12)
    np.testing.assert_allclose(
        s32["aggcache"]["upper_div_lower"], s64["aggcache"]["upper_div_lower"], 1e-5
    )


def test_bfloat16_keeps_codebook_and_cache_in_float32():
    """dtype="bfloat16": projections in bf16, but the state, the codebook and
    its gradients stay float32, and log-probs stay close to float32's."""
    config = small_config(4, 4, 5, is_train=True, pe_abs=True)
    bf16 = config.replace(dtype=jnp.dtype("bfloat16"))
    params = random_params(config, seed=30)
    tokens = random_tokens(config, 2, 16, seed=31)
    spec = spec_for(tokens)
    state = tvq.Transformer.initial_state(bf16, 2)
    for leaf in jax.tree.leaves(state):
        assert leaf.dtype in (jnp.float32, jnp.int32)

    def codebook_loss(params):
        out = tvq.Transformer(bf16).apply(params, tokens, state, spec)
        return out["l_codebook"], out

    grads, out = jit(jax.grad(codebook_loss, has_aux=True))(params)
    for leaf in jax.tree.leaves(out["attn_state"]):
        assert leaf.dtype in (jnp.float32, jnp.int32)
    for name in ("attn1", "attn2"):
        g = grads["params"]["layers_0"][name]["quantizer"]
        assert g["c_sum"].dtype == g["c_count"].dtype == jnp.float32
        assert np.all(np.isfinite(g["c_sum"])) and np.any(g["c_sum"] != 0)
    want = runner(config)(params, tokens, state, spec)["logprobs"]
    assert out["logprobs"].dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: agreement to about 1e-1 in log-prob.
    np.testing.assert_allclose(out["logprobs"], want, atol=0.15)
    assert not np.array_equal(out["logprobs"], want)


# ----------------------------------------------------------------------------
# The dense baseline.


@pytest.mark.parametrize("attention", ["dense", "dense_full"])
def test_dense_equals_dot_product_attention(attention):
    """attention="dense" (blockwise) and "dense_full" inside a GAU ==
    jax.nn.dot_product_attention on the GAU's q + u, k, v with the relative
    terms as bias and a causal mask. Float32: dot_product_attention takes its
    softmax in float32 anyway."""
    config = small_config(4, 3, None, attention=attention, d_v=4)
    params = random_params(config, seed=32)["params"]["layers_0"]["attn1"]
    b, length = 2, 12
    x = jnp.asarray(np.random.default_rng(33).standard_normal([b, length, 8]), F32)
    empty = tvq.layers.gau_initial_state(config, b)
    buffer = tvq.layers.gau_initial_state(config, b, max_len=length)
    if attention == "dense":
        attend = functools.partial(tvq.dense.dense_attention, block_len=4, chunk_len=3)
    else:
        attend = tvq.dense.dense_full_attention

    def heads_last(a):  # [B, H, L, X] -> [B, L, H, X]
        return jnp.transpose(a, (0, 2, 1, 3))

    @jit
    def compare(params, x):
        q, k, v, g, u, vb, r = gau_projections(params, x, config)
        bias = relative_bias(q + vb, r, length)
        causal = jnp.tril(jnp.ones([length, length], bool))[None, None]
        want = jax.nn.dot_product_attention(
            heads_last(q + u), heads_last(k), heads_last(v), bias, causal, scale=1.0
        )  # [B, L, H, V]
        got, _ = attend(q + u, k, v, empty, mem_len=config.mem_len, q_pos=q + vb, r=r)
        res_want = (want.reshape(b, length, -1) * g) @ params["res_proj"]["kernel"]
        res = [
            tvq.GAU(config).apply({"params": params}, x, state, spec_for(x[..., 0]))
            for state in (empty, buffer)
        ]
        return want, heads_last(got), res_want, [out["res"] for _, out in res]

    want, got, res_want, res = compare(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for r in res:  # without and with a KV buffer
        np.testing.assert_allclose(r, res_want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Bad input: each error a ValueError naming what was expected and what came.


def bad_case(name):
    """(config, params, tokens, state, spec) with one thing wrong."""
    config = small_config(4, 4, 5, is_train=True)
    params = random_params(config, seed=34)
    tokens = random_tokens(config, 2, 8, seed=35)
    state = tvq.Transformer.initial_state(config, 2)
    spec = spec_for(tokens)
    if name == "P not a multiple of block_len":
        tokens = tokens[:, :6]
        spec = spec_for(tokens)
    elif name == "tokens not integers":
        tokens = tokens.astype(jnp.float32)
    elif name == "tokens not [B, P]":
        tokens = tokens[0]
    elif name == "state for another batch size":
        state = tvq.Transformer.initial_state(config, 3)
    elif name == "state for another mem_len":
        state = tvq.Transformer.initial_state(config.replace(mem_len=8), 2)
    elif name == "state for another n_code":
        state = tvq.Transformer.initial_state(config.replace(n_code=6), 2)
    elif name == "state for dense attention":
        dense = config.replace(attention="dense")
        state = tvq.Transformer.initial_state(dense, 2, max_len=8)
    elif name == "state of another dtype":
        state = jax.tree.map(
            lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state
        )
    elif name == "mem_len < 0":
        config = config.replace(mem_len=-1)
    elif name == "block_len 0":
        config = config.replace(block_len=0)
    elif name == "config without n_vocab":
        config = config.replace(n_vocab=None)
    elif name == "config without n_code":
        config = config.replace(n_code=None)
    elif name == "vq_spec None while training":
        spec = None
    elif name == "loss_mask of another shape":
        spec = spec_for(tokens[:, :4])
    else:
        raise AssertionError(name)
    return config, params, tokens, state, spec


BAD_CASES = {
    "P not a multiple of block_len": r"block_len=4 must divide L=6 \(inputs shape"
    r" \[2, 6\]\)",
    "tokens not integers": r"inputs must have an integer dtype, got float32",
    "tokens not [B, P]": r"inputs must have shape \[B, P\] \(2 dims\), got shape \[8\]",
    "state for another batch size": r"state\[0\]\[0\]\['aggcache'\]\['lower'\] must"
    r" have shape \[2, 2, 5\] .*got shape \[3, 2, 5\]",
    "state for another mem_len": r"\['xlcache'\]\['k_hat'\] must have shape"
    r" \[2, 2, 4, 4\] .*got shape \[2, 2, 8, 4\]",
    "state for another n_code": r"\['aggcache'\]\['lower'\] must have shape"
    r" \[2, 2, 5\] .*got shape \[2, 2, 6\]",
    "state for dense attention": r"state must have the structure",
    "state of another dtype": r"must have dtype float32, got float64",
    "mem_len < 0": r"config.mem_len must be >= 0, got -1",
    "block_len 0": r"config.block_len must be > 0, got 0",
    "config without n_vocab": r"needs config.n_vocab, got None",
    "config without n_code": r"needs config.n_code, got None",
    "vq_spec None while training": r"vq_spec is needed when config.is_train",
    "loss_mask of another shape": r"vq_spec.loss_mask must have shape \[B=2, P=8\]"
    r" .*got shape \[2, 4\]",
}


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_raises_value_error(name, mode):
    config, params, tokens, state, spec = bad_case(name)

    def apply(params, tokens, state, spec):
        return tvq.Transformer(config).apply(params, tokens, state, spec)

    if mode == "jit":
        apply = jax.jit(apply)
    with pytest.raises(ValueError, match=BAD_CASES[name]):
        apply(params, tokens, state, spec)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(mem_len=-1), r"config.mem_len must be >= 0, got -1"),
        (dict(d_k=None), r"needs config.d_k, got None"),
        (dict(attention="linear"), r"config.attention must be one of .*'linear'"),
    ],
)
def test_initial_state_rejects_bad_config(overrides, match):
    config = small_config(4, 4, 5).replace(**overrides)
    with pytest.raises(ValueError, match=match):
        tvq.Transformer.initial_state(config, 2)


def test_initial_attention_state_rejects_negative_mem_len():
    with pytest.raises(ValueError, match=r"mem_len must be an int >= 0, got -2"):
        tvq.initial_attention_state(1, 1, 4, -2, 2, 2)
