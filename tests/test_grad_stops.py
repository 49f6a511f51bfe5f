"""Where gradients stop: grad_thru_cache, within one call and across calls.

With grad_thru_cache false the reference stops the gradient of the state
passed from block to block (its attention runs one block per scan step), so
a block's output has no gradient with respect to any earlier block's keys and
values, whether they sit in the window or in the cache, while the block's own
keys and values (the present part of its window) pass gradient as usual. With
it true both reach the earlier blocks. Across calls the returned state
carries no gradient either.

Checked on one GAU by differentiating a fixed linear function of the outputs
of the last block with respect to every input position, and on the whole
model by comparing the gradient through a carried state with the gradient
where the state is a constant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import init_params, random_mask, random_tokens, tiny_config, vq_spec

import tvq
from tvq.layers import GAU, gau_initial_state
from tvq.model import loss_fn

B, T, D = 2, 4, 16


@functools.cache
def gau_input_gradient(grad_thru_cache: bool, agg_cache: bool = True) -> np.ndarray:
    """[B, 3T] norm of d(w . res of the last position) / d x at each position.

    Three blocks of T with mem_len T: the last block's window holds block 1,
    the cache block 0.
    """
    config = tiny_config(
        grad_thru_cache=grad_thru_cache, agg_cache=agg_cache, mem_len=T,
        block_len=T, is_train=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, 3 * T, D)))
    w = jnp.asarray(rng.normal(size=(B, D)))
    spec = vq_spec(jnp.ones((B, 3 * T), jnp.int32))
    state = gau_initial_state(config, B)
    gau = GAU(config)
    params = gau.init(jax.random.key(0), x, state, spec)

    def last_output(x):
        _, out = gau.apply(params, x, state, spec)
        return jnp.sum(w * out["res"][:, -1])

    grad = jax.jit(jax.grad(last_output))(x)
    return np.linalg.norm(np.asarray(grad), axis=-1)


@pytest.mark.parametrize("agg_cache", [True, False])
def test_without_grad_thru_cache_no_gradient_reaches_earlier_blocks(agg_cache):
    norms = gau_input_gradient(False, agg_cache)
    # Blocks 0 (cache) and 1 (window): exactly nothing.
    np.testing.assert_array_equal(norms[:, : 2 * T], 0.0)
    # The last block's own positions: gradient through its keys and values.
    assert np.min(norms[:, 2 * T :]) > 1e-6


def test_with_grad_thru_cache_gradient_reaches_window_and_cache():
    norms = gau_input_gradient(True)
    assert np.min(norms[:, T : 2 * T]) > 1e-6  # window: keys and values
    assert np.min(norms[:, :T]) > 1e-6  # cache: values through the means
    # The last block itself is the same either way.
    np.testing.assert_allclose(
        norms[:, 2 * T :], gau_input_gradient(False)[:, 2 * T :], rtol=1e-10
    )


@functools.partial(jax.jit, static_argnames="config")
def second_call_grads(config, params, first, second, mask):
    """Gradients of call 2's loss after call 1: through call 1's state, and
    with that state held constant."""

    def loss(params, stop):
        model = tvq.Transformer(config)
        state = tvq.Transformer.initial_state(config, B, 4 * T)
        spec = vq_spec(mask)
        state = model.apply({"params": params}, first, state, spec)["attn_state"]
        if stop:
            state = jax.lax.stop_gradient(state)
        out = model.apply({"params": params}, second, state, spec)
        return loss_fn(out, jnp.roll(second, -1, 1), mask, config)["loss"]

    return jax.grad(loss)(params, False), jax.grad(loss)(params, True)


@pytest.mark.parametrize("attention", ["vq", "dense"])
@pytest.mark.parametrize("thru", [False, True])
def test_state_returned_by_a_call_carries_no_gradient(attention, thru):
    """Loss of call 2 after call 1: with grad_thru_cache false its gradient
    equals the gradient with call 1's state held constant; with true not."""
    config = tiny_config(
        attention=attention, grad_thru_cache=thru, n_layer=1,
        n_code=None if attention == "dense" else 5,
    )  # fmt: skip
    params = init_params(config)
    tokens = jnp.asarray(random_tokens(0, (B, 4 * T), config.n_vocab))
    mask = jnp.asarray(random_mask(1, (B, 2 * T)))
    carried, constant = second_call_grads(
        config, params, tokens[:, : 2 * T], tokens[:, 2 * T :], mask
    )
    pairs = zip(jax.tree.leaves(carried), jax.tree.leaves(constant), strict=True)
    diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    if thru:
        assert diff > 1e-6
    else:
        assert diff == 0.0
