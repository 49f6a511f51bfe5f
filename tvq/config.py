"""Model configuration: the `TransformerConfig` of the reference implementation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Initializer = Callable[..., jax.Array]

# One object per initializer, so configs built from equal arguments compare equal
# and hash alike (jit caches on them).
INITIALIZERS = dict(
    e_init=jax.nn.initializers.normal(1.0),
    w_init=jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
    r_init=jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
    b_init=jax.nn.initializers.zeros,
)


def static(default: Any) -> Any:
    """A field that is metadata of the pytree, not a leaf: never traced by jit."""
    return struct.field(pytree_node=False, default=default)


@struct.dataclass
class TransformerConfig:
    """Hyperparameters of a Transformer-VQ model.

    Field names follow the reference implementation so each one can be looked up
    in the paper's code (`attention` is tvq's own: "vq"; or the exact dense
    baseline, "dense" block by block or "dense_full" with the whole score
    matrix). Fields a module needs and finds None raise a ValueError naming
    them; the training fields (`grad_clip` .. `n_max_step`) are read by
    `tvq.train`. Every field is static pytree metadata, so a config passes
    through `jit` without being traced.

    Build instances with `TransformerConfig.create(**kwargs)`, which drops unknown
    keys, parses dtype names and 0/1 flags, and sets the initializers.
    """

    param_dtype: Any = static(jnp.float32)
    dtype: Any = static(jnp.float32)
    global_batch_size: int | None = static(None)
    sequence_len: int | None = static(None)
    update_len: int | None = static(None)
    block_len: int | None = static(None)
    mem_len: int | None = static(None)
    grad_thru_cache: bool | None = static(None)
    agg_cache: bool | None = static(None)
    d_model: int | None = static(None)
    d_k: int | None = static(None)
    d_v: int | None = static(None)
    d_ff: int | None = static(None)
    n_head: int | None = static(None)
    n_code: int | None = static(None)
    n_layer: int | None = static(None)
    n_vocab: int | None = static(None)
    pe_abs: bool | None = static(None)
    pe_lam: float | None = static(None)
    p_dropemb: float | None = static(None)
    p_dropsin: float | None = static(None)
    p_dropres: float | None = static(None)
    p_droplyr: float | None = static(None)
    p_nucleus: float | None = static(None)
    c_beta: float | None = static(None)
    c_gamma: float | None = static(None)
    e_tie: bool | None = static(None)
    e_preln: bool | None = static(None)
    e_scale: Any = static(None)
    is_train: bool | None = static(None)
    attention: str = static("vq")
    grad_clip: float | None = static(None)
    optimizer: str | None = static(None)
    lr_max: float | None = static(None)
    lr_schedule: str | None = static(None)
    wd_lam: float | None = static(None)
    n_warmup_step: int | None = static(None)
    n_max_step: int | None = static(None)
    no_emb: bool = static(False)
    e_init: Initializer | None = static(None)
    w_init: Initializer | None = static(None)
    r_init: Initializer | None = static(None)
    b_init: Initializer | None = static(None)

    @classmethod
    def create(cls, **kwargs: Any) -> TransformerConfig:
        """Build a config from keyword arguments, ignoring keys it does not know."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kept = {
            k: v for k, v in kwargs.items() if k in fields and k not in INITIALIZERS
        }
        for name, value in kept.items():
            if name in ("param_dtype", "dtype") and value is not None:
                kept[name] = jnp.dtype(value)
            elif fields[name].type in ("bool | None", "bool") and value in (0, 1):
                kept[name] = bool(value)
        return cls(**kept, **INITIALIZERS)
