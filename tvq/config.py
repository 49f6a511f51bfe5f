"""Model configuration: the `TransformerConfig` of the reference implementation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

Initializer = Callable[..., jax.Array]


@struct.dataclass
class TransformerConfig:
    """Hyperparameters of a Transformer-VQ model.

    Field names follow the reference implementation so each one can be looked up
    in the paper's code. tvq's quantizer reads `param_dtype`, `dtype`, `d_k`,
    `n_head`, `n_code`, `c_gamma`, `is_train` and `w_init`; the other fields
    are carried for compatibility and default to None.

    Build instances with `TransformerConfig.create(**kwargs)`, which drops unknown
    keys, parses dtype names and 0/1 flags, and sets the initializers.
    """

    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    global_batch_size: int | None = None
    sequence_len: int | None = None
    update_len: int | None = None
    block_len: int | None = None
    mem_len: int | None = None
    grad_thru_cache: bool | None = None
    agg_cache: bool | None = None
    d_model: int | None = None
    d_k: int | None = None
    d_v: int | None = None
    d_ff: int | None = None
    n_head: int | None = None
    n_code: int | None = None
    n_layer: int | None = None
    n_vocab: int | None = None
    pe_abs: bool | None = None
    pe_lam: float | None = None
    p_dropemb: float | None = None
    p_dropsin: float | None = None
    p_dropres: float | None = None
    p_droplyr: float | None = None
    p_nucleus: float | None = None
    c_beta: float | None = None
    c_gamma: float | None = None
    e_tie: bool | None = None
    e_preln: bool | None = None
    e_scale: Any = None
    is_train: bool | None = None
    no_emb: bool = False
    e_init: Initializer | None = struct.field(pytree_node=False, default=None)
    w_init: Initializer | None = struct.field(pytree_node=False, default=None)
    r_init: Initializer | None = struct.field(pytree_node=False, default=None)
    b_init: Initializer | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, **kwargs: Any) -> TransformerConfig:
        """Build a config from keyword arguments, ignoring keys it does not know."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        initializers = {"e_init", "w_init", "r_init", "b_init"}
        kept = {k: v for k, v in kwargs.items() if k in fields and k not in initializers}
        for name, value in kept.items():
            if name in ("param_dtype", "dtype") and value is not None:
                kept[name] = jnp.dtype(value)
            elif fields[name].type in ("bool | None", "bool") and value in (0, 1):
                kept[name] = bool(value)
        return cls(
            **kept,
            e_init=jax.nn.initializers.normal(1.0),
            w_init=jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
            r_init=jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
            b_init=jax.nn.initializers.zeros,
        )
