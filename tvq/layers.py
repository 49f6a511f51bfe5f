"""The Transformer-VQ attention sublayer: a gated attention unit (GAU).

x~ = LayerNorm(x); q, k = norm(x~ W_q), norm(x~ W_k), each times d_k^(-1/4);
v = silu(x~ W_v); g = silu(x~ W_g); the sublayer adds ((attention) * g) W_o to
the residual stream. Keys are quantized by `LearnableVQ` (attention="vq") or
used as they are (attention="dense", the quadratic baseline).

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
    relative_scores,
    sinusoids,
)
from tvq.config import TransformerConfig
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
ATTENTIONS = ("vq", "dense")


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
    attention="dense": a key/value buffer of max_len positions (default
    config.sequence_len, or 0: no state carried between calls).
    """
    check_config(config)
    b, h = batch_size, config.n_head
    dtype = config.param_dtype
    if config.attention == "dense":
        n = max_len if max_len is not None else config.sequence_len or 0
        return dict(
            pos_offset=jnp.zeros([], jnp.int32),
            k=jnp.zeros([b, h, n, config.d_k], dtype),
            v=jnp.zeros([b, h, n, config.d_v], dtype),
        )
    return initial_attention_state(
        b, h, config.n_code, config.mem_len, config.d_k, config.d_v, dtype
    )


def dense_attention(q, k, v, state, *, mem_len, q_pos, r):
    """Exact causal attention of each query over every earlier position.

    Same scores as the VQ form, with raw keys: q.k everywhere plus the relative
    terms (q + v).r_d at distances d <= M. With a buffer in the state (size N),
    keys and values are written at pos_offset and the queries attend over the
    buffer (the KV cache of decoding; pos_offset + P must not exceed N);
    without one (N = 0), over this call alone.

    Args:
      q, k, q_pos: [B, H, P, K]; v: [B, H, P, V]; state: pos_offset, k
      [B, H, N, K], v [B, H, N, V]; r: [H, M + 1, K].

    Returns:
      ([B, H, P, V] output, new state).
    """
    present = q.shape[2]
    offset = state["pos_offset"]
    if state["k"].shape[2] == 0:
        keys, vals = k, v
        q_at, k_at = jnp.arange(present), jnp.arange(present)
        new_state = dict(state, pos_offset=offset + present)
    else:
        zero = jnp.zeros_like(offset)  # all indices of one dtype, also with x64
        start = (zero, zero, offset, zero)
        keys = jax.lax.dynamic_update_slice(
            state["k"], k.astype(state["k"].dtype), start
        )
        vals = jax.lax.dynamic_update_slice(
            state["v"], v.astype(state["v"].dtype), start
        )
        q_at, k_at = offset + jnp.arange(present), jnp.arange(keys.shape[2])
        new_state = dict(pos_offset=offset + present, k=keys, v=vals)
    # Relative terms in window columns: keys at positions offset - M .. offset
    # + P - 1; placed at their positions in the buffer when there is one.
    rel = relative_scores(q_pos, r)  # [B, H, P, M + P]
    if state["k"].shape[2] > 0:
        zero = jnp.zeros_like(offset)
        wide = jnp.zeros([*rel.shape[:3], mem_len + keys.shape[2]], rel.dtype)
        rel = jax.lax.dynamic_update_slice(wide, rel, (zero, zero, zero, offset))
    scores = jnp.einsum("bhpk,bhnk->bhpn", q, keys) + rel[..., mem_len:]
    causal = q_at[:, None] >= k_at[None, :]  # [P, N]
    scores = jnp.where(causal, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1) @ vals, new_state


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
        y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = y * jax.lax.rsqrt(self.eps + jnp.mean(jnp.square(y), -1, keepdims=True))
        if self.gain:
            y = y * self.param("g", nn.initializers.ones, [width], self.param_dtype)
        if self.bias:
            y = y + self.param("b", nn.initializers.zeros, [width], self.param_dtype)
        return y.astype(x.dtype)


class GAU(nn.Module):
    """One attention sublayer of Transformer-VQ (the reference's `VQAttention`)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        check_config(cfg)
        h, k_dim, v_dim = cfg.n_head, cfg.d_k, cfg.d_v
        dense = dict(use_bias=False, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
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

    def heads(self, x, width):
        """[B, P, H * width] -> [B, H, P, width]."""
        b, p, _ = x.shape
        return jnp.transpose(x.reshape(b, p, self.config.n_head, width), (0, 2, 1, 3))

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
        hp = cfg.param_dtype  # attention, softmax and the state run in this dtype
        scale = k_dim**-0.25
        x_tilde = self.input_ln(x)
        k, v, g = jnp.split(
            self.kvg_proj(x_tilde), [h * k_dim, h * (k_dim + v_dim)], -1
        )
        q = self.q_ln(self.heads(self.q_proj(x_tilde), k_dim)).astype(hp) * scale
        k = self.k_ln(self.heads(k, k_dim)).astype(hp) * scale
        v = self.heads(jax.nn.silu(v), v_dim).astype(hp)
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
            )
            aux = dict(
                l_commit=vq["l_commit"],
                l_codebook=vq["l_codebook"],
                metrics=vq["metrics"],
            )
        else:
            out, state = dense_attention(
                q + u, k, v, state, mem_len=cfg.mem_len, q_pos=q + vb, r=r
            )
            zero = jnp.zeros([], cfg.dtype)
            aux = dict(l_commit=zero, l_codebook=zero, metrics={})
        if not cfg.grad_thru_cache:
            state = jax.tree.map(jax.lax.stop_gradient, state)
        b, _, p, _ = out.shape
        wv = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, p, h * v_dim).astype(cfg.dtype)
        res = self.dropres(self.res_proj(wv * jax.nn.silu(g)))
        return state, dict(res=res, **aux)
