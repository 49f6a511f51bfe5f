"""Multi-query associative recall (MQAR), the synthetic task of Arora et al.,
"Zoology: Measuring and Improving Recall in Efficient Language Models" (2023).

Each sequence of length L lists P key-value pairs, then `gap` filler tokens,
then a query region in which Q of the keys reappear, each followed by its
value. A model reading the sequence left to right must answer every query key
with the value paired with it earlier. The loss counts only those answers:

    position   0  1  2  3  ... 2P-1 | 2P ... 2P+gap-1 | query region
    inputs     k0 v0 k1 v1 ... vP-1 | 0  ... 0        | 0 0 k2 v2 0 0 k0 v0 ...
    loss_mask                       |                 |     1         1

Token 0 is the filler; keys come from tokens 1..h, values from h+1..2h, with
h = (n_vocab - 1) // 2, so keys and values never share a token. Keys are
distinct within a sequence and each query asks a different key, so the only
earlier occurrence of a query key is in the pair section, `distance` tokens
back (its value one token later). Queries sit on even offsets of the query
region, in uniformly random slots (all slots when the region holds exactly Q).

Axes: B batch, L length, P pairs, Q queries, E bin edges.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from tvq.shapes import check_shape

FILLER = 0
# Every argument of `mqar_batch` but `rng`: static under `jax.jit`.
MQAR_STATIC_ARGNAMES = (
    "batch_size",
    "seq_len",
    "n_vocab",
    "n_pairs",
    "n_queries",
    "gap",
)


def _check_int(name: str, value, minimum: int) -> None:
    """ValueError unless `value` is a Python/NumPy int >= `minimum`."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < minimum
    ):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_args(
    batch_size: int, seq_len: int, n_vocab: int, n_pairs: int, n_queries: int, gap: int
) -> None:
    """ValueError naming the expected and actual values of a bad MQAR setting."""
    _check_int("batch_size", batch_size, 1)
    _check_int("n_pairs", n_pairs, 1)
    _check_int("n_queries", n_queries, 1)
    _check_int("gap", gap, 0)
    _check_int("seq_len", seq_len, 1)
    _check_int("n_vocab", n_vocab, 1)
    if n_queries > n_pairs:
        raise ValueError(
            f"n_queries={n_queries} must not exceed n_pairs={n_pairs}: "
            "each query asks a different key"
        )
    if n_vocab < 2 * n_pairs + 1:
        raise ValueError(
            f"n_vocab={n_vocab} is too small for n_pairs={n_pairs} distinct keys: "
            f"need n_vocab >= 2 * n_pairs + 1 = {2 * n_pairs + 1} "
            "(filler token 0, then disjoint halves for keys and values)"
        )
    needed = 2 * n_pairs + gap + 2 * n_queries
    if seq_len < needed:
        raise ValueError(
            f"seq_len={seq_len} is too short: need 2 * n_pairs + gap + 2 * n_queries "
            f"= {needed} (n_pairs={n_pairs}, gap={gap}, n_queries={n_queries})"
        )


def _mqar_one(rng, seq_len: int, n_vocab: int, n_pairs: int, n_queries: int, gap: int):
    """One MQAR sequence: inputs, targets, loss_mask, distance, each [L] int32."""
    rng_key, rng_value, rng_ask, rng_slot = jax.random.split(rng, 4)
    half = (n_vocab - 1) // 2
    n_slot = (seq_len - 2 * n_pairs - gap) // 2
    i32 = jnp.int32
    # [P] distinct keys in 1..half and values in half+1..2*half.
    keys = jax.random.permutation(rng_key, jnp.arange(1, half + 1, dtype=i32))
    keys = keys[:n_pairs]
    values = jax.random.randint(rng_value, [n_pairs], half + 1, 2 * half + 1, i32)
    # [Q] distinct pairs to ask, in random order, at sorted random slots.
    asked = jax.random.permutation(rng_ask, jnp.arange(n_pairs, dtype=i32))
    asked = asked[:n_queries]
    slots = jax.random.permutation(rng_slot, jnp.arange(n_slot, dtype=i32))
    query_pos = 2 * n_pairs + gap + 2 * jnp.sort(slots[:n_queries])

    inputs = jnp.full([seq_len], FILLER, dtype=i32)
    inputs = inputs.at[0 : 2 * n_pairs : 2].set(keys)
    inputs = inputs.at[1 : 2 * n_pairs : 2].set(values)
    inputs = inputs.at[query_pos].set(keys[asked])
    inputs = inputs.at[query_pos + 1].set(values[asked])
    # Next-token targets: the answer to the query at t is inputs[t + 1].
    targets = jnp.append(inputs[1:], i32(FILLER))
    loss_mask = jnp.zeros([seq_len], dtype=i32).at[query_pos].set(1)
    # The key of pair i sits at position 2 i.
    distance = jnp.zeros([seq_len], dtype=i32).at[query_pos].set(query_pos - 2 * asked)
    return inputs, targets, loss_mask, distance


def mqar_batch(
    rng,
    *,
    batch_size: int,
    seq_len: int,
    n_vocab: int,
    n_pairs: int,
    n_queries: int | None = None,
    gap: int = 0,
) -> dict[str, jax.Array]:
    """A batch of MQAR sequences, determined by `rng`.

    Under `jax.jit` pass every argument but `rng` as static, e.g.
    `jax.jit(mqar_batch, static_argnames=MQAR_STATIC_ARGNAMES)`; bad settings
    then raise ValueError at trace time.

    Args:
      rng: a JAX PRNG key.
      batch_size: B.
      seq_len: L >= 2 * n_pairs + gap + 2 * n_queries.
      n_vocab: vocabulary size, >= 2 * n_pairs + 1.
      n_pairs: P key-value pairs at the start of each sequence.
      n_queries: Q <= P queries, each asking a different key; default P.
      gap: filler tokens between the pairs and the query region; every
        key-query distance is at least gap + 2.

    Returns:
      inputs: [B, L] int32 tokens.
      targets: [B, L] int32 next tokens, targets[:, t] = inputs[:, t + 1]
        (filler at t = L - 1); at a query, the value of its key.
      loss_mask: [B, L] int32, 1 exactly at the Q query positions per row.
      distance: [B, L] int32 query position minus its key's position at the
        query positions, 0 elsewhere.
    """
    n_queries = n_pairs if n_queries is None else n_queries
    _check_args(batch_size, seq_len, n_vocab, n_pairs, n_queries, gap)
    one = jax.vmap(lambda r: _mqar_one(r, seq_len, n_vocab, n_pairs, n_queries, gap))
    inputs, targets, loss_mask, distance = one(jax.random.split(rng, batch_size))
    return dict(inputs=inputs, targets=targets, loss_mask=loss_mask, distance=distance)


def accuracy_by_distance(correct, loss_mask, distance, bins):
    """Accuracy of the answers whose key-query distance falls in each bin.

    Args:
      correct: [B, L] bool, whether the prediction at each position is right.
      loss_mask: [B, L], nonzero at the answer positions.
      distance: [B, L] int key-query distances (as returned by `mqar_batch`).
      bins: [E] increasing bin edges; bin n holds bins[n] <= d < bins[n + 1]
        (the last bin also holds d = bins[-1]). Answers outside all bins are
        left out.

    Returns:
      accuracy: [E - 1] float64 fraction correct per bin, NaN for an empty bin.
      count: [E - 1] int64 answers per bin.
    """
    dims = check_shape("correct", correct, "BL")
    check_shape("loss_mask", loss_mask, "BL", dims)
    check_shape("distance", distance, "BL", dims)
    bins = np.asarray(bins)
    check_shape("bins", bins, "E")
    if bins.size < 2 or np.any(np.diff(bins) <= 0):
        raise ValueError(
            f"bins must be at least 2 strictly increasing edges, got {bins.tolist()}"
        )
    answer = np.asarray(loss_mask) != 0
    dist = np.asarray(distance)[answer]
    hit = np.asarray(correct, dtype=bool)[answer]
    count = np.histogram(dist, bins)[0]
    right = np.histogram(dist[hit], bins)[0]
    accuracy = np.full(count.shape, np.nan)
    np.divide(right, count, out=accuracy, where=count > 0)
    return accuracy, count
