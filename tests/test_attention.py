"""vq_attention equals dense causal softmax attention over the quantized keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.attention import vq_attention, vq_attention_flops
from tvq.vq import get_codewords, get_shortcodes

F32 = jnp.float32
vq = jax.jit(vq_attention, static_argnames="block_len")


def make_inputs(seed, b, h, length, d_k, d_v, n_code, dtype=F32, q_scale=1.0):
    """Standard normal q (times q_scale), k, v and codebook."""
    rng = np.random.default_rng(seed)
    shapes = [(b, h, length, d_k)] * 2 + [(b, h, length, d_v), (h, n_code, d_k)]
    q, k, v, codebook = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
    return q_scale * q, k, v, codebook


@jax.jit
def dense_attention(q, k, v, codebook):
    """softmax(q k_hat^T + causal mask) v, the L x L way."""
    k_hat = get_codewords(get_shortcodes(k, codebook)[0], codebook)
    scores = jnp.einsum("bhik,bhjk->bhij", q, k_hat)
    length = q.shape[2]
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
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
    np.testing.assert_allclose(
        out, dense_attention(q, k, v, codebook), rtol=1e-5, atol=1e-5
    )


def test_equals_dense_attention_float64_jitted():
    q, k, v, codebook = make_inputs(1, 2, 2, 96, 8, 4, 12, dtype=jnp.float64)
    out = vq(q, k, v, codebook, block_len=24)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, dense_attention(q, k, v, codebook), rtol=1e-12)


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


@pytest.mark.parametrize("dtype, tol", [(F32, 1e-5), (jnp.float64, 1e-11)])
def test_gradients_equal_dense_gradients(dtype, tol):
    q, k, v, codebook = make_inputs(5, 2, 2, 32, 4, 3, 6, dtype=dtype)
    cotangent = jax.random.normal(jax.random.key(9), (2, 2, 32, 3), dtype)

    def loss(fn):
        return lambda q, v, c: jnp.sum(cotangent * fn(q, k, v, c))

    vq_loss = loss(lambda q, k, v, c: vq_attention(q, k, v, c, block_len=8))
    grads = jax.jit(jax.grad(vq_loss, argnums=(0, 1, 2)))(q, v, codebook)
    dense_grads = jax.jit(jax.grad(loss(dense_attention), argnums=(0, 1, 2)))(
        q, v, codebook
    )
    for name, g, want in zip(("q", "v", "codebook"), grads, dense_grads, strict=True):
        assert g.dtype == dtype, name
        np.testing.assert_allclose(g, want, rtol=tol, atol=tol, err_msg=name)


def test_no_gradient_to_keys():
    q, k, v, codebook = make_inputs(6, 1, 1, 16, 4, 4, 4)
    g = jax.jit(jax.grad(lambda k: jnp.sum(vq(q, k, v, codebook, block_len=4))))(k)
    np.testing.assert_array_equal(g, jnp.zeros_like(k))


def stable_case(q_scale):
    """Huge scores, and an unused code whose score dwarfs all the used ones."""
    q, k, v, codebook = map(np.array, make_inputs(7, 1, 2, 48, 4, 4, 8))
    # Code 0 points along the mean query but far from every key: never used.
    direction = np.mean(q, axis=(0, 2))
    codebook[:, 0] = 1e3 * direction / np.linalg.norm(direction, axis=-1)[:, None]
    assert not np.any(jax.jit(get_shortcodes)(k, codebook)[0] == 0)
    return np.float32(q_scale) * q, k, v, codebook


@pytest.mark.parametrize("q_scale", [1.0, 1e3, 1e6])
def test_large_scores_and_unused_codes_stay_finite(q_scale):
    q, k, v, codebook = stable_case(q_scale)
    out = vq(q, k, v, codebook, block_len=8)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(
        out, dense_attention(q, k, v, codebook), rtol=1e-5, atol=1e-5
    )
    # Outputs are convex combinations of the values.
    assert np.all(out <= v.max() + 1e-5) and np.all(out >= v.min() - 1e-5)


@pytest.mark.parametrize("q_scale", [1e3, 1e6])
def test_gradients_finite_for_large_scores_and_unused_codes(q_scale):
    q, k, v, codebook = stable_case(q_scale)

    def loss(q, v, c):
        return jnp.sum(vq_attention(q, k, v, c, block_len=8) ** 2)

    for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, v, codebook):
        assert np.all(np.isfinite(g))


def test_all_keys_on_one_code():
    q, k, v, codebook = map(np.array, make_inputs(8, 1, 1, 32, 4, 4, 8))
    k = np.broadcast_to(codebook[0, 3], k.shape)
    out = vq(q, k, v, codebook, block_len=8)
    # Every key is the same, so each output is the running mean of the values.
    running_mean = np.cumsum(v, axis=2) / np.arange(1, 33)[:, None]
    np.testing.assert_allclose(out, running_mean, rtol=1e-5, atol=1e-5)


def test_flops_formula():
    # 2 L (S K + (S + T) K + (S + T) (V + 1)), written out for one small case.
    assert vq_attention_flops(8, 4, 2, 3, 5) == 2 * 8 * (4 * 3 + 6 * 3 + 6 * 6)
    assert vq_attention_flops(2 * 1024, 512, 512, 64, 64) == 2 * vq_attention_flops(
        1024, 512, 512, 64, 64
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block_len=5), r"block_len=5 must divide L=32"),
        (dict(block_len=0), r"block_len must be a positive int"),
        (dict(block_len=8.0), r"block_len must be a positive int"),
        (dict(block_len=True), r"block_len must be a positive int"),
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
        args[name] = value if name == "block_len" else np.zeros(value, np.float32)
    with pytest.raises(ValueError, match=match):
        vq_attention(**args)
