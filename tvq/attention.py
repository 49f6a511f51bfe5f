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

import numbers

import jax
import jax.numpy as jnp

from tvq.shapes import check_shape
from tvq.vq import get_codewords, get_shortcodes, sg, st

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


def relative_scores(q_pos, r):
    """[B, H, T, M + T] (q + v).r_d for window column j at distance d = M + i - j.

    q_pos: [B, H, T, K] queries plus the XL bias v; r: [H, M + 1, K] projected
    sinusoids of distances 0..M. Entries at distances outside 0..M are 0.
    """
    return skew(jnp.einsum("bhtk,hdk->bhtd", q_pos, r))


def attend_block(q, k_hat, v, codebook, state, *, agg_cache=True, q_pos=None, r=None):
    """One block's attention over its window and the aggcache.

    Scores are q.k_hat (+ relative terms) in the window and q.c_s + log n_s for
    the S codes of the aggcache; one softmax over the S + W entries, shifted by
    a stop-gradient max. The codebook enters with a stop-gradient: the language
    model loss never reaches it (its EMA update is a loss of its own).

    Args:
      q: [B, H, T, K] queries (content part, XL bias u already added).
      k_hat: [B, H, T, K] this block's quantized (or, dense, raw) keys.
      v: [B, H, T, V] this block's values.
      codebook: [H, S, K].
      state: the attention state before this block (`initial_attention_state`).
      agg_cache: attend to the aggcache; without it, a sliding window of M.
      q_pos, r: optional relative position terms, [B, H, T, K] and [H, M + 1, K].

    Returns:
      [B, H, T, V] attention output.
    """
    xl, agg = state["xlcache"], state["aggcache"]
    block_len, mem_len = q.shape[2], xl["z"].shape[-1]
    recent_k = jnp.concatenate([xl["k_hat"], k_hat], axis=2)  # [B, H, W, K]
    recent_v = jnp.concatenate([xl["v"], v], axis=2)  # [B, H, W, V]
    keep, _ = window_masks(block_len, mem_len, state["pos_offset"], agg_cache)
    # Masked entries get a large negative score (not -inf, so no inf meets a
    # gradient): exp makes them exactly 0. A query always sees itself.
    bias = jnp.where(keep, 0.0, -MASK)  # [T, W]
    if q_pos is not None:
        bias = bias + relative_scores(q_pos, r)  # [B, H, T, W]
    keys, values = recent_k, recent_v
    if agg_cache:
        # Code s stands for its n_s keys: exp(q.c_s + log n_s) = n_s exp(q.c_s).
        log_n = agg_biases(agg["lower"])
        bias = jnp.concatenate(
            [
                jnp.broadcast_to(log_n[:, :, None, :], (*q.shape[:3], log_n.shape[-1])),
                jnp.broadcast_to(bias, (*q.shape[:3], bias.shape[-1])),
            ],
            axis=-1,
        )  # [B, H, T, S + W]
        codewords = jnp.broadcast_to(sg(codebook), (q.shape[0], *codebook.shape))
        keys = jnp.concatenate([codewords, recent_k], axis=2)
        values = jnp.concatenate([agg["upper_div_lower"], recent_v], axis=2)
    scores = jnp.einsum("bhtk,bhnk->bhtn", q, keys) + bias
    # Any shift gives the same softmax, so no gradient flows through it.
    weights = jnp.exp(scores - sg(jnp.max(scores, axis=-1, keepdims=True)))
    # A column of ones gives the normalizer from the same product as the output.
    ones = jnp.ones([*values.shape[:3], 1], values.dtype)
    out = jnp.einsum("bhtn,bhnv->bhtv", weights, jnp.concatenate([values, ones], -1))
    return out[..., :-1] / out[..., -1:]


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
):
    """Attention of a whole call, block after block, carrying the state.

    Args:
      q, k_hat: [B, H, L, K]; z: [B, H, L] int32 shortcodes of k_hat;
      v: [B, H, L, V]; codebook: [H, S, K]; state: the state before the call;
      block_len: T, must divide L; q_pos: [B, H, L, K] or None; r: as in
      `attend_block`. Without grad_thru_cache the state passed from block to
      block carries no gradient.

    Returns:
      ([B, H, L, V] output, state after the call).
    """

    def step(carry, blk):
        q_b, k_b, z_b, v_b, qp_b = blk
        out = attend_block(
            q_b, k_b, v_b, codebook, carry, agg_cache=agg_cache, q_pos=qp_b, r=r
        )
        carry = update_state(carry, z_b, k_b, v_b)
        if not grad_thru_cache:
            carry = jax.tree.map(sg, carry)
        return carry, out

    blocks = [to_blocks(x, block_len) for x in (q, k_hat, z, v)]
    blocks.append(None if q_pos is None else to_blocks(q_pos, block_len))
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
    not a matmul. With L / T blocks: 2 L (S K + (S + W) (K + V)).
    """
    s, w = n_code, mem_len + block_len
    return 2 * length * (s * d_k + (s + w) * (d_k + d_v))


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
    # Nearest codes block by block: one block's [S, T] distances stay in cache,
    # where all L at once would stream S L of them through memory.
    z = from_blocks(
        jax.lax.map(
            lambda kb: get_shortcodes(kb, sg(codebook))[0], to_blocks(k, block_len)
        )
    )
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
