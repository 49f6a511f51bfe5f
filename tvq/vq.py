"""Vector quantization with an EMA codebook learned through a surrogate loss.

Axes: B batch, H heads, L length, S codes, K key width.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy as jsp
from flax import struct

from tvq.config import TransformerConfig
from tvq.shapes import check_integer, check_scalar, check_shape

MIN_COUNT = 0.01  # c_count floor when dividing, so unused codes never give inf/NaN


def sg(x):
    """Stop gradient: value x, gradient 0."""
    return jax.lax.stop_gradient(x)


def st(x):
    """Straight-through zero: value 0, gradient of x (identity)."""
    return x - jax.lax.stop_gradient(x)


@struct.dataclass
class VQSpec:
    """Per-step facts the codebook loss needs; a pytree, so it can be pmapped.

    Attributes:
      n_device: [1] number of devices whose gradients get averaged.
      n_block_per_update: [1] number of blocks whose gradients get averaged.
      loss_mask: [B, L] 1 for real positions, 0 for padding.
    """

    n_device: jax.Array
    n_block_per_update: jax.Array
    loss_mask: jax.Array

    @classmethod
    def create(cls, **kwargs: Any) -> VQSpec:
        """Build a spec from keyword arguments, ignoring keys it does not know."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in kwargs.items() if k in names})


def get_shortcodes(vecs: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Index of the nearest codeword for every vector, per head.

    Squared distances use |x|^2 - 2 x.c + |c|^2, so the only O(B H L S K) work
    is one einsum. Ties go to the lowest index, as with argmin.

    Args:
      vecs: [B, H, L, K] vectors to quantize.
      codebook: [H, S, K] codewords of each head.

    Returns:
      shortcodes: [B, H, L] int32 index of the nearest codeword.
      errs2: [B, H, L] squared distance to it, clamped at 0 against round-off.
    """
    dims = check_shape("vecs", vecs, "BHLK")
    dims = check_shape("codebook", codebook, "HSK", {"H": dims["H"], "K": dims["K"]})
    # Laid out [B, H, S, L] and reduced over S with two min reductions: on CPU
    # this runs several times faster than an argmin over a last axis of size S.
    dists2 = (
        jnp.sum(jnp.square(vecs), axis=-1)[:, :, None, :]
        - 2.0 * jnp.einsum("bhlk,hsk->bhsl", vecs, codebook)
        + jnp.sum(jnp.square(codebook), axis=-1)[None, :, :, None]
    )
    min_dists2 = jnp.min(dists2, axis=2)
    # Float code indices are exact below 2**24 and reduce faster than integers.
    index_dtype = jnp.float32 if dims["S"] < 2**24 else jnp.int32
    index = jax.lax.broadcasted_iota(index_dtype, dists2.shape, 2)
    is_nearest = dists2 == min_dists2[:, :, None, :]
    shortcodes = jnp.min(jnp.where(is_nearest, index, dims["S"]), axis=2)
    return shortcodes.astype(jnp.int32), jnp.maximum(min_dists2, 0.0)


def get_codewords(shortcodes: jax.Array, codebook: jax.Array) -> jax.Array:
    """Look up codewords: [B, H, L] shortcodes and [H, S, K] codebook -> [B, H, L, K].

    Shortcodes index like NumPy (-1 is the last code); past the ends JAX clamps
    instead of raising, as for any gather.
    """
    dims = check_shape("shortcodes", shortcodes, "BHL")
    check_shape("codebook", codebook, "HSK", {"H": dims["H"]})
    check_integer("shortcodes", shortcodes)
    heads = jnp.arange(dims["H"])[None, :, None]
    return codebook[heads, shortcodes]


def per_code_sums(vecs, weights, shortcodes, n_code):
    """Per head, the sums [H, S, K] of the [B, H, L, K] vecs and [H, S] of the
    [B, H, L] weights, grouped by their code.

    A scatter-add: O(B H L K) work, where a one-hot matmul costs O(B H L S K).
    """
    b, h, length, k = vecs.shape
    heads = jnp.arange(h, dtype=shortcodes.dtype)[None, :, None]
    segment = (heads * n_code + shortcodes).reshape(-1)
    sums = jax.ops.segment_sum(vecs.reshape(-1, k), segment, h * n_code)
    counts = jax.ops.segment_sum(weights.reshape(-1), segment, h * n_code)
    return sums.reshape(h, n_code, k), counts.reshape(h, n_code)


def nearest_codes(vecs: jax.Array, codebook: jax.Array, chunk_len=None) -> jax.Array:
    """[B, H, L] int32 index of the nearest codeword of each of the [B, H, L, K]
    vecs (`get_shortcodes`), with no gradient.

    With chunk_len dividing L, chunk by chunk: one chunk's [S, chunk_len]
    distances stay in cache, where all L at once would stream S L of them
    through memory.
    """
    vecs, codebook = sg(vecs), sg(codebook)
    length = vecs.shape[2]
    if not chunk_len or length % chunk_len or length == chunk_len:
        return get_shortcodes(vecs, codebook)[0]
    b, h, _, k = vecs.shape
    chunks = jnp.moveaxis(vecs.reshape(b, h, length // chunk_len, chunk_len, k), 2, 0)
    codes = jax.lax.map(lambda x: get_shortcodes(x, codebook)[0], chunks)
    return jnp.moveaxis(codes, 0, 2).reshape(b, h, length)


def codebook_from_stats(c_sum: jax.Array, c_count: jax.Array) -> jax.Array:
    """Codewords as running means: [H, S, K] sums / [H, S] counts (floored at 0.01)."""
    dims = check_shape("c_sum", c_sum, "HSK")
    check_shape("c_count", c_count, "HS", dims)
    return c_sum / jnp.maximum(c_count, MIN_COUNT)[..., None]


class LearnableVQ(nn.Module):
    """Vector quantizer whose codebook is an EMA of assigned vectors.

    The EMA is written as a loss (`get_codebook_loss`) whose SGD step with
    learning rate 1 is the EMA update, so it trains with the rest of the model.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        for name in ("n_head", "n_code", "d_k", "c_gamma"):
            if getattr(cfg, name) is None:
                raise ValueError(f"LearnableVQ needs config.{name}, got None")
        if cfg.w_init is None:
            raise ValueError(
                "LearnableVQ needs config.w_init: use TransformerConfig.create"
            )
        shape = [cfg.n_head, cfg.n_code, cfg.d_k]
        self.c_sum = self.param("c_sum", cfg.w_init, shape, cfg.param_dtype)
        self.c_count = self.param(
            "c_count", jax.nn.initializers.ones, shape[:2], cfg.param_dtype
        )

    def get_codebook(self) -> jax.Array:
        """[H, S, K] codebook c_sum / c_count, with no gradient to the parameters.

        Kept in param_dtype (float32) also when config.dtype is bfloat16: nearest
        codewords and the cache need the precision.
        """
        return sg(codebook_from_stats(self.c_sum, self.c_count))

    @staticmethod
    def get_codebook_ema_targets(
        vecs: jax.Array,
        shortcodes: jax.Array,
        c_sum: jax.Array,
        c_count: jax.Array,
        c_gamma: float,
        vq_spec: VQSpec,
    ) -> tuple[jax.Array, jax.Array]:
        """EMA targets of c_sum [H, S, K] and c_count [H, S] from this shard's data.

        The shard's statistics are scaled by n_device * n_block_per_update, so that
        averaging over devices and blocks gives gamma * param + (1 - gamma) * the
        statistics of the whole update.
        """
        dims = check_shape("vecs", vecs, "BHLK")
        dims = check_shape("shortcodes", shortcodes, "BHL", dims)
        check_integer("shortcodes", shortcodes)
        dims = check_shape("c_sum", c_sum, "HSK", dims)
        check_shape("c_count", c_count, "HS", dims)
        check_shape("vq_spec.loss_mask", vq_spec.loss_mask, "BL", dims)
        check_scalar("vq_spec.n_device", vq_spec.n_device)
        check_scalar("vq_spec.n_block_per_update", vq_spec.n_block_per_update)

        mask = jnp.broadcast_to(
            vq_spec.loss_mask.astype(vecs.dtype)[:, None, :], shortcodes.shape
        )
        sums, counts = per_code_sums(
            vecs * mask[..., None], mask, shortcodes, dims["S"]
        )
        scale = jnp.reshape(vq_spec.n_device * vq_spec.n_block_per_update, ())
        scale = scale.astype(vecs.dtype)
        c_sum_hat = scale * sums
        c_count_hat = scale * counts
        c_sum_tgt = c_gamma * c_sum + (1.0 - c_gamma) * c_sum_hat
        c_count_tgt = c_gamma * c_count + (1.0 - c_gamma) * c_count_hat
        return c_sum_tgt, c_count_tgt

    @staticmethod
    def get_codebook_loss(
        vecs: jax.Array,
        shortcodes: jax.Array,
        c_sum: jax.Array,
        c_count: jax.Array,
        c_gamma: float,
        vq_spec: VQSpec,
    ) -> jax.Array:
        """Scalar surrogate loss: value 0, gradient (param - EMA target) per parameter.

        One SGD step with learning rate 1 on gradients averaged over devices and
        blocks is the EMA update on the whole update's statistics.
        """
        c_sum_tgt, c_count_tgt = LearnableVQ.get_codebook_ema_targets(
            vecs, shortcodes, c_sum, c_count, c_gamma, vq_spec
        )
        l_sum = jnp.sum(sg(c_sum - c_sum_tgt) * st(c_sum))
        l_count = jnp.sum(sg(c_count - c_count_tgt) * st(c_count))
        return l_sum + l_count

    @staticmethod
    def get_quantization_metrics(
        vecs: jax.Array,
        errs2: jax.Array,
        c_sum: jax.Array,
        c_count: jax.Array,
        loss_mask: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Scalar diagnostics, averaged over heads; no gradient flows through them.

        c_usage_*: EMA counts per code; c_dead: codes with count below 1;
        c_entropy: entropy (nats) of the code-usage distribution, at most log S;
        c_norm_mean: codeword norm; relative_err_*: |x - c(x)| / |x| over the
        positions where the [B, L] loss_mask is nonzero (all when None; 0 when
        every position is masked).
        """
        dims = check_shape("vecs", vecs, "BHLK")
        dims = check_shape("errs2", errs2, "BHL", dims)
        dims = check_shape("c_sum", c_sum, "HSK", dims)
        check_shape("c_count", c_count, "HS", dims)
        if loss_mask is None:
            loss_mask = jnp.ones((dims["B"], dims["L"]))
        check_shape("loss_mask", loss_mask, "BL", dims)
        vecs, errs2, c_sum, c_count = map(sg, (vecs, errs2, c_sum, c_count))
        counts = jnp.maximum(c_count, MIN_COUNT)
        probs = counts / jnp.sum(counts, axis=-1, keepdims=True)
        rel_errs = jnp.sqrt(errs2) / (jnp.linalg.norm(vecs, axis=-1) + MIN_COUNT)
        real = jnp.broadcast_to(sg(loss_mask)[:, None, :] != 0, rel_errs.shape)
        n_real = jnp.sum(real, axis=(0, 2))
        per_head = dict(
            c_usage_min=jnp.min(c_count, axis=1),
            c_usage_mean=jnp.mean(c_count, axis=1),
            c_usage_max=jnp.max(c_count, axis=1),
            c_dead=jnp.sum(c_count < 1.0, axis=1),
            c_entropy=jnp.sum(jsp.special.entr(probs), axis=1),
            c_norm_mean=jnp.mean(
                jnp.linalg.norm(codebook_from_stats(c_sum, c_count), axis=-1), axis=1
            ),
            relative_err_min=jnp.where(
                n_real > 0,
                jnp.min(rel_errs, axis=(0, 2), where=real, initial=jnp.inf),
                0.0,
            ),
            relative_err_mean=jnp.sum(jnp.where(real, rel_errs, 0.0), axis=(0, 2))
            / jnp.maximum(n_real, 1),
            relative_err_max=jnp.max(rel_errs, axis=(0, 2), where=real, initial=0.0),
        )
        return {k: jnp.mean(v.astype(jnp.float32)) for k, v in per_head.items()}

    def __call__(self, vecs: jax.Array, vq_spec: VQSpec) -> dict[str, Any]:
        """Quantize [B, H, L, K] vecs.

        Returns a dict with
          quantized: [B, H, L, K] codewords forward, identity gradient to vecs;
          shortcodes: [B, H, L] int32;
          l_commit: scalar, masked squared error summed over H, mean over B and L;
          l_codebook: scalar surrogate loss of the EMA update (see above);
          metrics: dict of scalar diagnostics;
          errs2: [B, H, L] squared quantization errors.
        Both losses are zero when config.is_train is false.
        """
        cfg = self.config
        dims = check_shape("vecs", vecs, "BHLK", {"H": cfg.n_head, "K": cfg.d_k})
        check_shape("vq_spec.loss_mask", vq_spec.loss_mask, "BL", dims)
        compute_dtype = jnp.promote_types(vecs.dtype, jnp.float32)
        vecs_hp = vecs.astype(compute_dtype)
        codebook = self.get_codebook().astype(compute_dtype)
        shortcodes = nearest_codes(vecs_hp, codebook, cfg.block_len)
        codewords = get_codewords(shortcodes, codebook)
        # |x - c_z|^2 directly: its gradient 2 (x - c_z) costs O(L K), where
        # differentiating the distances to every code would cost O(L S K).
        errs2 = jnp.sum(jnp.square(vecs_hp - codewords), axis=-1)
        quantized = sg(codewords.astype(vecs.dtype)) + st(vecs)
        if cfg.is_train:
            mask = vq_spec.loss_mask.astype(errs2.dtype)[:, None, :]
            l_commit = jnp.mean(jnp.sum(mask * errs2, axis=1))
            l_codebook = self.get_codebook_loss(
                vecs_hp, shortcodes, self.c_sum, self.c_count, cfg.c_gamma, vq_spec
            )
        else:
            l_commit = jnp.zeros([], cfg.dtype)
            l_codebook = jnp.zeros([], cfg.dtype)
        metrics = self.get_quantization_metrics(
            vecs_hp, errs2, self.c_sum, self.c_count, vq_spec.loss_mask
        )
        return dict(
            quantized=quantized,
            shortcodes=shortcodes,
            l_commit=l_commit.astype(cfg.dtype),
            l_codebook=l_codebook.astype(cfg.dtype),
            metrics=metrics,
            errs2=errs2.astype(cfg.dtype),
        )
