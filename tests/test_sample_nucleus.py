"""Nucleus sampling against a brute-force loop over the ranked tokens.

The reference ranks tokens with Python's `sorted` on (-probability, index) and
adds them one at a time until their mass reaches p, as the definition reads.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.sample import nucleus_logprobs, sample_nucleus


def brute_nucleus(probs, p: float) -> np.ndarray:
    """[V] bool: the shortest prefix of the ranking whose mass reaches p."""
    ranking = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep = np.zeros(len(probs), dtype=bool)
    mass = 0.0
    for i in ranking:
        if keep.any() and mass >= p:
            break
        keep[i] = True
        mass += probs[i]
    return keep


def brute_logprobs(probs, p: float) -> np.ndarray:
    """[..., V] log-probabilities renormalized over each row's nucleus."""
    probs = np.asarray(probs, dtype=np.float64)
    out = np.full(probs.shape, -np.inf)
    for index in np.ndindex(probs.shape[:-1]):
        keep = brute_nucleus(probs[index].tolist(), p)
        kept = probs[index][keep]
        out[index][keep] = np.log(kept / kept.sum())
    return out


def prefix_masses(probs) -> np.ndarray:
    """[..., V] mass of the top 1, 2, ..., V tokens of each row."""
    return np.cumsum(-np.sort(-np.asarray(probs), axis=-1), axis=-1)


def assert_logprobs_equal(actual, expected):
    actual = np.asarray(actual)
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=1e-12)


@pytest.mark.parametrize("vocab", [1, 2, 7, 50])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_random_distributions_match_brute_force(vocab, alpha, p):
    rng = np.random.default_rng([vocab, int(alpha * 10), int(p * 100)])
    probs = rng.dirichlet(np.full(vocab, alpha), size=(3, 4))
    # Keep p clear of every prefix mass, where rounding could flip the answer.
    assert np.abs(prefix_masses(probs) - p).min() > 1e-9
    logprobs = np.log(probs) + rng.normal(size=(3, 4, 1))  # logits: any shift
    assert_logprobs_equal(nucleus_logprobs(logprobs, p), brute_logprobs(probs, p))


TIE_CASES = {
    # probs, p, the nucleus by hand
    "three_way_tie_split": ([0.1, 0.3, 0.3, 0.3], 0.5, [0, 1, 1, 0]),
    "uniform": ([0.2] * 5, 0.7, [1, 1, 1, 1, 0]),
    "tie_after_top": ([0.4, 0.15, 0.15, 0.15, 0.15], 0.6, [1, 1, 1, 0, 0]),
    "tie_at_top_first_index": ([0.3, 0.1, 0.3, 0.3], 0.2, [1, 0, 0, 0]),
    "tie_order_not_position": ([0.1, 0.2, 0.2, 0.5], 0.6, [0, 1, 0, 1]),
}


@pytest.mark.parametrize("case", TIE_CASES, ids=str)
def test_ties_go_to_the_smaller_index(case):
    probs, p, by_hand = TIE_CASES[case]
    keep = np.isfinite(np.asarray(nucleus_logprobs(np.log(probs), p)))
    np.testing.assert_array_equal(keep, np.array(by_hand, dtype=bool))
    np.testing.assert_array_equal(brute_nucleus(probs, p), keep)


def test_many_ties_match_brute_force():
    # Integer weights 1..3 over W: every prefix mass is k / W, so p = (k + 1/2) / W
    # (k < W) sits halfway between two of them.
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 4, size=(64, 12)).astype(np.float64)
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / total
    for fraction in [0.1, 0.4, 0.7, 0.95]:
        for row in range(64):
            p = (math.floor(fraction * total[row, 0]) + 0.5) / total[row, 0]
            assert_logprobs_equal(
                nucleus_logprobs(np.log(probs[row]), p),
                brute_logprobs(probs[row], p),
            )


def test_p_one_keeps_every_token_of_nonzero_probability():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(9), size=20)
    probs[:, [0, 4]] = 0.0  # impossible tokens stay impossible
    probs /= probs.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        logprobs = np.log(probs)
    out = np.asarray(nucleus_logprobs(logprobs, 1.0))
    np.testing.assert_array_equal(np.isfinite(out), probs > 0)
    np.testing.assert_allclose(out[probs > 0], logprobs[probs > 0], atol=1e-12)


@pytest.mark.parametrize("p", [1e-12, 1e-300])
def test_tiny_p_keeps_only_the_argmax(p):
    rng = np.random.default_rng(2)
    logprobs = rng.normal(size=(30, 17))
    logprobs[0, [3, 11]] = 10.0  # a tie at the top goes to the first index
    expected = np.full(logprobs.shape, -np.inf)
    expected[np.arange(30), np.argmax(logprobs, axis=-1)] = 0.0
    np.testing.assert_array_equal(np.asarray(nucleus_logprobs(logprobs, p)), expected)
    assert expected[0, 3] == 0.0


def test_traced_p_matches_eager_and_nonpositive_p_is_greedy():
    rng = np.random.default_rng(3)
    logprobs = rng.normal(size=(5, 11)) * 2
    jitted = jax.jit(nucleus_logprobs)
    for p in [0.3, 0.8]:
        assert_logprobs_equal(
            jitted(logprobs, jnp.float64(p)), np.asarray(nucleus_logprobs(logprobs, p))
        )
    greedy = np.asarray(jitted(logprobs, jnp.float64(0.0)))
    np.testing.assert_array_equal(
        np.argmax(np.isfinite(greedy), axis=-1), np.argmax(logprobs, axis=-1)
    )
    np.testing.assert_array_equal(np.isfinite(greedy).sum(axis=-1), 1)


def test_samples_lie_in_the_nucleus_with_its_frequencies():
    probs = np.array([0.05, 0.3, 0.02, 0.25, 0.2, 0.18])
    p = 0.7  # nucleus: tokens 1, 3, 4 (mass 0.75)
    keep = brute_nucleus(probs.tolist(), p)
    n = 20_000
    logprobs = np.broadcast_to(np.log(probs), (n, len(probs)))
    tokens = np.asarray(sample_nucleus(jax.random.key(0), logprobs, p))
    assert tokens.shape == (n,) and tokens.dtype == np.int32
    assert keep[tokens].all()
    # Each nucleus token's frequency within 5 standard errors of prob / 0.75.
    freq = np.bincount(tokens, minlength=len(probs)) / n
    want = np.where(keep, probs, 0.0) / probs[keep].sum()
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12)


def test_samples_lie_in_the_nucleus_random_rows():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.full(30, 0.3), size=(4, 500))
    p = 0.8
    assert np.abs(prefix_masses(probs) - p).min() > 1e-9
    tokens = np.asarray(sample_nucleus(jax.random.key(1), np.log(probs), p))
    assert tokens.shape == (4, 500)
    for index in np.ndindex(tokens.shape):
        assert brute_nucleus(probs[index].tolist(), p)[tokens[index]]


def test_fixed_rng_is_deterministic():
    logprobs = np.log(np.random.default_rng(5).dirichlet(np.ones(40), size=300))
    first = np.asarray(sample_nucleus(jax.random.key(9), logprobs, 0.9))
    again = np.asarray(sample_nucleus(jax.random.key(9), logprobs, 0.9))
    jitted = np.asarray(jax.jit(sample_nucleus)(jax.random.key(9), logprobs, 0.9))
    other = np.asarray(sample_nucleus(jax.random.key(10), logprobs, 0.9))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, jitted)
    assert not np.array_equal(first, other)


BAD_P = {
    "zero": (0.0, "p must lie in (0, 1], got 0.0"),
    "negative": (-0.5, "p must lie in (0, 1], got -0.5"),
    "above_one": (1.5, "p must lie in (0, 1], got 1.5"),
    "nan": (math.nan, "p must lie in (0, 1], got nan"),
    "numpy_scalar": (np.float32(2.0), "p must lie in (0, 1], got 2.0"),
    "concrete_array": (jnp.array(0.0), "p must lie in (0, 1], got 0.0"),
    "vector": (np.array([0.5, 0.5]), "p must have shape [] or [1], got shape [2]"),
}


FUNCTIONS = {
    "nucleus_logprobs": nucleus_logprobs,
    "sample_nucleus": lambda lp, p: sample_nucleus(jax.random.key(0), lp, p),
}


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("function", FUNCTIONS, ids=str)
@pytest.mark.parametrize("case", BAD_P, ids=str)
def test_bad_p_raises(case, function, mode):
    p, message = BAD_P[case]
    fn = FUNCTIONS[function]

    def with_p(lp):
        return fn(lp, p)

    run = jax.jit(with_p) if mode == "jit" else with_p
    with pytest.raises(ValueError, match=re.escape(message)):
        run(np.log(np.full([2, 4], 0.25)))


def test_scalar_logprobs_raise():
    with pytest.raises(
        ValueError, match=re.escape("logprobs must have shape [..., V], got shape []")
    ):
        nucleus_logprobs(jnp.float64(0.0), 0.5)
