"""Exact causal softmax attention over raw keys: the dense baseline, two ways.

Both compute, for the query at position i and every key at position j <= i,
the score q_i.k_j plus the Transformer-XL relative term (q_i + v).r_(i-j) when
i - j <= M, and one softmax over all of them: what Transformer-VQ's attention
would be without quantization or a cache.

- `dense_attention` (config.attention="dense") goes block by block, as flash
  attention does. A block of T queries starting at position s sees the
  WINDOW, positions s - M .. s + T - 1 (the M = mem_len previous keys and the
  block itself, causal mask and relative terms, as in Transformer-VQ's
  window), and the FAR part, positions 0 .. s - M - 1, which every query of
  the block sees whole, at distances above M, so without relative terms or
  mask. The far part runs an online softmax over chunks of `chunk_len` keys
  (a fixed size, so a one-token step costs time in proportion to its
  position) and returns its output with its log-sum-exp; the two parts merge
  by log-sum-exp. Its gradient is flash attention's backward pass, which
  recomputes the probabilities chunk by chunk: no P x P matrix is ever held,
  forward or backward, and future blocks cost nothing.
- `dense_full_attention` (config.attention="dense_full") builds the whole
  P x N score matrix and masks the future: the plain form, kept as the oracle
  the blockwise form is tested against and for the benchmarks.

Both take the same state: pos_offset, and key/value buffers k [B, H, N, K],
v [B, H, N, V]. With N > 0 the call's keys and values are written at
pos_offset and the queries attend over the buffer (decoding); with N = 0
nothing is carried and the queries attend over this call alone.

Axes: B batch, H heads, P length of the call, N buffer length, K key width,
V value width, T block length, M window (mem_len), C chunk length.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from tvq.attention import (
    MASK,
    check_block_len,
    relative_scores,
    to_blocks,
    window_masks,
)
from tvq.precision import accumulator, einsum
from tvq.vq import sg

CHUNK_LEN = 512  # keys per step of the far part's online softmax


# ----------------------------------------------------------------------------
# The far part: every query of block i sees positions 0 .. s_i - M - 1 whole.


def far_range(start, block, block_len, mem_len):
    """Number of far keys of a block: positions 0 .. n - 1, n >= 0."""
    return jnp.maximum(start + block * block_len - mem_len, 0)


def chunk_at(x, index, chunk_len):
    """Rows of chunk `index` of x [B, H, N, D], and their positions [C].

    The last chunk may reach past N: it is read from N - C on, and the rows
    before index * C (already counted by the chunk before) are flagged by the
    caller's mask through the positions returned.
    """
    first = jnp.minimum(index * chunk_len, x.shape[2] - chunk_len)
    rows = jax.lax.dynamic_slice_in_dim(x, first, chunk_len, axis=2)
    return rows, first + jnp.arange(chunk_len, dtype=first.dtype)


def chunk_mask(positions, index, chunk_len, n_far):
    """[C] bool: position belongs to this chunk and to the far part."""
    return (positions >= index * chunk_len) & (positions < n_far)


def n_chunks(n_far, chunk_len):
    return (n_far + chunk_len - 1) // chunk_len


def far_block_forward(q, keys, vals, n_far, chunk_len, dtype):
    """Online softmax of q [B, H, T, K] over keys 0 .. n_far - 1.

    Returns (output [B, H, T, V], log-sum-exp [B, H, T]); with no far keys,
    output 0 and log-sum-exp -MASK (exp gives exactly 0 when merging).
    """
    b, h, t, _ = q.shape
    stat_dtype = accumulator(q.dtype, keys.dtype)

    def step(index, carry):
        m, l, acc = carry
        k_c, pos = chunk_at(keys, index, chunk_len)
        v_c, _ = chunk_at(vals, index, chunk_len)
        keep = chunk_mask(pos, index, chunk_len, n_far)
        s = jnp.where(keep, einsum("bhtk,bhck->bhtc", q, k_c, dtype), -MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        l = l * rescale + jnp.sum(p, axis=-1)
        pv = einsum("bhtc,bhcv->bhtv", p, v_c, dtype)
        acc = acc * rescale[..., None] + pv
        return m_new, l, acc

    init = (
        jnp.full([b, h, t], -MASK, stat_dtype),
        jnp.zeros([b, h, t], stat_dtype),
        jnp.zeros([b, h, t, vals.shape[-1]], stat_dtype),
    )
    zero = jnp.zeros_like(n_far)
    m, l, acc = jax.lax.fori_loop(zero, n_chunks(n_far, chunk_len), step, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -MASK)
    return out, lse


def far_block_backward(
    q, keys, vals, n_far, chunk_len, dtype, out_ct, delta, lse, dk, dv
):
    """Flash attention's backward pass for one block's far part.

    delta [B, H, T] = rowsum(dout * out) - dlse: the score cotangent is
    p (dout.v - delta). Returns dq [B, H, T, K] and dk, dv with this block's
    contributions added.
    """

    def step(index, carry):
        dq, dk, dv = carry
        k_c, pos = chunk_at(keys, index, chunk_len)
        v_c, _ = chunk_at(vals, index, chunk_len)
        keep = chunk_mask(pos, index, chunk_len, n_far)
        s = einsum("bhtk,bhck->bhtc", q, k_c, dtype)
        p = jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0)
        dp = einsum("bhtv,bhcv->bhtc", out_ct, v_c, dtype)
        ds = p * (dp - delta[..., None])
        dq = dq + einsum("bhtc,bhck->bhtk", ds, k_c, dtype)
        first = pos[0]
        dk_c = einsum("bhtc,bhtk->bhck", ds, q, dtype)
        dv_c = einsum("bhtc,bhtv->bhcv", p, out_ct, dtype)
        dk = jax.lax.dynamic_update_slice_in_dim(
            dk, jax.lax.dynamic_slice_in_dim(dk, first, chunk_len, 2) + dk_c, first, 2
        )
        dv = jax.lax.dynamic_update_slice_in_dim(
            dv, jax.lax.dynamic_slice_in_dim(dv, first, chunk_len, 2) + dv_c, first, 2
        )
        return dq, dk, dv

    dq = jnp.zeros(q.shape, dk.dtype)
    zero = jnp.zeros_like(n_far)
    return jax.lax.fori_loop(zero, n_chunks(n_far, chunk_len), step, (dq, dk, dv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def far_attention(q, keys, vals, start, block_len, mem_len, chunk_len, dtype=None):
    """Softmax attention of each block of q over its far keys.

    Block i of T = block_len queries (positions start + i T ..) sees the keys
    at buffer positions 0 .. start + i T - M - 1, every one of them, with no
    mask or relative term.

    Args:
      q: [B, H, P, K] queries, P a multiple of T.
      keys: [B, H, N, K] and vals: [B, H, N, V], the buffer (N >= C).
      start: [] int32, buffer position of the first query.
      block_len, mem_len, chunk_len: T, M, C (static).
      dtype: the products' input dtype (None: the inputs'), forward and
        backward; statistics and sums in float32 at least.

    Returns:
      (output [B, H, P, V], log-sum-exp [B, H, P]), float32 at least; a block
      with no far keys gets output 0 and log-sum-exp -1e30.
    """
    args = (block_len, mem_len, chunk_len, dtype)
    return _far_forward(q, keys, vals, start, *args)[0]


def _far_forward(q, keys, vals, start, block_len, mem_len, chunk_len, dtype):
    def block(_, xs):
        i, q_i = xs
        n_far = far_range(start, i, block_len, mem_len)
        return None, far_block_forward(q_i, keys, vals, n_far, chunk_len, dtype)

    n_block = q.shape[2] // block_len
    index = jnp.arange(n_block, dtype=start.dtype)
    _, (out, lse) = jax.lax.scan(block, None, (index, to_blocks(q, block_len)))
    out, lse = from_blocks(out), from_blocks(lse)
    return (out, lse), (q, keys, vals, start, out, lse)


def _far_backward(block_len, mem_len, chunk_len, dtype, residuals, cotangents):
    q, keys, vals, start, out, lse = residuals
    out_ct, lse_ct = cotangents
    out_ct = out_ct.astype(out.dtype)
    delta = jnp.sum(out_ct * out, axis=-1) - lse_ct

    def block(carry, xs):
        i, q_i, ct_i, delta_i, lse_i = xs
        n_far = far_range(start, i, block_len, mem_len)
        dq, dk, dv = far_block_backward(
            q_i, keys, vals, n_far, chunk_len, dtype, ct_i, delta_i, lse_i, *carry
        )
        return (dk, dv), dq

    acc = accumulator(q.dtype, keys.dtype)
    zeros = (jnp.zeros(keys.shape, acc), jnp.zeros(vals.shape, acc))
    n_block = q.shape[2] // block_len
    xs = (jnp.arange(n_block, dtype=start.dtype),) + tuple(
        to_blocks(x, block_len) for x in (q, out_ct, delta, lse)
    )
    (dk, dv), dq = jax.lax.scan(block, zeros, xs)
    dq = from_blocks(dq)
    return dq.astype(q.dtype), dk.astype(keys.dtype), dv.astype(vals.dtype), None


far_attention.defvjp(_far_forward, _far_backward)


def from_blocks(x):
    """[R, B, H, T, ...] -> [B, H, R T, ...]."""
    r, b, h, t, *rest = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, r * t, *rest)


# ----------------------------------------------------------------------------
# The window: the M previous positions and the block, as Transformer-VQ's.


def window_block(q, k, v, xl_k, xl_v, pos, q_pos, r, dtype):
    """Softmax of one block over its window; (output [B, H, T, V], lse [B, H, T]).

    q, k, q_pos: [B, H, T, K]; v: [B, H, T, V]; xl_k, xl_v: the M positions
    before the block; pos: [] position of the block's first query (keys before
    position 0 are masked); r: [H, M + 1, K]; dtype: the products' input
    dtype (None: the inputs').
    """
    block_len, mem_len = q.shape[2], xl_k.shape[2]
    keys = jnp.concatenate([xl_k, k], axis=2)
    vals = jnp.concatenate([xl_v, v], axis=2)
    keep, _ = window_masks(block_len, mem_len, pos, agg_cache=True)
    scores = einsum("bhtk,bhwk->bhtw", q, keys, dtype)
    if q_pos is not None:
        scores = scores + relative_scores(q_pos, r, dtype)
    scores = jnp.where(keep, scores, -MASK)
    m = sg(jnp.max(scores, axis=-1))
    p = jnp.exp(scores - m[..., None])
    l = jnp.sum(p, axis=-1)
    out = einsum("bhtw,bhwv->bhtv", p, vals, dtype) / l[..., None]
    return out, m + jnp.log(l)


def window_attention(q, k, v, xl_k, xl_v, start, q_pos, r, block_len, dtype):
    """`window_block` for every block of the call, sliding the window along.

    q, k, q_pos: [B, H, P, K]; v: [B, H, P, V]; xl_k [B, H, M, K], xl_v
    [B, H, M, V]: the M positions before the call; start: [] position of the
    first query; dtype as in `window_block`. Returns (output [B, H, P, V],
    lse [B, H, P]).
    """

    def step(carry, blk):
        xl_k, xl_v, pos = carry
        q_b, k_b, v_b, qp_b = blk
        out = window_block(q_b, k_b, v_b, xl_k, xl_v, pos, qp_b, r, dtype)
        xl_k = jnp.concatenate([xl_k, k_b], axis=2)[:, :, block_len:]
        xl_v = jnp.concatenate([xl_v, v_b], axis=2)[:, :, block_len:]
        return (xl_k, xl_v, pos + block_len), out

    blocks = tuple(
        None if x is None else to_blocks(x, block_len) for x in (q, k, v, q_pos)
    )
    _, (out, lse) = jax.lax.scan(step, (xl_k, xl_v, start), blocks)
    return from_blocks(out), from_blocks(lse)


def rows_before(x, start, count):
    """[B, H, count, D]: rows start - count .. start - 1 of x [B, H, N, D],
    zeros where the position is below 0. Reads O(count) rows, whatever N."""
    b, h, n, d = x.shape
    if n < count:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, count - n), (0, 0)])
    head = jnp.concatenate([jnp.zeros_like(x[:, :, :count]), x[:, :, :count]], axis=2)
    early = jax.lax.dynamic_slice_in_dim(head, jnp.minimum(start, count), count, 2)
    late = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(start - count, 0), count, 2)
    return jnp.where(start >= count, late, early)


# ----------------------------------------------------------------------------
# The two dense attentions of a GAU.


def check_room(state, length):
    """ValueError unless a buffer (N > 0) can hold a call of `length` positions.

    Whether pos_offset + P <= N is known only when the call runs; P <= N is
    known when it is traced.
    """
    n = state["k"].shape[2]
    if 0 < n < length:
        raise ValueError(
            f"the key/value buffer holds N={n} positions, a call of P={length} "
            "cannot fit: make the state with Transformer.initial_state(config, B, "
            "max_len) and max_len >= pos_offset + P"
        )


def write_buffer(state, k, v):
    """The call's keys and values written into the state's buffers at pos_offset.

    Returns (keys [B, H, N', K], values [B, H, N', V], buffer position of the
    first query, new state); N' = P when the state carries no buffer.
    """
    offset = state["pos_offset"]
    present = k.shape[2]
    if state["k"].shape[2] == 0:
        start = jnp.zeros_like(offset)
        return k, v, start, dict(state, pos_offset=offset + present)
    zero = jnp.zeros_like(offset)  # all indices of one dtype, also with x64
    at = (zero, zero, offset, zero)
    keys = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), at)
    vals = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), at)
    return keys, vals, offset, dict(pos_offset=offset + present, k=keys, v=vals)


def dense_attention(
    q, k, v, state, *, block_len, mem_len, q_pos, r, chunk_len=CHUNK_LEN, dtype=None
):
    """Exact causal attention, block by block, with no P x N matrix.

    Same result as `dense_full_attention` (module docstring): the window of
    each block exactly as Transformer-VQ's, every older key through
    `far_attention`, merged by log-sum-exp.

    Args:
      q, k, q_pos: [B, H, P, K]; v: [B, H, P, V]; P a multiple of block_len.
      state: pos_offset, k [B, H, N, K], v [B, H, N, V] (N = 0: no buffer;
        else pos_offset + P <= N).
      block_len: T; mem_len: M; q_pos, r: [B, H, P, K] and [H, M + 1, K], the
        relative terms (None: none); chunk_len: C, keys per step
        of the far part; dtype: the products' input dtype (bfloat16 for mixed
        precision; None: the inputs'), softmax in float32 at least.

    Returns:
      ([B, H, P, V] output, new state).
    """
    check_block_len(block_len, q.shape[2], f"q shape {list(q.shape)}")
    if not isinstance(chunk_len, numbers.Integral) or chunk_len <= 0:
        raise ValueError(f"chunk_len must be a positive int, got {chunk_len!r}")
    check_room(state, q.shape[2])
    keys, vals, start, new_state = write_buffer(state, k, v)
    if state["k"].shape[2] == 0:
        xl_k = jnp.zeros([*k.shape[:2], mem_len, k.shape[3]], k.dtype)
        xl_v = jnp.zeros([*v.shape[:2], mem_len, v.shape[3]], v.dtype)
    else:
        xl_k = rows_before(state["k"], start, mem_len).astype(k.dtype)
        xl_v = rows_before(state["v"], start, mem_len).astype(v.dtype)
    out_w, lse_w = window_attention(
        q, k, v, xl_k, xl_v, start, q_pos, r, block_len, dtype
    )
    chunk = min(chunk_len, keys.shape[2])
    out_f, lse_f = far_attention(q, keys, vals, start, block_len, mem_len, chunk, dtype)
    lse = jnp.logaddexp(lse_w, lse_f)
    w_w, w_f = jnp.exp(lse_w - lse)[..., None], jnp.exp(lse_f - lse)[..., None]
    return w_w * out_w + w_f * out_f, new_state


def dense_full_attention(q, k, v, state, *, mem_len, q_pos, r, dtype=None):
    """Exact causal attention of each query over every earlier position, the
    P x N way (the oracle of `dense_attention`).

    Args:
      q, k, q_pos: [B, H, P, K]; v: [B, H, P, V]; state: pos_offset, k
      [B, H, N, K], v [B, H, N, V]; r: [H, M + 1, K] (q_pos and r None: no
      relative terms); dtype: the products' input dtype (None: the inputs'),
      softmax in float32 at least.

    Returns:
      ([B, H, P, V] output, new state).
    """
    present = q.shape[2]
    check_room(state, present)
    keys, vals, start, new_state = write_buffer(state, k, v)
    q_at = start + jnp.arange(present)
    k_at = jnp.arange(keys.shape[2])
    # Relative terms in window columns: keys at positions start - M .. start
    # + P - 1, placed at their positions in the buffer.
    scores = einsum("bhpk,bhnk->bhpn", q, keys, dtype)
    if q_pos is not None:
        rel = relative_scores(q_pos, r, dtype)  # [B, H, P, M + P]
        if state["k"].shape[2] > 0:
            zero = jnp.zeros_like(start)
            wide = jnp.zeros([*rel.shape[:3], mem_len + keys.shape[2]], rel.dtype)
            rel = jax.lax.dynamic_update_slice(wide, rel, (zero, zero, zero, start))
        scores = scores + rel[..., mem_len:]
    causal = q_at[:, None] >= k_at[None, :]  # [P, N]
    scores = jnp.where(causal, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    return einsum("bhpn,bhnv->bhpv", weights, vals, dtype), new_state


# ----------------------------------------------------------------------------
# FLOP counts (2 M N K per [M, K] x [K, N] product).


def dense_attention_flops(
    length: int,
    block_len: int,
    mem_len: int,
    d_k: int,
    d_v: int,
    chunk_len: int = CHUNK_LEN,
    start: int = 0,
    n_keys: int | None = None,
    relative: bool = True,
) -> int:
    """Matmul FLOPs of `dense_attention`'s forward pass, one batch element and
    one head, for a call of `length` queries from buffer position `start` in a
    buffer of N = n_keys positions (default start + length; no buffer: N =
    length, start 0).

    Each block of T queries: 2 T (M + T) (K + V) for its window and
    2 T (M + 1) K for the relative terms (`relative_scores`; none without
    them, relative=False), plus
    2 T C (K + V) per chunk of C far keys, ceil((s - M) / C) chunks for a
    block starting at s (C = min(chunk_len, N)). Products against keys before
    position 0 (the first blocks' windows) are counted too: they are computed
    and masked.
    """
    n = start + length if n_keys is None else n_keys
    c = min(chunk_len, n)
    w = mem_len + block_len
    total = 0
    for s in range(start, start + length, block_len):
        far = max(s - mem_len, 0)
        chunks = -(-far // c)
        total += 2 * block_len * (w * (d_k + d_v) + relative * (mem_len + 1) * d_k)
        total += 2 * block_len * chunks * c * (d_k + d_v)
    return total


def dense_full_attention_flops(
    length: int,
    mem_len: int,
    d_k: int,
    d_v: int,
    n_keys: int | None = None,
    relative: bool = True,
) -> int:
    """Matmul FLOPs of `dense_full_attention`'s forward pass, one batch element
    and one head: 2 P N (K + V) for the scores and the weighted sum over all
    N keys (N = P without a buffer) and 2 P (M + 1) K for the relative terms
    (none with relative=False)."""
    n = length if n_keys is None else n_keys
    rel = 2 * length * (mem_len + 1) * d_k if relative else 0
    return 2 * length * n * (d_k + d_v) + rel
