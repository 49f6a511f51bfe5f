"""The randomness of generation: step i draws with fold_in(rng, i).

`tvq.sample.decode` documents its key schedule, so every sampled token can be
redrawn by hand: the teacher-forced forward over the finished sequence gives
each step's distribution, a NumPy loop over the ranked tokens its nucleus,
and `jax.random.categorical` with fold_in(rng, i) the token. A model whose
logits are all equal (zero embeddings) samples uniformly; its steps must look
independent: consecutive tokens agree about 1 / N of the time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import init_params, random_tokens, tiny_config

import tvq

B, P, G = 3, 6, 10


@functools.cache
def model(emb_scale: float):
    """A float64 eval model, embeddings times emb_scale (small: flat logits)."""
    config = tiny_config(is_train=False, n_layer=1)
    params = init_params(config, seed=1)
    return config, dict(params, embs=params["embs"] * emb_scale)


@functools.partial(jax.jit, static_argnames="config")
def teacher_forced(config, params, tokens):
    state = tvq.Transformer.initial_state(config, *tokens.shape)
    return tvq.Transformer(config).apply({"params": params}, tokens, state)["logprobs"]


def brute_nucleus(probs, p):
    """[N] bool: ranked by (-probability, index), kept while the mass before
    a token is below p."""
    keep = np.zeros(len(probs), bool)
    mass = 0.0
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass >= p:
            break
        keep[i] = True
        mass += probs[i]
    return keep


@pytest.mark.parametrize("p", [1.0, 0.7])
def test_step_i_draws_with_fold_in_rng_i(p):
    config, params = model(0.1)
    prompt = random_tokens(0, (B, P), config.n_vocab)
    rng = jax.random.key(11)
    out = np.asarray(
        tvq.generate(config, params, prompt, max_new_tokens=G, rng=rng, p_nucleus=p)
    )
    logprobs = np.asarray(teacher_forced(config, params, out), np.float64)
    sizes = []
    for i in range(G):
        step = logprobs[:, P - 1 + i]  # [B, N]: the distribution of token P + i
        keep = np.stack([brute_nucleus(np.exp(row), p) for row in step])
        sizes.append(keep.sum(-1))
        logits = np.where(keep, step, -np.inf)
        want = jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)
        np.testing.assert_array_equal(out[:, P + i], want, err_msg=f"step {i}")
    # Sampling had choices to make: most nuclei hold several tokens.
    print(f"p={p}: nucleus sizes {np.array(sizes).T.tolist()}")
    assert np.median(sizes) > 1


def test_steps_draw_independently():
    """Uniform next-token distributions: tokens spread over the vocabulary and
    a step repeats the previous token about 1 / N of the time."""
    config, params = model(0.0)
    n, length = config.n_vocab, 120
    prompt = random_tokens(1, (4, 4), n)
    out = tvq.generate(
        config, params, prompt, max_new_tokens=length, rng=jax.random.key(0),
        p_nucleus=1.0,
    )  # fmt: skip
    tokens = np.asarray(out)[:, 4:]
    logprobs = np.asarray(teacher_forced(config, params, out))
    np.testing.assert_allclose(logprobs, -np.log(n), rtol=1e-12)  # uniform
    repeats = np.sum(tokens[:, 1:] == tokens[:, :-1])
    pairs = tokens[:, 1:].size
    sd = np.sqrt(pairs * (1 / n) * (1 - 1 / n))
    assert abs(repeats - pairs / n) < 5 * sd, (repeats, pairs / n)
    counts = np.bincount(tokens.ravel(), minlength=n)
    chi2 = np.sum((counts - tokens.size / n) ** 2 / (tokens.size / n))
    assert chi2 < n - 1 + 5 * np.sqrt(2 * (n - 1)), counts  # mean n - 1
    # The rows of the batch draw independently too.
    assert np.mean(tokens[0] == tokens[1]) < 0.3


def test_same_rng_reproduces_and_decode_equals_generate():
    """The same key gives the same tokens, another key others, and decode
    after prefill gives generate's tokens for the same key."""
    config, params = model(0.3)
    prompt = jnp.asarray(random_tokens(2, (B, P), config.n_vocab))
    rng = jax.random.key(4)
    run = functools.partial(
        tvq.generate, config, params, prompt, max_new_tokens=G, p_nucleus=1.0
    )
    first = np.asarray(run(rng=rng))
    np.testing.assert_array_equal(first, run(rng=rng))
    assert not np.array_equal(first, run(rng=jax.random.key(5)))
    # decode from a prefilled state gives generate's tokens.
    state = tvq.Transformer.initial_state(config, B)
    last, state = tvq.sample.prefill(config, params, prompt, state)
    tokens, _, _ = tvq.sample.decode(
        config, params, last, state, n_steps=G, rng=rng, p=1.0
    )
    np.testing.assert_array_equal(tokens, first[:, P:])
