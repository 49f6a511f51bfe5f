"""Causal softmax attention over quantized keys, in time linear in sequence length.

With keys quantized to S codewords, every earlier block's keys and values
reduce to S per-code aggregates: how often each code occurred (counts) and the
sum of the values that carried it (value sums). Each block of block_len queries
then attends exactly within its own block and to those S aggregates, so a
length-L sequence costs O(L * (S + block_len)) time, and beyond arrays the
size of its inputs and output the forward pass needs only the cache, O(S * V),
and one block's scores, O(block_len * (S + block_len)), whatever L is.

Axes: B batch, H heads, L length, S codes, K key width, V value width,
R blocks, T block length.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from tvq.shapes import check_shape
from tvq.vq import get_codewords, get_shortcodes


def vq_attention_flops(
    length: int, n_code: int, block_len: int, d_k: int, d_v: int
) -> int:
    """Matmul FLOPs of `vq_attention` for one batch element and one head.

    Counting 2 M N K per [M, K] x [K, N] matmul, each block of T = block_len
    queries costs 2 T S K for the nearest-code distances, 2 T (S + T) K for the
    scores against the S codewords and the block's T quantized keys, and
    2 T (S + T) (V + 1) for the weighted sum of the cache's value sums and
    counts and of the block's values and ones. The cache update is a
    scatter-add, not a matmul. With L / T blocks:
    2 L (S K + (S + T) K + (S + T) (V + 1)).
    """
    s, t = n_code, block_len
    return 2 * length * (s * d_k + (s + t) * d_k + (s + t) * (d_v + 1))


def _check_inputs(q, k, v, codebook, block_len):
    """Shapes of the four inputs, or ValueError naming expected and actual ones."""
    dims = check_shape("q", q, "BHLK")
    dims = check_shape("k", k, "BHLK", dims)
    dims = check_shape("v", v, "BHLV", dims)
    dims = check_shape("codebook", codebook, "HSK", dims)
    if (
        not isinstance(block_len, numbers.Integral)
        or isinstance(block_len, bool)
        or block_len <= 0
    ):
        raise ValueError(f"block_len must be a positive int, got {block_len!r}")
    if dims["L"] % block_len != 0:
        raise ValueError(
            f"block_len={block_len} must divide L={dims['L']} "
            f"(q, k shape {list(q.shape)}, v shape {list(v.shape)})"
        )
    return dims


def _to_blocks(x, block_len):
    """[B, H, L, D] -> [R, B, H, T, D], the block axis first for `scan`."""
    b, h, length, d = x.shape
    return jnp.moveaxis(x.reshape(b, h, length // block_len, block_len, d), 2, 0)


def _code_stats(codes, vals, n_code):
    """[B, H, S, D] sums of [B, H, T, D] vals over the positions of each code."""
    b, h, t, d = vals.shape
    heads = jnp.arange(b * h, dtype=codes.dtype).reshape(b, h, 1) * n_code
    stats = jax.ops.segment_sum(
        vals.reshape(b * h * t, d), (heads + codes).reshape(-1), b * h * n_code
    )
    return stats.reshape(b, h, n_code, d)


def vq_attention(q, k, v, codebook, *, block_len: int):
    """Causal softmax attention of q over the quantized keys, block by block.

    Equal to dense causal attention softmax(q k_hat^T + causal mask) v with
    k_hat = get_codewords(get_shortcodes(k, codebook)), and no scaling of the
    scores (scale q first). Each block of block_len queries attends exactly to
    its own block's k_hat and, for every earlier position, to a cache of S
    per-code counts and value sums: attending to code s with count n_s and value
    sum u_s is attending n_s times to c_s, so the cache weight is
    exp(q.c_s) n_s and its contribution exp(q.c_s) u_s. Codes with count 0 are
    left out of the max. Gradients flow to q, v and the codebook as in the dense
    form; none flows to k through the argmin (use a straight-through estimator
    upstream, as `LearnableVQ` does).

    Args:
      q: [B, H, L, K] queries.
      k: [B, H, L, K] keys, quantized here.
      v: [B, H, L, V] values.
      codebook: [H, S, K] codewords of each head.
      block_len: T, positions per block; must divide L.

    Returns:
      [B, H, L, V] attention output, in the dtype of q, v and codebook combined.
    """
    dims = _check_inputs(q, k, v, codebook, block_len)
    b, h, s, v_dim = dims["B"], dims["H"], dims["S"], dims["V"]
    dtype = jnp.result_type(q, v, codebook)
    q, v, codebook = (x.astype(dtype) for x in (q, v, codebook))
    t = block_len
    causal = jnp.tril(jnp.ones([t, t], bool))
    codebook_b = jnp.broadcast_to(codebook[None], (b, h, s, dims["K"]))
    ones = jnp.ones([b, h, t, 1], dtype)

    def step(carry, blk):
        """One block: attend to the cache and the block, then add it to the cache."""
        cache, codes = carry  # codes: [B, H, T] shortcodes of this block's keys
        q_blk, v_blk, r = blk
        # The next block's codes do not depend on this block: computing them
        # here lets XLA run them alongside this block's attention. (The last
        # step computes block 0's again, unused.)
        k_next = jax.lax.dynamic_index_in_dim(k_blks, (r + 1) % n_blk, keepdims=False)
        codes_next, _ = get_shortcodes(k_next, codebook)
        # S codewords weighted by their counts, then the block's T own keys.
        keys = jnp.concatenate([codebook_b, get_codewords(codes, codebook)], axis=2)
        v_one = jnp.concatenate([v_blk, ones], axis=-1)  # [B, H, T, V + 1]
        vals = jnp.concatenate([cache, v_one], axis=2)  # [B, H, S + T, V + 1]
        used = jnp.broadcast_to((cache[..., -1] > 0)[:, :, None, :], (b, h, t, s))
        mask = jnp.concatenate([used, jnp.broadcast_to(causal, (b, h, t, t))], -1)
        scores = jnp.einsum("bhtk,bhnk->bhtn", q_blk, keys)  # [B, H, T, S + T]
        # Shift by the max over what each query sees (used codes, earlier keys
        # of the block). Any shift gives the same result: no gradient through it.
        m = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
        m = jax.lax.stop_gradient(m)
        # Masked entries go through exp(0) and are then zeroed, so neither the
        # value nor the gradient meets an inf from a large masked score.
        probs = jnp.where(mask, jnp.exp(jnp.where(mask, scores - m, 0.0)), 0.0)
        out = jnp.einsum("bhtn,bhnv->bhtv", probs, vals)
        cache = cache + _code_stats(codes, v_one, s)
        return (cache, codes_next), out[..., :-1] / out[..., -1:]

    # Per code: value sums in the first V columns, the count in the last.
    cache = jnp.zeros([b, h, s, v_dim + 1], dtype)
    q_blks, k_blks, v_blks = (_to_blocks(x, t) for x in (q, k.astype(dtype), v))
    n_blk = dims["L"] // t
    codes, _ = get_shortcodes(k_blks[0], codebook)
    _, out = jax.lax.scan(step, (cache, codes), (q_blks, v_blks, jnp.arange(n_blk)))
    return jnp.moveaxis(out, 0, 2).reshape(b, h, dims["L"], v_dim)
