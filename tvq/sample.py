"""Sampling from a Transformer-VQ.

Nucleus (top-p) sampling, Holtzman et al., "The Curious Case of Neural Text
Degeneration" (2020): draw the next token only from the nucleus, the smallest
set of most probable tokens whose total probability reaches p.

Tie rule: tokens are ranked by probability, larger first, and equal
probabilities by token index, smaller first (a stable sort). The nucleus is the
shortest prefix of that ranking whose mass reaches p: token r of the ranking is
in it when the tokens ranked before it hold less than p. The first-ranked token,
`argmax` of the probabilities, is always in it; as p -> 0 sampling becomes
greedy, and p = 1 keeps every token of nonzero probability.

Axes: V vocabulary; `...` any leading axes (batch, heads, positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tvq.shapes import check_scalar


def _check_p(p) -> None:
    """ValueError unless p is one number in (0, 1]; a traced p is not checked."""
    check_scalar("p", p)
    if isinstance(p, jax.core.Tracer):
        return  # its value is unknown until the traced function runs
    value = float(np.asarray(p).reshape(()))
    if not 0.0 < value <= 1.0:
        raise ValueError(f"p must lie in (0, 1], got {value}")


def _nucleus_mask(probs, p):
    """[..., V] bool: which tokens lie in the nucleus of `probs` [..., V]."""
    order = jnp.argsort(-probs, axis=-1, stable=True)
    ranked = jnp.take_along_axis(probs, order, axis=-1)
    # Mass of the tokens ranked strictly before each one.
    before = jnp.cumsum(ranked[..., :-1], axis=-1)
    before = jnp.concatenate([jnp.zeros_like(ranked[..., :1]), before], axis=-1)
    # The first-ranked token stays even for a traced p <= 0.
    keep_ranked = (before < p).at[..., 0].set(True)
    # Undo the ranking: the token at rank r is order[r].
    rank = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_ranked, rank, axis=-1)


def nucleus_logprobs(logprobs, p):
    """Log-probabilities of the nucleus distribution.

    Args:
      logprobs: [..., V] log-probabilities, or logits (only differences
        along V matter).
      p: nucleus mass in (0, 1], shape [] or [1]; ValueError otherwise. A
        traced p (an argument of a jitted function) has no value to check:
        there p <= 0 keeps only the argmax and p > 1 every token.

    Returns:
      [..., V] log-probabilities renormalized over the nucleus, -inf outside.
    """
    _check_p(p)
    if jnp.ndim(logprobs) < 1:
        raise ValueError(
            f"logprobs must have shape [..., V], got shape {list(jnp.shape(logprobs))}"
        )
    keep = _nucleus_mask(jax.nn.softmax(logprobs, axis=-1), p)
    return jax.nn.log_softmax(jnp.where(keep, logprobs, -jnp.inf), axis=-1)


def sample_nucleus(rng, logprobs, p):
    """[...] int32 tokens drawn from the nucleus of `logprobs` [..., V].

    Each leading position draws independently; see `nucleus_logprobs` for p.
    """
    nucleus = nucleus_logprobs(logprobs, p)
    return jax.random.categorical(rng, nucleus, axis=-1).astype(jnp.int32)
