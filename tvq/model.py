"""The Transformer-VQ language model and its loss.

Tokens -> embeddings (+ optional absolute sinusoids) -> n_layer layers of two
GAUs each (no MLP) -> optional LayerNorm -> logits (tied or not) * e_scale ->
log-probabilities. Every GAU carries its own attention state between calls.

Axes: B batch, P length of the call, D model width, N vocabulary size.
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tvq.attention import check_block_len, check_state, sinusoids
from tvq.config import TransformerConfig
from tvq.layers import GAU, LayerNorm, check_config, gau_initial_state, require
from tvq.shapes import check_integer, check_shape
from tvq.vq import VQSpec

MODEL_FIELDS = (
    "n_vocab",
    "n_layer",
    "pe_abs",
    "p_dropemb",
    "p_droplyr",
    "e_tie",
    "e_preln",
    "e_scale",
    "e_init",
)


class TransformerLayer(nn.Module):
    """Two GAUs, each adding its residual (with optional LayerDrop)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.attn1 = GAU(cfg)
        self.attn2 = GAU(cfg)
        # LayerDrop: one draw per sequence, the same for every position.
        drop = dict(
            deterministic=not cfg.is_train,
            broadcast_dims=(1, 2),
            rng_collection="timeless",
        )
        self.droplyr1 = nn.Dropout(cfg.p_droplyr, **drop)
        self.droplyr2 = nn.Dropout(cfg.p_droplyr, **drop)

    def __call__(self, x, state, vq_spec):
        """x [B, P, D], state [two GAU states] -> (x, new state, aux)."""
        state1, out1 = self.attn1(x, state[0], vq_spec)
        x = x + self.droplyr1(out1.pop("res"))
        state2, out2 = self.attn2(x, state[1], vq_spec)
        x = x + self.droplyr2(out2.pop("res"))
        aux = dict(
            l_commit=out1["l_commit"] + out2["l_commit"],
            l_codebook=out1["l_codebook"] + out2["l_codebook"],
            metrics=jax.tree.map(
                lambda a, b: (a + b) / 2, out1["metrics"], out2["metrics"]
            ),
        )
        return x, [state1, state2], aux


class Transformer(nn.Module):
    """Transformer-VQ decoder (the reference's `Transformer`).

    `apply(variables, inputs, state, vq_spec)` with inputs [B, P] int tokens, P a
    multiple of block_len, returns a dict with logprobs [B, P, N], attn_state
    (same structure as state), l_commit and l_codebook (scalars summed over the
    GAUs) and metrics (scalars averaged over the GAUs). vq_spec (loss_mask
    [B, P]) is needed when config.is_train; it may be None otherwise. Dropout
    draws from the rng collections "ephemeral" and "timeless".
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        check_model_config(cfg)
        self.embs = self.param(
            "embs", cfg.e_init, [cfg.n_vocab, cfg.d_model], cfg.param_dtype
        )
        self.bias_out = self.param(
            "bias_out", cfg.b_init, [cfg.n_vocab], cfg.param_dtype
        )
        if cfg.pe_abs:
            self.pe_scale = self.param("pe_scale", cfg.b_init, [], cfg.param_dtype)
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.n_layer)]
        if cfg.e_preln:
            self.out_ln = LayerNorm(param_dtype=cfg.param_dtype)
        if not cfg.e_tie:
            self.out_proj = nn.Dense(
                cfg.n_vocab,
                kernel_init=cfg.w_init,
                bias_init=cfg.b_init,
                param_dtype=cfg.param_dtype,
                dtype=cfg.param_dtype,  # logits in full precision
            )
        self.dropemb = nn.Dropout(
            cfg.p_dropemb, deterministic=not cfg.is_train, rng_collection="ephemeral"
        )

    @staticmethod
    def initial_state(
        config: TransformerConfig, batch_size: int, max_len: int | None = None
    ) -> list:
        """State before the first token: per layer, a list of two GAU states.

        max_len sizes the key/value buffer of attention="dense" (see
        `tvq.layers.gau_initial_state`); the VQ state has a fixed size.
        """
        check_model_config(config)
        return [
            [gau_initial_state(config, batch_size, max_len) for _ in range(2)]
            for _ in range(config.n_layer)
        ]

    def __call__(self, inputs, state, vq_spec: VQSpec | None = None):
        cfg = self.config
        vq_spec = check_call(cfg, inputs, state, vq_spec)
        b, p = inputs.shape
        # The residual stream: in dtype, but float32 at least in mixed
        # precision (dtype="bfloat16"), where only the products are bf16.
        stream = jnp.promote_types(cfg.dtype, cfg.param_dtype)
        x = jnp.take(self.embs, inputs, axis=0).astype(stream)
        if cfg.pe_abs:
            offset = state[0][0]["pos_offset"]
            pe = sinusoids(p, cfg.d_model, cfg.pe_lam, start=offset)
            x = x + (self.pe_scale * pe).astype(stream)
        x = self.dropemb(x)
        new_state, aux = [], []
        for layer, layer_state in zip(self.layers, state, strict=True):
            x, layer_state, layer_aux = layer(x, layer_state, vq_spec)
            new_state.append(layer_state)
            aux.append(layer_aux)
        if cfg.e_preln:
            x = self.out_ln(x)
        # Logits in full precision, as rows [B P, D]: plain matmuls, and a
        # softmax over the last axis of a 2-d array (see `LayerNorm`).
        x = x.astype(cfg.param_dtype).reshape(b * p, -1)
        if cfg.e_tie:
            logits = x @ self.embs.T + self.bias_out
        else:
            logits = self.out_proj(x)
        logprobs = jax.nn.log_softmax(logits * cfg.e_scale, axis=-1)
        logprobs = logprobs.reshape(b, p, -1)
        return dict(
            logprobs=logprobs,
            attn_state=new_state,
            l_commit=sum(a["l_commit"] for a in aux),
            l_codebook=sum(a["l_codebook"] for a in aux),
            metrics=jax.tree.map(
                lambda *m: sum(m) / len(m), *[a["metrics"] for a in aux]
            ),
        )


def check_model_config(config: TransformerConfig) -> None:
    """ValueError naming the first field the model needs and the config lacks."""
    require(config, MODEL_FIELDS, "Transformer")
    check_config(config, "Transformer")


def check_call(config, inputs, state, vq_spec):
    """Validate one call's arguments; return the spec each GAU's quantizer gets.

    The reference quantizes block by block and averages the per-block losses,
    each block's statistics scaled by n_block_per_update. tvq quantizes the
    whole call at once, so it divides n_block_per_update by the number of
    blocks in the call: the same average, in one step.
    """
    dims = check_shape("inputs", inputs, "BP")
    check_integer("inputs", inputs)
    check_block_len(config.block_len, dims["P"], f"inputs shape {list(inputs.shape)}")
    expected = Transformer.initial_state(config, dims["B"], dense_len(state))
    check_state(state, expected)
    if vq_spec is None:
        if config.is_train and config.attention == "vq":
            raise ValueError(
                "vq_spec is needed when config.is_train is true: a VQSpec with "
                f"loss_mask [B={dims['B']}, P={dims['P']}], got None"
            )
        ones = jnp.ones([1], jnp.int32)
        vq_spec = VQSpec(ones, ones, jnp.ones([dims["B"], dims["P"]], jnp.int32))
    check_shape("vq_spec.loss_mask", vq_spec.loss_mask, "BP", dims)
    n_block = dims["P"] // config.block_len
    return VQSpec(
        n_device=vq_spec.n_device,
        n_block_per_update=vq_spec.n_block_per_update / n_block,
        loss_mask=vq_spec.loss_mask,
    )


def dense_len(state) -> int | None:
    """Buffer length of a dense-attention state, None for a VQ state."""
    try:
        return int(np.shape(state[0][0]["k"])[2])
    except (TypeError, KeyError, IndexError):
        return None


def loss_fn(outputs: dict, targets, loss_mask, config: TransformerConfig) -> dict:
    """Training loss terms of one call, as the reference's `ops/loss.py`.

    Args:
      outputs: what `Transformer.apply` returned.
      targets: [B, P] int next tokens; loss_mask: [B, P], 1 where counted.

    Returns:
      dict of scalars: l_lm, the masked cross-entropy averaged over all B P
      positions (the reference's "unscaled" form); l_lm_per_token, the same
      averaged over the counted positions only; l_commit; l_codebook; and
      loss = l_lm + c_beta * l_commit + l_codebook, the one to differentiate.
    """
    dims = check_shape("outputs['logprobs']", outputs["logprobs"], "BPN")
    check_shape("targets", targets, "BP", dims)
    check_integer("targets", targets)
    check_shape("loss_mask", loss_mask, "BP", dims)
    if not isinstance(config.c_beta, numbers.Real):
        raise ValueError(f"loss_fn needs config.c_beta, got {config.c_beta!r}")
    logprobs = outputs["logprobs"]
    nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(logprobs.dtype)
    l_lm = jnp.mean(mask * nll)
    l_commit, l_codebook = outputs["l_commit"], outputs["l_codebook"]
    return dict(
        loss=l_lm + config.c_beta * l_commit + l_codebook,
        l_lm=l_lm,
        l_lm_per_token=jnp.sum(mask * nll) / jnp.maximum(jnp.sum(mask), 1.0),
        l_commit=l_commit,
        l_codebook=l_codebook,
    )
