"""A tiny float64 Transformer-VQ for the glue tests (loss, dropout, rng, stops).

Not collected by pytest (no test_ prefix); the test modules import it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import tvq
from tvq.vq import LearnableVQ

TINY = dict(
    n_vocab=13, d_model=16, d_k=4, d_v=6, n_head=2, n_code=5, n_layer=2,
    block_len=4, mem_len=4, sequence_len=16, update_len=8, agg_cache=True,
    grad_thru_cache=True, pe_abs=True, pe_lam=10_000, c_beta=0.37, c_gamma=0.9,
    e_tie=True, e_preln=True, e_scale=1.0, p_dropemb=0.0, p_dropsin=0.0,
    p_dropres=0.0, p_droplyr=0.0, p_nucleus=0.9, is_train=True,
    dtype="float64", param_dtype="float64",
    grad_clip=None, optimizer="adamw", lr_max=1e-2, lr_schedule="cosine",
    wd_lam=0.0, n_warmup_step=2, n_max_step=10,
)  # fmt: skip


def tiny_config(**overrides) -> tvq.TransformerConfig:
    """The TINY config with fields replaced."""
    return tvq.TransformerConfig.create(**{**TINY, **overrides})


def init_params(config: tvq.TransformerConfig, seed: int = 0) -> dict:
    """Random parameters of `tvq.Transformer(config)` (the "params" collection)."""
    t = config.block_len
    tokens = jnp.zeros([1, t], jnp.int32)
    state = tvq.Transformer.initial_state(config, 1, t)
    spec = vq_spec(jnp.ones([1, t], jnp.int32))
    model = tvq.Transformer(config.replace(is_train=False))
    return model.init(jax.random.key(seed), tokens, state, spec)["params"]


def vq_spec(loss_mask) -> tvq.VQSpec:
    """One device, one block per update, the given [B, P] mask."""
    return tvq.VQSpec(jnp.array([1]), jnp.array([1]), jnp.asarray(loss_mask))


def random_tokens(seed: int, shape, n_vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, size=shape, dtype=np.int32)


def random_mask(seed: int, shape, keep: float = 0.7) -> np.ndarray:
    """[B, P] int32 0/1 mask with a fraction about `keep` of ones (never all)."""
    mask = np.random.default_rng(seed).uniform(size=shape) < keep
    mask.flat[0] = False  # at least one masked and one counted position
    mask.flat[-1] = True
    return mask.astype(np.int32)


def quantizer_inputs(config, params, tokens, mask):
    """Model outputs and, for every GAU, (the path of its quantizer, its keys
    [B, H, P, K], its codebook [H, S, K]); keys recorded with an interceptor."""
    paths = []

    def forward(params, tokens, mask):
        keys = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, LearnableVQ) and (
                context.method_name == "__call__"
            ):
                paths.append(context.module.path)
                keys.append(args[0])
            return next_fun(*args, **kwargs)

        state = tvq.Transformer.initial_state(config, *tokens.shape)
        with nn.intercept_methods(record):
            out = tvq.Transformer(config).apply(
                {"params": params}, tokens, state, vq_spec(mask)
            )
        return out, keys

    out, keys = jax.jit(forward)(params, tokens, mask)
    found = []
    for path, k in zip(paths, keys, strict=True):
        quantizer = params
        for name in path:
            quantizer = quantizer[name]
        c_sum = np.asarray(quantizer["c_sum"])
        c_count = np.asarray(quantizer["c_count"])
        found.append(
            (path, np.asarray(k), c_sum / np.maximum(c_count, 0.01)[..., None])
        )
    return out, found
