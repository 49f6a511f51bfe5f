"""Generation: prefill, single-token steps, nucleus sampling and the state size.

The references are the teacher-forced block-wise forward over the finished
sequence, feeding the prompt one token at a time, a brute-force NumPy nucleus,
and the state size counted by hand from the shapes of the paper's cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tvq.sample import decode, decode_config, generate, prefill, state_nbytes

B, N, D, H, K, V, S, T, M, N_LAYER = 2, 32, 16, 2, 8, 12, 6, 4, 4, 1
P, G = 13, 11  # the prompt is 3 blocks and 1 token; P + G = 6 blocks


def make_config(attention: str, p_nucleus=0.9) -> tvq.TransformerConfig:
    return tvq.TransformerConfig.create(
        n_vocab=N,
        d_model=D,
        d_k=K,
        d_v=V,
        n_head=H,
        n_code=S,
        n_layer=N_LAYER,
        block_len=T,
        mem_len=M,
        agg_cache=True,
        grad_thru_cache=True,
        pe_abs=True,
        pe_lam=10_000,
        c_beta=1e-4,
        c_gamma=0.99,
        e_tie=True,
        e_preln=True,
        e_scale=1.0,
        p_dropemb=0.0,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        p_nucleus=p_nucleus,
        is_train=False,
        attention=attention,
        dtype="float64",
        param_dtype="float64",
    )


@functools.cache
def model(attention: str, emb_scale: float = 1.0):
    """(config, params) of a small random model, embeddings times emb_scale.

    At init the tied embeddings make next-token distributions sharply peaked
    (well separated for greedy decoding); smaller ones spread them out.
    """
    config = make_config(attention)
    tokens = jnp.zeros([1, T], jnp.int32)
    state = tvq.Transformer.initial_state(config, 1, T)
    params = tvq.Transformer(config).init(jax.random.key(0), tokens, state)["params"]
    params = dict(params, embs=params["embs"] * emb_scale)
    return config, params


def prompt(batch=B, length=P, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, N)


@functools.partial(jax.jit, static_argnames="config")
def teacher_forced(config, params, tokens):
    """[B, L, N] logprobs of the block-wise forward over the whole sequence."""
    b, length = tokens.shape
    state = tvq.Transformer.initial_state(config, b, length)
    return tvq.Transformer(config).apply({"params": params}, tokens, state)["logprobs"]


def brute_nucleus(probs, p):
    """[N] bool: the most probable tokens, one by one, until their mass reaches p."""
    keep = np.zeros(len(probs), bool)
    mass = 0.0
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        keep[i] = True
        mass += probs[i]
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("attention", ["vq", "dense"])
def test_greedy_is_argmax_of_teacher_forced_forward(attention):
    config, params = model(attention)
    start = prompt()
    out = generate(
        config, params, start, max_new_tokens=G, rng=jax.random.key(2), p_nucleus=1e-9
    )
    assert out.shape == (B, P + G) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :P], start)
    logprobs = np.asarray(teacher_forced(config, params, out))
    # Position i predicts token i + 1: every generated token is the argmax.
    np.testing.assert_array_equal(np.argmax(logprobs[:, P - 1 : -1], -1), out[:, P:])
    # And the argmax is clear: no near-tie could hide a wrong token.
    top2 = np.sort(logprobs[:, P - 1 : -1], -1)[..., -2:]
    assert np.min(top2[..., 1] - top2[..., 0]) > 1e-6


@pytest.mark.parametrize("attention", ["vq", "dense"])
def test_prefill_equals_feeding_one_token_at_a_time(attention):
    config, params = model(attention)
    tokens = prompt()
    state0 = tvq.Transformer.initial_state(config, B, P)
    last, state = prefill(config, params, tokens, state0)
    step = jax.jit(tvq.Transformer(decode_config(config)).apply)
    one_by_one = state0
    for i in range(P):
        out = step({"params": params}, tokens[:, i : i + 1], one_by_one)
        one_by_one = out["attn_state"]
    np.testing.assert_allclose(last, out["logprobs"][:, 0], rtol=1e-9, atol=1e-9)
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(one_by_one)
    assert len(leaves) == len(expected) > 0
    for got, want in zip(leaves, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    # The prefill saw every token: the offset counts them all.
    assert int(state[0][0]["pos_offset"]) == P


def test_sampling_is_deterministic_given_the_rng():
    config, params = model("vq", emb_scale=0.2)
    start = prompt()
    run = functools.partial(generate, config, params, start, max_new_tokens=G)
    first = run(rng=jax.random.key(3), p_nucleus=1.0)
    np.testing.assert_array_equal(first, run(rng=jax.random.key(3), p_nucleus=1.0))
    assert not np.array_equal(first, run(rng=jax.random.key(4), p_nucleus=1.0))


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_sampled_tokens_lie_in_the_nucleus(p):
    config, params = model("vq", emb_scale=0.2)
    out = generate(
        config, params, prompt(), max_new_tokens=G, rng=jax.random.key(5), p_nucleus=p
    )
    probs = np.exp(np.asarray(teacher_forced(config, params, out), np.float64))
    sizes = []
    for b in range(B):
        for i in range(P, P + G):
            keep = brute_nucleus(probs[b, i - 1], p)
            sizes.append(keep.sum())
            assert keep[int(out[b, i])], (b, i, p)
    # The nucleus is a real restriction here: it neither holds one token
    # everywhere (greedy) nor every token.
    assert max(sizes) > 1 and min(sizes) < N


def state_bytes_by_hand(config, batch, max_len=None):
    """Bytes of the state from the shapes in tvq.attention's docstring."""
    item, per_gau = 8, 4  # float64 entries; the int32 pos_offset
    if config.attention == "dense":
        per_gau += batch * H * max_len * (K + V) * item
    else:
        per_gau += batch * H * M * 4  # int32 shortcodes of the window
        per_gau += batch * H * M * (K + V) * item  # window keys and values
        per_gau += batch * H * S * (1 + V) * item  # counts and mean values
    return 2 * N_LAYER * per_gau


def leaf_bytes(state):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_state_nbytes_is_constant_and_counts_every_leaf():
    config, params = model("vq")
    expected = state_bytes_by_hand(config, B)
    assert state_nbytes(config, B) == expected
    assert state_nbytes(config, 1) == state_bytes_by_hand(config, 1)
    state = tvq.Transformer.initial_state(config, B)
    assert leaf_bytes(state) == expected
    logprobs, state = prefill(config, params, prompt(length=5), state)
    sizes = [leaf_bytes(state)]
    for _ in range(2):  # positions 19 and 33: past the window of M = 4
        _, logprobs, state = decode(
            config, params, logprobs, state, n_steps=14, rng=jax.random.key(0), p=0.9
        )
        sizes.append(leaf_bytes(state))
    assert int(state[0][0]["pos_offset"]) == 33
    assert sizes == [expected] * 3


def test_dense_state_nbytes_grows_with_the_buffer():
    config, _ = model("dense")
    for n in (1, 16, 100):
        assert state_nbytes(config, B, n) == state_bytes_by_hand(config, B, n)


def test_bad_inputs():
    config, params = model("vq")
    rng = jax.random.key(0)
    run = functools.partial(generate, config, params, rng=rng)
    with pytest.raises(ValueError, match=r"n_vocab=32\), got values in \[0, 32\]"):
        run(jnp.array([[0, 32]]), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"got values in \[-1, 3\]"):
        run(jnp.array([[-1, 3]]), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompt must have shape \[B, P\]"):
        run(jnp.array([1, 2]), max_new_tokens=1)
    with pytest.raises(ValueError, match="integer dtype"):
        run(jnp.array([[1.0, 2.0]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        run(jnp.zeros([1, 0], jnp.int32), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        run(prompt(), max_new_tokens=-1)
    for p in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"p_nucleus must lie in \(0, 1\]"):
            run(prompt(), max_new_tokens=1, p_nucleus=p)
    with pytest.raises(ValueError, match="pass it or set config.p_nucleus"):
        generate(
            config.replace(p_nucleus=None), params, prompt(), max_new_tokens=1, rng=rng
        )
    state = tvq.Transformer.initial_state(config, B + 1)
    with pytest.raises(
        ValueError, match="batch size B=2 but the state was made for B=3"
    ):
        prefill(config, params, prompt(), state)
    logprobs = jnp.zeros([B, N])
    with pytest.raises(
        ValueError, match="batch size B=2 but the state was made for B=3"
    ):
        decode(config, params, logprobs, state, n_steps=1, rng=rng, p=0.9)


def test_dense_buffer_must_have_room():
    config, params = model("dense")
    short = tvq.Transformer.initial_state(config, B, P - 1)
    with pytest.raises(ValueError, match=r"holds N=12 positions.* need 13"):
        prefill(config, params, prompt(), short)
    none = tvq.Transformer.initial_state(config, B, 0)
    with pytest.raises(ValueError, match="got one with N=0"):
        prefill(config, params, prompt(), none)
