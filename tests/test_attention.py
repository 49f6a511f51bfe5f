"""vq_attention equals causal softmax attention over the quantized keys.

Forward: dense attention over k_hat = c_z, whatever the window (mem_len) when
the aggcache is on; a sliding window of M + 1 positions when it is off.
Backward: keys get their straight-through gradient where a query sees them
exactly (its block and the M positions before it) and none through the
aggcache; the codebook gets none.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.attention import (
    blockwise_attention,
    initial_attention_state,
    vq_attention,
    vq_attention_flops,
)
from tvq.vq import get_codewords, get_shortcodes, sg

F32 = jnp.float32
# Tiny shapes: compile time dominates, and XLA's CPU backend compiles about
# twice as fast without LLVM optimizations.
jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0)
)
vq = jit(vq_attention, static_argnames=("block_len", "mem_len", "agg_cache"))


def make_inputs(seed, b, h, length, d_k, d_v, n_code, dtype=F32, q_scale=1.0):
    """Standard normal q (times q_scale), k, v and codebook."""
    rng = np.random.default_rng(seed)
    shapes = [(b, h, length, d_k)] * 2 + [(b, h, length, d_v), (h, n_code, d_k)]
    q, k, v, codebook = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
    return q_scale * q, k, v, codebook


def dense_attention(q, k, v, codebook, window=None):
    """softmax(q k_hat^T + causal mask) v, the L x L way; with a window, only
    keys at distance <= window count."""
    k_hat = get_codewords(get_shortcodes(k, codebook)[0], codebook)
    scores = jnp.einsum("bhik,bhjk->bhij", q, k_hat)
    length = q.shape[2]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    keep = (j <= i) & (window is None or (i - j <= window))
    weights = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhij,bhjv->bhiv", weights, v)


dense = jit(dense_attention, static_argnames="window")


def quadratic_st(q, k, v, codebook, block_len, mem_len, window=None):
    """The L x L form with vq_attention's gradients: k_hat = sg(c_z) + k - sg(k)
    where query i sees key j exactly (j >= start of i's block - M), the constant
    sg(c_z) further back (the aggcache); with a window, only keys at distance
    <= window count."""
    codebook = sg(codebook)
    z = get_shortcodes(sg(k), codebook)[0]
    c_z = sg(get_codewords(z, codebook))
    length = q.shape[2]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    exact = j >= (i // block_len) * block_len - mem_len
    scores = jnp.where(
        exact,
        jnp.einsum("bhik,bhjk->bhij", q, c_z + k - sg(k)),
        jnp.einsum("bhik,bhjk->bhij", q, c_z),
    )
    keep = (j <= i) & (window is None or (i - j <= window))
    weights = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhij,bhjv->bhiv", weights, v)


SHAPES = {
    # name: (B, H, L, K, V, S, T)
    "S>T": (2, 3, 64, 8, 5, 16, 8),
    "S<T": (1, 2, 48, 4, 6, 4, 16),
    "S=T": (2, 1, 40, 6, 3, 8, 8),
    "one block": (2, 2, 32, 8, 8, 8, 32),
    "T=1": (1, 1, 12, 4, 2, 6, 1),
    "many codes": (1, 1, 64, 16, 16, 128, 16),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_equals_dense_attention_float32(name):
    b, h, length, d_k, d_v, n_code, block_len = SHAPES[name]
    q, k, v, codebook = make_inputs(0, b, h, length, d_k, d_v, n_code)
    out = vq(q, k, v, codebook, block_len=block_len)
    assert out.shape == (b, h, length, d_v) and out.dtype == F32
    np.testing.assert_allclose(out, dense(q, k, v, codebook), rtol=1e-5, atol=1e-5)


def test_equals_dense_attention_float64_jitted():
    q, k, v, codebook = make_inputs(1, 2, 2, 96, 8, 4, 12, dtype=jnp.float64)
    out = vq(q, k, v, codebook, block_len=24)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, dense(q, k, v, codebook), rtol=1e-12)


def test_block_len_does_not_change_the_result():
    q, k, v, codebook = make_inputs(2, 1, 2, 64, 8, 8, 16)
    outs = [vq(q, k, v, codebook, block_len=t) for t in (4, 16, 64)]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-5)


def test_causal_future_keys_and_values_do_not_matter():
    q, k, v, codebook = make_inputs(3, 1, 2, 32, 4, 4, 8)
    out = vq(q, k, v, codebook, block_len=8)
    k2 = np.concatenate([k[:, :, :20], -k[:, :, 20:]], axis=2)
    v2 = np.concatenate([v[:, :, :20], v[:, :, 20:] + 100.0], axis=2)
    out2 = vq(q, k2, v2, codebook, block_len=8)
    np.testing.assert_array_equal(out[:, :, :20], out2[:, :, :20])
    assert not np.allclose(out[:, :, 20:], out2[:, :, 20:])


@pytest.mark.parametrize("mem_len", [4, 30])
def test_mem_len_does_not_change_the_forward_values(mem_len):
    """With the aggcache, the window only moves keys between the exact window
    and the cache: the same k_hat = c_z either way."""
    q, k, v, codebook = make_inputs(10, 1, 2, 32, 4, 3, 6, dtype=jnp.float64)
    out = vq(q, k, v, codebook, block_len=8, mem_len=mem_len)
    np.testing.assert_allclose(out, vq(q, k, v, codebook, block_len=8), rtol=1e-12)


@pytest.mark.parametrize("block_len, mem_len", [(8, 5), (1, 3)])
def test_without_aggcache_a_sliding_window(block_len, mem_len):
    q, k, v, codebook = make_inputs(11, 2, 2, 32, 4, 3, 6, dtype=jnp.float64)
    out = vq(q, k, v, codebook, block_len=block_len, mem_len=mem_len, agg_cache=False)
    np.testing.assert_allclose(
        out, dense(q, k, v, codebook, window=mem_len), rtol=1e-12
    )
    assert not np.allclose(out, dense(q, k, v, codebook), atol=1e-3)


@pytest.mark.parametrize("dtype, tol", [(F32, 1e-5), (jnp.float64, 1e-11)])
def test_gradients_equal_dense_gradients(dtype, tol):
    """q and v get the dense gradients; the codebook gets none."""
    q, k, v, codebook = make_inputs(5, 2, 2, 32, 4, 3, 6, dtype=dtype)
    cotangent = jax.random.normal(jax.random.key(9), (2, 2, 32, 3), dtype)

    def loss(fn):
        return lambda q, v, c: jnp.sum(cotangent * fn(q, k, v, c))

    vq_loss = loss(lambda q, k, v, c: vq_attention(q, k, v, c, block_len=8))
    grads = jit(jax.grad(vq_loss, argnums=(0, 1, 2)))(q, v, codebook)
    dense_grads = jit(jax.grad(loss(dense_attention), argnums=(0, 1)))(q, v, codebook)
    for name, g, want in zip(("q", "v"), grads, dense_grads, strict=False):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(g, want, rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_array_equal(grads[2], jnp.zeros_like(codebook))


@pytest.mark.parametrize(
    "block_len, mem_len, agg_cache",
    [(4, 4, True), (8, 32, True), (4, 6, False)],
)
def test_key_gradients_straight_through_in_the_window_only(
    block_len, mem_len, agg_cache
):
    """All gradients equal those of the quadratic form with straight-through
    keys where seen exactly and constant codewords in the aggcache (float64).
    mem_len >= L: straight-through everywhere, dense attention over k_hat."""
    q, k, v, codebook = make_inputs(12, 2, 2, 32, 4, 3, 6, dtype=jnp.float64)
    cotangent = jax.random.normal(jax.random.key(13), v.shape, jnp.float64)

    def vq_loss(q, k, v, c):
        out = vq_attention(
            q, k, v, c, block_len=block_len, mem_len=mem_len, agg_cache=agg_cache
        )
        return jnp.sum(cotangent * out)

    def ref_loss(q, k, v, c):
        if agg_cache:
            out = quadratic_st(q, k, v, c, block_len, mem_len)
        else:  # a sliding window: every key a query sees is seen exactly
            out = quadratic_st(q, k, v, c, 1, mem_len, window=mem_len)
        return jnp.sum(cotangent * out)

    grads = jit(jax.grad(vq_loss, argnums=(0, 1, 2, 3)))(q, k, v, codebook)
    want = jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3)))(q, k, v, codebook)
    for name, g, w in zip("qkvc", grads, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)
    assert np.any(grads[1] != 0)
    np.testing.assert_array_equal(grads[3], 0.0)


def test_cached_keys_get_no_gradient():
    """T = M = 4: only queries from position 8 on get a loss. Keys 0..3 are in
    the aggcache of those queries (no gradient), keys 4..15 in their window."""
    q, k, v, codebook = make_inputs(6, 1, 1, 16, 4, 4, 4, dtype=jnp.float64)
    weight = (np.arange(16) >= 8)[None, None, :, None]

    def loss(k):
        out = vq_attention(q, k, v, codebook, block_len=4, mem_len=4)
        return jnp.sum(weight * out**2)

    g = jit(jax.grad(loss))(k)
    np.testing.assert_array_equal(g[:, :, :4], 0.0)
    assert np.all(np.any(g[:, :, 4:] != 0, axis=-1))


def stable_case(q_scale):
    """Huge scores, and an unused code whose score dwarfs all the used ones."""
    q, k, v, codebook = map(np.array, make_inputs(7, 1, 2, 48, 4, 4, 8))
    # Code 0 points along the mean query but far from every key: never used.
    direction = np.mean(q, axis=(0, 2))
    codebook[:, 0] = 1e3 * direction / np.linalg.norm(direction, axis=-1)[:, None]
    assert not np.any(jit(get_shortcodes)(k, codebook)[0] == 0)
    return np.float32(q_scale) * q, k, v, codebook


@pytest.mark.parametrize("q_scale", [1.0, 1e3, 1e6])
def test_large_scores_and_unused_codes_stay_finite(q_scale):
    q, k, v, codebook = stable_case(q_scale)
    out = vq(q, k, v, codebook, block_len=8)
    assert np.all(np.isfinite(out))
    # Keys sharing a code tie exactly in the dense form; here the aggcache
    # and the window compute q.c_s in two different matmuls, each rounded to
    # float32 at the scores' size, so a tie may be off by an ulp or two of
    # max |q.c|, and the weights by as much (relative).
    max_score = np.max(np.abs(np.einsum("bhlk,hsk->bhls", q, codebook[:, 1:])))
    tol = 1e-5 + 2 * np.finfo(np.float32).eps * max_score * np.abs(v).max()
    np.testing.assert_allclose(out, dense(q, k, v, codebook), rtol=0, atol=tol)
    # Outputs are convex combinations of the values.
    assert np.all(out <= v.max() + 1e-5) and np.all(out >= v.min() - 1e-5)


@pytest.mark.parametrize("q_scale, mem_len", [(1e3, 8), (1e6, 0), (1e6, 8)])
def test_gradients_finite_for_large_scores_and_unused_codes(q_scale, mem_len):
    q, k, v, codebook = stable_case(q_scale)

    def loss(q, k, v, c):
        out = vq_attention(q, k, v, c, block_len=8, mem_len=mem_len)
        return jnp.sum(out**2)

    for g in jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, codebook):
        assert np.all(np.isfinite(g))


def test_all_keys_on_one_code():
    q, k, v, codebook = map(np.array, make_inputs(8, 1, 1, 32, 4, 4, 8))
    k = np.broadcast_to(codebook[0, 3], k.shape)
    out = vq(q, k, v, codebook, block_len=8)
    # Every key is the same, so each output is the running mean of the values.
    running_mean = np.cumsum(v, axis=2) / np.arange(1, 33)[:, None]
    np.testing.assert_allclose(out, running_mean, rtol=1e-5, atol=1e-5)


def test_flops_formula():
    # 2 L (S K + (S + W) (K + V)) with W = M + T, written out.
    assert vq_attention_flops(8, 4, 2, 3, 5) == 2 * 8 * (4 * 3 + 6 * 8)
    assert vq_attention_flops(8, 4, 2, 3, 5, mem_len=3) == 2 * 8 * (4 * 3 + 9 * 8)
    assert vq_attention_flops(2 * 1024, 512, 512, 64, 64) == 2 * vq_attention_flops(
        1024, 512, 512, 64, 64
    )


@pytest.mark.parametrize(
    "n_code, block_len, d_k, d_v, mem_len",
    [(128, 128, 64, 64, 128), (16, 64, 64, 64, 0)],
)
def test_flops_formula_matches_xla_cost_analysis(n_code, block_len, d_k, d_v, mem_len):
    """XLA's count for one block of vq_attention's work (quantize, attend,
    fold into the cache) is the formula's plus at most 10%. XLA counts a loop body
    once whatever its trip count, hence one block; it also counts elementwise
    work (exp, max, sums, the fold's scatter-add), which the formula leaves
    out."""

    def one_block(q, k, v, codebook, state):
        z = get_shortcodes(k, codebook)[0]
        k_hat = get_codewords(z, codebook)
        return blockwise_attention(q, k_hat, z, v, codebook, state, block_len=block_len)

    qk = jax.ShapeDtypeStruct((1, 1, block_len, d_k), F32)
    v = jax.ShapeDtypeStruct((1, 1, block_len, d_v), F32)
    codebook = jax.ShapeDtypeStruct((1, n_code, d_k), F32)
    state = jax.eval_shape(
        lambda: initial_attention_state(1, 1, n_code, mem_len, d_k, d_v)
    )
    cost = jit(one_block).lower(qk, qk, v, codebook, state).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    want = vq_attention_flops(block_len, n_code, block_len, d_k, d_v, mem_len)
    # XLA counts every matmul the formula counts, and a little more.
    assert want <= cost["flops"] <= 1.10 * want, (cost["flops"], want)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block_len=5), r"block_len=5 must divide L=32"),
        (dict(block_len=0), r"block_len must be a positive int"),
        (dict(block_len=8.0), r"block_len must be a positive int"),
        (dict(block_len=True), r"block_len must be a positive int"),
        (dict(mem_len=-1), r"mem_len must be an int >= 0, got -1"),
        (dict(mem_len=2.0), r"mem_len must be an int >= 0, got 2.0"),
        (dict(q=(1, 2, 32)), r"q must have shape \[B, H, L, K\]"),
        (dict(k=(1, 2, 32, 5)), r"k must have shape \[B=1, H=2, L=32, K=4\]"),
        (dict(k=(1, 2, 16, 4)), r"got shape \[1, 2, 16, 4\]"),
        (dict(v=(2, 2, 32, 3)), r"v must have shape \[B=1, H=2, L=32, V\]"),
        (dict(codebook=(3, 4, 4)), r"codebook must have shape \[H=2, S, K=4\]"),
        (dict(codebook=(2, 4, 5)), r"got shape \[2, 4, 5\]"),
    ],
)
def test_bad_input_raises_value_error_with_shapes(change, match):
    q, k, v, codebook = make_inputs(9, 1, 2, 32, 4, 3, 4)
    args = dict(q=q, k=k, v=v, codebook=codebook, block_len=8)
    for name, value in change.items():
        is_shape = name in ("q", "k", "v", "codebook")
        args[name] = np.zeros(value, np.float32) if is_shape else value
    with pytest.raises(ValueError, match=match):
        vq_attention(**args)
