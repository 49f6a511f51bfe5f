"""Independent NumPy references and small builders shared by the tvq tests.

The references below are deliberately written differently from tvq: nearest
neighbours by explicit (x - c)^2 sums, EMA statistics by scatter-adds.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tvq import TransformerConfig, VQSpec

# Tolerances for comparing float64 results of different summation orders.
TOL64 = dict(rtol=1e-10, atol=1e-12)


def scaled_one_hot_codebook(h: int, s: int, d: int, dtype=np.float64) -> np.ndarray:
    """[h, s, d] codebook whose head i holds (i + 1) times the first s unit vectors."""
    codebook = np.zeros([h, s, d], dtype=dtype)
    for head in range(h):
        for code in range(s):
            codebook[head, code, code] = head + 1
    return codebook


def brute_nearest(vecs, codebook) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codeword index and squared distance by explicit (x - c)^2 sums.

    Args:
      vecs: [B, H, L, K].
      codebook: [H, S, K].

    Returns:
      idx: [B, H, L] argmin over codes; dist2: [B, H, L] the minimum distance.
    """
    vecs = np.asarray(vecs, dtype=np.float64)
    codebook = np.asarray(codebook, dtype=np.float64)
    diff = vecs[:, :, :, None, :] - codebook[None, :, None, :, :]
    dist2 = np.sum(diff * diff, axis=-1)
    return np.argmin(dist2, axis=-1), np.min(dist2, axis=-1)


def brute_stats(vecs, shortcodes, n_code: int, mask=None):
    """Per-code sums [H, S, K] and counts [H, S] of the unmasked vectors."""
    vecs = np.asarray(vecs, dtype=np.float64)
    shortcodes = np.asarray(shortcodes)
    b, h, l, k = vecs.shape
    mask = np.ones([b, l], dtype=bool) if mask is None else np.asarray(mask) > 0
    sums = np.zeros([h, n_code, k])
    counts = np.zeros([h, n_code])
    bi, hi, li = np.nonzero(np.broadcast_to(mask[:, None, :], (b, h, l)))
    codes = shortcodes[bi, hi, li]
    np.add.at(sums, (hi, codes), vecs[bi, hi, li])
    np.add.at(counts, (hi, codes), 1.0)
    return sums, counts


def brute_ema(vecs, shortcodes, c_sum, c_count, gamma: float, mask=None):
    """EMA of c_sum and c_count towards the statistics of all unmasked vectors."""
    c_sum = np.asarray(c_sum, dtype=np.float64)
    c_count = np.asarray(c_count, dtype=np.float64)
    sums, counts = brute_stats(vecs, shortcodes, c_sum.shape[1], mask)
    return (
        gamma * c_sum + (1.0 - gamma) * sums,
        gamma * c_count + (1.0 - gamma) * counts,
    )


def make_spec(
    batch: int,
    length: int,
    n_device: int = 1,
    n_block_per_update: int = 1,
    loss_mask=None,
    **extra,
) -> VQSpec:
    """VQSpec for one device (extra keys, e.g. block_id, are passed to create)."""
    if loss_mask is None:
        loss_mask = jnp.ones([batch, length], dtype=jnp.int32)
    return VQSpec.create(
        n_device=jnp.array([n_device], dtype=jnp.int32),
        n_block_per_update=jnp.array([n_block_per_update], dtype=jnp.int32),
        loss_mask=jnp.asarray(loss_mask),
        **extra,
    )


def reference_config_kwargs(**overrides) -> dict:
    """All keys of the reference test fixture's TransformerConfig."""
    kwargs = dict(
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        global_batch_size=1,
        sequence_len=100,
        update_len=100,
        block_len=100,
        mem_len=100,
        grad_thru_cache=True,
        agg_cache=True,
        d_model=4,
        d_k=4,
        d_v=8,
        d_ff=0,
        n_head=2,
        n_code=8,
        n_layer=2,
        n_vocab=10,
        pe_abs=True,
        pe_lam=10_000,
        p_dropemb=0.0,
        p_dropsin=0.0,
        p_dropres=0.0,
        p_droplyr=0.0,
        p_nucleus=0.8,
        c_beta=0.02,
        c_gamma=0.99,
        e_tie=True,
        e_preln=True,
        e_scale="rad",
        is_train=True,
        no_emb=False,
    )
    kwargs.update(overrides)
    return kwargs


def make_config(**overrides) -> TransformerConfig:
    """TransformerConfig.create with the reference keys, updated by overrides."""
    return TransformerConfig.create(**reference_config_kwargs(**overrides))
