"""Bad input raises ValueError naming the expected and the actual shape.

Every case runs eagerly and under jax.jit: the checks use static shapes, so they
fire at trace time too.
"""

from __future__ import annotations

import re

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_config, make_spec

from tvq import (
    LearnableVQ,
    TransformerConfig,
    VQSpec,
    codebook_from_stats,
    get_codewords,
    get_shortcodes,
)

B, H, L, S, K = 2, 3, 4, 5, 6
MODES = ["eager", "jit"]


def run(mode: str, fn, *args):
    return jax.jit(fn)(*args) if mode == "jit" else fn(*args)


def shape_error(name: str, wanted: str, got) -> str:
    """Regex: the message names `name`, the wanted axes and the actual shape."""
    return (
        re.escape(f"{name} must have shape [{wanted}]")
        + ".*"
        + re.escape(f"got shape {list(got)}")
    )


def zeros(*shape, dtype=jnp.float64):
    return jnp.zeros(shape, dtype=dtype)


def codes(*shape):
    return jnp.zeros(shape, dtype=jnp.int32)


# get_shortcodes(vecs [B, H, L, K], codebook [H, S, K])
SHORTCODES_CASES = {
    "vecs_rank3": ((B, H, L), (H, S, K), "vecs", "B, H, L, K", (B, H, L)),
    "vecs_rank5": ((1, B, H, L, K), (H, S, K), "vecs", "B, H, L, K", (1, B, H, L, K)),
    "codebook_rank2": ((B, H, L, K), (S, K), "codebook", "H=3, S, K=6", (S, K)),
    "codebook_wrong_H": ((B, H, L, K), (2, S, K), "codebook", "H=3, S, K=6", (2, S, K)),
    "codebook_wrong_K": ((B, H, L, K), (H, S, 7), "codebook", "H=3, S, K=6", (H, S, 7)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SHORTCODES_CASES, ids=str)
def test_get_shortcodes_bad_shapes(case, mode):
    vecs_shape, codebook_shape, name, wanted, got = SHORTCODES_CASES[case]
    with pytest.raises(ValueError, match=shape_error(name, wanted, got)):
        run(mode, get_shortcodes, zeros(*vecs_shape), zeros(*codebook_shape))


# get_codewords(shortcodes [B, H, L], codebook [H, S, K])
CODEWORDS_CASES = {
    "shortcodes_rank2": ((H, L), (H, S, K), "shortcodes", "B, H, L", (H, L)),
    "shortcodes_rank4": (
        (B, H, L, 1),
        (H, S, K),
        "shortcodes",
        "B, H, L",
        (B, H, L, 1),
    ),
    "codebook_rank4": ((B, H, L), (1, H, S, K), "codebook", "H=3, S, K", (1, H, S, K)),
    "codebook_wrong_H": ((B, H, L), (4, S, K), "codebook", "H=3, S, K", (4, S, K)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CODEWORDS_CASES, ids=str)
def test_get_codewords_bad_shapes(case, mode):
    codes_shape, codebook_shape, name, wanted, got = CODEWORDS_CASES[case]
    with pytest.raises(ValueError, match=shape_error(name, wanted, got)):
        run(mode, get_codewords, codes(*codes_shape), zeros(*codebook_shape))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bool_])
def test_get_codewords_non_integer_shortcodes(dtype, mode):
    shortcodes = jnp.zeros([B, H, L], dtype=dtype)
    match = re.escape(f"shortcodes must have an integer dtype, got {jnp.dtype(dtype)}")
    with pytest.raises(ValueError, match=match):
        run(mode, get_codewords, shortcodes, zeros(H, S, K))


# codebook_from_stats(c_sum [H, S, K], c_count [H, S])
STATS_CASES = {
    "c_sum_rank2": ((S, K), (H, S), "c_sum", "H, S, K", (S, K)),
    "c_count_wrong_H": ((H, S, K), (2, S), "c_count", "H=3, S=5", (2, S)),
    "c_count_wrong_S": ((H, S, K), (H, 4), "c_count", "H=3, S=5", (H, 4)),
    "c_count_rank3": ((H, S, K), (H, S, 1), "c_count", "H=3, S=5", (H, S, 1)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", STATS_CASES, ids=str)
def test_codebook_from_stats_bad_shapes(case, mode):
    sum_shape, count_shape, name, wanted, got = STATS_CASES[case]
    with pytest.raises(ValueError, match=shape_error(name, wanted, got)):
        run(mode, codebook_from_stats, zeros(*sum_shape), zeros(*count_shape))


# get_codebook_ema_targets / get_codebook_loss: one argument replaced at a time.
def good_ema_args() -> dict:
    return dict(
        vecs=zeros(B, H, L, K),
        shortcodes=codes(B, H, L),
        c_sum=zeros(H, S, K),
        c_count=zeros(H, S),
        spec=make_spec(B, L),
    )


def with_spec(**fields) -> VQSpec:
    return make_spec(B, L).replace(**fields)


EMA_CASES = {
    "vecs_rank3": ("vecs", zeros(B, H, L), "vecs", "B, H, L, K", (B, H, L)),
    "shortcodes_wrong_B": (
        "shortcodes",
        codes(1, H, L),
        "shortcodes",
        "B=2, H=3, L=4",
        (1, H, L),
    ),
    "shortcodes_wrong_H": (
        "shortcodes",
        codes(B, 2, L),
        "shortcodes",
        "B=2, H=3, L=4",
        (B, 2, L),
    ),
    "shortcodes_wrong_L": (
        "shortcodes",
        codes(B, H, 5),
        "shortcodes",
        "B=2, H=3, L=4",
        (B, H, 5),
    ),
    "shortcodes_rank4": (
        "shortcodes",
        codes(B, H, L, 1),
        "shortcodes",
        "B=2, H=3, L=4",
        (B, H, L, 1),
    ),
    "c_sum_wrong_H": ("c_sum", zeros(2, S, K), "c_sum", "H=3, S, K=6", (2, S, K)),
    "c_sum_wrong_K": ("c_sum", zeros(H, S, 7), "c_sum", "H=3, S, K=6", (H, S, 7)),
    "c_sum_rank2": ("c_sum", zeros(S, K), "c_sum", "H=3, S, K=6", (S, K)),
    "c_count_wrong_H": ("c_count", zeros(4, S), "c_count", "H=3, S=5", (4, S)),
    "c_count_wrong_S": ("c_count", zeros(H, 4), "c_count", "H=3, S=5", (H, 4)),
    "c_count_rank1": ("c_count", zeros(H * S), "c_count", "H=3, S=5", (H * S,)),
    "loss_mask_wrong_B": (
        "spec",
        with_spec(loss_mask=jnp.ones([3, L])),
        "vq_spec.loss_mask",
        "B=2, L=4",
        (3, L),
    ),
    "loss_mask_wrong_L": (
        "spec",
        with_spec(loss_mask=jnp.ones([B, 5])),
        "vq_spec.loss_mask",
        "B=2, L=4",
        (B, 5),
    ),
    "loss_mask_rank3": (
        "spec",
        with_spec(loss_mask=jnp.ones([B, L, 1])),
        "vq_spec.loss_mask",
        "B=2, L=4",
        (B, L, 1),
    ),
    "loss_mask_rank1": (
        "spec",
        with_spec(loss_mask=jnp.ones([L])),
        "vq_spec.loss_mask",
        "B=2, L=4",
        (L,),
    ),
}

SCALAR_CASES = {
    "n_device_shape2": ("n_device", jnp.array([8, 8])),
    "n_device_shape1x1": ("n_device", jnp.array([[8]])),
    "n_block_per_update_shape8": ("n_block_per_update", jnp.ones([8], jnp.int32)),
}

EMA_FUNCTIONS = {
    "ema_targets": LearnableVQ.get_codebook_ema_targets,
    "codebook_loss": LearnableVQ.get_codebook_loss,
}


def call_ema(fn, mode, args):
    def apply(vecs, shortcodes, c_sum, c_count, spec):
        return fn(vecs, shortcodes, c_sum, c_count, 0.99, spec)

    return run(mode, apply, *args.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", EMA_FUNCTIONS, ids=str)
@pytest.mark.parametrize("case", EMA_CASES, ids=str)
def test_ema_bad_shapes(case, fn, mode):
    arg, value, name, wanted, got = EMA_CASES[case]
    args = good_ema_args() | {arg: value}
    with pytest.raises(ValueError, match=shape_error(name, wanted, got)):
        call_ema(EMA_FUNCTIONS[fn], mode, args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", EMA_FUNCTIONS, ids=str)
@pytest.mark.parametrize("case", SCALAR_CASES, ids=str)
def test_ema_bad_spec_scalars(case, fn, mode):
    field, value = SCALAR_CASES[case]
    args = good_ema_args() | {"spec": with_spec(**{field: value})}
    match = re.escape(
        f"vq_spec.{field} must have shape [] or [1], got shape {list(value.shape)}"
    )
    with pytest.raises(ValueError, match=match):
        call_ema(EMA_FUNCTIONS[fn], mode, args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", EMA_FUNCTIONS, ids=str)
def test_ema_accepts_good_input(fn, mode):
    """The control case: the unmodified arguments raise nothing."""
    call_ema(EMA_FUNCTIONS[fn], mode, good_ema_args())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", EMA_FUNCTIONS, ids=str)
def test_ema_non_integer_shortcodes(fn, mode):
    args = good_ema_args() | {"shortcodes": jnp.full([B, H, L], 2.5, jnp.float64)}
    with pytest.raises(ValueError, match="shortcodes must have an integer dtype"):
        call_ema(EMA_FUNCTIONS[fn], mode, args)


# LearnableVQ.__call__ with config n_head=2, d_k=4.
CONFIG = make_config()
CH, CK, CL = CONFIG.n_head, CONFIG.d_k, 7
PARAMS = dict(
    c_sum=jnp.ones([CH, CONFIG.n_code, CK], jnp.float32),
    c_count=jnp.ones([CH, CONFIG.n_code], jnp.float32),
)


def apply_module(params, vecs, spec):
    return LearnableVQ(CONFIG).apply({"params": params}, vecs, spec)


MODULE_CASES = {
    "wrong_H": ((B, CH + 1, CL, CK), make_spec(B, CL), "vecs", "B, H=2, L, K=4"),
    "wrong_K": ((B, CH, CL, CK + 1), make_spec(B, CL), "vecs", "B, H=2, L, K=4"),
    "rank3": ((B, CL, CK), make_spec(B, CL), "vecs", "B, H=2, L, K=4"),
    "loss_mask_wrong_L": (
        (B, CH, CL, CK),
        make_spec(B, CL - 1),
        "vq_spec.loss_mask",
        "B=2, L=7",
    ),
    "loss_mask_wrong_B": (
        (B, CH, CL, CK),
        make_spec(B + 1, CL),
        "vq_spec.loss_mask",
        "B=2, L=7",
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", MODULE_CASES, ids=str)
def test_learnable_vq_bad_shapes(case, mode):
    vecs_shape, spec, name, wanted = MODULE_CASES[case]
    got = vecs_shape if name == "vecs" else spec.loss_mask.shape
    with pytest.raises(ValueError, match=shape_error(name, wanted, got)):
        run(mode, apply_module, PARAMS, zeros(*vecs_shape), spec)


@pytest.mark.parametrize("mode", MODES)
def test_learnable_vq_bad_n_device(mode):
    spec = make_spec(B, CL).replace(n_device=jnp.array([8, 8]))
    match = re.escape("vq_spec.n_device must have shape [] or [1], got shape [2]")
    with pytest.raises(ValueError, match=match):
        run(mode, apply_module, PARAMS, zeros(B, CH, CL, CK), spec)


@pytest.mark.parametrize("mode", MODES)
def test_learnable_vq_bad_param_shapes(mode):
    # Flax checks stored parameters against the module's declared shapes before
    # tvq sees them: its own error (not a ValueError) names both shapes.
    params = PARAMS | {"c_count": jnp.ones([CH, CONFIG.n_code + 1], jnp.float32)}
    match = re.escape("expected to generate shape (2, 8)") + ".*" + re.escape("(2, 9)")
    with pytest.raises(flax.errors.ScopeParamShapeError, match=match):
        run(mode, apply_module, params, zeros(B, CH, CL, CK), make_spec(B, CL))


def init_module(config):
    vecs = zeros(1, 2, 3, 4)
    return LearnableVQ(config).init(jax.random.key(0), vecs, make_spec(1, 3))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("field", ["n_code", "n_head", "d_k", "c_gamma"])
def test_config_missing_field(field, mode):
    kwargs = dict(n_head=2, n_code=8, d_k=4, c_gamma=0.99)
    del kwargs[field]
    config = TransformerConfig.create(**kwargs)
    with pytest.raises(ValueError, match=re.escape(f"needs config.{field}, got None")):
        run(mode, init_module, config)


def test_config_without_create_has_no_w_init():
    config = TransformerConfig(n_head=2, n_code=8, d_k=4, c_gamma=0.99)
    with pytest.raises(ValueError, match=re.escape("config.w_init")):
        init_module(config)


def test_config_without_create_is_accepted_once_w_init_is_set():
    w_init = jax.nn.initializers.normal(1.0)
    config = TransformerConfig(n_head=2, n_code=8, d_k=4, c_gamma=0.99, w_init=w_init)
    params = jax.jit(init_module, static_argnums=0)(config)["params"]
    assert params["c_sum"].shape == (2, 8, 4)
    np.testing.assert_array_equal(params["c_count"], np.ones([2, 8]))
