"""The nucleus rule where the mass of the top tokens is exactly p.

Token r of the ranking is in the nucleus when the tokens ranked before it hold
*less than* p: at a mass of exactly p the nucleus stops. Probabilities here
are dyadic (k / 2^n), so softmax, cumulative sums and the comparison are exact
in floating point (checked first), and the reference is a loop over the
ranking in exact rational arithmetic (`fractions.Fraction`).
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq.sample import nucleus_logprobs, sample_nucleus

DYADIC = [Fraction(1, 16), Fraction(1, 2), Fraction(1, 16), Fraction(1, 8),
          Fraction(1, 4)]  # fmt: skip
UNIFORM = [Fraction(1, 8)] * 8
# In float64 exp(x) reaches no 2^-k below 1/2 exactly (its steps skip it), so
# float64 cases use ratios 1 and 1/2 only.
HALVES = [Fraction(1, 4), Fraction(1, 8), Fraction(1, 4), Fraction(1, 8),
          Fraction(1, 8), Fraction(1, 8)]  # fmt: skip
CASES = {
    "dyadic-float32": (DYADIC, np.float32),
    "uniform-float32": (UNIFORM, np.float32),
    "halves-float32": (HALVES, np.float32),
    "uniform-float64": (UNIFORM, np.float64),
    "halves-float64": (HALVES, np.float64),
}


def exact_nucleus(probs, p: Fraction) -> np.ndarray:
    """[N] bool by the definition, in exact arithmetic."""
    ranking = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep = np.zeros(len(probs), bool)
    before = Fraction(0)
    for i in ranking:
        keep[i] = before < p or not keep.any()
        before += probs[i]
    return keep


def boundaries(probs):
    """Every prefix mass of the ranking, and dyadic values just either side."""
    masses = np.cumsum(sorted(probs, reverse=True))
    eps = Fraction(1, 2**20)  # representable next to every mass, also float32
    out = []
    for m in masses:
        out += [m - eps, m] + ([m + eps] if m < 1 else [])
    return out


def exact_logits(probs, dtype) -> jax.Array:
    """[N] logits whose softmax is exactly probs (dyadic).

    exp(log 2^-k) may miss 2^-k by an ulp, so each logit is moved along the
    floats next to log 2^-k until the softmax gives its probability exactly.
    """
    want = np.array([float(q) for q in probs], dtype)
    logits = np.log(want / want.max())
    for _ in range(32):
        got = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
        if np.array_equal(got, want):
            break
        towards = np.where(got < want, np.inf, -np.inf).astype(dtype)
        logits = np.where(got == want, logits, np.nextafter(logits, towards))
    # Precondition: the probabilities the rule sees are exactly the dyadic ones.
    np.testing.assert_array_equal(jax.nn.softmax(jnp.asarray(logits)), want)
    return jnp.asarray(logits)


@pytest.mark.parametrize("case", list(CASES))
def test_mass_exactly_p_stops_the_nucleus(case):
    probs, dtype = CASES[case]
    logprobs = exact_logits(probs, dtype)
    for p in boundaries(probs):
        keep = exact_nucleus(probs, p)
        got = np.asarray(nucleus_logprobs(logprobs, float(p)))
        np.testing.assert_array_equal(np.isfinite(got), keep, err_msg=str(p))
        kept_mass = sum(q for q, k in zip(probs, keep, strict=True) if k)
        want = np.log([float(q / kept_mass) for q in np.array(probs)[keep]])
        np.testing.assert_allclose(got[keep], want, rtol=1e-6, err_msg=str(p))


def test_a_traced_p_has_the_same_boundary():
    logprobs = exact_logits(HALVES, np.float64)
    jitted = jax.jit(nucleus_logprobs)
    for p in boundaries(HALVES):
        got = np.isfinite(np.asarray(jitted(logprobs, jnp.asarray(float(p)))))
        np.testing.assert_array_equal(got, exact_nucleus(HALVES, p), err_msg=str(p))


def test_samples_at_the_boundary_stay_in_the_nucleus():
    """p = 3/4 = 1/2 + 1/4: the 1/8 token is out, both others come up."""
    logprobs = exact_logits(DYADIC, np.float32)
    rows = jnp.broadcast_to(logprobs, (4000, len(DYADIC)))
    draws = np.asarray(sample_nucleus(jax.random.key(0), rows, 0.75))
    counts = np.bincount(draws, minlength=len(DYADIC))
    keep = exact_nucleus(DYADIC, Fraction(3, 4))
    assert np.all(counts[~keep] == 0) and np.all(counts[keep] > 0)
    # In the ratio 2 : 1 of their probabilities (five standard deviations).
    n, share = counts[keep].sum(), counts[1] / counts[keep].sum()
    assert abs(share - 2 / 3) < 5 * np.sqrt(2 / 9 / n)
