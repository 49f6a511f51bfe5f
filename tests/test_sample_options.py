"""Temperature, top-k and the stop token against brute force.

The references rank tokens with Python's `sorted` on (-probability, index),
raise probabilities to 1 / temperature and renormalize in NumPy, and cut at
the stop token with a loop; generation with a stop token is compared with the
same generation without one.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tvq.sample import generate, sample_token, sampling_logprobs


def brute_distribution(probs, p: float, temperature: float, top_k) -> np.ndarray:
    """[V] probabilities after temperature, then top-k, then the nucleus."""
    probs = np.asarray(probs, np.float64)
    v = len(probs)
    ranking = sorted(range(v), key=lambda i: (-probs[i], i))
    if temperature == 0:
        out = np.zeros(v)
        out[ranking[0]] = 1.0
    else:
        out = probs ** (1.0 / temperature)
        out /= out.sum()
    if top_k is not None:
        keep = np.zeros(v, bool)
        keep[ranking[:top_k]] = True
        out = np.where(keep, out, 0.0)
        out /= out.sum()
    kept, mass = np.zeros(v, bool), 0.0
    for i in sorted(range(v), key=lambda i: (-out[i], i)):
        if kept.any() and mass >= p:
            break
        kept[i] = True
        mass += out[i]
    out = np.where(kept, out, 0.0)
    return out / out.sum()


def check_against_brute(probs, p, temperature, top_k):
    got = np.exp(np.asarray(
        sampling_logprobs(np.log(probs), p, temperature=temperature, top_k=top_k)
    ))  # fmt: skip
    for index in np.ndindex(probs.shape[:-1]):
        want = brute_distribution(probs[index], p, temperature, top_k)
        np.testing.assert_array_equal(got[index] > 0, want > 0, err_msg=str(index))
        np.testing.assert_allclose(got[index], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 3, 12])
@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
def test_distribution_matches_brute_force(temperature, top_k, p):
    seed = [int(temperature * 10), top_k or 0, int(p * 10)]
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(12, 0.7), size=(4, 5))
    check_against_brute(probs, p, temperature, top_k)


def test_ties_go_to_the_smaller_index():
    probs = np.array([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]])
    keep = np.isfinite(np.asarray(sampling_logprobs(np.log(probs), top_k=2)))
    np.testing.assert_array_equal(keep, [[0, 1, 1, 0], [1, 1, 0, 0]])
    greedy = np.isfinite(np.asarray(sampling_logprobs(np.log(probs), temperature=0)))
    np.testing.assert_array_equal(greedy, [[0, 1, 0, 0], [1, 0, 0, 0]])
    check_against_brute(probs, 1.0, 1.0, 2)


def test_order_is_temperature_then_top_k_then_nucleus():
    """Cases where another order would keep another set of tokens."""
    probs = np.array([0.4, 0.3, 0.2, 0.1])

    def kept(**kwargs):
        return np.isfinite(np.asarray(sampling_logprobs(np.log(probs), **kwargs)))

    # Temperature 3 flattens to masses 0.300, 0.272, 0.238, 0.189: the nucleus
    # at p = 0.6 needs 3 tokens (the nucleus taken before the temperature,
    # of 0.4, 0.3, ..., would need 2).
    np.testing.assert_array_equal(kept(p=0.6, temperature=3.0), [1, 1, 1, 0])
    # Top-2 renormalizes to 0.571, 0.429: the nucleus at p = 0.5 keeps 1 (the
    # nucleus taken before top-k would keep 2).
    np.testing.assert_array_equal(kept(p=0.5, top_k=2), [1, 0, 0, 0])
    for kwargs in (dict(p=0.6, temperature=3.0), dict(p=0.5, top_k=2)):
        want = brute_distribution(
            probs, kwargs["p"], kwargs.get("temperature", 1.0), kwargs.get("top_k")
        )
        np.testing.assert_array_equal(kept(**kwargs), want > 0)


def test_traced_temperature_matches_eager():
    rng = np.random.default_rng(1)
    logprobs = np.log(rng.dirichlet(np.ones(9), size=6))
    jitted = jax.jit(lambda lp, t: sampling_logprobs(lp, 0.8, temperature=t, top_k=4))
    for t in (0.0, 0.7, 1.3):
        np.testing.assert_allclose(
            np.exp(jitted(logprobs, jnp.float64(t))),
            np.exp(sampling_logprobs(logprobs, 0.8, temperature=t, top_k=4)),
            atol=1e-12,
        )


def test_samples_follow_the_distribution():
    probs = np.array([0.05, 0.3, 0.02, 0.25, 0.2, 0.18])
    temperature, top_k, p = 0.8, 4, 0.9
    want = brute_distribution(probs, p, temperature, top_k)
    n = 20_000
    logprobs = np.broadcast_to(np.log(probs), (n, len(probs)))
    tokens = np.asarray(
        sample_token(
            jax.random.key(0), logprobs, p, temperature=temperature, top_k=top_k
        )
    )
    assert tokens.dtype == np.int32 and (want[tokens] > 0).all()
    freq = np.bincount(tokens, minlength=len(probs)) / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12)


BAD = {
    "negative temperature": (dict(temperature=-1.0), "temperature must be a finite"),
    "nan temperature": (dict(temperature=math.nan), "temperature must be a finite"),
    "top_k zero": (dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
    "top_k float": (dict(top_k=2.0), "top_k must be None or an int >= 1, got 2.0"),
    "top_k bool": (dict(top_k=True), "top_k must be None or an int >= 1, got True"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_options_raise(case):
    kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        sampling_logprobs(np.log(np.full([2, 4], 0.25)), **kwargs)


# ------------------------------------------------------------ generation

N = 16


@functools.cache
def tiny_model(attention: str):
    config = tvq.TransformerConfig.create(
        n_vocab=N, d_model=16, d_k=8, d_v=16, n_head=1, n_code=4, n_layer=1,
        block_len=4, mem_len=4, agg_cache=True, grad_thru_cache=True,
        pe_abs=False, pe_lam=10_000, c_beta=1e-4, c_gamma=0.99, e_tie=False,
        e_preln=False, e_scale=1.0, p_dropemb=0.0, p_dropsin=0.0, p_dropres=0.0,
        p_droplyr=0.0, p_nucleus=1.0, is_train=False, attention=attention,
    )  # fmt: skip
    state = tvq.Transformer.initial_state(config, 1, 4)
    tokens = jnp.zeros([1, 4], jnp.int32)
    params = tvq.Transformer(config).init(jax.random.key(0), tokens, state)["params"]
    # Small output weights: spread-out distributions, so the stop token is
    # drawn at some steps and not at others.
    params = dict(params, out_proj=jax.tree.map(lambda w: w * 0.1, params["out_proj"]))
    return config, params


def brute_stop(tokens, stop: int) -> np.ndarray:
    """Each row up to and including its first stop token, then stop tokens."""
    out = np.array(tokens)
    for row in out:
        for i, token in enumerate(row):
            if token == stop:
                row[i:] = stop
                break
    return out


@pytest.mark.parametrize("attention", ["vq", "dense"])
def test_stopped_rows_keep_the_stop_token(attention):
    config, params = tiny_model(attention)
    prompt = jax.random.randint(jax.random.key(1), (6, 5), 0, N)
    run = functools.partial(
        generate, config, params, prompt, max_new_tokens=24, rng=jax.random.key(2),
        temperature=1.5,
    )  # fmt: skip
    free = np.asarray(run())
    stop = 3
    stopped = np.asarray(run(stop_token=stop))
    np.testing.assert_array_equal(stopped[:, :5], prompt)
    new = free[:, 5:]
    np.testing.assert_array_equal(stopped[:, 5:], brute_stop(new, stop))
    # The case is not trivial: some rows stop, some do not, none at once.
    hit = (new == stop).any(axis=1)
    assert hit.any() and not hit.all()
    assert not (new[:, 0] == stop).all()


def test_all_rows_stopped_ends_early_with_stop_tokens():
    config, params = tiny_model("vq")
    prompt = jnp.zeros([2, 4], jnp.int32)
    greedy = np.asarray(
        generate(config, params, prompt, max_new_tokens=12, rng=jax.random.key(0),
                 temperature=0.0)
    )  # fmt: skip
    first = int(greedy[0, 4])  # what greedy decoding draws first, in both rows
    assert (greedy[:, 4] == first).all()
    out = np.asarray(
        generate(config, params, prompt, max_new_tokens=12, rng=jax.random.key(0),
                 temperature=0.0, stop_token=first)
    )  # fmt: skip
    np.testing.assert_array_equal(out[:, 4:], first)


def test_bad_stop_token():
    config, params = tiny_model("vq")
    prompt = jnp.zeros([1, 4], jnp.int32)
    for bad in (-1, N, 1.0, True):
        with pytest.raises(ValueError, match=r"stop_token must be None or an int in"):
            generate(config, params, prompt, max_new_tokens=2, rng=jax.random.key(0),
                     stop_token=bad)  # fmt: skip
