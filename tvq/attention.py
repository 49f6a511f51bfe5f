"""Causal softmax attention over quantized keys, block by block, in linear time.

Each block of T = block_len queries attends

- exactly to a window: the M = mem_len previous keys and values carried in the
  state (the "xlcache") and its own block under a causal mask, with optional
  Transformer-XL relative position terms for distances 0..M;
- through the codebook to every older position: keys quantized to S codewords
  reduce to a per-code count n_s and running mean of values (the "aggcache"),
  and code s enters the softmax once, with score q.c_s + log n_s.

After the block, its T oldest window entries fold into the aggcache. The state
has a fixed size whatever the length, so a length-L sequence costs
O(L (S + M + T)) time and the state O(S V + M (K + V)) memory per head.

This is the one block-attention implementation of tvq: `vq_attention` (the
attention chapter), `tvq.layers.GAU` (the model) and decoding (block_len = 1)
all run `attend_block` and `update_state` below.

Axes: B batch, H heads, L length, S codes, K key width, V value width,
T block length, M window (mem_len), W = M + T, R blocks.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from tvq.precision import einsum
from tvq.shapes import check_shape
from tvq.vq import get_codewords, nearest_codes, sg, st

MASK = 1e30  # a masked score is -MASK: exp gives exactly 0, and no inf arises


def initial_attention_state(
    batch_size: int,
    n_head: int,
    n_code: int,
    mem_len: int,
    d_k: int,
    d_v: int,
    dtype=jnp.float32,
) -> dict:
    """The state before the first block: empty window, empty cache.

    Returns a pytree with
      pos_offset: [] int32, positions seen so far;
      xlcache: z [B, H, M] int32 shortcodes (S marks an empty slot),
        k_hat [B, H, M, K] quantized keys, v [B, H, M, V] values;
      aggcache: lower [B, H, S] counts n_s, upper_div_lower [B, H, S, V]
        running means of the values of each code.
    """
    if not isinstance(mem_len, numbers.Integral) or mem_len < 0:
        raise ValueError(f"mem_len must be an int >= 0, got {mem_len!r}")
    prefix = [batch_size, n_head]
    return dict(
        pos_offset=jnp.zeros([], jnp.int32),
        xlcache=dict(
            z=jnp.full([*prefix, mem_len], n_code, jnp.int32),
            k_hat=jnp.zeros([*prefix, mem_len, d_k], dtype),
            v=jnp.zeros([*prefix, mem_len, d_v], dtype),
        ),
        aggcache=dict(
            lower=jnp.zeros([*prefix, n_code], dtype),
            upper_div_lower=jnp.zeros([*prefix, n_code, d_v], dtype),
        ),
    )


def check_state(state: dict, expected: dict, name: str = "state") -> None:
    """ValueError unless `state` has the structure, shapes and dtypes of `expected`."""
    if jax.tree.structure(state) != jax.tree.structure(expected):
        raise ValueError(
            f"{name} must have the structure {jax.tree.structure(expected)}, "
            f"got {jax.tree.structure(state)}"
        )
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(state),
        jax.tree.leaves(expected),
        strict=True,
    ):
        where = name + jax.tree_util.keystr(path)
        if jnp.shape(got) != jnp.shape(want):
            raise ValueError(
                f"{where} must have shape {list(jnp.shape(want))} (a state made for "
                f"this batch size and config), got shape {list(jnp.shape(got))}"
            )
        if jnp.result_type(got) != jnp.result_type(want):
            raise ValueError(
                f"{where} must have dtype {jnp.result_type(want)}, "
                f"got {jnp.result_type(got)}"
            )


def sinusoids(length: int, width: int, lam: float, start=0) -> jax.Array:
    """[length, width] sin and cos of positions start.. at wavelengths up to lam.

    Column i < width / 2 holds sin(p / lam^(2i / width)), the rest the cosines.
    """
    positions = start + jnp.arange(length)
    inv_lams = lam ** (-jnp.arange(0, width, 2) / width)
    angles = positions[:, None] * inv_lams[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def agg_biases(lower: jax.Array) -> jax.Array:
    """log n_s for each code's count n_s, and -1e30 (masked) where n_s = 0."""
    return jnp.where(lower > 0, jnp.log(jnp.maximum(lower, 1.0)), -MASK)


def window_masks(block_len, mem_len, pos_offset, agg_cache):
    """Which window entries each query of a block may see. Both [T, W] bool.

    Window column j holds the key at distance M + i - j from query i. `keep`:
    the key exists (not before position 0) and is not in the future; without the
    aggcache, also at distance <= M (a sliding window). `near`: kept and at
    distance <= M, where the relative position terms act.
    """
    i = jnp.arange(block_len)[:, None]
    j = jnp.arange(mem_len + block_len)[None, :]
    exists = j >= jnp.maximum(mem_len - pos_offset, 0)
    near = exists & (j <= mem_len + i) & (j >= i)
    keep = near if not agg_cache else exists & (j <= mem_len + i)
    return keep, near


def skew(by_distance: jax.Array) -> jax.Array:
    """[..., T, M + 1] values by distance -> [..., T, M + T] by window column.

    Row i of the result holds by_distance[i, d] at column j = M + i - d, for
    d = 0..M, and zeros elsewhere: query i sits at column M + i, its keys to
    the left. Pure padding and reshaping (the Transformer-XL "relative shift"),
    so its gradient is one too: no gather, no scatter.
    """
    *lead, t, m1 = by_distance.shape
    # Reversed, column c holds distance M - c; padding each row with T zeros and
    # reading the flat array T + M columns at a time shifts row i right by i.
    rows = jnp.pad(jnp.flip(by_distance, -1), [(0, 0)] * len(lead) + [(0, 0), (0, t)])
    flat = rows.reshape(*lead, t * (m1 + t))[..., : t * (m1 + t - 1)]
    return flat.reshape(*lead, t, m1 + t - 1)


def relative_scores(q_pos, r, dtype=None):
    """[B, H, T, M + T] (q + v).r_d for window column j at distance d = M + i - j.

    q_pos: [B, H, T, K] queries plus the XL bias v; r: [H, M + 1, K] projected
    sinusoids of distances 0..M; dtype: that of the product (None: the
    inputs'). Entries at distances outside 0..M are 0.
    """
    return skew(einsum("bhtk,bhdk->bhtd", q_pos, per_batch(r, q_pos), dtype))


def per_batch(x, like):
    """[H, ...] broadcast to [B, H, ...] with the B of `like`: products whose
    batch axes lead both operands need no transposed copy of their result."""
    return jnp.broadcast_to(x[None], (like.shape[0], *x.shape))


def attend_block(
    q, k_hat, v, codebook, state, *, agg_cache=True, q_pos=None, r=None, dtype=None
):
    """One block's attention over its window and the aggcache.

    Scores are q.k_hat (+ relative terms) in the window and q.c_s + log n_s for
    the S codes of the aggcache; one softmax over the S + W entries, shifted by
    its max. The codebook enters with a stop-gradient: the language model loss
    never reaches it (its EMA update is a loss of its own); nor does it reach
    the counts n_s.

    Args:
      q: [B, H, T, K] queries (content part, XL bias u already added).
      k_hat: [B, H, T, K] this block's quantized (or, dense, raw) keys.
      v: [B, H, T, V] this block's values.
      codebook: [H, S, K].
      state: the attention state before this block (`initial_attention_state`).
      agg_cache: attend to the aggcache; without it, a sliding window of M.
      q_pos, r: optional relative position terms, [B, H, T, K] and [H, M + 1, K].
      dtype: the products' input dtype (bfloat16 for mixed precision; None:
        the inputs'); they accumulate, and the softmax runs, in float32 at
        least.

    Returns:
      [B, H, T, V] attention output, float32 at least.
    """
    code_scores, by_distance = stateless_products(
        q, codebook, q_pos, r, agg_cache=agg_cache, dtype=dtype
    )
    return attend_with_products(
        q, k_hat, v, code_scores, by_distance, state, agg_cache=agg_cache, dtype=dtype
    )


def stateless_products(q, codebook, q_pos, r, *, agg_cache, dtype):
    """The two products of attention that need no state, for any L positions:
    q.c_s [B, H, L, S] against the codewords (None without the aggcache) and
    (q + v).r_d [B, H, L, M + 1] by distance (None without q_pos).

    `blockwise_attention` makes them for every block at once: large matmuls,
    where block by block they would be small ones.
    """
    code_scores = by_distance = None
    if agg_cache:
        codewords = per_batch(sg(codebook), q)
        code_scores = einsum("bhlk,bhsk->bhls", q, codewords, dtype)
    if q_pos is not None:
        by_distance = einsum("bhlk,bhdk->bhld", q_pos, per_batch(r, q_pos), dtype)
    return code_scores, by_distance


def attend_with_products(
    q, k_hat, v, code_scores, by_distance, state, *, agg_cache, dtype
):
    """`attend_block` given its block's `stateless_products` (T positions).

    The codes and the window are two products each (scores, then weighted
    values) sharing the max and the normalizer, with no [S + W]
    concatenation; the backward pass is written out (`_block_bwd`), as flash
    attention's, from the saved probabilities.
    """
    xl, agg = state["xlcache"], state["aggcache"]
    block_len, mem_len = q.shape[2], xl["z"].shape[-1]
    keep, _ = window_masks(block_len, mem_len, state["pos_offset"], agg_cache)
    log_n = agg_biases(agg["lower"]) if agg_cache else None
    return _block(
        q,
        k_hat,
        v,
        xl["k_hat"],
        xl["v"],
        agg["upper_div_lower"],
        code_scores,
        by_distance,
        log_n,
        keep,
        dtype,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _block(q, k, v, xl_k, xl_v, means, code_scores, by_distance, log_n, keep, dtype):
    args = (q, k, v, xl_k, xl_v, means, code_scores, by_distance, log_n, keep)
    return _block_fwd(*args, dtype)[0]


def _block_fwd(
    q, k, v, xl_k, xl_v, means, code_scores, by_distance, log_n, keep, dtype
):
    keys = jnp.concatenate([xl_k, k], axis=2)  # [B, H, W, K]
    vals = jnp.concatenate([xl_v, v], axis=2)  # [B, H, W, V]
    scores = einsum("bhtk,bhwk->bhtw", q, keys, dtype)
    if by_distance is not None:
        scores = scores + skew(by_distance)
    # Masked entries get a large negative score (not -inf, so no inf arises):
    # exp makes them exactly 0. A query always sees itself.
    scores = jnp.where(keep, scores, -MASK)
    top = jnp.max(scores, axis=-1, keepdims=True)
    if code_scores is not None:
        # Code s stands for its n_s keys: exp(q.c_s + log n_s) = n_s exp(q.c_s).
        codes = code_scores + log_n[:, :, None, :]
        top = jnp.maximum(top, jnp.max(codes, axis=-1, keepdims=True))
    weights = jnp.exp(scores - top)
    out = einsum("bhtw,bhwv->bhtv", weights, vals, dtype)
    norm = jnp.sum(weights, axis=-1, keepdims=True)
    code_probs = None
    if code_scores is not None:
        code_weights = jnp.exp(codes - top)
        out = out + einsum("bhts,bhsv->bhtv", code_weights, means, dtype)
        norm = norm + jnp.sum(code_weights, axis=-1, keepdims=True)
        code_probs = code_weights / norm
    out = out / norm
    # The pieces of the window, not their concatenation: a scan over blocks
    # stacks these per block, and the block's own k and v it has already.
    relative = None if by_distance is None else jnp.zeros([0], by_distance.dtype)
    residuals = (q, k, v, xl_k, xl_v, means, out, weights / norm, code_probs, relative)
    return out, residuals


def _block_bwd(dtype, residuals, out_ct):
    """Flash attention's backward pass over the window and the codes.

    With probabilities p = softmax(scores) and D = rowsum(dout * out), the
    score cotangent is p (dout.v - D); keys and queries get it through the
    score products, values through p^T dout, the relative terms and the code
    scores as they are (their products are differentiated outside).
    """
    q, k, v, xl_k, xl_v, means, out, probs, code_probs, relative = residuals
    keys = jnp.concatenate([xl_k, k], axis=2)
    vals = jnp.concatenate([xl_v, v], axis=2)
    mem_len = xl_k.shape[2]
    out_ct = out_ct.astype(out.dtype)
    delta = jnp.sum(rows(out_ct * out), axis=-1).reshape(out.shape[:-1] + (1,))
    d_scores = probs * (einsum("bhtv,bhwv->bhtw", out_ct, vals, dtype) - delta)
    d_vals = einsum("bhtw,bhtv->bhwv", probs, out_ct, dtype)
    d_q = einsum("bhtw,bhwk->bhtk", d_scores, keys, dtype)
    d_keys = einsum("bhtw,bhtk->bhwk", d_scores, q, dtype)
    d_distance = None
    if relative is not None:
        # The transposed skew gathers the score cotangents back by distance.
        shape = jax.ShapeDtypeStruct((*q.shape[:3], mem_len + 1), relative.dtype)
        (d_distance,) = jax.linear_transpose(skew, shape)(d_scores.astype(shape.dtype))
    d_codes, d_means = None, jnp.zeros_like(means)
    if code_probs is not None:
        d_codes = einsum("bhtv,bhsv->bhts", out_ct, means, dtype) - delta
        d_codes = code_probs * d_codes
        d_codes = d_codes.astype(code_probs.dtype)
        d_means = einsum("bhts,bhtv->bhsv", code_probs, out_ct, dtype)
    return (
        d_q.astype(q.dtype),
        d_keys[:, :, mem_len:].astype(k.dtype),
        d_vals[:, :, mem_len:].astype(v.dtype),
        d_keys[:, :, :mem_len].astype(xl_k.dtype),
        d_vals[:, :, :mem_len].astype(xl_v.dtype),
        d_means.astype(means.dtype),
        d_codes,
        d_distance,
        None,  # the counts: no gradient
        None,  # the mask
    )


_block.defvjp(_block_fwd, _block_bwd)


def rows(x):
    """[..., D] as [N, D]. XLA's CPU backend reduces the last axis of an array
    whose other axes are all 1 (batch 1, one head) many times slower."""
    return x.reshape(-1, x.shape[-1])


def code_stats(z, v, n_code):
    """Per-code counts [B, H, S] and value sums [B, H, S, V] of [B, H, T] codes z.

    A scatter-add (O(T V) work, not the O(T S V) of a one-hot matmul); codes
    outside 0..S-1 (the empty-slot code S) count for nothing.
    """
    b, h, t, d = v.shape
    # One segment per (batch, head, code), plus a spare one for code S.
    seg = jnp.arange(b * h, dtype=z.dtype).reshape(b, h, 1) * (n_code + 1) + z
    n_seg = b * h * (n_code + 1)
    sums = jax.ops.segment_sum(v.reshape(b * h * t, d), seg.reshape(-1), n_seg)
    counts = jax.ops.segment_sum(jnp.ones([b * h * t], v.dtype), seg.reshape(-1), n_seg)
    sums = sums.reshape(b, h, n_code + 1, d)[:, :, :n_code]
    return counts.reshape(b, h, n_code + 1)[:, :, :n_code], sums


def update_state(state, z, k_hat, v):
    """Slide the window by one block and fold its T oldest entries into the cache.

    The aggcache keeps counts n_s and running means m_s of values, not raw sums
    (which grow without bound, and stall in low precision such as bfloat16):
    with c_s new entries of sum u_s,
    m_s <- (n_s m_s + u_s) / max(n_s + c_s, 1) and n_s <- n_s + c_s. Empty
    window slots (code S) count for nothing.

    Args:
      state: the state before the block.
      z: [B, H, T] int32 shortcodes; k_hat: [B, H, T, K]; v: [B, H, T, V].

    Returns:
      the state after the block, same structure and shapes.
    """
    xl, agg = state["xlcache"], state["aggcache"]
    block_len, n_code = z.shape[-1], agg["lower"].shape[-1]
    recent_z = jnp.concatenate([xl["z"], z], axis=-1)
    recent_k = jnp.concatenate([xl["k_hat"], k_hat], axis=2)
    recent_v = jnp.concatenate([xl["v"], v], axis=2)
    counts, sums = code_stats(
        recent_z[..., :block_len], recent_v[:, :, :block_len], n_code
    )
    lower = agg["lower"] + counts
    denom = jnp.maximum(lower, 1.0)
    kept = (agg["lower"] / denom)[..., None] * agg["upper_div_lower"]
    upper_div_lower = kept + sums / denom[..., None]
    return dict(
        pos_offset=state["pos_offset"] + block_len,
        xlcache=dict(
            z=recent_z[..., block_len:],
            k_hat=recent_k[:, :, block_len:],
            v=recent_v[:, :, block_len:],
        ),
        aggcache=dict(lower=lower, upper_div_lower=upper_div_lower),
    )


def to_blocks(x, block_len):
    """[B, H, L, ...] -> [R, B, H, T, ...], the block axis first for `scan`."""
    b, h, length, *rest = x.shape
    x = x.reshape(b, h, length // block_len, block_len, *rest)
    return jnp.moveaxis(x, 2, 0)


def from_blocks(x):
    """[R, B, H, T, ...] -> [B, H, R T, ...]."""
    r, b, h, t, *rest = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, r * t, *rest)


def blockwise_attention(
    q,
    k_hat,
    z,
    v,
    codebook,
    state,
    *,
    block_len,
    agg_cache=True,
    grad_thru_cache=True,
    q_pos=None,
    r=None,
    dtype=None,
):
    """Attention of a whole call, block after block, carrying the state.

    Args:
      q, k_hat: [B, H, L, K]; z: [B, H, L] int32 shortcodes of k_hat;
      v: [B, H, L, V]; codebook: [H, S, K]; state: the state before the call;
      block_len: T, must divide L; q_pos: [B, H, L, K] or None; r: as in
      `attend_block`; dtype: the products' input dtype, as in `attend_block`.
      Without grad_thru_cache the state passed from block to block carries no
      gradient.

    Returns:
      ([B, H, L, V] output, state after the call).
    """

    products = stateless_products(
        q, codebook, q_pos, r, agg_cache=agg_cache, dtype=dtype
    )

    def step(carry, blk):
        q_b, k_b, z_b, v_b, codes_b, distance_b = blk
        out = attend_with_products(
            q_b,
            k_b,
            v_b,
            codes_b,
            distance_b,
            carry,
            agg_cache=agg_cache,
            dtype=dtype,
        )
        carry = update_state(carry, z_b, k_b, v_b)
        if not grad_thru_cache:
            carry = jax.tree.map(sg, carry)
        return carry, out

    blocks = [to_blocks(x, block_len) for x in (q, k_hat, z, v)]
    blocks += [None if x is None else to_blocks(x, block_len) for x in products]
    state, out = jax.lax.scan(step, state, tuple(blocks))
    return from_blocks(out), state


def vq_attention_flops(
    length: int, n_code: int, block_len: int, d_k: int, d_v: int, mem_len: int = 0
) -> int:
    """Matmul FLOPs of `vq_attention` for one batch element and one head.

    Counting 2 M N K per [M, K] x [K, N] matmul, each block of T = block_len
    queries costs 2 T S K for the nearest-code distances of its keys,
    2 T (S + W) K for the scores against the S codewords and the W = M + T
    window keys, and 2 T (S + W) V for the weighted sum of the S running means
    and the W window values. Folding a block into the cache is a scatter-add,
    not a matmul. With L / T blocks: 2 L (S K + (S + W) (K + V)). The relative
    position terms (2 T (M + 1) K per block, `relative_scores`) are left out.
    """
    w = mem_len + block_len
    return 2 * length * (n_code * d_k + (n_code + w) * (d_k + d_v))


def vq_attention(
    q, k, v, codebook, *, block_len: int, mem_len: int = 0, agg_cache: bool = True
):
    """Causal softmax attention of q over the quantized keys, block by block.

    Keys are quantized to k_hat = sg(c_z) + k - sg(k): the value of the nearest
    codeword with the gradient of k (straight-through). The result equals dense
    causal attention softmax(q k_hat^T + causal mask) v (no scaling of the
    scores: scale q first), computed with a window of the mem_len previous keys
    plus the block itself, and a per-code cache of counts and running means for
    everything older. Keys get their straight-through gradient inside the window;
    keys in the cache and the codebook get none.

    Args:
      q: [B, H, L, K] queries.
      k: [B, H, L, K] keys, quantized here.
      v: [B, H, L, V] values.
      codebook: [H, S, K] codewords of each head.
      block_len: T, positions per block; must divide L.
      mem_len: M >= 0, earlier positions each block sees exactly.
      agg_cache: with False, a sliding window of M + 1 positions only.

    Returns:
      [B, H, L, V] attention output, in the dtype of q, v and codebook combined.
    """
    dims = check_shape("q", q, "BHLK")
    dims = check_shape("k", k, "BHLK", dims)
    dims = check_shape("v", v, "BHLV", dims)
    dims = check_shape("codebook", codebook, "HSK", dims)
    check_block_len(block_len, dims["L"], f"q, k shape {list(q.shape)}")
    dtype = jnp.result_type(q, v, codebook)
    q, k, v, codebook = (x.astype(dtype) for x in (q, k, v, codebook))
    z = nearest_codes(k, codebook, block_len)
    k_hat = sg(get_codewords(z, codebook)) + st(k)
    state = initial_attention_state(
        dims["B"], dims["H"], dims["S"], mem_len, dims["K"], dims["V"], dtype
    )
    out, _ = blockwise_attention(
        q, k_hat, z, v, codebook, state, block_len=block_len, agg_cache=agg_cache
    )
    return out


def check_block_len(block_len, length, what="inputs") -> None:
    """ValueError unless block_len is a positive int dividing length."""
    if (
        not isinstance(block_len, numbers.Integral)
        or isinstance(block_len, bool)
        or block_len <= 0
    ):
        raise ValueError(f"block_len must be a positive int, got {block_len!r}")
    if length % block_len != 0:
        raise ValueError(f"block_len={block_len} must divide L={length} ({what})")
