"""Mixed precision, dtype="bfloat16": which products run in bf16, how close
the model stays to float32, and what stays float32 (the state, the codebook
and its EMA step).

bf16 keeps 8 significant bits: each product input is rounded by a relative
error of at most 2^-9, and the products sum in float32, so logits move by a
few 2^-9 of their size. The tolerances below are stated in those units.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flop_tally import matmul_flops_by_dtype
from test_layer_reference import jit, random_params, random_tokens, runner, small_config

import tvq
from tvq.flops import train_step_flops
from tvq.precision import einsum, product, transposed

BF16 = jnp.dtype("bfloat16")


def mixed_config(attention="vq", **overrides):
    """Two layers, d_model 32: big enough for rounding to average out."""
    kwargs = dict(attention=attention, pe_abs=True, d_model=32, d_k=8, d_v=16)
    kwargs = kwargs | dict(n_layer=2) | overrides
    n_code = 5 if attention == "vq" else None
    return small_config(4, 4, n_code, **kwargs)


def spec_for(tokens):
    return tvq.VQSpec(jnp.ones([1]), jnp.ones([1]), jnp.ones(tokens.shape))


@pytest.mark.parametrize("attention", ["vq", "dense", "dense_full"])
def test_every_product_is_bf16_but_codes_and_logits(attention):
    """In the gradient of the bf16 loss, the only float32 products are the
    nearest-code distances and the logits (full precision by design); all
    the others, projections and attention, forward and backward, are bf16."""
    config = mixed_config(attention, is_train=True).replace(dtype=BF16)
    params = random_params(config, seed=1)
    tokens = random_tokens(config, 2, 16, seed=2)
    state = tvq.Transformer.initial_state(config, 2, max_len=0)

    def loss(params):
        out = tvq.Transformer(config).apply(params, tokens, state, spec_for(tokens))
        return tvq.loss_fn(out, tokens, jnp.ones(tokens.shape), config)["loss"]

    by_dtype = matmul_flops_by_dtype(jax.grad(loss), params)
    n = tokens.size
    nearest = (
        2 * n * config.n_head * config.n_code * config.d_k if attention == "vq" else 0
    )
    f32 = 3 * 2 * n * config.d_model * config.n_vocab + 2 * config.n_layer * nearest
    assert by_dtype.pop("float32") == f32
    assert by_dtype.pop("bfloat16") == train_step_flops(config, 16, 2)["total"] - f32
    assert not by_dtype


@pytest.mark.parametrize(
    "attention, units",
    # dense: within 2^-8 on average, half the rounding of one input. VQ: a
    # key near the boundary of two codes can change code when its projection
    # is rounded, which moves that key's scores by more: within 2^-6.
    [("dense", 2**-8), ("dense_full", 2**-8), ("vq", 2**-6)],
)
def test_logprobs_close_to_float32(attention, units):
    config = mixed_config(attention)
    mixed = config.replace(dtype=BF16)
    for seed in range(3):
        params = random_params(config, seed=seed)
        tokens = random_tokens(config, 2, 32, seed=seed + 10)
        want = runner(config)(params, tokens, tvq.Transformer.initial_state(config, 2))
        got = runner(mixed)(params, tokens, tvq.Transformer.initial_state(mixed, 2))
        want, got = want["logprobs"], got["logprobs"]
        assert got.dtype == jnp.float32
        error = jnp.mean(jnp.abs(got - want))
        assert error <= units * jnp.mean(jnp.abs(want)), (seed, float(error))
        # And the rounding is really there.
        assert error > 2**-16 * jnp.mean(jnp.abs(want))


def test_codebook_ema_step_is_float32_exact():
    """One SGD(1) step on l_codebook of the bf16 model is the EMA of the keys
    and codes that model computed, to float32 round-off: the statistics and
    the codebook stay float32. The state, codebook and gradients are float32."""
    config = mixed_config("vq", is_train=True, n_layer=1)
    mixed = config.replace(dtype=BF16)
    params = random_params(config, seed=4)
    tokens = random_tokens(config, 2, 16, seed=5)
    state = tvq.Transformer.initial_state(mixed, 2)
    assert all(
        leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(state)
    )
    model = tvq.Transformer(mixed)

    @jit
    def step(params):
        def l_codebook(params):
            out, seen = model.apply(
                params,
                tokens,
                state,
                spec_for(tokens),
                capture_intermediates=True,
                mutable=["intermediates"],
            )
            return out["l_codebook"], (out, seen["intermediates"])

        return jax.grad(l_codebook, has_aux=True)(params)

    grads, (out, seen) = step(params)
    for leaf in jax.tree.leaves(out["attn_state"]):
        assert leaf.dtype in (jnp.float32, jnp.int32)
    for name in ("attn1", "attn2"):
        gau = seen["layers_0"][name]
        keys = np.asarray(gau["k_ln"]["__call__"][0], np.float64) * config.d_k**-0.25
        codes = np.asarray(gau["quantizer"]["__call__"][0]["shortcodes"])
        old = params["params"]["layers_0"][name]["quantizer"]
        g = grads["params"]["layers_0"][name]["quantizer"]
        assert g["c_sum"].dtype == g["c_count"].dtype == jnp.float32
        sums = np.zeros(old["c_sum"].shape)
        counts = np.zeros(old["c_count"].shape)
        for b, h, i in np.ndindex(*codes.shape):
            sums[h, codes[b, h, i]] += keys[b, h, i]
            counts[h, codes[b, h, i]] += 1
        scale = 1 / (16 // config.block_len)  # n_block_per_update / blocks
        gamma = config.c_gamma
        np.testing.assert_allclose(
            old["c_sum"] - g["c_sum"],
            gamma * np.asarray(old["c_sum"]) + (1 - gamma) * scale * sums,
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            old["c_count"] - g["c_count"],
            gamma * np.asarray(old["c_count"]) + (1 - gamma) * scale * counts,
            rtol=1e-6,
        )


@pytest.mark.parametrize("attention", ["vq", "dense"])
def test_decoding_and_carried_state_in_bf16(attention):
    """One token at a time (block_len 1, carried state) gives the block-wise
    forward's log-probabilities in bf16 too, to bf16 rounding: the state's
    float32 sums differ by round-off between the two orders, and rounding
    them to bf16 for a product can turn that into one bf16 ulp (2^-8)."""
    config = mixed_config(attention, n_layer=1).replace(dtype=BF16)
    params = random_params(config, seed=6)
    tokens = random_tokens(config, 2, 12, seed=7)
    want = runner(config)(params, tokens, tvq.Transformer.initial_state(config, 2))
    decoder = config.replace(block_len=1)
    state = tvq.Transformer.initial_state(decoder, 2, max_len=12)
    got = []
    for i in range(12):
        out = runner(decoder)(params, tokens[:, i : i + 1], state)
        state = out["attn_state"]
        got.append(out["logprobs"])
    got, want = jnp.concatenate(got, axis=1), want["logprobs"]
    assert jnp.mean(jnp.abs(got - want)) <= 2**-8 * jnp.mean(jnp.abs(want))


def test_huge_scores_stay_finite_in_bf16():
    config = mixed_config("vq", is_train=True).replace(dtype=BF16)
    params = jax.tree.map(np.array, random_params(config, seed=8))
    for layer in params["params"].values():
        if isinstance(layer, dict) and "attn1" in layer:
            for gau in layer.values():
                gau["u"] *= 1e4
    tokens = random_tokens(config, 2, 16, seed=9)
    state = tvq.Transformer.initial_state(config, 2)

    @jit
    def value_and_grad(params):
        def loss(params):
            out = tvq.Transformer(config).apply(params, tokens, state, spec_for(tokens))
            return tvq.loss_fn(out, tokens, jnp.ones(tokens.shape), config)["loss"]

        return jax.value_and_grad(loss)(params)

    for leaf in jax.tree.leaves(value_and_grad(jax.tree.map(jnp.asarray, params))):
        assert np.all(np.isfinite(leaf))


# ----------------------------------------------------------------------------
# The products themselves.


@pytest.mark.parametrize(
    "spec, a_shape, b_shape",
    [
        ("ld,ln->dn", (64, 8), (64, 12)),  # a weight gradient: laid out again
        ("bhtw,bhtv->bhwv", (2, 3, 16, 10), (2, 3, 16, 4)),
        ("bhtk,bhwk->bhtw", (2, 3, 16, 4), (2, 3, 10, 4)),  # already fast
        ("tk,kd->td", (16, 4), (4, 6)),
    ],
)
def test_bf16_products_equal_einsum_on_the_same_inputs(spec, a_shape, b_shape):
    """Whatever the layout, the same sums: equal (to float32 summation order)
    to jnp.einsum of the same bf16 inputs, forward and backward."""
    rng = np.random.default_rng(10)
    a = jnp.asarray(rng.standard_normal(a_shape), BF16)
    b = jnp.asarray(rng.standard_normal(b_shape), BF16)
    want = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(product(spec, a, b), want, rtol=1e-6, atol=1e-5)

    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    grads = jax.grad(
        lambda a, b: jnp.sum(cotangent * einsum(spec, a, b, BF16)), argnums=(0, 1)
    )(a.astype(jnp.float32), b.astype(jnp.float32))
    ct = cotangent.astype(BF16)  # the backward products take bf16 too
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    (spec_a, spec_b), spec_c = spec.split("->")[0].split(","), spec.split("->")[1]
    want_a = f32(f"{spec_c},{spec_b}->{spec_a}", ct, b).astype(BF16)
    want_b = f32(f"{spec_a},{spec_c}->{spec_b}", a, ct).astype(BF16)
    for got, w in zip(grads, (want_a, want_b), strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, w.astype(jnp.float32), rtol=1e-2, atol=1e-2)


def test_transposed_writes_the_axes_in_the_new_order():
    x = jnp.arange(2 * 6 * 8 * 3).reshape(2, 6, 8, 3)
    for target in ("adbc", "bcda", "cbad"):
        perm = ["abcd".index(i) for i in target]
        np.testing.assert_array_equal(
            transposed(x, "abcd", target), jnp.transpose(x, perm)
        )
