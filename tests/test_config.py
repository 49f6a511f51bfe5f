"""TransformerConfig.create and VQSpec.create: keys, parsing, initializers, pytrees."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_config, make_spec, reference_config_kwargs

from tvq import TransformerConfig, VQSpec

INITIALIZERS = ("e_init", "w_init", "r_init", "b_init")


def fields_without_initializers(config: TransformerConfig) -> dict:
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in INITIALIZERS
    }


def test_config_accepts_all_reference_keys():
    kwargs = reference_config_kwargs()
    config = TransformerConfig.create(**kwargs)
    for name, value in kwargs.items():
        if name in ("param_dtype", "dtype"):
            assert getattr(config, name) == jnp.dtype(value)
        else:
            assert getattr(config, name) == value, name


def test_config_ignores_unknown_keys():
    config = make_config(widening=3, dtypes="bfloat16", not_a_field=object())
    assert not hasattr(config, "widening")
    assert not hasattr(config, "not_a_field")
    assert fields_without_initializers(config) == fields_without_initializers(
        make_config()
    )


def test_config_ignores_initializer_keys():
    def sentinel(*args, **kwargs):
        raise AssertionError("user initializer must not be used")

    config = make_config(w_init=sentinel, e_init=sentinel, b_init=sentinel)
    assert config.w_init is not sentinel
    assert config.e_init is not sentinel
    assert config.b_init is not sentinel


@pytest.mark.parametrize(
    "name, expected",
    [("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float64", jnp.float64)],
)
def test_config_parses_dtype_strings(name, expected):
    config = make_config(param_dtype=name, dtype=name)
    assert config.param_dtype == jnp.dtype(expected)
    assert config.dtype == jnp.dtype(expected)
    assert isinstance(config.dtype, np.dtype)


@pytest.mark.parametrize(
    "field", ["grad_thru_cache", "agg_cache", "pe_abs", "e_tie", "e_preln", "is_train"]
)
@pytest.mark.parametrize("value", [0, 1])
def test_config_int_flags_become_bools(field, value):
    config = make_config(**{field: value})
    assert type(getattr(config, field)) is bool
    assert getattr(config, field) is bool(value)


@pytest.mark.parametrize("value", [0, 1])
def test_config_no_emb_flag_becomes_bool(value):
    assert make_config(no_emb=value).no_emb is bool(value)


@pytest.mark.parametrize("field", ["n_head", "d_k", "n_layer", "global_batch_size"])
def test_config_int_fields_stay_ints(field):
    value = getattr(make_config(**{field: 1}), field)
    assert type(value) is int
    assert value == 1


def test_config_unset_fields_default_to_none():
    config = TransformerConfig.create(n_code=4)
    assert config.n_code == 4
    assert config.n_head is None
    assert config.c_gamma is None
    assert config.no_emb is False


@pytest.mark.parametrize("shape", [(256, 512), (4, 64, 128)])
def test_config_w_init_is_fan_in_variance_scaling_normal(shape):
    config = make_config()
    w = np.asarray(config.w_init(jax.random.key(0), shape, jnp.float64))
    assert w.shape == shape
    assert w.dtype == np.float64
    # fan_in = input axis (-2) times the receptive field (all leading axes).
    fan_in = math.prod(shape[:-1])
    std = 1.0 / math.sqrt(fan_in)
    assert abs(w.mean()) < 0.02 * std
    assert abs(w.std() / std - 1.0) < 0.02
    # A plain (untruncated) normal: 68.27% within 1 std, 4.55% beyond 2 std.
    z = np.abs(w / std)
    assert abs(np.mean(z < 1.0) - 0.6827) < 0.01
    assert abs(np.mean(z > 2.0) - 0.0455) < 0.005


def test_config_w_init_respects_param_dtype():
    config = make_config()
    w = config.w_init(jax.random.key(0), (3, 5), jnp.float32)
    assert w.dtype == jnp.float32


def test_config_other_initializers_are_set():
    config = make_config()
    key = jax.random.key(0)
    np.testing.assert_array_equal(config.b_init(key, (7,), jnp.float32), 0.0)
    e = np.asarray(config.e_init(key, (200, 200), jnp.float64))
    assert abs(e.std() - 1.0) < 0.02
    assert config.r_init is not None


def test_config_is_pytree():
    config = make_config()
    leaves, treedef = jax.tree_util.tree_flatten(config)
    # Every field is static metadata: no leaves, all of it in the treedef.
    assert leaves == []
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt == config
    mapped = jax.tree_util.tree_map(lambda x: x, config)
    assert mapped.w_init is config.w_init
    assert mapped == config


def test_config_replace():
    config = make_config()
    changed = config.replace(n_code=16, is_train=False)
    assert changed.n_code == 16
    assert changed.is_train is False
    assert config.n_code == 8


def affine(x, config):
    # Python arithmetic on fields: they must be concrete values, not tracers.
    assert isinstance(config.c_gamma, float)
    return x * config.c_gamma + config.n_code


@pytest.mark.parametrize(
    "jitted",
    [jax.jit(affine), jax.jit(affine, static_argnums=1)],
    ids=["pytree_argument", "static_argument"],
)
def test_config_passes_through_jit(jitted):
    config = make_config()
    hash(config)
    x = jnp.ones([2], jnp.float64)
    np.testing.assert_allclose(jitted(x, config), [8.99, 8.99])
    np.testing.assert_allclose(jitted(x, config.replace(c_gamma=0.5)), [8.5, 8.5])


def test_vq_spec_create_ignores_unknown_keys():
    spec = VQSpec.create(
        n_device=jnp.array([8]),
        n_block_per_update=jnp.array([2]),
        loss_mask=jnp.ones([3, 5]),
        block_id=1,
        batch_size=3,
    )
    assert not hasattr(spec, "block_id")
    assert spec.n_device.tolist() == [8]
    assert spec.n_block_per_update.tolist() == [2]
    assert spec.loss_mask.shape == (3, 5)


def test_vq_spec_is_pytree():
    spec = make_spec(batch=3, length=5, n_device=2, n_block_per_update=4)
    leaves = jax.tree_util.tree_leaves(spec)
    assert len(leaves) == 3
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, spec)
    assert isinstance(doubled, VQSpec)
    assert doubled.n_device.tolist() == [4]
    assert doubled.n_block_per_update.tolist() == [8]
    # A pytree argument of jit, not a static one.
    total = jax.jit(lambda s: s.n_device * s.n_block_per_update + s.loss_mask.sum())
    assert total(spec).tolist() == [2 * 4 + 15]
