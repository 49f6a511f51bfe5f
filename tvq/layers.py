"""The Transformer-VQ attention sublayer: a gated attention unit (GAU).

x~ = LayerNorm(x); q, k = norm(x~ W_q), norm(x~ W_k), each times d_k^(-1/4);
v = silu(x~ W_v); g = silu(x~ W_g); the sublayer adds ((attention) * g) W_o to
the residual stream. Keys are quantized by `LearnableVQ` (attention="vq") or
used as they are by exact attention (the baseline: attention="dense", block by
block; attention="dense_full", the whole score matrix; see `tvq.dense`).

Axes: B batch, H heads, P length of the call, S codes, K key width,
V value width, D model width, M window (mem_len).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tvq.attention import (
    blockwise_attention,
    initial_attention_state,
    sinusoids,
)
from tvq.config import TransformerConfig
from tvq.dense import dense_attention, dense_full_attention
from tvq.precision import dot_general as precision_dot_general
from tvq.precision import is_low
from tvq.vq import LearnableVQ, VQSpec

GAU_FIELDS = (
    "d_model",
    "d_k",
    "d_v",
    "n_head",
    "block_len",
    "mem_len",
    "pe_lam",
    "agg_cache",
    "grad_thru_cache",
    "is_train",
    "p_dropsin",
    "p_dropres",
    "w_init",
    "r_init",
    "b_init",
)
VQ_FIELDS = ("n_code", "c_gamma")
ATTENTIONS = ("vq", "dense", "dense_full")
DENSE_ATTENTIONS = ("dense", "dense_full")  # exact, with a key/value buffer


def require(config: TransformerConfig, names, who: str) -> None:
    """ValueError naming the first field of `names` that the config leaves None."""
    for name in names:
        if getattr(config, name) is None:
            raise ValueError(f"{who} needs config.{name}, got None")


def check_config(config: TransformerConfig, who: str = "GAU") -> None:
    """ValueError unless the config has every field a GAU needs, in range."""
    if config.attention not in ATTENTIONS:
        raise ValueError(
            f"config.attention must be one of {ATTENTIONS}, got {config.attention!r}"
        )
    require(config, GAU_FIELDS, who)
    if config.attention == "vq":
        require(config, VQ_FIELDS, who)
    if config.mem_len < 0:
        raise ValueError(f"config.mem_len must be >= 0, got {config.mem_len}")
    if config.block_len <= 0:
        raise ValueError(f"config.block_len must be > 0, got {config.block_len}")


def gau_initial_state(
    config: TransformerConfig, batch_size: int, max_len: int | None = None
) -> dict:
    """The state of one GAU before any token.

    attention="vq": the window and aggcache of `initial_attention_state`.
    attention="dense" or "dense_full": a key/value buffer of max_len positions
    (default config.sequence_len, or 0: no state carried between calls).
    """
    check_config(config)
    b, h = batch_size, config.n_head
    dtype = config.param_dtype
    if config.attention in DENSE_ATTENTIONS:
        n = max_len if max_len is not None else config.sequence_len or 0
        return dict(
            pos_offset=jnp.zeros([], jnp.int32),
            k=jnp.zeros([b, h, n, config.d_k], dtype),
            v=jnp.zeros([b, h, n, config.d_v], dtype),
        )
    return initial_attention_state(
        b, h, config.n_code, config.mem_len, config.d_k, config.d_v, dtype
    )


class LayerNorm(nn.Module):
    """RMS norm over the last axis with optional gain g and bias b.

    Computed in float32 at least (float64 inputs stay float64), returned in the
    dtype of x.
    """

    gain: bool = True
    bias: bool = True
    param_dtype: Any = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        # As rows [N, width]: XLA's CPU backend reduces the last axis of an
        # array whose other axes are all 1 (batch 1, one head) up to 50 times
        # slower, which the backward pass of this norm would hit.
        y = x.reshape(-1, width).astype(jnp.promote_types(x.dtype, jnp.float32))
        y = y * jax.lax.rsqrt(self.eps + jnp.mean(jnp.square(y), -1, keepdims=True))
        if self.gain:
            y = y * self.param("g", nn.initializers.ones, [width], self.param_dtype)
        if self.bias:
            y = y + self.param("b", nn.initializers.zeros, [width], self.param_dtype)
        return y.reshape(x.shape).astype(x.dtype)


class GAU(nn.Module):
    """One attention sublayer of Transformer-VQ (the reference's `VQAttention`)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        check_config(cfg)
        h, k_dim, v_dim = cfg.n_head, cfg.d_k, cfg.d_v
        dense = dict(use_bias=False, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        if is_low(cfg.dtype):  # bf16 inputs, float32 sums and results
            dense["dot_general"] = precision_dot_general(cfg.dtype)
        self.input_ln = LayerNorm(param_dtype=cfg.param_dtype)
        self.q_ln = LayerNorm(gain=False, bias=False)
        self.k_ln = LayerNorm(gain=False, bias=False)
        self.q_proj = nn.Dense(h * k_dim, kernel_init=cfg.w_init, **dense)
        self.kvg_proj = nn.Dense(
            h * (k_dim + 2 * v_dim), kernel_init=cfg.w_init, **dense
        )
        self.r_proj = nn.Dense(h * k_dim, kernel_init=cfg.w_init, **dense)
        self.res_proj = nn.Dense(cfg.d_model, kernel_init=cfg.r_init, **dense)
        self.xl_u = self.param("u", cfg.b_init, [h * k_dim], cfg.param_dtype)
        self.xl_v = self.param("v", cfg.b_init, [h * k_dim], cfg.param_dtype)
        if cfg.attention == "vq":
            self.quantizer = LearnableVQ(cfg)
        train = cfg.is_train
        self.dropsin = nn.Dropout(
            cfg.p_dropsin, deterministic=not train, rng_collection="timeless"
        )
        self.dropres = nn.Dropout(
            cfg.p_dropres, deterministic=not train, rng_collection="ephemeral"
        )

    def heads(self, x, batch_size, width):
        """[B P, H * width] -> [B, H, P, width]."""
        x = x.reshape(batch_size, -1, self.config.n_head, width)
        return jnp.transpose(x, (0, 2, 1, 3))

    def relative_keys(self):
        """[H, M + 1, K] projected sinusoids of the distances 0..M, times d_k^(-1/4)."""
        cfg = self.config
        sins = sinusoids(cfg.mem_len + 1, cfg.d_model, cfg.pe_lam)
        r = self.r_proj(self.dropsin(sins.astype(cfg.dtype)))
        r = r.reshape(cfg.mem_len + 1, cfg.n_head, cfg.d_k).transpose(1, 0, 2)
        return r.astype(cfg.param_dtype) * cfg.d_k**-0.25

    def __call__(self, x, state, vq_spec: VQSpec):
        """x [B, P, D] -> (state, dict(res [B, P, D], l_commit, l_codebook, metrics)).

        vq_spec: the quantizer's spec for this call, loss_mask [B, P] (see
        `tvq.Transformer`).
        """
        cfg = self.config
        h, k_dim, v_dim = cfg.n_head, cfg.d_k, cfg.d_v
        hp = cfg.param_dtype  # softmax, norms and the state run in this dtype
        low = cfg.dtype if is_low(cfg.dtype) else None  # attention products
        scale = k_dim**-0.25
        b, p, d = x.shape
        # Projections of rows [B P, D]: a plain matmul, forward and backward.
        x_tilde = self.input_ln(x).reshape(b * p, d)
        k, v, g = jnp.split(
            self.kvg_proj(x_tilde), [h * k_dim, h * (k_dim + v_dim)], -1
        )
        q = self.q_ln(self.heads(self.q_proj(x_tilde), b, k_dim)).astype(hp) * scale
        k = self.k_ln(self.heads(k, b, k_dim)).astype(hp) * scale
        v = self.heads(jax.nn.silu(v), b, v_dim).astype(hp)
        u = self.xl_u.reshape(1, h, 1, k_dim).astype(hp) * scale
        vb = self.xl_v.reshape(1, h, 1, k_dim).astype(hp) * scale
        r = self.relative_keys()
        if cfg.attention == "vq":
            vq = self.quantizer(k, vq_spec)
            out, state = blockwise_attention(
                q + u,
                vq["quantized"],
                vq["shortcodes"],
                v,
                self.quantizer.get_codebook(),
                state,
                block_len=cfg.block_len,
                agg_cache=cfg.agg_cache,
                grad_thru_cache=cfg.grad_thru_cache,
                q_pos=q + vb,
                r=r,
                dtype=low,
            )
            aux = dict(
                l_commit=vq["l_commit"],
                l_codebook=vq["l_codebook"],
                metrics=vq["metrics"],
            )
        else:
            exact = dict(mem_len=cfg.mem_len, q_pos=q + vb, r=r, dtype=low)
            if cfg.attention == "dense":
                out, state = dense_attention(
                    q + u, k, v, state, block_len=cfg.block_len, **exact
                )
            else:
                out, state = dense_full_attention(q + u, k, v, state, **exact)
            zero = jnp.zeros([], jnp.promote_types(cfg.dtype, jnp.float32))
            aux = dict(l_commit=zero, l_codebook=zero, metrics={})
        if not cfg.grad_thru_cache:
            state = jax.tree.map(jax.lax.stop_gradient, state)
        wv = jnp.transpose(out, (0, 2, 1, 3)).reshape(b * p, h * v_dim)
        res = self.res_proj(wv.astype(g.dtype) * jax.nn.silu(g))
        return state, dict(res=self.dropres(res.reshape(b, p, d)), **aux)
