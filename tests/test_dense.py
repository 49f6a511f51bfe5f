"""tvq.dense: the blockwise exact attention equals the full-matrix one and a
float64 NumPy reference, in values, gradients, carried state and decoding;
it is causal, stable with huge scores, holds no P x P matrix, and its FLOP
formulas match a tally of the products it runs.

The NumPy reference scores query i against every key j <= i (buffer
positions) with q_i.k_j plus (q_i + v).r_(i-j) when i - j <= M, one softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flop_tally import matmul_flops

from tvq.dense import (
    dense_attention,
    dense_attention_flops,
    dense_full_attention,
    dense_full_attention_flops,
)

jit = functools.partial(
    jax.jit, compiler_options=dict(xla_backend_optimization_level=0)
)
B, H, K, V = 2, 2, 4, 3


def make_case(seed, length, mem_len, n_buffer=0, offset=0, dtype=jnp.float64):
    """q, k, v, q_pos [B, H, P, .], r [H, M + 1, K] and a state whose buffer
    (N = n_buffer) holds random keys and values before `offset`."""
    rng = np.random.default_rng(seed)
    q, k, q_pos = (rng.standard_normal([B, H, length, K]) for _ in range(3))
    v = rng.standard_normal([B, H, length, V])
    r = rng.standard_normal([H, mem_len + 1, K])
    buf_k = rng.standard_normal([B, H, n_buffer, K])
    buf_v = rng.standard_normal([B, H, n_buffer, V])
    buf_k[:, :, offset:] = 0.0  # not yet written
    buf_v[:, :, offset:] = 0.0
    state = dict(
        pos_offset=jnp.asarray(offset, jnp.int32),
        k=jnp.asarray(buf_k, dtype),
        v=jnp.asarray(buf_v, dtype),
    )
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v, q_pos, r)]
    return arrays, state


def numpy_reference(q, k, v, q_pos, r, state):
    """Output [B, H, P, V] by explicit loops over queries, in float64."""
    q, k, v, q_pos, r = (np.asarray(x, np.float64) for x in (q, k, v, q_pos, r))
    n = state["k"].shape[2]
    offset = int(state["pos_offset"]) if n else 0
    keys = np.concatenate([np.asarray(state["k"])[:, :, :offset], k], axis=2)
    vals = np.concatenate([np.asarray(state["v"])[:, :, :offset], v], axis=2)
    mem_len = r.shape[1] - 1
    out = np.zeros(v.shape)
    for i in range(q.shape[2]):
        pos = offset + i
        scores = np.einsum("bhk,bhjk->bhj", q[:, :, i], keys[:, :, : pos + 1])
        for j in range(max(pos - mem_len, 0), pos + 1):
            scores[:, :, j] += np.einsum("bhk,hk->bh", q_pos[:, :, i], r[:, pos - j])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, :, i] = np.einsum("bhj,bhjv->bhv", weights, vals[:, :, : pos + 1])
    return out


def blockwise(block_len, mem_len, chunk_len):
    """(q, k, v, q_pos, r, state) -> dense_attention's (output, state)."""

    def run(q, k, v, q_pos, r, state):
        return dense_attention(
            q,
            k,
            v,
            state,
            block_len=block_len,
            mem_len=mem_len,
            q_pos=q_pos,
            r=r,
            chunk_len=chunk_len,
        )

    return run


def full(mem_len):
    """(q, k, v, q_pos, r, state) -> dense_full_attention's (output, state)."""

    def run(q, k, v, q_pos, r, state):
        return dense_full_attention(q, k, v, state, mem_len=mem_len, q_pos=q_pos, r=r)

    return run


# (P, T, M, C, N, offset): no buffer, chunks that end mid-block, a window of
# several blocks, M = 0, one block, a buffer written from an offset.
CASES = {
    "no buffer": (24, 4, 4, 3, 0, 0),
    "C=T": (32, 8, 8, 8, 0, 0),
    "M=2.5T, C>T": (30, 2, 5, 7, 0, 0),
    "M=0": (16, 4, 0, 5, 0, 0),
    "one block": (8, 8, 3, 2, 0, 0),
    "buffer, offset 13": (12, 4, 5, 4, 40, 13),
    "buffer, C>N": (8, 2, 3, 64, 20, 10),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_numpy_reference_and_full_matrix(case):
    length, t, m, c, n, offset = CASES[case]
    (q, k, v, q_pos, r), state = make_case(1, length, m, n, offset)
    want = numpy_reference(q, k, v, q_pos, r, state)
    got, new_state = jit(blockwise(t, m, c))(q, k, v, q_pos, r, state)
    full_out, full_state = jit(full(m))(q, k, v, q_pos, r, state)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(full_out, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        jax.tree.leaves(new_state), jax.tree.leaves(full_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert int(new_state["pos_offset"]) == offset + length


@pytest.mark.parametrize("case", ["no buffer", "M=2.5T, C>T", "buffer, offset 13"])
def test_gradients_equal_the_full_matrix(case):
    """Gradients of every input, the state's buffers included (float64)."""
    length, t, m, c, n, offset = CASES[case]
    (q, k, v, q_pos, r), state = make_case(2, length, m, n, offset)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(v.shape))

    def loss(fn):
        def value(q, k, v, q_pos, r, state):
            out, new_state = fn(q, k, v, q_pos, r, state)
            # The state too: its buffers carry the call's keys and values.
            extra = sum(jnp.sum(jnp.sin(x)) for x in (new_state["k"], new_state["v"]))
            return jnp.sum(cotangent * out) + extra

        return jit(jax.grad(value, argnums=(0, 1, 2, 3, 4, 5), allow_int=True))

    got = loss(blockwise(t, m, c))(q, k, v, q_pos, r, state)
    want = loss(full(m))(q, k, v, q_pos, r, state)
    flat = zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    )
    for (path, g), w in flat:
        if g.dtype == jax.dtypes.float0:
            continue
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)
        assert np.any(g != 0) or name.endswith("['k']") or name.endswith("['v']")


def test_carried_state_and_one_token_decoding():
    """Four calls of 8, and 32 calls of one token with block_len = 1, equal one
    call of 32 over the same buffer: outputs and final state (float64)."""
    m, c, n = 5, 4, 32
    (q, k, v, q_pos, r), state = make_case(4, n, m, n, 0)
    whole, whole_state = jit(blockwise(4, m, c))(q, k, v, q_pos, r, state)
    for call_len, t in ((8, 4), (1, 1)):
        step, carried, outs = jit(blockwise(t, m, c)), state, []
        for start in range(0, n, call_len):
            piece = [x[:, :, start : start + call_len] for x in (q, k, v, q_pos)]
            out, carried = step(*piece, r, carried)
            outs.append(out)
        np.testing.assert_allclose(
            jnp.concatenate(outs, axis=2), whole, rtol=1e-12, atol=1e-13
        )
        for a, b in zip(
            jax.tree.leaves(carried), jax.tree.leaves(whole_state), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n_buffer", [0, 40])
def test_causal(n_buffer):
    """Keys, values and queries after position i change no output at <= i."""
    length, t, m, c = 24, 4, 5, 3
    (q, k, v, q_pos, r), state = make_case(5, length, m, n_buffer, 9 if n_buffer else 0)
    i = 13
    changed = [x.at[:, :, i + 1 :].add(7.0) for x in (q, k, v, q_pos)]
    fn = jit(blockwise(t, m, c))
    a, _ = fn(q, k, v, q_pos, r, state)
    b, _ = fn(*changed, r, state)
    np.testing.assert_array_equal(a[:, :, : i + 1], b[:, :, : i + 1])
    assert np.all(np.abs(a[:, :, i + 1 :] - b[:, :, i + 1 :]).max(-1) > 1e-6)


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_huge_scores_stay_finite_and_exact(scale):
    """float32, scores of order `scale`^2: finite values and gradients, equal
    to the full matrix's within float32 rounding of the largest score."""
    length, t, m, c = 32, 8, 4, 8
    (q, k, v, q_pos, r), state = make_case(6, length, m, dtype=jnp.float32)
    q, k = scale * q, scale * k
    got, _ = jit(blockwise(t, m, c))(q, k, v, q_pos, r, state)
    want, _ = jit(full(m))(q, k, v, q_pos, r, state)
    assert np.all(np.isfinite(got))
    max_score = float(jnp.max(jnp.abs(jnp.einsum("bhik,bhjk->bhij", q, k))))
    tol = 1e-5 + 4 * np.finfo(np.float32).eps * max_score * float(jnp.abs(v).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)

    def loss(q, k, v):
        out, _ = dense_attention(
            q, k, v, state, block_len=t, mem_len=m, q_pos=q_pos, r=r, chunk_len=c
        )
        return jnp.sum(out**2)

    for g in jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v):
        assert np.all(np.isfinite(g))


def test_memory_grows_linearly():
    """From P = 2048 to 8192 the gradient's compiled temporaries grow about
    4x for the blockwise form (linear) and more than 10x for the full matrix
    (quadratic): no [P, P] array, forward or backward."""
    t, m = 256, 256

    def temp_bytes(fn, length, **kwargs):
        q = jax.ShapeDtypeStruct((1, 1, length, 8), jnp.float32)
        r = jax.ShapeDtypeStruct((1, m + 1, 8), jnp.float32)
        empty = jax.ShapeDtypeStruct((1, 1, 0, 8), jnp.float32)
        state = dict(pos_offset=jax.ShapeDtypeStruct((), jnp.int32), k=empty, v=empty)

        def loss(q, k, v, q_pos, r, state):
            out, _ = fn(q, k, v, state, mem_len=m, q_pos=q_pos, r=r, **kwargs)
            return jnp.sum(out)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        compiled = grad.lower(q, q, q, q, r, state).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def growth(fn, **kwargs):
        return temp_bytes(fn, 8192, **kwargs) / temp_bytes(fn, 2048, **kwargs)

    assert growth(dense_attention, block_len=t) < 4.5
    assert growth(dense_full_attention) > 10


@pytest.mark.parametrize(
    "length, block_len, mem_len, chunk_len, n_buffer, offset",
    [
        (32, 4, 4, 8, 0, 0),
        (32, 8, 5, 6, 0, 0),
        (8, 4, 4, 4, 40, 20),
        (1, 1, 3, 4, 40, 30),
    ],
)
def test_flop_formulas_match_a_tally(
    length, block_len, mem_len, chunk_len, n_buffer, offset
):
    """The formulas count exactly the matmul FLOPs the forward passes run,
    loops run to their data-dependent trip counts (tests/flop_tally.py)."""
    (q, k, v, q_pos, r), state = make_case(7, length, mem_len, n_buffer, offset)

    def run_blockwise(q, k, v, q_pos, r):
        return dense_attention(
            q,
            k,
            v,
            state,
            block_len=block_len,
            mem_len=mem_len,
            q_pos=q_pos,
            r=r,
            chunk_len=chunk_len,
        )[0]

    def run_full(q, k, v, q_pos, r):
        return dense_full_attention(q, k, v, state, mem_len=mem_len, q_pos=q_pos, r=r)[
            0
        ]

    per_head = B * H
    got = matmul_flops(run_blockwise, q, k, v, q_pos, r)
    want = dense_attention_flops(
        length,
        block_len,
        mem_len,
        K,
        V,
        chunk_len,
        start=offset,
        n_keys=n_buffer or None,
    )
    assert got == per_head * want
    got = matmul_flops(run_full, q, k, v, q_pos, r)
    assert got == per_head * dense_full_attention_flops(
        length, mem_len, K, V, n_keys=n_buffer or None
    )


def test_blockwise_does_half_the_work_at_length():
    """Future blocks cost nothing: at 32 blocks the blockwise count is close to
    half the full matrix's (the window and the chunk rounding add a little)."""
    full_count = dense_full_attention_flops(32 * 512, 512, 128, 512)
    count = dense_attention_flops(32 * 512, 512, 512, 128, 512)
    assert 0.5 < count / full_count < 0.56


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block_len=5), r"block_len=5 must divide L=24"),
        (dict(chunk_len=0), r"chunk_len must be a positive int, got 0"),
        (dict(n_buffer=16), r"buffer holds N=16 positions, a call of P=24"),
    ],
)
def test_bad_input(change, match):
    kwargs = dict(block_len=4, chunk_len=4, n_buffer=0) | change
    (q, k, v, q_pos, r), state = make_case(8, 24, 4, kwargs.pop("n_buffer"))
    with pytest.raises(ValueError, match=match):
        dense_attention(q, k, v, state, mem_len=4, q_pos=q_pos, r=r, **kwargs)


def test_without_relative_terms():
    """q_pos = r = None: plain causal attention, the reference's with r = 0;
    the FLOP counts drop the relative products."""
    length, t, m, c = 24, 4, 5, 3
    (q, k, v, q_pos, r), state = make_case(9, length, m)
    want = numpy_reference(q, k, v, q_pos, 0 * r, state)
    got, _ = dense_attention(
        q, k, v, state, block_len=t, mem_len=m, q_pos=None, r=None, chunk_len=c
    )
    full_out, _ = dense_full_attention(q, k, v, state, mem_len=m, q_pos=None, r=None)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(full_out, want, rtol=1e-12, atol=1e-12)

    def run(q, k, v):
        return dense_attention(
            q, k, v, state, block_len=t, mem_len=m, q_pos=None, r=None, chunk_len=c
        )[0]

    count = dense_attention_flops(length, t, m, K, V, c, relative=False)
    assert matmul_flops(run, q, k, v) == B * H * count
