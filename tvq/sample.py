"""Sampling from a Transformer-VQ: nucleus sampling and generation.

Nucleus (top-p) sampling, Holtzman et al., "The Curious Case of Neural Text
Degeneration" (2020): draw the next token only from the nucleus, the smallest
set of most probable tokens whose total probability reaches p.

Tie rule: tokens are ranked by probability, larger first, and equal
probabilities by token index, smaller first (a stable sort). The nucleus is the
shortest prefix of that ranking whose mass reaches p: token r of the ranking is
in it when the tokens ranked before it hold less than p. The first-ranked token,
`argmax` of the probabilities, is always in it; as p -> 0 sampling becomes
greedy, and p = 1 keeps every token of nonzero probability.

Sampling options. `sampling_logprobs` builds the distribution a token is drawn
from, in this order: temperature (log-probabilities divided by it and
renormalized; temperature 0 keeps only the argmax), then top-k (the k first
tokens of the ranking above, renormalized), then the nucleus of what is left
(so p is a fraction of the top-k mass at that temperature). Ranking ties go
to the smaller token index at every stage.

Generation. Autoregressive generation with the attention state as the only cache.

A prompt goes through the model in blocks of `config.block_len` (the same
block-wise forward as training), the tokens left over when the prompt length
is not a multiple of it one at a time, and every new token through a step of
one position: the same parameters under `config.replace(block_len=1)`, with
the state carried from call to call.

For attention="vq" that state is the window of the last M keys and values and
the per-code cache of counts and mean values: S (V + 1) + M (K + V + 1) numbers
per head and GAU, whatever the position, so every token costs the same. For
dense attention (any other `attention`) it is a key/value buffer as long as the
whole sequence, the KV cache of an ordinary transformer, and a token costs time
in proportion to it.

A stop token ends a row: the row emits it, and every later position of that
row holds it too (the row keeps emitting the stop token); decoding ends early
once every row has stopped.

Axes: B batch, P prompt length, V or N vocabulary size (N in generation),
G generated tokens; `...` any leading axes.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from tvq.config import TransformerConfig
from tvq.model import Transformer, dense_len
from tvq.shapes import check_integer, check_scalar, check_shape


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


def _check_temperature(temperature) -> None:
    """ValueError unless temperature is one finite number >= 0 (traced: unchecked)."""
    check_scalar("temperature", temperature)
    if isinstance(temperature, jax.core.Tracer):
        return
    value = float(np.asarray(temperature).reshape(()))
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0, got {value}")


def _check_top_k(top_k) -> None:
    """ValueError unless top_k is None or an int >= 1."""
    if top_k is None:
        return
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def _ranks(logprobs):
    """[..., V] int: rank of each token, larger first, ties to the smaller index."""
    order = jnp.argsort(-logprobs, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def sampling_logprobs(logprobs, p=1.0, *, temperature=1.0, top_k=None):
    """Log-probabilities of the distribution a token is drawn from.

    Temperature, then top-k, then nucleus (see the module docstring).

    Args:
      logprobs: [..., V] log-probabilities, or logits.
      p: nucleus mass in (0, 1] (1 keeps every token top-k kept).
      temperature: a number >= 0; 1 leaves the distribution as it is, 0 is
        greedy (the argmax, ties to the smaller index).
      top_k: None (every token) or an int >= 1 (k >= V keeps every token).

    Returns:
      [..., V] log-probabilities, -inf for tokens that cannot be drawn.
    """
    _check_p(p)
    _check_temperature(temperature)
    _check_top_k(top_k)
    if jnp.ndim(logprobs) < 1:
        raise ValueError(
            f"logprobs must have shape [..., V], got shape {list(jnp.shape(logprobs))}"
        )
    logprobs = jax.nn.log_softmax(logprobs, axis=-1)
    rank = _ranks(logprobs)
    positive = temperature > 0
    scaled = logprobs / jnp.where(positive, temperature, 1.0)
    greedy = jnp.where(rank == 0, 0.0, -jnp.inf).astype(logprobs.dtype)
    logprobs = jax.nn.log_softmax(jnp.where(positive, scaled, greedy), axis=-1)
    if top_k is not None:
        logprobs = jax.nn.log_softmax(
            jnp.where(rank < top_k, logprobs, -jnp.inf), axis=-1
        )
    return nucleus_logprobs(logprobs, p)


def sample_token(rng, logprobs, p=1.0, *, temperature=1.0, top_k=None):
    """[...] int32 tokens drawn from `sampling_logprobs` of logprobs [..., V]."""
    dist = sampling_logprobs(logprobs, p, temperature=temperature, top_k=top_k)
    return jax.random.categorical(rng, dist, axis=-1).astype(jnp.int32)


def decode_config(config: TransformerConfig) -> TransformerConfig:
    """The config of one decoding step: same model, one position per call."""
    return config.replace(block_len=1, is_train=False)


def state_nbytes(
    config: TransformerConfig, batch_size: int, max_len: int | None = None
) -> int:
    """Bytes of the decode state `Transformer.initial_state(config, B, max_len)`.

    Every call returns a state of the same shapes and dtypes as it was given, so
    this is also the size at every later position. max_len sizes the key/value
    buffer of dense attention (any attention but "vq") and is ignored for "vq".
    """
    shapes = jax.eval_shape(
        lambda: Transformer.initial_state(config, batch_size, max_len)
    )
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(shapes)
    )


def check_tokens(config: TransformerConfig, tokens, name: str = "prompt") -> dict:
    """ValueError unless tokens is [B, P], P >= 1, of ints in [0, n_vocab)."""
    dims = check_shape(name, tokens, "BP")
    check_integer(name, tokens)
    if dims["P"] < 1:
        raise ValueError(f"{name} must hold at least one token, got shape [B, 0]")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= config.n_vocab:
            raise ValueError(
                f"{name} tokens must lie in [0, n_vocab={config.n_vocab}), "
                f"got values in [{low}, {high}]"
            )
    return dims


def resolve_p(config: TransformerConfig, p_nucleus) -> float:
    """The nucleus mass to sample with: p_nucleus, else config.p_nucleus."""
    p = config.p_nucleus if p_nucleus is None else p_nucleus
    if p is None:
        raise ValueError("p_nucleus is needed: pass it or set config.p_nucleus")
    if not isinstance(p, numbers.Real) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"p_nucleus must lie in (0, 1], got {p!r}")
    return float(p)


def check_batch(dims: dict, state, name: str = "prompt") -> None:
    """ValueError unless the state was made for the batch size of the tokens."""
    b_state = int(np.shape(jax.tree.leaves(state)[-1])[0])
    if b_state != dims["B"]:
        raise ValueError(
            f"{name} has batch size B={dims['B']} but the state was made for "
            f"B={b_state}"
        )


def check_room(config: TransformerConfig, state, n_new: int) -> None:
    """ValueError unless a dense key/value buffer has room for n_new positions."""
    if config.attention == "vq":
        return
    n = dense_len(state)
    if not n:
        raise ValueError(
            "dense decoding needs a key/value buffer: a state from "
            "Transformer.initial_state(config, B, max_len) with max_len > 0, "
            "got one with N=0"
        )
    offset = state[0][0]["pos_offset"]
    if isinstance(offset, jax.core.Tracer):
        return  # its value is unknown until the traced function runs
    if int(offset) + n_new > n:
        raise ValueError(
            f"the dense key/value buffer holds N={n} positions, but "
            f"pos_offset={int(offset)} + {n_new} new tokens need {int(offset) + n_new}"
        )


def prefill(config: TransformerConfig, params, tokens, state):
    """Feed tokens after the state: whole blocks block-wise, the rest one by one.

    Args:
      config: the model config (its block_len is the block of the forward).
      params: the model's parameters (the "params" collection).
      tokens: [B, P] int tokens, P >= 1.
      state: the state before them (`Transformer.initial_state`); a dense
        buffer must have room for pos_offset + P positions.

    Returns:
      (logprobs [B, N] of the token after the last one, state after them).
    """
    dims = check_tokens(config, tokens, "tokens")
    check_batch(dims, state, "tokens")
    check_room(config, state, dims["P"])
    return _prefill(config.replace(is_train=False), params, jnp.asarray(tokens), state)


@functools.partial(jax.jit, static_argnames="config")
def _prefill(config, params, tokens, state):
    b, p = tokens.shape
    t = config.block_len
    head = p // t * t
    variables = {"params": params}
    if head:
        model = Transformer(config)
        blocks = jnp.moveaxis(tokens[:, :head].reshape(b, head // t, t), 1, 0)

        def feed_block(state, block):  # block [B, T]
            out = model.apply(variables, block, state)
            return out["attn_state"], out["logprobs"][:, -1]

        state, last = jax.lax.scan(feed_block, state, blocks)
    if p > head:
        step = Transformer(decode_config(config))

        def feed_token(state, token):  # token [B]
            out = step.apply(variables, token[:, None], state)
            return out["attn_state"], out["logprobs"][:, 0]

        state, last = jax.lax.scan(feed_token, state, tokens[:, head:].T)
    return last[-1], state


def check_stop_token(config: TransformerConfig, stop_token) -> None:
    """ValueError unless stop_token is None or an int in [0, n_vocab)."""
    if stop_token is None:
        return
    if (
        not isinstance(stop_token, numbers.Integral)
        or isinstance(stop_token, bool)
        or not 0 <= stop_token < config.n_vocab
    ):
        raise ValueError(
            f"stop_token must be None or an int in [0, n_vocab={config.n_vocab}), "
            f"got {stop_token!r}"
        )


def decode(
    config: TransformerConfig,
    params,
    logprobs,
    state,
    *,
    n_steps,
    rng,
    p,
    temperature=1.0,
    top_k=None,
    stop_token=None,
):
    """Sample up to n_steps tokens, one position per model call.

    Args:
      config: the model config; steps run under `decode_config(config)`.
      params: the model's parameters.
      logprobs: [B, N] distribution of the first token to sample.
      state: the state after everything before that token.
      n_steps: G >= 0, tokens to sample.
      rng: PRNG key; step i draws with `fold_in(rng, i)`.
      p: nucleus mass in (0, 1]; tiny p samples the argmax (greedy).
      temperature, top_k: see `sampling_logprobs` (applied before p).
      stop_token: None, or a token that ends a row: from the step a row draws
        it, the row holds it at every later position, and decoding ends once
        every row has drawn it.

    Returns:
      (tokens [B, G] int32, logprobs [B, N] of the token after the last token
      fed, state after it). Without a stop token, or when some row never
      stops, that is after all G tokens; when every row stopped earlier, after
      the step at which the last row stopped.
    """
    dims = check_shape("logprobs", logprobs, "BN", {"N": config.n_vocab})
    check_batch(dims, state, "logprobs")
    if not isinstance(n_steps, numbers.Integral) or n_steps < 0:
        raise ValueError(
            f"n_steps (max_new_tokens) must be an int >= 0, got {n_steps!r}"
        )
    check_room(config, state, n_steps)
    p = resolve_p(config, p)
    _check_temperature(temperature)
    _check_top_k(top_k)
    check_stop_token(config, stop_token)
    return _decode(
        decode_config(config),
        params,
        logprobs,
        state,
        rng,
        p,
        jnp.asarray(temperature, jnp.float32),
        n_steps,
        top_k,
        stop_token,
    )


@functools.partial(
    jax.jit, static_argnames=("config", "n_steps", "top_k", "stop_token")
)
def _decode(
    config, params, logprobs, state, rng, p, temperature, n_steps, top_k, stop_token
):
    step = Transformer(config)
    variables = {"params": params}
    b = logprobs.shape[0]
    fill = 0 if stop_token is None else stop_token

    def running(carry):
        i, stopped = carry[0], carry[-1]
        return (i < n_steps) & ~jnp.all(stopped)

    def sample_and_feed(carry):
        i, tokens, logprobs, state, stopped = carry
        token = sample_token(
            jax.random.fold_in(rng, i),
            logprobs,
            p,
            temperature=temperature,
            top_k=top_k,
        )
        if stop_token is not None:
            token = jnp.where(stopped, stop_token, token)
            stopped = stopped | (token == stop_token)
        tokens = tokens.at[:, i].set(token)
        out = step.apply(variables, token[:, None], state)
        return i + 1, tokens, out["logprobs"][:, 0], out["attn_state"], stopped

    carry = (
        jnp.zeros([], jnp.int32),
        jnp.full([b, n_steps], fill, jnp.int32),
        logprobs,
        state,
        jnp.zeros([b], bool),
    )
    _, tokens, logprobs, state, _ = jax.lax.while_loop(running, sample_and_feed, carry)
    return tokens, logprobs, state


def generate(
    config: TransformerConfig,
    params,
    prompt,
    *,
    max_new_tokens: int,
    rng,
    p_nucleus: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_token: int | None = None,
):
    """Continue each prompt by up to max_new_tokens sampled tokens.

    Args:
      config: the model config; dense attention decodes with a key/value
        buffer of P + max_new_tokens positions.
      params: the model's parameters (the "params" collection).
      prompt: [B, P] int tokens in [0, n_vocab), P >= 1.
      max_new_tokens: G >= 0.
      rng: PRNG key; new token i draws with `fold_in(rng, i)`.
      p_nucleus: nucleus mass in (0, 1], default config.p_nucleus; tiny p
        (say 1e-6) is greedy decoding.
      temperature: >= 0, applied first (0: greedy); top_k: None or >= 1,
        applied next; then the nucleus (see `sampling_logprobs`).
      stop_token: None, or a token that ends a row: the row holds it at
        the step it is drawn and at every later position.

    Returns:
      [B, P + G] int32: the prompt followed by the sampled tokens.
    """
    dims = check_tokens(config, prompt)
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    p = resolve_p(config, p_nucleus)
    max_len = dims["P"] + max_new_tokens if config.attention != "vq" else None
    state = Transformer.initial_state(config, dims["B"], max_len)
    logprobs, state = prefill(config, params, prompt, state)
    tokens, _, _ = decode(
        config,
        params,
        logprobs,
        state,
        n_steps=max_new_tokens,
        rng=rng,
        p=p,
        temperature=temperature,
        top_k=top_k,
        stop_token=stop_token,
    )
    return jnp.concatenate([jnp.asarray(prompt, jnp.int32), tokens], axis=1)
